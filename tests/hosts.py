"""Several hosts on one machine: network namespaces joined by a Linux bridge, and a Ray cluster across them.

Each host is a network namespace with its own private address (10.77.X.N/24, X picked so that no interface of
this machine uses that subnet) on a veth pair whose other end sits on a bridge in the root namespace. Processes
started with :func:`run_in` see only the host's loopback and its veth, so a Ray node started there can bind to
nothing but the host's address. Everything made here is named ``gf<pid>…`` and removed by :func:`remove_hosts`
and :func:`stop_ray`, which also work on half-built state (teardown after a failed start). Needs root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
RAY_PORT = 6390  # the GCS port inside the head's namespace (namespaces have their own ports; 6379 is avoided anyway)


@dataclass
class Host:
    """One namespace: ``ns`` is its name, ``addr`` its address on the bridge, ``veth`` the root-side link."""

    name: str
    ns: str
    addr: str
    veth: str
    temp: Path = field(default_factory=Path)  # Ray's --temp-dir for this host's node


@dataclass
class Hosts:
    """The hosts made by :func:`make_hosts`, the bridge joining them, and the subnet (a /24 prefix)."""

    prefix: str
    bridge: str
    hosts: dict[str, Host]

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``cmd`` (no shell) and capture its output; raise with the output when ``check`` and it fails."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def unavailable() -> str | None:
    """Why namespaces cannot be made here (a skip reason), or None when they can (tried with a throwaway one)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"gf{os.getpid()}probe"
    p = sh("ip", "netns", "add", probe, check=False)
    if p.returncode != 0:
        return f"`ip netns add` fails here: {p.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


def free_prefix() -> str:
    """A 10.77.X subnet (as "10.77.X") that no address or route of the root namespace uses."""
    used = sh("ip", "-4", "addr").stdout + sh("ip", "-4", "route").stdout
    start = os.getpid() % 200
    for i in range(250):
        prefix = f"10.77.{(start + i) % 250 + 1}"
        if f"{prefix}." not in used:
            return prefix
    raise RuntimeError("no free 10.77.X.0/24 subnet")


def make_hosts(names: list[str], tag: str | None = None) -> Hosts:
    """Namespaces ``gf<pid>-<name>`` with loopback up, host i at ``10.77.X.(i+1)/24`` on a shared bridge.

    On any failure what was made so far is removed before the error propagates."""
    tag = tag or f"gf{os.getpid()}"
    remove_stale()  # a killed earlier run's subnet and names would otherwise stay taken
    prefix = free_prefix()
    hosts = Hosts(prefix, f"{tag}br", {})
    try:
        sh("ip", "link", "add", hosts.bridge, "type", "bridge")
        sh("ip", "link", "set", hosts.bridge, "up")
        for i, name in enumerate(names):
            host = Host(name, f"{tag}-{name}", f"{prefix}.{i + 1}", f"{tag}v{i}")
            hosts.hosts[name] = host
            sh("ip", "netns", "add", host.ns)
            sh("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            sh("ip", "link", "set", host.veth, "master", hosts.bridge, "up")
            sh("ip", "-n", host.ns, "link", "set", "lo", "up")
            sh("ip", "-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            sh("ip", "-n", host.ns, "link", "set", "eth0", "up")
    except BaseException:
        remove_hosts(hosts)
        raise
    return hosts


def pids(ns: str) -> list[int]:
    """The processes in namespace ``ns`` (none when it does not exist)."""
    return [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]


def signal_all(ns: str, sig: int) -> None:
    """Send ``sig`` to every process in namespace ``ns``."""
    for pid in pids(ns):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_all(ns: str) -> None:
    """SIGKILL every process in namespace ``ns`` and wait (up to 10 s) until none is left: a lost host."""
    for _ in range(50):
        if not pids(ns):
            return
        signal_all(ns, signal.SIGKILL)
        time.sleep(0.2)
    raise RuntimeError(f"processes left in {ns}: {pids(ns)}")


def set_link(host: Host, up: bool) -> None:
    """Cut (``up=False``) or restore ``host``'s link to the bridge: a network partition of that one host."""
    sh("ip", "link", "set", host.veth, "up" if up else "down")


def remove_hosts(hosts: Hosts) -> None:
    """Kill what runs in the namespaces, delete them, their veths and the bridge; ignores what is already gone."""
    errors = []
    for host in hosts.hosts.values():
        try:
            kill_all(host.ns)
        except RuntimeError as e:
            errors.append(str(e))
        sh("ip", "link", "del", host.veth, check=False)  # deleting one end removes the pair
        sh("ip", "netns", "del", host.ns, check=False)
    sh("ip", "link", "del", hosts.bridge, check=False)
    if errors:
        raise RuntimeError("; ".join(errors))


def leftovers(tag: str) -> list[str]:
    """Namespaces and links whose names start with ``tag`` (empty after a clean teardown)."""
    netns = [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.startswith(tag)]
    links = [line.split()[0].split("@")[0] for line in sh("ip", "-br", "link").stdout.splitlines()]
    return netns + [link for link in links if link.startswith(tag)]


def remove_stale() -> list[str]:
    """Remove what an earlier test process left behind when it was killed before its teardown (SIGKILL, a CI
    timeout): the namespaces, links and bridges named ``gf<pid>…`` whose pid no longer runs, with every process
    inside. Returns the names removed."""

    def stale(name: str) -> bool:
        m = re.match(r"gf(\d+)", name)
        return bool(m) and not Path(f"/proc/{m.group(1)}").exists()

    netns = [n for n in (line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines()) if stale(n)]
    for ns in netns:
        kill_all(ns)
        sh("ip", "netns", "del", ns, check=False)
    links = [line.split()[0].split("@")[0] for line in sh("ip", "-br", "link").stdout.splitlines()]
    links = [n for n in links if stale(n)]
    for link in links:  # veths first went with their namespaces' ends; what is left: root-side veths, bridges
        sh("ip", "link", "del", link, check=False)
    return netns + links


def ray_env(home: Path) -> dict[str, str]:
    """The environment of Ray's CLI and drivers in the namespaces: this venv first, no usage stats."""
    return {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "WANDB_MODE": "disabled",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }


def run_in(host: Host, cmd: list[str], env: dict, timeout: float = 180, check: bool = True):
    """Run ``cmd`` inside ``host``'s namespace; raise with its output when ``check`` and it fails."""
    p = subprocess.run(["ip", "netns", "exec", host.ns, *cmd], env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{cmd} in {host.ns} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def ray_start(host: Host, env: dict, head: Host | None = None, num_cpus: int = 1, dashboard: bool = False) -> None:
    """``ray start`` in ``host``'s namespace on its own address, with a ``host_<name>`` resource: the head when
    ``head`` is None (with the dashboard and job API on its address, port 8265, when ``dashboard``), else a
    worker node joined to ``head``."""
    web = [f"--dashboard-host={host.addr}"] if dashboard else ["--include-dashboard=false"]
    where = ["--head", f"--port={RAY_PORT}", *web] if head is None else []
    join = [f"--address={head.addr}:{RAY_PORT}"] if head is not None else []
    cmd = [
        "ray", "start", *where, *join,
        f"--node-ip-address={host.addr}",
        f"--num-cpus={num_cpus}",
        f"--resources={json.dumps({f'host_{host.name}': 1})}",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
        f"--temp-dir={host.temp}",
    ]  # fmt: skip
    run_in(host, cmd, env)


def ray_stop(host: Host, grace_s: float = 5) -> None:
    """Stop the Ray node of ``host``: SIGTERM to every process in its namespace, SIGKILL to what is left after
    ``grace_s``, then remove its temp dir. Not ``ray stop``: that kills every Ray process of the machine (the
    namespaces share one PID space), other clusters included."""
    signal_all(host.ns, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids(host.ns) and time.monotonic() < deadline:
        time.sleep(0.2)
    kill_all(host.ns)
    shutil.rmtree(host.temp, ignore_errors=True)


NODES = """
import json, ray
ray.init(address="{addr}:{port}", log_to_driver=False)
print("NODES=" + json.dumps([
    {{"ip": n["NodeManagerAddress"], "alive": n["Alive"], "resources": n["Resources"]}} for n in ray.nodes()
]))
"""


def ray_nodes(head: Host, env: dict) -> list[dict]:
    """``ray.nodes()`` seen by a driver in the head's namespace: address, liveness and resources of each node."""
    p = run_in(head, [sys.executable, "-c", NODES.format(addr=head.addr, port=RAY_PORT)], env)
    line = next(x for x in p.stdout.splitlines() if x.startswith("NODES="))
    return json.loads(line.removeprefix("NODES="))


def wait_for_nodes(head: Host, env: dict, count: int, timeout: float = 120) -> list[dict]:
    """Poll :func:`ray_nodes` until ``count`` nodes are alive; their list."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [n for n in ray_nodes(head, env) if n["alive"]]
        if len(alive) >= count or time.monotonic() > deadline:
            return alive
        time.sleep(1)


@dataclass
class RayCluster:
    """A Ray cluster on :class:`Hosts`: the head's host, the environment of its CLI and drivers, and how long
    starting took (seconds, namespaces included)."""

    hosts: Hosts
    head: Host
    env: dict[str, str]
    start_s: float = 0.0
    num_cpus: dict[str, int] = field(default_factory=dict)
    dashboard: bool = False

    def start(self) -> None:
        """Start the head, then join every other host to it; wait until all nodes are alive."""
        for host in self.hosts.hosts.values():
            host.temp = Path(tempfile.mkdtemp(prefix=f"{host.ns}-"))  # short: Ray's socket paths fit in 107 bytes
        ray_start(self.head, self.env, num_cpus=self.num_cpus.get(self.head.name, 1), dashboard=self.dashboard)
        for host in self.hosts.hosts.values():
            if host is not self.head:
                ray_start(host, self.env, head=self.head, num_cpus=self.num_cpus.get(host.name, 1))
        alive = wait_for_nodes(self.head, self.env, len(self.hosts.hosts))
        if len(alive) != len(self.hosts.hosts):
            raise RuntimeError(f"{len(alive)} of {len(self.hosts.hosts)} Ray nodes came up: {alive}")

    def stop(self) -> None:
        """Stop every node, workers first and the head last (the namespaces stay)."""
        for host in reversed(list(self.hosts.hosts.values())):
            ray_stop(host)

    @property
    def address(self) -> str:
        return f"{self.head.addr}:{RAY_PORT}"

    @property
    def job_api(self) -> str:
        """The head's job API (``ray job submit --address``), when started with the dashboard."""
        return f"http://{self.head.addr}:8265"

    def submit_command(
        self,
        config: str | Path,
        run_dir: Path,
        env_vars: dict[str, str],
        submission_id: str | None = None,
        sets: tuple[str, ...] = (),
    ) -> list[str]:
        """The README's ``ray job submit`` of ``python -m launch.ray_job CONFIG --run-dir RUN_DIR [--set …]``, run
        in the head's namespace against its job API, the repository as working directory and ``env_vars`` in the
        job's runtime environment (``GLOO_SOCKET_IFNAME``: the hostname resolves to 127.0.0.1 here)."""
        ident = ["--submission-id", submission_id] if submission_id else []
        return [
            "ip", "netns", "exec", self.head.ns, "ray", "job", "submit", "--address", self.job_api, *ident,
            "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": env_vars}),
            "--", "python", "-m", "launch.ray_job", str(config), "--run-dir", str(run_dir),
            *[arg for s in sets for arg in ("--set", s)],
        ]  # fmt: skip

    def rejoin(self, name: str) -> None:
        """Start host ``name``'s Ray node again (after :func:`kill_all` or a partition) and wait until it is
        alive: a lost host that came back."""
        host = self.hosts[name]
        kill_all(host.ns)  # what is left of the old node (a raylet told it was dead exits; make sure)
        alive = len([n for n in ray_nodes(self.head, self.env) if n["alive"]])
        ray_start(host, self.env, head=self.head, num_cpus=self.num_cpus.get(name, 1))
        if len(wait_for_nodes(self.head, self.env, alive + 1)) < alive + 1:
            raise RuntimeError(f"{name} did not rejoin the cluster")


@contextmanager
def ray_cluster(
    names: list[str],
    home: Path,
    tag: str | None = None,
    num_cpus: dict[str, int] | None = None,
    dashboard: bool = False,
    env: dict[str, str] | None = None,
) -> Iterator[RayCluster]:
    """Hosts ``names`` (the first is the Ray head, the others worker nodes joined to it), each a Ray node on its
    own address with ``num_cpus[name]`` CPUs (default 1), a ``host_<name>`` resource, and ``env`` added to its
    environment; the head with the job API when ``dashboard``. Afterwards (also after a failed start) every
    node is stopped, the namespaces, links and temp dirs are removed, and nothing must be left."""
    t0 = time.monotonic()
    hosts = make_hosts(names, tag)
    tag = hosts.bridge.removesuffix("br")
    env = {**ray_env(home), **(env or {})}
    cluster = RayCluster(hosts, hosts[names[0]], env, num_cpus=num_cpus or {}, dashboard=dashboard)
    try:
        cluster.start()
        cluster.start_s = time.monotonic() - t0
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            remove_hosts(hosts)
        left = leftovers(tag)
        if left:
            raise RuntimeError(f"left behind after teardown: {left}")


RESULT = """
import json, ray
ray.init(address="{address}", log_to_driver=False)
{code}
print("RESULT=" + json.dumps(main()))
"""


def driver(cluster: RayCluster, code: str, timeout: float = 300):
    """Run ``code`` as a Ray driver in the head's namespace, connected to the cluster; ``code`` defines
    ``main()``, whose JSON-able result is returned."""
    script = RESULT.format(address=cluster.address, code=code)
    p = run_in(cluster.head, [sys.executable, "-c", script], cluster.env, timeout=timeout)
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT="))
    return json.loads(line.removeprefix("RESULT="))
