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


FORWARD_1024 = """
import resource, sys, time, torch
from orchestrator.config import load_config
from architectures import ImageSpec, get
torch.set_num_threads(int(sys.argv[1]))
cfg = load_config("configs/stylegan2/config-f-1024.yaml")
arch = get("stylegan2")
G = arch.build_generator(cfg.model, ImageSpec(1024, 3, 0)).eval()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
z = torch.randn(1, G.z_dim)
times = []
with torch.no_grad():
    for _ in range(3):
        t = time.perf_counter()
        img = G(z, None, noise_mode="const")
        times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{tuple(img.shape)} {min(times):.2f} {sorted(times)[1]:.2f} {base:.0f} {peak:.0f}")
"""


def stylegan2_1024_forward() -> None:
    """Time and peak memory of one config-F 1024×1024 G forward (batch 1, fp32, no grad) on CPU."""
    import subprocess

    print("\n| torch threads | output | best of 3 (s) | median (s) | RSS after building G (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for threads in (1, 2):
        out = subprocess.run([sys.executable, "-c", FORWARD_1024, str(threads)], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
        print(f"| {threads} | {out[0]}{out[1]}{out[2]}{out[3]} | {out[4]} | {out[5]} | {out[6]} | {out[7]} |")


BENCHMARKS = {"dev_loader_settings": dev_loader_settings, "stylegan2_1024_forward": stylegan2_1024_forward}


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
