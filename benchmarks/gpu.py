"""StyleGAN2 on one GPU: seconds per kimg and peak GPU memory of the official presets, through the real Run.

    bash benchmarks/gpu.sh                        # one CUDA GPU, under 8 minutes in all
    GF_GPU_BENCH_DRY=1 bash benchmarks/gpu.sh     # the same code on CPU at a tiny size (tests/test_gpu_bench.py)

Cases: ``configs/stylegan2/paper256.yaml`` (batch 64) and ``configs/stylegan2/config-f-1024.yaml`` (batch 32),
fp16 on the top 4 resolutions with conv_clamp 256 as the official presets, eager and with ``train.compile``.
Each case runs in its own process (``Run.build`` then ``Run.step`` in a loop) on synthetic shards written
here (smooth random colour fields: nothing is downloaded), under a time limit: a few warm-up steps, then up
to 16 timed steps (R1 every 16 D steps and path length every 4 G steps: 16 steps hold the long-run mix),
fewer when the case's time is up. The table goes to stdout and, when ``$OUT`` is set, to ``$OUT/gpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET = [
    "eval.enabled=false",
    "tracking.progress_bar=false",
    "tracking.wandb.mode=disabled",
    "tracking.log_every=1000000",
    "checkpoint.every_kimg=1000000",
    "tracking.sample_every_kimg=1000000",
]


@dataclass(frozen=True)
class Case:
    """One measured configuration: a preset, its resolution and batch, eager or compiled, its time limit (s)."""

    name: str
    config: str
    resolution: int
    batch: int
    compile: bool
    limit_s: float


@dataclass(frozen=True)
class Plan:
    """How long to measure: warm-up and timed steps, the cap on the timed steps' seconds, the whole budget."""

    warmup: int
    steps: int
    timed_cap_s: float
    total_s: float
    dry: bool


GPU_CASES = [
    Case("paper256", "configs/stylegan2/paper256.yaml", 256, 64, False, 75),
    Case("config-f-1024", "configs/stylegan2/config-f-1024.yaml", 1024, 32, False, 100),
    Case("paper256", "configs/stylegan2/paper256.yaml", 256, 64, True, 130),
    Case("config-f-1024", "configs/stylegan2/config-f-1024.yaml", 1024, 32, True, 200),
]
GPU_PLAN = Plan(warmup=2, steps=16, timed_cap_s=45, total_s=430, dry=False)
DRY_CASES = [Case("dev", "configs/stylegan2/dev.yaml", 16, 8, False, 300)]
DRY_PLAN = Plan(warmup=1, steps=1, timed_cap_s=60, total_s=400, dry=True)

REFERENCES = """\
Official figures (other GPUs, other per-GPU batches: compare with care):

| source | setup | GPUs × batch per GPU | s/kimg V100 | s/kimg A100 | GPU mem per GPU |
|---|---|---|---|---|---|
| stylegan2-ada-pytorch README, "Expected training time" | 256², `--cfg=auto` (cbase 16384, 2 mapping layers) | 1 × 16 | 21.6-24.2 | | 5.0 GB |
| stylegan2-ada-pytorch README, "Expected training time" | 1024², `--cfg=auto` (config F widths, 2 mapping layers) | 1 × 4 | 154.3-161.6 | | 8.1 GB |
| stylegan3 docs/configs.md, "Old StyleGAN2-ADA configurations" | 256², `--cfg=stylegan2 --batch=16 --cbase=16384 --map-depth=2` | 1 × 16 | 20.84 | 12.53 | 4.5 GB |
| stylegan3 docs/configs.md, "Old StyleGAN2-ADA configurations" | 1024², `--cfg=stylegan2 --batch=4 --map-depth=2` | 1 × 4 | 141.83 | 90.39 | 7.2 GB |
| stylegan3 docs/configs.md, "Repro configurations" | `paper256` (batch 64, as ours) | 8 × 8 | 4.01 | 2.47 | 2.7 GB |
| stylegan3 docs/configs.md, "Repro configurations" | `stylegan2` (config F 1024², batch 32, as ours) | 8 × 4 | 17.55 | 14.57 | 6.2 GB |

Sources: NVlabs/stylegan2-ada-pytorch `README.md` (commit 6074d86; V100, `--aug=ada --metrics=fid50k_full`,
"GPU mem" is the highest observed, excluding cudnn.benchmark's start-up peak); NVlabs/stylegan3 `docs/configs.md`
(commit 8fb5177; the stylegan3 README has no speed table and points there). 8-GPU rows are the wall time of 8 GPUs:
one GPU doing the same work takes up to 8× as long. Ours: one GPU holds the whole batch, so its memory is higher.
"""


# ---------------------------------------------------------------------------------------------------------
# Synthetic shards


def write_synthetic_shards(out: Path, resolution: int, count: int = 64, shard_size: int = 8) -> str:
    """``count`` smooth random RGB images at ``resolution`` as unlabelled shards in ``out``; their glob."""
    import numpy as np
    from PIL import Image

    from orchestrator.data.write import write_shards

    folder = out / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        cells = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), mode="RGB")
        cells.resize((resolution, resolution), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.png", compress_level=1)
    write_shards(str(folder), out, resolution=resolution, holdout=0.0, shard_size=shard_size)
    return str(out / "train-*.tar")


# ---------------------------------------------------------------------------------------------------------
# One case, in its own process


def case_overrides(case: Case, shards: str, dry: bool) -> list[str]:
    """The config overrides of one case: its shards and batch, compile, quiet tracking; GPU fp16 or CPU fp32."""
    common = [f"data.shards={shards}", f"train.batch_size={case.batch}", f"train.compile={str(case.compile).lower()}"]
    if dry:
        return QUIET + common + ["train.device=cpu", "train.precision=fp32", "data.workers=0"]
    return (
        QUIET + common + ["train.device=cuda", "train.precision=fp16", "model.num_fp16_res=4", "model.conv_clamp=256"]
    )


def measure(case: Case, shards: str, plan: Plan, deadline: float, run_dir: Path) -> dict:
    """Build the Run, step through the warm-up, then time up to ``plan.steps`` steps (stopping at the timed cap
    or ``deadline``, a ``time.time()``); seconds per kimg, img/s, data wait and peak memory."""
    import torch

    from orchestrator.config import load_config
    from orchestrator.train.run import Run

    cfg = load_config(ROOT / case.config, case_overrides(case, shards, plan.dry))
    t_build = time.perf_counter()
    run = Run.build(cfg, run_dir, None, None)
    cuda = run.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(plan.warmup):
        run.step()
    sync()
    t0 = time.perf_counter()
    nimg0, wait0, steps = run.progress.nimg, run.monitor.data_wait, 0
    stop = min(t0 + plan.timed_cap_s, t0 + deadline - time.time())
    while steps < plan.steps and (steps == 0 or time.perf_counter() < stop):
        run.step()
        steps += 1
    sync()
    seconds = time.perf_counter() - t0
    images = run.progress.nimg - nimg0
    run.tracker.close()
    return {
        "steps": steps,
        "sec_per_kimg": seconds / (images / 1000),
        "img_per_s": images / seconds,
        "data_wait": (run.monitor.data_wait - wait0) / seconds,
        "peak_gib": peak_memory_gib(run.device),
        "warm_s": t0 - t_build,
        "device": torch.cuda.get_device_name(run.device) if cuda else "cpu",
    }


def peak_memory_gib(device) -> float:
    """CUDA's allocator peak on a GPU (``torch.cuda.max_memory_allocated``), the resident-set peak on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child_main(spec: dict) -> int:
    """Entry of a case's process: measure, write the result as JSON to ``spec["result"]``."""
    case, plan = Case(**spec["case"]), Plan(**spec["plan"])
    result = measure(case, spec["shards"], plan, spec["deadline"], Path(spec["run_dir"]))
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------------------
# The driver


def run_case(case: Case, shards: str, plan: Plan, limit_s: float, tmp: Path) -> dict:
    """One case in its own process group, killed after ``limit_s``; its result, or ``{"status": why not}``."""
    tag = f"{case.name}-{'compiled' if case.compile else 'eager'}"
    result = tmp / f"{tag}.json"
    spec = {"case": asdict(case), "plan": asdict(plan), "shards": shards, "run_dir": str(tmp / tag),
            "result": str(result), "deadline": time.time() + limit_s - 5}  # fmt: skip
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu", "--child", json.dumps(spec)], cwd=ROOT,
                             start_new_session=True)  # fmt: skip
    try:
        code = child.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # its DataLoader workers too
        child.wait()
        return {"status": f"stopped after {limit_s:.0f} s: build + warm-up (compile) did not finish"}
    if code != 0 or not result.exists():
        return {"status": f"failed (exit code {code}; its error is above)"}
    return {"status": "ok", **json.loads(result.read_text())}


def table(rows: list[tuple[Case, dict]], plan: Plan) -> str:
    """The results as a markdown table, with the device and what was timed."""
    device = next((r["device"] for _, r in rows if "device" in r), "?")
    lines = [
        f"StyleGAN2 on {device}, per case: warm-up steps {plan.warmup}, then timed steps up to {plan.steps} "
        f"(at most {plan.timed_cap_s:.0f} s); {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        "| preset | batch | compile | timed steps | s/kimg | img/s | peak mem (GiB) | data wait | build + warm-up (s) "
        "| status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, r in rows:
        if r["status"] != "ok":
            lines.append(f"| {case.name} | {case.batch} | {case.compile} | | | | | | | {r['status']} |")
            continue
        lines.append(
            f"| {case.name} | {case.batch} | {case.compile} | {r['steps']} | {r['sec_per_kimg']:.1f} "
            f"| {r['img_per_s']:.1f} | {r['peak_gib']:.2f} | {r['data_wait']:.1%} | {r['warm_s']:.0f} | ok |"
        )
    memory = "torch.cuda.max_memory_allocated" if not plan.dry else "the resident-set peak (a CPU dry run)"
    return "\n".join(lines) + f"\n\nPeak memory: {memory}, over build, warm-up and timed steps.\n"


def main(argv: list[str] | None = None) -> int:
    """Write the shards, run every case within the total budget, print and save the table; exit code 1 when a
    case failed (a case stopped or skipped for time is a result, not a failure)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU, tiny preset, 1 step (also GF_GPU_BENCH_DRY=1)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    dry = args.dry or os.environ.get("GF_GPU_BENCH_DRY", "0") not in ("", "0")
    cases, plan = (DRY_CASES, DRY_PLAN) if dry else (GPU_CASES, GPU_PLAN)
    if not dry and not _cuda_visible():
        print("benchmarks/gpu.py: no CUDA GPU is visible; GF_GPU_BENCH_DRY=1 runs the CPU dry run", file=sys.stderr)
        return 2
    deadline = time.monotonic() + plan.total_s
    rows = []
    with tempfile.TemporaryDirectory(prefix="gf-gpu-bench-") as tmp:
        shards = _shards_for(cases, Path(tmp))
        for case in cases:
            left = deadline - time.monotonic()
            result = (
                run_case(case, shards[case.resolution], plan, min(case.limit_s, left), Path(tmp))
                if left > 30
                else {"status": "skipped: the 8-minute budget is spent"}
            )
            rows.append((case, result))
            print(f"{case.name} compile={case.compile}: {result}", flush=True)
    text = table(rows, plan) + "\n" + REFERENCES
    print("\n" + text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu.md").write_text(text)
    return 1 if any(r["status"].startswith("failed") for _, r in rows) else 0


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _shards_for(cases: list[Case], tmp: Path) -> dict[int, str]:
    """Synthetic shards at each case's resolution: resolution → glob."""
    return {res: write_synthetic_shards(tmp / f"r{res}", res) for res in sorted({c.resolution for c in cases})}


if __name__ == "__main__":
    sys.exit(main())
