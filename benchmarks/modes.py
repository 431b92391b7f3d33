"""Mode coverage on stacked digits (issue 18): the plain DCGAN against packing, minibatch discrimination and
unrolling, at equal kimg, over several seeds; figures go to docs/benchmarks.md ("Mode coverage").

    python -m benchmarks.modes                                   # every variant of VARIANTS, seeds 0 to 4
    python -m benchmarks.modes --variants dcgan --seeds 0 --kimg 20   # a smoke run
    python -m benchmarks.modes --variant lr4 optim.d.lr=0.0004   # another variant: a name and its overrides

Each run trains ``configs/dev/dcgan-stacked.yaml`` (16×16, unconditional, eval off) with the variant's overrides
(dotted ``key=value``, as ``ganforge train --set`` takes them) and ``train.seed``, then draws ``--samples``
images from G (the config keeps G_ema a copy of G), reads each channel's digit with a 16×16 digit
classifier (``data/stacked-digits/digit-cnn16.pt``, trained on the training split of ``builtin:digits``) and
reports the modes covered (of 1,000) and ``KL(p_gen ‖ p_data)``, ``p_data`` the modes' frequencies in the
training split of ``builtin:stacked-digits`` (orchestrator/eval/modes.py). The shards (read without labels:
``data.num_classes: 0``) and the classifier are made first when missing. Results: ``OUT/results.json`` and
``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/dev/dcgan-stacked.yaml"
STACKED = "data/stacked-digits"
DIGITS = "data/digits16"
CLASSIFIER = f"{STACKED}/digit-cnn16.pt"  # a grey single-digit classifier, trained on DIGITS' training split
CLASSIFIER_EPOCHS = 20  # 97.2% of the 180 held-out single digits (8 epochs: 96.1%)
VARIANTS = {  # name: config overrides; the keys of the stability options (docs/architectures.md)
    "dcgan": [],
    "pack2": ["loss.pack=2"],
    "mbdisc": ["model.mbdisc_kernels=50"],
    "unroll5": ["loss.unroll_steps=5"],
}


@dataclass
class Row:
    """One run: its variant, seed, result (None fields and ``error`` when it failed) and wall seconds;
    ``confident``: the fraction of samples whose three digits the classifier read with confidence."""

    variant: str
    seed: int
    modes: int | None
    reverse_kl: float | None
    train_s: float
    error: str | None = None
    confident: float | None = None


def ensure_data(root: Path = ROOT) -> None:
    """Write what the benchmark reads, where missing: the stacked-digit shards (16×16), the single-digit
    shards at 16×16 and the digit classifier."""
    from orchestrator.data.write import write_shards
    from orchestrator.eval.extractors import train_feature_extractor

    stacked, digits = root / STACKED, root / DIGITS
    if not (stacked / "manifest.json").exists():
        write_shards("builtin:stacked-digits", stacked, resolution=16, shard_size=2000)
    if not (digits / "manifest.json").exists():
        write_shards("builtin:digits", digits, resolution=16, shard_size=128)
    if not (root / CLASSIFIER).exists():
        result = train_feature_extractor(
            str(digits / "train-*.tar"),
            root / CLASSIFIER,
            CLASSIFIER_EPOCHS,
            holdout_shards=str(digits / "holdout-*.tar"),
        )
        print(f"digit classifier: held-out accuracy {result.holdout_accuracy:.1%} of {result.num_holdout}", flush=True)


def train_command(overrides: list[str], seed: int, kimg: float, run_dir: Path, threads: int) -> list[str]:
    """The ``ganforge train`` command of one run: the variant's overrides after the benchmark's own."""
    sets = [f"train.seed={seed}", f"train.total_kimg={kimg}", f"train.threads={threads}",
            f"checkpoint.every_kimg={kimg}", f"tracking.sample_every_kimg={kimg}", "eval.enabled=false",
            "tracking.progress_bar=false", "tracking.wandb.mode=disabled", *overrides]  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "ganforge"), "train", CONFIG, "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def sample_images(checkpoint: Path, n: int, seed: int = 123, batch: int = 1000):
    """``n`` uint8 images ``N×C×H×W`` from a checkpoint's sampling network (G_ema; here a copy of G), from
    ``torch.randn`` latents seeded with ``seed``."""
    import torch

    from orchestrator.checkpoint import load_generator

    G = load_generator(checkpoint).G
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, n, batch):
            z = torch.randn(min(batch, n - i), G.z_dim, generator=g)
            out.append(G(z).float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8))
    return torch.cat(out)


def last_checkpoint(run_dir: Path) -> Path:
    """The newest ``ckpt-*`` directory of a run."""
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt-*"))
    if not ckpts:
        raise FileNotFoundError(f"{run_dir}: no checkpoint")
    return ckpts[-1]


def run_one(variant: str, overrides: list[str], seed: int, args: argparse.Namespace, measure) -> Row:
    """Train one variant with one seed and measure its samples with ``measure(images) -> ModeCoverage``."""
    run_dir = Path(args.out) / f"{variant}-s{seed}"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    done = subprocess.run(
        train_command(overrides, seed, args.kimg, run_dir, args.threads),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    if done.returncode:
        error = ((done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"])[-1].strip()
        print(f"{variant} seed {seed}: FAILED ({error})", flush=True)
        return Row(variant, seed, None, None, seconds, error)
    cov = measure(sample_images(last_checkpoint(run_dir), args.samples))
    print(f"{variant} seed {seed}: {cov.modes} modes, reverse KL {cov.reverse_kl:.3f}, "
          f"{cov.confident:.1%} read with confidence, {seconds:.0f} s", flush=True)  # fmt: skip
    return Row(variant, seed, cov.modes, cov.reverse_kl, seconds, confident=cov.confident)


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(rows: list[Row]) -> list[dict]:
    """Per variant, in order of first appearance: mean ± sd over its successful seeds of modes, reverse KL, the
    fraction read with confidence and wall seconds, and how many seeds ran and failed."""
    out = []
    for variant in dict.fromkeys(r.variant for r in rows):
        ok = [r for r in rows if r.variant == variant and r.error is None]
        entry: dict = {
            "variant": variant,
            "seeds": len(ok),
            "failed": sum(r.variant == variant for r in rows) - len(ok),
        }
        for key in ("modes", "reverse_kl", "confident", "train_s"):
            values = [float(getattr(r, key)) for r in ok if getattr(r, key) is not None]
            entry[key] = mean_sd(values) if values else None
        out.append(entry)
    return out


def _pm(value: tuple[float, float | None] | None, digits: int) -> str:
    if value is None:
        return "–"
    mean, sd = value
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def markdown(rows: list[Row], summary: list[dict], reference: dict | None = None) -> str:
    """The per-run table and the per-variant table (mean ± sd over seeds) as markdown."""
    head = "| variant | seed | modes (of 1000) | reverse KL | read with confidence | train s |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.variant} | {r.seed} | failed: {r.error} | | | {r.train_s:.0f} |")
        else:
            conf = "–" if r.confident is None else f"{r.confident:.1%}"
            lines.append(f"| {r.variant} | {r.seed} | {r.modes} | {r.reverse_kl:.3f} | {conf} | {r.train_s:.0f} |")
    lines += [
        "",
        "| variant | seeds | modes | reverse KL | read with confidence | train s |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        failed = f" ({s['failed']} failed)" if s["failed"] else ""
        conf = (
            None if s["confident"] is None else (100 * s["confident"][0], s["confident"][1] and 100 * s["confident"][1])
        )
        lines.append(
            f"| {s['variant']} | {s['seeds']}{failed} | {_pm(s['modes'], 1)} | {_pm(s['reverse_kl'], 3)} "
            f"| {_pm(conf, 1)}{'' if conf is None else ' %'} | {_pm(s['train_s'], 0)} |"
        )
    if reference:
        conf = reference.get("confident")
        conf_text = "–" if conf is None else f"{conf:.1%}"
        lines.append(
            f"| real training images | – | {reference['modes']} | {reference['reverse_kl']:.3f} | {conf_text} | – |"
        )
    return "\n".join(lines)


def make_measure(root: Path = ROOT, samples: int = 10_000):
    """``measure(images) -> ModeCoverage`` with the digit classifier and the training split's mode histogram,
    and the reference figures of ``samples`` real training images read by the same classifier."""
    import torch

    from orchestrator.data.shards import expand_shards
    from orchestrator.eval import modes
    from orchestrator.eval.extractors import load_classifier, read_labelled_images, shards_spec

    torch.set_num_threads(1)
    net = load_classifier(root / CLASSIFIER)
    pattern = str(root / STACKED / "train-*.tar")
    data_counts = modes.shard_mode_counts(pattern)
    real, _ = read_labelled_images(expand_shards(pattern), shards_spec(pattern))
    real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:samples]]
    return (lambda images: modes.count_modes(net, images, data_counts)), modes.count_modes(net, real, data_counts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="another variant: a name and its overrides (repeatable)")  # fmt: skip
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="train.seed of each run (default 0 to 4)"
    )
    p.add_argument("--kimg", type=float, default=50.0, help="train.total_kimg of every run (default 50)")
    p.add_argument("--samples", type=int, default=10_000, help="images drawn from each G (default 10,000)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--out", default="runs/bench-modes", help="run directories and results (default runs/bench-modes)")
    return p.parse_args(argv)


def variants_of(args: argparse.Namespace) -> dict[str, list[str]]:
    """The variants to run: the chosen ones of ``VARIANTS``, then those given with ``--variant``."""
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)} (or use --variant)")
    chosen = {v: VARIANTS[v] for v in args.variants}
    chosen.update({name: list(overrides) for name, *overrides in args.variant})
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = variants_of(args)
    ensure_data()
    measure, reference = make_measure(samples=args.samples)
    print(f"real training images ({reference.samples}): {reference.modes} modes, reverse KL {reference.reverse_kl:.3f}, "
          f"{reference.confident:.1%} read with confidence")  # fmt: skip
    jobs = [(v, o, s) for v, o in variants.items() for s in args.seeds]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda job: run_one(*job, args, measure), jobs))
    summary = summarize(rows)
    table = markdown(rows, summary, asdict(reference))
    print(
        f"\n{table}\n\n{len(rows)} runs in {time.perf_counter() - t0:.0f} s ({args.jobs} at a time, {args.threads} thread(s) each)"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "variants": variants, "reference": asdict(reference),
              "rows": [asdict(r) for r in rows], "summary": summary}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
