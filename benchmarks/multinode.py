"""Cross-host against single-host step time (issue 19): the same Ray job on the same three-host namespace
cluster (tests/hosts.py; needs root), once with its two workers on two hosts (``ray.placement_strategy:
STRICT_SPREAD``: gradients cross the veth links and the bridge) and once with both on one host
(``STRICT_PACK``: gloo over that host's loopback). Figures go to docs/benchmarks.md ("Across hosts").

    sudo python -m benchmarks.multinode                      # the demo config, 200 steps each way
    python -m benchmarks.multinode --steps 60 --set train.batch_size=32

The seconds per step are the median of the training rows' time differences in ``metrics.jsonl`` after the
first ``--warmup`` steps (one row per step: ``tracking.log_every=1``). Every host is a Ray node with 2 CPUs
(on this machine they share its cores, so the figure isolates the transport, not the hardware).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
CONFIG = "configs/dev/dcgan-digits.yaml"
SHARDS = "data/digits32"


def job(cluster, config: str, run_dir: Path, placement: str, steps: int, overrides: list[str]) -> float:
    """Run the job to ``steps`` with ``placement``; its wall time in seconds."""
    sets = [f"data.shards={ROOT / SHARDS}/train-*.tar", f"train.stop_at_step={steps}", "tracking.log_every=1",
            "tracking.progress_bar=false", "train.threads=1", "eval.enabled=false", "checkpoint.every_kimg=1000",
            "distributed.strategy=ddp", "ray.num_workers=2", "ray.cpus_per_worker=1",
            f"ray.placement_strategy={placement}", *overrides]  # fmt: skip
    cmd = cluster.submit_command(config, run_dir, {"GLOO_SOCKET_IFNAME": "eth0"}, sets=tuple(sets))
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0 or "succeeded" not in p.stdout + p.stderr:
        raise RuntimeError(f"{placement} job failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return time.monotonic() - t0


def step_seconds(run_dir: Path, warmup: int) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if "loss/D" in r][warmup:]
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multinode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    a = p.parse_args(argv)
    import hosts

    reason = hosts.unavailable()
    if reason:
        print(f"benchmarks.multinode: {reason}", file=sys.stderr)
        return 2
    if not (ROOT / SHARDS / "manifest.json").exists():
        from orchestrator.data.write import write_shards

        write_shards("builtin:digits", ROOT / SHARDS, resolution=32, shard_size=256)
    work = Path(tempfile.mkdtemp(prefix="gf-bench-multinode-"))
    cpus = {"head": 0, "w1": 2, "w2": 2}
    out = {"date": time.strftime("%Y-%m-%d"), "config": a.config, "steps": a.steps, "overrides": a.set}
    with hosts.ray_cluster(["head", "w1", "w2"], work / "home", num_cpus=cpus, dashboard=True) as cluster:
        for placement, name in (("STRICT_SPREAD", "two hosts"), ("STRICT_PACK", "one host")):
            wall = job(cluster, a.config, work / placement, placement, a.steps, a.set)
            out[name] = {"s_per_step": step_seconds(work / placement, a.warmup), "job_wall_s": wall}
            print(f"{name:9s}: {out[name]['s_per_step']:.4f} s/step (median after {a.warmup}), job {wall:.0f} s",
                  flush=True)  # fmt: skip
    out["ratio"] = out["two hosts"]["s_per_step"] / out["one host"]["s_per_step"]
    out["cpu"] = (
        subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("Model name:")[1].split("\n")[0].strip()
    )
    print(json.dumps(out, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
