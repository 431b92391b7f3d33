"""Benchmarks, run by hand or `make bench`; figures go to docs/benchmarks.md with date and command.

    python -m benchmarks.run [NAME ...]      # default: all

Each benchmark prints one table. Ratios are measured within one run (these machines are noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dev_loader_settings(steps: int = 150) -> None:
    """Training images/s of the DCGAN digits preset for DataLoader workers × torch threads."""
    from orchestrator.config import load_config
    from orchestrator.data import write_shards
    from orchestrator.train import train

    os.environ["WANDB_MODE"] = "disabled"
    with tempfile.TemporaryDirectory() as tmp:
        write_shards("builtin:digits", Path(tmp) / "d", resolution=32, shard_size=256)
        rows = []
        for workers, threads in ((0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)):
            cfg = load_config(ROOT / "configs/dev/dcgan-digits.yaml", [
                f"data.shards={tmp}/d/train-*.tar", f"data.workers={workers}", f"train.threads={threads}",
                f"train.stop_at_step={steps}", "tracking.progress_bar=false", "tracking.wandb.mode=disabled",
                f"tracking.log_every={steps // 3}", "checkpoint.every_kimg=1000", "tracking.sample_every_kimg=1000"])
            run_dir = Path(tmp) / f"w{workers}t{threads}"
            train(cfg, run_dir)
            rows.append((workers, threads, json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])))
        print("\n| loader workers | torch threads | img/s (steady, last third) | data wait |")
        print("|---|---|---|---|")
        for w, t, r in rows:
            print(f"| {w} | {t} | {r['perf/img_per_s']:.0f} | {r['perf/data_wait']:.1%} |")


BENCHMARKS = {"dev_loader_settings": dev_loader_settings}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", choices=[[], *BENCHMARKS], help="benchmarks to run (default: all)")
    args = p.parse_args()
    for name in args.names or BENCHMARKS:
        print(f"## {name} ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs)", flush=True)
        BENCHMARKS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
