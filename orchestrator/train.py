"""The one training loop. Dev mode calls :func:`train` in-process; every launcher runs the same function.

Read top to bottom: build the pieces from their own config sections, restore them from a checkpoint
if resuming, then step until ``train.total_kimg`` (or ``train.stop_at_step``): phases, EMA, logging,
sample grids and checkpoints on intervals of images seen. Everything that must survive a restart is
in :func:`training_state`, nothing only in loop-local variables.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

import architectures
from architectures.registry import StrictConfig
from orchestrator.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                                     load_into, save_checkpoint)
from orchestrator.data import ShardLoader, image_spec, load_manifest
from orchestrator.ema import ema_beta, make_ema, update_ema
from orchestrator.optim import make_adam
from orchestrator.phases import Nets, RegState, Sampler, has_mapping, train_step
from orchestrator.precision import PrecisionName, make_precision
from orchestrator.tracking import Tracker, peak_memory_mb

if TYPE_CHECKING:
    from orchestrator.config import JobConfig


class TrainConfig(StrictConfig):
    """Length, batch, seed, precision and device of a run."""

    batch_size: int = Field(64, ge=1, description="images per D step, all workers together")
    total_kimg: float = Field(100.0, gt=0, description="train until this many thousand real images were shown to D")
    stop_at_step: int | None = Field(None, ge=1, description="stop early after this step, with a checkpoint (resume continues)")
    seed: int = Field(0, description="seeds the networks' init, latents and data order")
    precision: PrecisionName = Field("fp32", description="fp32 | bf16 | fp16 (fp16 needs CUDA; fp32 is the CPU default)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")


@dataclass
class Progress:
    """Counters of a run (checkpointed)."""

    step: int = 0
    nimg: int = 0
    d_steps: int = 0


@dataclass
class TrainResult:
    """Where a finished (or stopped) run left its outputs."""

    run_dir: Path
    checkpoint: Path
    grid: Path
    config: Path
    wandb_dir: str | None
    step: int
    nimg: int


def resolve_device(name: str, precision: str) -> torch.device:
    from orchestrator.config import ConfigError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if precision == "fp16" and name != "cuda":
        raise ConfigError("train.precision: 'fp16' (with loss scaling) is a CUDA path; on CPU use 'fp32' "
                          "(fast here) or 'bf16'")
    return torch.device(name)


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to start from: None (fresh), 'auto' (newest complete one, if any) or a path."""
    if resume is None:
        if list_checkpoints(run_dir):
            raise CheckpointError(f"{run_dir} already holds checkpoints; pass --resume auto to continue that run "
                                  f"or choose another --run-dir")
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    return Path(resume)


def check_recipe(cfg: JobConfig, G) -> None:
    """Recipe settings the generator cannot honour are config errors, raised before training starts."""
    from orchestrator.config import ConfigError

    for key in ("pl_weight", "style_mixing_prob"):
        if getattr(cfg.loss, key) > 0 and not has_mapping(G):
            raise ConfigError(f"loss.{key}: {getattr(cfg.loss, key)} needs a generator with a mapping network "
                              f"(stylegan2); the {cfg.model.arch} generator has none: set it to 0")


def training_state(nets: Nets, G_ema, precision, progress: Progress, sampler: Sampler, loader: ShardLoader,
                   reg: RegState, run_id: str, config_yaml: str) -> dict:
    """Everything a resumed run needs to continue exactly."""
    rng = {"torch": torch.get_rng_state(), "sampler": sampler.rng.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"G": nets.G.state_dict(), "D": nets.D.state_dict(), "G_ema": G_ema.state_dict(),
            "opt_G": nets.opt_G.state_dict(), "opt_D": nets.opt_D.state_dict(),
            "scaler": precision.scaler.state_dict(), "progress": asdict(progress), "reg": reg.state_dict(), "rng": rng,
            "data": loader.state_dict(), "tracking": {"wandb_run_id": run_id}, "config": config_yaml}


def restore(state: dict, nets: Nets, G_ema, precision, progress: Progress, sampler: Sampler, loader: ShardLoader,
            reg: RegState) -> None:
    load_into(nets.G, state["G"], "G")
    load_into(nets.D, state["D"], "D")
    load_into(G_ema, state["G_ema"], "G_ema")
    nets.opt_G.load_state_dict(state["opt_G"])
    nets.opt_D.load_state_dict(state["opt_D"])
    if state["scaler"]:
        precision.scaler.load_state_dict(state["scaler"])
    reg.load_state_dict(state["reg"])
    for key, value in state["progress"].items():
        setattr(progress, key, value)
    torch.set_rng_state(state["rng"]["torch"])
    sampler.rng.set_state(state["rng"]["sampler"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    loader.load_state_dict(state["data"])


def grid_latents(G, num_classes: int, grid_size: int, device: torch.device):
    """Fixed latents for sample grids (same every time, so progress is visible); one row per class."""
    rows = num_classes if 0 < num_classes <= 32 else grid_size
    z = torch.randn(rows * grid_size, G.z_dim, generator=torch.Generator().manual_seed(0)).to(device)
    c = torch.arange(rows).repeat_interleave(grid_size).to(device) if num_classes else None
    return z, c, grid_size


@torch.no_grad()
def save_grid(G_ema, z, c, ncol: int, path: Path) -> Path:
    """Render G_ema on fixed latents to a PNG grid."""
    import torchvision  # imported here: it costs ~1.5 s of start-up (torch._dynamo)

    path.parent.mkdir(parents=True, exist_ok=True)
    img = torch.cat([G_ema(z[i:i + 256], None if c is None else c[i:i + 256]).float() for i in range(0, len(z), 256)])
    torchvision.utils.save_image(img.clamp(-1, 1), path, nrow=ncol, normalize=True, value_range=(-1, 1), padding=1)
    return path


def _crossed(before: int, after: int, every: float) -> bool:
    every = max(int(every * 1000), 1)
    return before // every != after // every


def train(cfg: JobConfig, run_dir: str | Path, resume: str | None = None) -> TrainResult:
    """Train (or continue training) the GAN described by ``cfg`` in ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device, cfg.train.precision)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    start_from = resolve_resume(run_dir, resume)

    torch.manual_seed(cfg.train.seed)
    spec = image_spec(cfg.data, load_manifest(cfg.data))
    arch = architectures.get(cfg.model.arch)
    G = arch.build_generator(cfg.model, spec).to(device)
    D = arch.build_discriminator(cfg.model, spec).to(device)
    G_ema = make_ema(G)
    precision = make_precision(cfg.train.precision, device)
    for net in (G, D, G_ema):
        precision.adopt(net)
    check_recipe(cfg, G)
    lazy_r1 = cfg.loss.r1_gamma > 0 and cfg.loss.r1_interval > 1
    lazy_pl = cfg.loss.pl_weight > 0 and cfg.loss.pl_interval > 1
    nets = Nets(G, D, make_adam(G.parameters(), cfg.optim.g, reg_interval=cfg.loss.pl_interval if lazy_pl else 1),
                make_adam(D.parameters(), cfg.optim.d, reg_interval=cfg.loss.r1_interval if lazy_r1 else 1))
    reg = RegState(pl_mean=torch.zeros([], device=device))
    sampler = Sampler(G.z_dim, spec.num_classes, device, torch.Generator(device).manual_seed(cfg.train.seed + 1))
    loader = ShardLoader(cfg.data, spec, cfg.train.batch_size, seed=cfg.train.seed)
    progress = Progress()
    config_yaml = cfg.to_yaml()
    (run_dir / "config.yaml").write_text(config_yaml)

    run_id = None
    if start_from is not None:
        saved = load_checkpoint(start_from, map_location=device)
        restore(saved, nets, G_ema, precision, progress, sampler, loader, reg)
        run_id = saved["tracking"]["wandb_run_id"]
        _warn_config_changes(saved["config"], cfg, start_from)
    total_img = int(cfg.train.total_kimg * 1000)
    tracker = Tracker(cfg.tracking, run_dir, cfg.model_dump(mode="json"), total_img, run_id, progress.nimg)
    if start_from is not None:
        tracker.note(f"resumed from {start_from} at step {progress.step}, {progress.nimg / 1000:.1f} kimg")
    grid_z, grid_c, grid_cols = grid_latents(G, spec.num_classes, cfg.tracking.grid_size, device)
    samples_dir = run_dir / "samples"

    data_wait = 0.0

    def next_batch():
        nonlocal data_wait
        t0 = time.perf_counter()
        batch = loader.next()
        data_wait += time.perf_counter() - t0
        for shard, key, reason in batch.bad:
            tracker.note(f"warning: skipped bad sample {key or '?'} in {shard}: {reason}")
        return batch

    def save() -> Path:
        state = training_state(nets, G_ema, precision, progress, sampler, loader, reg, tracker.run_id, config_yaml)
        return save_checkpoint(run_dir, progress.step, state, config_yaml, cfg.checkpoint.keep_last)

    last_ckpt, last_grid = None, None
    t_log, img_log = time.perf_counter(), progress.nimg
    try:
        while progress.nimg < total_img and not (cfg.train.stop_at_step and progress.step >= cfg.train.stop_at_step):
            stats, n_real = train_step(nets, next_batch, sampler, cfg.loss, precision, reg, progress.step, progress.d_steps)
            before = progress.nimg
            progress.step += 1
            progress.nimg += n_real
            progress.d_steps += cfg.loss.d_steps
            beta = ema_beta(cfg.ema, cfg.train.batch_size, progress.nimg)
            update_ema(G_ema, G, beta)
            tracker.advance(progress.nimg)

            if progress.step % cfg.tracking.log_every == 0:
                now = time.perf_counter()
                metrics = {k: float(v) for k, v in stats.items()}
                metrics.update({"perf/img_per_s": (progress.nimg - img_log) / (now - t_log),
                                "perf/data_wait": data_wait / (now - t_log), "perf/peak_mem_mb": peak_memory_mb(device),
                                "ema/beta": beta, "data/bad_samples": loader.health.bad,
                                "lr/G": nets.opt_G.param_groups[0]["lr"], "lr/D": nets.opt_D.param_groups[0]["lr"]})
                tracker.log(metrics, progress.step, progress.nimg)
                t_log, img_log, data_wait = now, progress.nimg, 0.0
            if _crossed(before, progress.nimg, cfg.tracking.sample_every_kimg):
                last_grid = save_grid(G_ema, grid_z, grid_c, grid_cols, samples_dir / f"grid-{progress.nimg // 1000:06d}kimg.png")
                tracker.log_image("samples/grid", last_grid, progress.step, f"G_ema at {progress.nimg / 1000:.1f} kimg")
            if _crossed(before, progress.nimg, cfg.checkpoint.every_kimg):
                last_ckpt = save()
        if last_ckpt is None or not last_ckpt.name.endswith(f"{progress.step:09d}"):
            last_ckpt = save()
        final_grid = samples_dir / f"grid-{progress.nimg // 1000:06d}kimg.png"
        if last_grid != final_grid:
            last_grid = save_grid(G_ema, grid_z, grid_c, grid_cols, final_grid)
            tracker.log_image("samples/grid", last_grid, progress.step, f"G_ema at {progress.nimg / 1000:.1f} kimg")
        wandb_dir = tracker.wandb_dir
    finally:
        tracker.close()
    return TrainResult(run_dir, last_ckpt, last_grid, run_dir / "config.yaml", wandb_dir, progress.step, progress.nimg)


def _warn_config_changes(saved_yaml: str, cfg: JobConfig, path: Path) -> None:
    from orchestrator.config import config_diff, config_from_yaml_text

    changes = config_diff(config_from_yaml_text(saved_yaml, str(path)), cfg)
    if changes:
        print(f"note: config differs from the checkpoint's ({path}):\n  " + "\n  ".join(changes), flush=True)
