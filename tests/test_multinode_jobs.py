"""Training jobs across three hosts (network namespaces, tests/hosts.py): `ray job submit` to the head runs two
workers on two different hosts (DDP and DeepSpeed ZeRO-2) with the evaluator actor on the third; a lost worker
host, a partitioned host and a lost head; and an elastic run that shrinks to one worker and grows back with the
global batch unchanged.

The hosts share this machine's filesystem: the run directory and Ray's storage under the test's tmp_path are
"storage every host sees", as an NFS mount or a bucket is on real nodes (docs/distributed.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import hosts
import pytest
import yaml
from conftest import tiny_config

pytestmark = [pytest.mark.multinode, pytest.mark.slow]
ROOT = Path(__file__).parents[1]
STEPS = 40  # batch 16: 0.64 kimg
INTERVAL = 5  # steps between checkpoints (0.08 kimg)
# Ray's node health checks every second, a node dead after 5 missed (about 10 s); Ray Train's own poll of a
# worker gives up after 30 s instead of 10 min (docs/distributed.md, "Timeouts: what ends a hang").
HEALTH = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "5",
}
JOB_ENV = {"GLOO_SOCKET_IFNAME": "eth0", "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": "30"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The head (no CPU for training, as on KubeRay; the job API on its address) and worker hosts w1 and w2
    (2 CPUs each)."""
    reason = hosts.unavailable()
    if reason:
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("ray-home")
    cpus = {"head": 0, "w1": 2, "w2": 2}
    with hosts.ray_cluster(["head", "w1", "w2"], home, num_cpus=cpus, dashboard=True, env=HEALTH) as c:
        yield c


def job_config(tmp_path: Path, shards: Path, **sections) -> Path:
    """A tiny DCGAN job on 2 workers, one per host (SPREAD), checkpointing every ``INTERVAL`` steps."""
    merged = {
        "train": {"total_kimg": STEPS * 16 / 1000, "threads": 1},
        "checkpoint": {"every_kimg": INTERVAL * 16 / 1000, "keep_last": 3},
        "tracking": {"sample_every_kimg": 1.0},
        "distributed": {"strategy": "ddp"},
        "ray": {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "SPREAD", "max_failures": 3},
    }
    for name, values in sections.items():
        merged[name] = {**merged.get(name, {}), **values}
    cfg = tiny_config(shards, **merged)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(cluster, config: Path, run_dir: Path, submission_id: str) -> subprocess.Popen:
    return subprocess.Popen(
        cluster.submit_command(config, run_dir, JOB_ENV, submission_id),
        cwd=ROOT,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(job: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        out, _ = job.communicate()
        pytest.fail(f"the job did not end within {timeout:.0f} s:\n{out[-4000:]}")
    return out


def rows(run_dir: Path) -> list[dict]:
    """The training rows of metrics.jsonl (evaluator rows are logged at their own steps)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if "loss/D" in r]


def wait_for_step(run_dir: Path, step: int, job: subprocess.Popen, timeout: float = 300) -> None:
    """Until a checkpoint exists and training logged ``step``."""
    deadline = time.monotonic() + timeout
    while not (list((run_dir / "checkpoints").glob("ckpt-*")) and last_step(run_dir) >= step):
        if job.poll() is not None:
            pytest.fail(f"the job ended before step {step}:\n{job.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.5)


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in rows(run_dir)), default=0)


def resumed_at(out: str) -> list[int]:
    """The steps at which rank 0 "resumed from CKPT at step N", in the job's log (each line once: Ray's log
    can repeat a worker's line)."""
    return sorted({int(n) for n in re.findall(r"resumed from \S+ at step (\d+)", out)})


PLACEMENT = """
from ray.util.state import list_actors, list_jobs

def main():
    job = next(j.job_id for j in list_jobs() if j.submission_id == "{sid}")
    ips = {{n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}}
    actors = list_actors(filters=[("job_id", "=", job)], detail=True, limit=10000)
    return [{{"class": a.class_name, "ip": ips.get(a.node_id)}} for a in actors]
"""


def placement(cluster, submission_id: str) -> dict[str, list[str]]:
    """From Ray's state API: the address of every actor the job made, by class (dead ones included)."""
    out: dict[str, list[str]] = {}
    for actor in hosts.driver(cluster, PLACEMENT.format(sid=submission_id)):
        out.setdefault(actor["class"], []).append(actor["ip"])
    return out


def test_ddp_job_trains_on_two_hosts_and_evaluates_on_the_third(cluster, digits16, tmp_path):
    from orchestrator.eval.extractors import train_feature_extractor

    extractor = tmp_path / "dataset-cnn.pt"
    train_feature_extractor(str(digits16 / "train-*.tar"), extractor, epochs=1)
    evaluation = {
        "enabled": True,
        "feature_extractor": "dataset-cnn",
        "weights_path": str(extractor),
        "num_samples": 64,
        "metrics": ["fid"],
        "every_kimg": 0.32,
        "cpus": 0,
        "cache_dir": str(tmp_path / "cache"),
        "resources": {"host_head": 1},  # its own host: training keeps the worker hosts
    }
    config, run_dir = job_config(tmp_path, digits16, eval=evaluation), tmp_path / "run"
    t0 = time.monotonic()
    out = finish(start(cluster, config, run_dir, f"gf-ddp-{os.getpid()}"), timeout=600)
    assert "succeeded" in out, out[-4000:]
    where = placement(cluster, f"gf-ddp-{os.getpid()}")
    w1, w2, head = (cluster.hosts[n].addr for n in ("w1", "w2", "head"))
    assert sorted(where["RayTrainWorker"]) == sorted([w1, w2])  # SPREAD: one per worker host
    assert where["EvaluatorActor"] == [head]
    assert [r["step"] for r in rows(run_dir)] == list(range(1, STEPS + 1))
    fids = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("eval/fid", 0) > 0 for r in fids)
    step_s = rows(run_dir)[-1]["time"] - rows(run_dir)[9]["time"]
    print(f"\ncross-host DDP job: {time.monotonic() - t0:.0f} s, {step_s / (STEPS - 10):.3f} s/step (steps 11-{STEPS})")


def test_zero2_job_trains_on_two_hosts(cluster, digits16, tmp_path):
    ds = {"strategy": "deepspeed", "deepspeed_config": str(ROOT / "configs/deepspeed/zero2.yaml")}
    config, run_dir = job_config(tmp_path, digits16, distributed=ds), tmp_path / "run"
    out = finish(start(cluster, config, run_dir, f"gf-zero2-{os.getpid()}"), timeout=600)
    assert "succeeded" in out, out[-4000:]
    where = placement(cluster, f"gf-zero2-{os.getpid()}")
    assert sorted(where["RayTrainWorker"]) == sorted(cluster.hosts[n].addr for n in ("w1", "w2"))
    last = run_dir / "checkpoints" / f"ckpt-{STEPS:09d}"
    assert (last / "COMPLETE.json").exists()
    for engine in ("deepspeed_G", "deepspeed_D"):  # each engine's ZeRO optimizer shards, one per rank
        assert len(list((last / engine).rglob("*optim_states.pt"))) == 2, engine


def test_a_lost_worker_host_costs_at_most_one_checkpoint_interval(cluster, digits16, tmp_path):
    """Every process of w2 killed mid-run (its raylet, its worker): Ray declares the node dead, Ray Train
    restarts the worker group on what is left (SPREAD is a preference: both workers on w1) from the newest
    checkpoint, and the job finishes."""
    config, run_dir = job_config(tmp_path, digits16), tmp_path / "run"
    job = start(cluster, config, run_dir, f"gf-hostkill-{os.getpid()}")
    try:
        wait_for_step(run_dir, INTERVAL + 3, job)
        hosts.kill_all(cluster.hosts["w2"].ns)
        t_lost, lost_at = time.monotonic(), last_step(run_dir)  # rank 0 cannot log a step w2 did not finish
        out = finish(job, timeout=600)
    finally:
        job.kill()
        cluster.rejoin("w2")
    assert "succeeded" in out, out[-4000:]
    workers = placement(cluster, f"gf-hostkill-{os.getpid()}")["RayTrainWorker"]
    assert workers.count(cluster.hosts["w2"].addr) == 1 and workers.count(cluster.hosts["w1"].addr) == 3, workers
    (resumed,) = resumed_at(out)
    assert lost_at - INTERVAL <= resumed <= lost_at, (lost_at, resumed)  # lost at most one interval
    assert rows(run_dir)[-1]["step"] == STEPS
    print(f"\nhost lost at step {lost_at}, resumed at {resumed}; the job ended {time.monotonic() - t_lost:.0f} s later")


def test_a_partitioned_host_ends_in_recovery_within_a_stated_time(cluster, digits16, tmp_path):
    """w2's link cut for 25 s (beyond Ray's 10 s node health check), then restored: Ray declares w2 dead, the
    group restarts on w1 from the newest checkpoint and the job succeeds, within 5 minutes of the cut. w2's
    raylet, told it was declared dead when the link returns, exits; it rejoins as a new node."""
    config, run_dir = job_config(tmp_path, digits16), tmp_path / "run"
    job = start(cluster, config, run_dir, f"gf-partition-{os.getpid()}")
    try:
        wait_for_step(run_dir, INTERVAL + 3, job)
        t_cut, cut_at = time.monotonic(), last_step(run_dir)
        hosts.set_link(cluster.hosts["w2"], up=False)
        time.sleep(25)
        hosts.set_link(cluster.hosts["w2"], up=True)
        out = finish(job, timeout=300 - (time.monotonic() - t_cut))
    finally:
        hosts.set_link(cluster.hosts["w2"], up=True)
        job.kill()
        cluster.rejoin("w2")
    assert "succeeded" in out, out[-4000:]
    (resumed,) = resumed_at(out)
    assert cut_at - INTERVAL <= resumed <= cut_at + 1, (cut_at, resumed)  # + 1: a step logged as the link went
    assert rows(run_dir)[-1]["step"] == STEPS
    print(f"\npartition: the job ended {time.monotonic() - t_cut:.0f} s after the cut")


def test_after_losing_the_head_a_resubmitted_job_continues_the_run(cluster, digits16, tmp_path):
    """Every process of the head killed (GCS, job API, the job's driver): the cluster is gone. A new cluster on
    the same hosts and the same `ray job submit` with the same --run-dir continue from the newest checkpoint on
    the shared storage."""
    config, run_dir = job_config(tmp_path, digits16), tmp_path / "run"
    job = start(cluster, config, run_dir, f"gf-headloss-{os.getpid()}")
    try:
        wait_for_step(run_dir, 2 * INTERVAL + 2, job)
        hosts.kill_all(cluster.head.ns)
        job.wait(timeout=60)  # the `ray job submit` client ran on the head: gone with it
    finally:
        job.kill()
        cluster.stop()  # the worker nodes lose their GCS; a new cluster replaces them all
        cluster.start()
    saved = max(int(c.name.removeprefix("ckpt-")) for c in (run_dir / "checkpoints").glob("ckpt-*"))
    out = finish(start(cluster, config, run_dir, f"gf-headloss2-{os.getpid()}"), timeout=600)
    assert "succeeded" in out, out[-4000:]
    assert resumed_at(out) == [saved], out[-3000:]
    assert rows(run_dir)[-1]["step"] == STEPS


def test_an_elastic_run_shrinks_to_one_worker_and_grows_back_with_the_same_global_batch(cluster, digits16, tmp_path):
    """ray.min_workers 1, num_workers 2, one worker per host (2 CPUs each): w2 lost, the run goes on with one
    worker (micro-batch 16 instead of 8); w2 back, it grows to two again, and a STOP file then ends it with a
    checkpoint (the run is long enough never to end first, however slow the machine). Every step consumes 16
    images."""
    ray = {"min_workers": 1, "cpus_per_worker": 2, "resize_interval_s": 2}
    config, run_dir = (
        job_config(tmp_path, digits16, ray=ray, train={"total_kimg": 5000 * 16 / 1000, "threads": 1}),
        tmp_path / "run",
    )

    def sizes() -> list[int]:
        seen = [r["dist/workers"] for r in rows(run_dir)]
        return [n for i, n in enumerate(seen) if i == 0 or n != seen[i - 1]]

    def wait_for_sizes(expected: list[int], what: str) -> None:
        deadline = time.monotonic() + 300
        while sizes()[: len(expected)] != expected:
            assert time.monotonic() < deadline and job.poll() is None, f"{what}: worker counts {sizes()}"
            time.sleep(0.5)

    job = start(cluster, config, run_dir, f"gf-elastic-{os.getpid()}")
    try:
        wait_for_step(run_dir, INTERVAL + 3, job)
        hosts.kill_all(cluster.hosts["w2"].ns)
        wait_for_sizes([2, 1], "the run did not go on with one worker")
        cluster.rejoin("w2")
        wait_for_sizes([2, 1, 2], "the run did not grow back to two workers")
        (run_dir / "STOP").write_text("test: grown back\n")
        out = finish(job, timeout=600)
    finally:
        job.kill()
        if len([n for n in hosts.ray_nodes(cluster.head, cluster.env) if n["alive"]]) < 3:
            cluster.rejoin("w2")
    assert "succeeded" in out, out[-4000:]
    assert sizes() == [2, 1, 2]
    seen = rows(run_dir)
    for r in seen:  # the split changes, the batch does not
        assert r["dist/micro_batch"] * r["dist/accumulation"] * r["dist/workers"] == 16, r
    steps_and_nimg = [(r["step"], round(r["kimg"] * 1000)) for r in seen]
    assert all(n == 16 * s for s, n in steps_and_nimg), steps_and_nimg  # 16 images per step at every size
