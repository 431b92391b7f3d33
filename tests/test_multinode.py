"""Three hosts on one machine (network namespaces, tests/hosts.py): a Ray cluster whose nodes bind to their own
addresses, never loopback; tasks placed per host; a gloo rendezvous across two hosts; and a teardown that leaves
nothing behind."""

from __future__ import annotations

import ipaddress
import os
import sys

import hosts
import pytest

pytestmark = [pytest.mark.multinode, pytest.mark.slow]


def test_three_nodes_on_three_distinct_non_loopback_addresses(ray_hosts):
    nodes = hosts.ray_nodes(ray_hosts.head, ray_hosts.env)
    expected = {h.addr for h in ray_hosts.hosts.hosts.values()}
    assert [n["alive"] for n in nodes] == [True] * 3
    ips = [n["ip"] for n in nodes]
    assert sorted(ips) == sorted(expected) and len(set(ips)) == 3
    assert not any(ipaddress.ip_address(ip).is_loopback for ip in ips), ips  # no node binds to 127.0.0.1
    for node in nodes:  # each host's resource is on the node with that host's address
        (name,) = [k.removeprefix("host_") for k in node["resources"] if k.startswith("host_")]
        assert ray_hosts.hosts[name].addr == node["ip"]


PINNED = """
@ray.remote(num_cpus=0)
def where():
    import ray.util
    return ray.util.get_node_ip_address()

def main():
    names = {names!r}
    return dict(zip(names, ray.get([where.options(resources={{f"host_{{n}}": 1}}).remote() for n in names])))
"""


def test_a_task_pinned_to_each_host_runs_on_that_hosts_address(ray_hosts):
    names = list(ray_hosts.hosts.hosts)
    seen = hosts.driver(ray_hosts, PINNED.format(names=names))
    assert seen == {n: ray_hosts.hosts[n].addr for n in names}


GLOO = """
import os, socket

@ray.remote(num_cpus=1)
class Rank:
    def free_port(self):
        with socket.socket() as s:
            s.bind((ray.util.get_node_ip_address(), 0))
            return s.getsockname()[1]

    def all_reduce(self, rank, master, port):
        import torch, torch.distributed as dist
        from datetime import timedelta
        dist.init_process_group("gloo", init_method=f"tcp://{{master}}:{{port}}", rank=rank, world_size=2,
                                timeout=timedelta(seconds={timeout}))
        t = torch.tensor([1.0, 2.0]) * (10 ** rank)
        dist.all_reduce(t)
        dist.destroy_process_group()
        return {{"ip": ray.util.get_node_ip_address(), "sum": t.tolist()}}

def main():
    env = {{"env_vars": {env_vars!r}}}
    ranks = [Rank.options(resources={{f"host_{{n}}": 1}}, runtime_env=env).remote() for n in ("w1", "w2")]
    port = ray.get(ranks[0].free_port.remote())
    return ray.get([r.all_reduce.remote(i, "{master}", port) for i, r in enumerate(ranks)])
"""


def test_gloo_all_reduce_across_two_hosts(ray_hosts):
    """GLOO_SOCKET_IFNAME names the host's interface: gloo's own address is otherwise that of the hostname."""
    w1, w2 = ray_hosts.hosts["w1"], ray_hosts.hosts["w2"]
    code = GLOO.format(master=w1.addr, env_vars={"GLOO_SOCKET_IFNAME": "eth0"}, timeout=60)
    out = hosts.driver(ray_hosts, code)
    assert [r["ip"] for r in out] == [w1.addr, w2.addr]
    assert [r["sum"] for r in out] == [[11.0, 22.0], [11.0, 22.0]]


def test_without_gloo_socket_ifname_gloo_advertises_the_hostnames_loopback_address_and_fails(ray_hosts):
    """Here the hostname resolves to 127.0.0.1, so each rank offers its peer a loopback address: the reason the
    multi-host launch must set GLOO_SOCKET_IFNAME (or a hostname that resolves to the host's own address)."""
    if not hosts.sh("getent", "hosts", os.uname().nodename, check=False).stdout.startswith("127."):
        pytest.skip("the hostname does not resolve to a loopback address here")
    code = GLOO.format(master=ray_hosts.hosts["w1"].addr, env_vars={}, timeout=15)
    with pytest.raises(RuntimeError, match=r"remote=\[127\.0\.0\.1\]"):
        hosts.driver(ray_hosts, code)


SERVE = "import socket,sys; s=socket.create_server((sys.argv[1], 0)); print(s.getsockname()[1], flush=True); "
SERVE += "c, _ = s.accept(); c.sendall(b'hello from ' + sys.argv[1].encode())"
CONNECT = "import socket,sys; print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).recv(64))"


def test_helpers_make_two_hosts_that_talk_and_remove_them_without_a_trace():
    reason = hosts.unavailable()
    if reason:
        pytest.skip(reason)
    import subprocess

    tag = f"gf{os.getpid()}t"
    pair = hosts.make_hosts(["a", "b"], tag=tag)
    try:
        a, b = pair["a"], pair["b"]
        assert sorted(hosts.leftovers(tag)) == sorted([a.ns, b.ns, a.veth, b.veth, pair.bridge])
        server = subprocess.Popen(
            ["ip", "netns", "exec", a.ns, sys.executable, "-c", SERVE, a.addr], stdout=subprocess.PIPE, text=True
        )
        port = server.stdout.readline().strip()
        got = hosts.run_in(b, [sys.executable, "-c", CONNECT, a.addr, port], dict(os.environ), timeout=30)
        assert f"hello from {a.addr}" in got.stdout
        assert server.wait(timeout=10) == 0
        server.stdout.close()
        lo = hosts.run_in(a, ["ip", "-br", "addr"], dict(os.environ)).stdout
        assert "127.0.0.1" in lo and f"{a.addr}/24" in lo  # loopback up, own address on eth0
        hosts.set_link(a, up=False)  # a partition: b no longer reaches a
        cut = hosts.run_in(b, [sys.executable, "-c", CONNECT, a.addr, port], dict(os.environ), check=False)
        assert cut.returncode != 0 and "timed out" in cut.stderr
        hosts.set_link(a, up=True)
        subprocess.Popen(["ip", "netns", "exec", b.ns, "sleep", "600"])  # a process the teardown must kill
    finally:
        hosts.remove_hosts(pair)
    assert hosts.leftovers(tag) == []
    assert pair.bridge not in hosts.sh("ip", "link").stdout


def test_a_cluster_whose_test_fails_is_still_torn_down(tmp_path):
    reason = hosts.unavailable()
    if reason:
        pytest.skip(reason)
    import shutil
    import subprocess

    tag = f"gf{os.getpid()}f"
    shutil.copy("/bin/sleep", tmp_path / "raylet")  # a Ray process outside the namespaces: not ours to stop
    bystander = subprocess.Popen([str(tmp_path / "raylet"), "600"])
    with pytest.raises(ZeroDivisionError):
        with hosts.ray_cluster(["h", "x"], tmp_path, tag=tag) as cluster:
            temps = [h.temp for h in cluster.hosts.hosts.values()]
            assert all(t.is_dir() for t in temps)
            1 / 0  # noqa: B018 — the test body fails
    assert hosts.leftovers(tag) == []
    assert not any(t.exists() for t in temps)
    for temp in temps:  # no Ray process of either node survives (their command lines name the temp dir)
        assert hosts.sh("pgrep", "-f", str(temp), check=False).stdout == ""
    alive = bystander.poll() is None
    bystander.kill()
    bystander.wait()
    assert alive, "the teardown killed a Ray process of another cluster"


def test_without_root_the_reason_to_skip_says_so(monkeypatch):
    monkeypatch.setattr(hosts.os, "geteuid", lambda: 1000)
    assert hosts.unavailable() == "network namespaces need root"


EVALUATOR = """
import os
import time
from pathlib import Path
from architectures import ImageSpec, get
from launch.ray_worker import start_evaluator
from orchestrator.config import validate_config
from orchestrator.eval.service import EvalClient

@ray.remote(num_cpus=0, resources={{"host_w1": 1}})  # placed by its host alone
def rank0(actor, model):
    import torch
    client, spec = EvalClient(actor=actor), ImageSpec(16, 1, 10)
    client.submit(3, 96, get("dcgan").build_generator(model, spec), None)
    deadline = time.time() + 120
    while not (rows := client.poll(640)) and time.time() < deadline:
        time.sleep(0.2)
    return {{"ip": ray.util.get_node_ip_address(), "rows": rows}}

def main():
    cfg = validate_config(json.loads(Path("{cfg}").read_text()), "test")
    _, actor = start_evaluator(cfg, ImageSpec(16, 1, 10), Path("{run}"))
    out = ray.get(rank0.remote(actor, cfg.model))
    pid = ray.get(actor.isolation.remote())["pid"]
    netns = lambda p: os.readlink(f"/proc/{{p}}/ns/net")
    out["evaluator_in_drivers_netns"] = netns(pid) == netns("self")  # the driver runs on the head
    ray.kill(actor)
    return out
"""


def test_the_evaluator_actor_on_the_head_serves_rank_0_on_another_host(ray_hosts, digits16, tmp_path):
    """As a job places them: the evaluator actor on one host (here pinned to the head by ``eval.resources``),
    rank 0 on another submits G_ema to it and gets the metrics back across the link."""
    import json

    from conftest import tiny_config

    from orchestrator.eval.extractors import train_feature_extractor

    extractor = tmp_path / "dataset-cnn.pt"
    train_feature_extractor(str(digits16 / "train-*.tar"), extractor, epochs=1)
    cfg = tiny_config(
        digits16,
        eval={
            "enabled": True,
            "feature_extractor": "dataset-cnn",
            "weights_path": str(extractor),
            "num_samples": 64,
            "metrics": ["fid"],
            "cache_dir": str(tmp_path / "cache"),
            "resources": {"host_head": 1},
        },
    )
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = hosts.driver(ray_hosts, EVALUATOR.format(cfg=tmp_path / "cfg.json", run=tmp_path / "run"), timeout=180)
    assert out["ip"] == ray_hosts.hosts["w1"].addr
    assert out["evaluator_in_drivers_netns"]  # the actor ran on the head
    (row,) = out["rows"]
    assert row["eval/lag_kimg"] == pytest.approx(0.64 - 0.096)
    assert row.get("eval/fid", 0) > 0, row


def test_what_a_killed_test_process_left_behind_is_removed_by_the_next():
    """A pytest killed before its teardown leaves namespaces, veths and a bridge named after its pid; the next
    make_hosts removes them (and the processes inside) because that pid no longer runs."""
    reason = hosts.unavailable()
    if reason:
        pytest.skip(reason)
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that ran and is gone
    tag = f"gf{dead.pid}"
    left = hosts.make_hosts(["a"], tag=tag)  # what the killed process had made
    sleeper = subprocess.Popen(["ip", "netns", "exec", left["a"].ns, "sleep", "600"])
    assert sorted(hosts.leftovers(tag)) == sorted([left["a"].ns, left["a"].veth, left.bridge])
    mine = hosts.make_hosts(["b"], tag=f"gf{os.getpid()}s")  # the next run's hosts: made after a clean-up
    try:
        assert hosts.leftovers(tag) == []
        assert sleeper.wait(timeout=10) != 0  # killed with its namespace
        assert sorted(hosts.leftovers(f"gf{os.getpid()}s")) == sorted([mine["b"].ns, mine["b"].veth, mine.bridge])
        assert hosts.remove_stale() == []  # a live process's hosts are not stale
    finally:
        hosts.remove_hosts(mine)
        hosts.remove_hosts(left)
