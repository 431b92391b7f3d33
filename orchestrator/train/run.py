"""The one training loop. Dev mode calls :func:`train` in-process; Ray Train workers, ``torchrun`` and
``accelerate launch`` workers call the same function with a :class:`WorkerContext`.

Read top to bottom: build the pieces from their own config sections, restore them from a checkpoint
if resuming, then step until ``train.total_kimg`` (or ``train.stop_at_step``): phases, EMA, logging,
sample grids and checkpoints on intervals of images seen. Everything that must survive a restart is
in :func:`training_state` (and, for DeepSpeed, the engines' sharded files), nothing only in
loop-local variables. Side effects (logs, grids, checkpoint files) happen on rank 0; every rank
takes part in the collective calls (statistics, checkpoint state, Ray's report) the same number of
times.
"""
from __future__ import annotations

import inspect
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import torch
import torch.distributed as dist
from pydantic import Field

import architectures
from core.config import StrictConfig
from orchestrator.config import JobConfig
from orchestrator.checkpoint import (CheckpointError, checkpoint_dir, latest_checkpoint, list_checkpoints,
                                     load_checkpoint, load_into, mark_best, save_checkpoint)
from orchestrator.data.shards import ShardLoader, image_spec, load_manifest
from orchestrator.ema import ema_beta, make_ema, update_ema
from orchestrator.faults import FaultState, NonfiniteError, StopRequest
from orchestrator.growth import Growth
from orchestrator.health import HealthMonitor
from orchestrator.optim import lazy_ratio, make_adam
from orchestrator.recipes.noise_to_image import Nets, RegState, Sampler, has_mapping, train_step
from orchestrator.precision import PrecisionName
from orchestrator.dist.strategy import make_strategy
from orchestrator.tracking import Tracker, peak_memory_mb



@dataclass
class WorkerContext:
    """Where this worker stands: its rank among ``world_size`` workers, a hook that reports each new
    checkpoint to the launcher (Ray Train), and a checkpoint the launcher wants restored."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    report: Callable[[dict, Path | None], None] | None = None
    restore_from: Path | None = None
    evaluator: str | None = None  # name of the Ray evaluator actor (None: evaluate in-process)


@dataclass
class Progress:
    """Counters of a run (checkpointed)."""

    step: int = 0
    nimg: int = 0
    d_steps: int = 0


@dataclass
class TrainResult:
    """Where a finished (or stopped) run left its outputs (paths are None on ranks other than 0)."""

    run_dir: Path
    checkpoint: Path | None
    grid: Path | None
    config: Path
    wandb_dir: str | None
    step: int
    nimg: int
    preempted: bool = False  # stopped early by SIGTERM or a STOP file, with a checkpoint


def resolve_device(name: str, precision: str, local_rank: int = 0) -> torch.device:
    from core.config import ConfigError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if precision == "fp16" and name != "cuda":
        raise ConfigError("train.precision: 'fp16' (with loss scaling) is a CUDA path; on CPU use 'fp32' "
                          "(fast here) or 'bf16'")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device("cpu")


def batch_split(batch: int, micro_batch: int | None, world_size: int) -> tuple[int, int]:
    """``(micro_batch, micro_batches_per_step)`` of one worker for a global ``batch`` (``train.batch_size``
    or the growth level's); ``micro_batch`` (``train.micro_batch``) caps the images per forward pass."""
    from core.config import ConfigError

    micro = min(micro_batch, batch // world_size) if micro_batch else batch // world_size
    if micro < 1 or batch % (world_size * micro):
        raise ConfigError(f"global batch {batch} (train.batch_size or growth.batch_size) must be divisible by "
                          f"workers ({world_size}) × train.micro_batch ({micro_batch or 'batch / workers'}); "
                          f"e.g. use a batch of {max(1, batch // world_size) * world_size}")
    return micro, batch // (world_size * micro)


def check_batches(cfg: JobConfig, world_size: int) -> None:
    """Every global batch the run will use (``train.batch_size`` and each of ``growth.batch_size``) splits
    evenly into ``world_size`` workers × micro-batches: checked before any work starts."""
    for batch in {cfg.train.batch_size, *cfg.growth.batch_size.values()}:
        batch_split(batch, cfg.train.micro_batch, world_size)


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


def check_recipe(cfg: JobConfig, G, D) -> None:
    """Recipe settings the networks cannot honour are config errors, raised before training starts."""
    from core.config import ConfigError

    progressive = hasattr(G, "set_lod")
    if cfg.growth != type(cfg.growth)() and not progressive:
        raise ConfigError(f"growth: progressive growing needs a growing architecture (progan); "
                          f"model.arch is {cfg.model.arch}: remove the growth section")
    if progressive and cfg.distributed.strategy == "deepspeed":
        raise ConfigError("distributed.strategy: deepspeed cannot follow progressive growing (its batch sizes are "
                          "fixed at start and its sharded Adam state cannot be reset per level); use ddp")
    if progressive and cfg.distributed.strategy == "ddp" and not cfg.distributed.find_unused_parameters:
        raise ConfigError("distributed.find_unused_parameters: must be true for progan under ddp (the blocks of "
                          "levels not yet grown get no gradient)")
    classifies = getattr(D, "num_classes", 0) and "return_class_logits" in inspect.signature(D.forward).parameters
    if cfg.loss.ac_weight > 0 and not classifies:
        raise ConfigError(f"loss.ac_weight: {cfg.loss.ac_weight} needs a class-conditional D with an auxiliary "
                          f"classifier (conditional progan); set it to 0")
    if classifies and cfg.loss.ac_weight == 0:
        raise ConfigError(f"loss.ac_weight: 0, but the {cfg.model.arch} D only learns labels through the AC-GAN "
                          f"term, so G would ignore them: set loss.ac_weight (official: 1.0)")

    for key in ("pl_weight", "style_mixing_prob"):
        if getattr(cfg.loss, key) > 0 and not has_mapping(G):
            raise ConfigError(f"loss.{key}: {getattr(cfg.loss, key)} needs a generator with a mapping network "
                              f"(stylegan2); the {cfg.model.arch} generator has none: set it to 0")
    if cfg.loss.ortho_beta > 0 and not hasattr(G, "ortho_parameters"):
        raise ConfigError(f"loss.ortho_beta: {cfg.loss.ortho_beta} needs a generator that names its orthogonally "
                          f"regularized weights (biggan's ortho_parameters); the {cfg.model.arch} generator does not: "
                          f"set it to 0")


def rank_state(loader: ShardLoader) -> dict:
    """What differs between ranks: the data position and the global RNG (noise inputs, style mixing)."""
    state = {"data": loader.state_dict(), "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def gather(obj, ctx: WorkerContext) -> list:
    """``obj`` of every rank, in rank order (a collective call when distributed)."""
    if ctx.world_size == 1:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def training_state(nets: Nets, G_ema, progress: Progress, sampler: Sampler, reg: RegState, ranks: list[dict],
                   run_id: str, config_yaml: str, growth: Growth | None, faults: FaultState) -> dict:
    """Everything a resumed run needs to continue exactly (besides DeepSpeed's sharded files)."""
    st = nets.strategy
    return {"G": st.unwrap(nets.G).state_dict(), "D": st.unwrap(nets.D).state_dict(), "G_ema": G_ema.state_dict(),
            "strategy": st.state_dict(), "progress": asdict(progress), "reg": reg.state_dict(),
            "sampler_rng": sampler.rng.get_state(), "ranks": ranks, "tracking": {"wandb_run_id": run_id},
            "growth": growth.state_dict() if growth else None, "faults": faults.state_dict(), "config": config_yaml}


def restore(state: dict, path: Path, nets: Nets, G_ema, progress: Progress, sampler: Sampler, loader: ShardLoader,
            reg: RegState, ctx: WorkerContext, growth: Growth | None = None) -> None:
    st = nets.strategy
    if growth is not None:
        if not state.get("growth"):
            raise CheckpointError(f"{path} holds no growth schedule: it was not written by a progressive run")
        growth.load_state_dict(state["growth"])
    load_into(st.unwrap(nets.G), state["G"], "G")
    load_into(st.unwrap(nets.D), state["D"], "D")
    load_into(G_ema, state["G_ema"], "G_ema")
    st.load_state_dict(state["strategy"], directory=path)
    reg.load_state_dict(state["reg"])
    for key, value in state["progress"].items():
        setattr(progress, key, value)
    sampler.rng.set_state(state["sampler_rng"])
    if len(state["ranks"]) == ctx.world_size:
        mine = state["ranks"][ctx.rank]
        torch.set_rng_state(mine["torch_rng"])
        if "cuda_rng" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda_rng"])
        loader.load_state_dict(mine["data"])
    else:  # another worker count: same weights and counters, fresh data epoch and noise
        print(f"note: {path} was written by {len(state['ranks'])} worker(s), this run has {ctx.world_size}; "
              f"data order and noise restart, weights and counters continue", flush=True)
        loader.load_state_dict(state["ranks"][0]["data"])  # its other world size restarts the epoch


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


def real_images(cfg: JobConfig, spec, grid_size: int, max_batches: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images for the real grid (``(rows × grid_size, C, H, W)``, one row per class when conditional,
    black where a class ran out) and, in reading order, a batch for the real data's diversity. Read by
    a loader of their own, so training's data order is untouched."""
    rows = spec.num_classes if 0 < spec.num_classes <= 32 else grid_size
    data = cfg.data.model_copy(update={"workers": 0, "shuffle_buffer": min(cfg.data.shuffle_buffer, 256)})
    loader = ShardLoader(data, spec, 64, seed=cfg.train.seed + 104729)
    seen: list[torch.Tensor] = []
    per_class: dict[int, list[torch.Tensor]] = {}
    need = max(grid_size * rows, cfg.health.diversity_samples)
    for _ in range(max_batches):
        batch = loader.next()
        seen.append(batch.img)
        for img, label in zip(batch.img, batch.label.tolist() if spec.num_classes else [0] * len(batch.img)):
            per_class.setdefault(int(label) if spec.num_classes else 0, []).append(img)
        if spec.num_classes and rows == spec.num_classes:
            if all(len(per_class.get(k, [])) >= grid_size for k in range(rows)):
                break
        elif sum(len(b) for b in seen) >= need:
            break
    every = torch.cat(seen)
    if not (spec.num_classes and rows == spec.num_classes):
        return every[:grid_size * rows], every[:cfg.health.diversity_samples]
    blank = torch.full_like(every[0], -1.0)
    grid = [(per_class.get(k, []) + [blank] * grid_size)[:grid_size] for k in range(rows)]
    return torch.stack([img for row in grid for img in row]), every[:cfg.health.diversity_samples]


def grid_path(samples_dir: Path, nimg: int) -> Path:
    """``grid-<kimg with 3 decimals, zero-padded>kimg.png``: sorts by time, readable, unique per step."""
    return samples_dir / f"grid-{nimg / 1000:010.3f}kimg.png"


def _crossed(before: int, after: int, every: float) -> bool:
    every = max(int(every * 1000), 1)
    return before // every != after // every


def _mean_across_ranks(stats: dict[str, torch.Tensor], ctx: WorkerContext) -> dict[str, float]:
    keys = sorted(stats)
    values = torch.stack([stats[k].detach().float().cpu().reshape(()) for k in keys])
    if ctx.world_size > 1:
        dist.all_reduce(values)
        values /= ctx.world_size
    return dict(zip(keys, values.tolist()))


def make_eval_client(cfg: JobConfig, ctx: WorkerContext, run_dir: Path, config_yaml: str, note):
    """Rank 0's evaluator: the named Ray actor when the launcher made one, else one in this process."""
    from orchestrator.eval.service import NAMESPACE, EvalClient, Evaluator

    if ctx.evaluator:
        import ray

        return EvalClient(actor=ray.get_actor(ctx.evaluator, namespace=NAMESPACE), note=note)
    return EvalClient(Evaluator(config_yaml, str(run_dir)), note=note)


def log_eval_rows(evaluator, tracker: Tracker) -> None:
    """Log new evaluator results at the steps they belong to; protect the best-FID checkpoint from pruning."""
    for row in evaluator.poll():
        tracker.log_eval(row)
        fid = row.get("eval/fid")
        if fid is not None and fid < evaluator.best_fid:
            evaluator.best_fid = fid
            if row.get("checkpoint") and Path(row["checkpoint"]).exists():
                mark_best(Path(row["checkpoint"]), {"fid": fid, "step": row["step"]})


def _any_rank(flag: bool, ctx: WorkerContext, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (a collective call when distributed, so all ranks agree)."""
    if ctx.world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def ensure_writable(run_dir: Path) -> None:
    """Create the run directory and prove it takes a file, before any work starts."""
    from core.config import ConfigError

    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {run_dir} is not writable ({e.strerror}): choose another --run-dir or "
                          f"fix the path or its permissions") from None


def _barrier(ctx: WorkerContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def train(cfg: JobConfig, run_dir: str | Path, resume: str | None = None, ctx: WorkerContext | None = None) -> TrainResult:
    """Train (or continue training) the GAN described by ``cfg`` in ``run_dir``, as worker ``ctx``."""
    from core.config import ConfigError

    ctx = ctx or WorkerContext()
    lead = ctx.rank == 0
    run_dir = Path(run_dir)
    device = resolve_device(cfg.train.device, cfg.train.precision, ctx.local_rank)
    check_batches(cfg, ctx.world_size)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    torch.manual_seed(cfg.train.seed)  # the same initial networks on every rank
    spec = image_spec(cfg.data, load_manifest(cfg.data))
    arch = architectures.get(cfg.model.arch)
    try:
        G = arch.build_generator(cfg.model, spec).to(device)
        D = arch.build_discriminator(cfg.model, spec).to(device)
    except ValueError as e:  # e.g. a resolution the architecture cannot take
        raise ConfigError(f"model ({cfg.model.arch}) on data {spec}: {e}") from None
    check_recipe(cfg, G, D)
    growth = Growth(cfg.growth, G.start_resolution, spec.resolution) if hasattr(G, "set_lod") else None
    global_batch = growth.batch_size(cfg.train.batch_size) if growth else cfg.train.batch_size
    micro_batch, num_micro = batch_split(global_batch, cfg.train.micro_batch, ctx.world_size)
    ensure_writable(run_dir)  # the config holds up: now the run directory
    start_from = ctx.restore_from or resolve_resume(run_dir, resume)
    if cfg.distributed.sync_batchnorm and ctx.world_size > 1:
        G, D = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(n) for n in (G, D))
    G_ema = make_ema(G)
    torch.manual_seed(cfg.train.seed + 7919 * (ctx.rank + 1))  # noise inputs and style mixing differ per rank
    lazy_r1 = cfg.loss.r1_gamma > 0 and cfg.loss.r1_interval > 1
    lazy_pl = cfg.loss.pl_weight > 0 and cfg.loss.pl_interval > 1
    opt_G = make_adam(G.parameters(), cfg.optim.g, reg_interval=cfg.loss.pl_interval if lazy_pl else 1)
    opt_D = make_adam(D.parameters(), cfg.optim.d, reg_interval=cfg.loss.r1_interval if lazy_r1 else 1)
    strategy = make_strategy(cfg.distributed, cfg.train.precision, device, micro_batch, num_micro, ctx.world_size)
    strategy.skip_nonfinite = cfg.faults.skip_nonfinite and cfg.train.precision != "fp16"  # fp16: the scaler's job
    faults = FaultState()
    for net in (G, D, G_ema):
        strategy.precision.adopt(net)
    nets = Nets(*strategy.prepare(G, D, opt_G, opt_D), strategy)
    reg = RegState(pl_mean=torch.zeros([], device=device))
    sampler = Sampler(G.z_dim, spec.num_classes, device, torch.Generator().manual_seed(cfg.train.seed + 1),
                      ctx.rank, ctx.world_size)
    loader = ShardLoader(cfg.data, spec, micro_batch, seed=cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size)
    progress = Progress()
    config_yaml = cfg.to_yaml()
    run_id = None
    if start_from is not None:
        saved = load_checkpoint(start_from, map_location=device)
        restore(saved, Path(start_from), nets, G_ema, progress, sampler, loader, reg, ctx, growth)
        run_id = saved["tracking"]["wandb_run_id"]
        faults.load_state_dict(saved.get("faults") or {})
        if lead:
            _warn_config_changes(saved["config"], cfg, start_from)
    if lead:  # only now: a checkpoint this config cannot restore leaves the run's config as it was
        (run_dir / "config.yaml").write_text(config_yaml)
    total_img = int(cfg.train.total_kimg * 1000)
    tracker = Tracker(cfg.tracking, run_dir, cfg.model_dump(mode="json"), total_img, run_id, progress.nimg, active=lead)
    if start_from is not None:
        tracker.note(f"resumed from {start_from} at step {progress.step}, {progress.nimg / 1000:.1f} kimg")
    grid_z, grid_c, grid_cols = grid_latents(G, spec.num_classes, cfg.tracking.grid_size, device)
    samples_dir = run_dir / "samples"
    monitor = None
    if lead:
        monitor = HealthMonitor(cfg.health, lambda key, title, text: tracker.alert(title, text), cfg.loss.kind)
        health_z = torch.randn(cfg.health.diversity_samples, G.z_dim, generator=torch.Generator().manual_seed(1)).to(device)
        health_c = (torch.arange(cfg.health.diversity_samples) % spec.num_classes).to(device) if spec.num_classes else None
        with torch.random.fork_rng(devices=[]):  # reading and rendering here must not move training's RNG
            real_grid, real_batch = real_images(cfg, spec, cfg.tracking.grid_size)
        monitor.observe_real(real_batch)
        if not (samples_dir / "real.png").exists():
            import torchvision

            samples_dir.mkdir(parents=True, exist_ok=True)
            torchvision.utils.save_image(real_grid, samples_dir / "real.png", nrow=cfg.tracking.grid_size,
                                         normalize=True, value_range=(-1, 1), padding=1)
            tracker.log_image("samples/real", samples_dir / "real.png", progress.step, "real images")

    def apply_lr() -> None:
        """Learning rates of the growth level (or the config), corrected for lazy regularization and
        lowered by any NaN/Inf rollbacks."""
        for key, adam, lazy, interval in (("G", cfg.optim.g, lazy_pl, cfg.loss.pl_interval),
                                          ("D", cfg.optim.d, lazy_r1, cfg.loss.r1_interval)):
            lr = growth.lr(adam.lr) if growth else adam.lr
            strategy.set_lr(key, lr * lazy_ratio(interval if lazy else 1) * faults.lr_scale)

    def enter_level() -> None:
        """The batch size, learning rates and real-image reference of the growth level the run is at."""
        nonlocal global_batch, micro_batch, num_micro
        global_batch = growth.batch_size(cfg.train.batch_size)
        micro_batch, num_micro = batch_split(global_batch, cfg.train.micro_batch, ctx.world_size)
        loader.set_batch_size(micro_batch)
        apply_lr()
        if monitor is not None:
            monitor.observe_real(growth.reals(real_batch))

    def apply_fault_state() -> None:
        apply_lr()
        if faults.fp32:
            strategy.use_fp32(G_ema)

    def rollback() -> None:
        """Back to the last good checkpoint with a lower learning rate (K bad steps in a row)."""
        path = latest_checkpoint(run_dir)
        why = f"{faults.consecutive} consecutive steps with NaN/Inf gradients at step {progress.step}"
        if cfg.faults.on_nonfinite == "stop" or path is None or faults.rollbacks >= cfg.faults.max_rollbacks:
            reason = ("faults.on_nonfinite is stop" if cfg.faults.on_nonfinite == "stop" else
                      "no checkpoint to roll back to" if path is None else
                      f"faults.max_rollbacks ({cfg.faults.max_rollbacks}) reached")
            raise NonfiniteError(f"{why}; {reason}. Lower optim.*.lr, use train.precision fp32, or raise "
                                 f"faults.nonfinite_patience")
        restore(load_checkpoint(path, map_location=device), path, nets, G_ema, progress, sampler, loader, reg, ctx,
                growth)
        faults.rollbacks += 1
        faults.consecutive = 0
        faults.lr_scale *= cfg.faults.lr_factor
        faults.fp32 = faults.fp32 or cfg.faults.fp32_fallback
        if growth is not None:
            enter_level()
        apply_fault_state()
        text = (f"{why}: rolled back to {path.name} (step {progress.step}); learning rates × {faults.lr_scale:g}"
                + ("; reduced-precision blocks now run in fp32" if faults.fp32 else ""))
        tracker.note(f"warning: {text}")
        tracker.alert("Rolled back after NaN/Inf", text)

    if faults.lr_scale != 1.0 or faults.fp32:
        apply_fault_state()

    def level_grid(resolution: int) -> Path:
        """G_ema's grid at the end of a growth level (G_ema is still at that level)."""
        path = save_grid(G_ema, grid_z, grid_c, grid_cols, samples_dir / f"level-{resolution:04d}px.png")
        tracker.log_image("samples/level", path, progress.step, f"G_ema at {resolution}×{resolution}")
        return path

    if growth is not None:
        enter_level()
    data_wait = 0.0

    def next_batch():
        nonlocal data_wait
        t0 = time.perf_counter()
        batch = loader.next()
        data_wait += time.perf_counter() - t0
        for shard, key, reason in batch.bad:
            tracker.note(f"warning: skipped bad sample {key or '?'} in {shard}: {reason}")
        return batch

    def save(metrics: dict[str, float]) -> Path:
        """Checkpoint (collective): every rank contributes its state; rank 0 writes; all report."""
        ranks = gather(rank_state(loader), ctx)
        shards = None
        if strategy.wrapped and hasattr(strategy, "engines"):  # DeepSpeed: every rank writes its shard files
            shards = checkpoint_dir(run_dir) / f".shards-{progress.step:09d}"
            if lead:
                shutil.rmtree(shards, ignore_errors=True)
                shards.mkdir(parents=True)
            _barrier(ctx)
            strategy.save_sharded(shards)
            _barrier(ctx)
        path = None
        if lead:
            state = training_state(nets, G_ema, progress, sampler, reg, ranks, tracker.run_id, config_yaml, growth,
                                   faults)
            path = save_checkpoint(run_dir, progress.step, state, config_yaml, cfg.checkpoint.keep_last, extra=shards)
        _barrier(ctx)
        path = checkpoint_dir(run_dir) / f"ckpt-{progress.step:09d}"
        if ctx.report is not None:
            ctx.report({"step": progress.step, "kimg": progress.nimg / 1000, **metrics}, path if lead else None)
        return path

    last_ckpt, last_grid = None, None
    t_log, img_log = time.perf_counter(), progress.nimg
    metrics: dict[str, float] = {}
    evaluator = make_eval_client(cfg, ctx, run_dir, config_yaml, tracker.note) if lead and cfg.eval.enabled else None

    def full_size() -> bool:
        """Whether G has its final size (FID compares full-resolution images)."""
        return growth is None or growth.complete

    if evaluator is not None and not full_size():
        tracker.note("evaluation waits until the networks have grown to full resolution")
    if evaluator is not None and progress.step == 0 and full_size():
        evaluator.submit(0, 0, G_ema, None)  # the FID at the start, for comparison
    preempted = False
    stop = StopRequest(run_dir, cfg.faults.grace_s, lead)
    stop.install()
    try:
        while progress.nimg < total_img and not (cfg.train.stop_at_step and progress.step >= cfg.train.stop_at_step):
            log_step = (progress.step + 1) % cfg.tracking.log_every == 0
            if growth is not None:
                growth.set_lod(strategy.unwrap(nets.G), strategy.unwrap(nets.D), G_ema)
            stats, n_real = train_step(nets, next_batch, num_micro, sampler, cfg.loss, reg, progress.step, progress.d_steps,
                                       grad_norms=log_step, reals=growth.reals if growth else None)
            before = progress.nimg
            progress.step += 1
            progress.nimg += n_real * ctx.world_size
            progress.d_steps += cfg.loss.d_steps
            beta = ema_beta(cfg.ema, global_batch, progress.nimg)
            update_ema(G_ema, strategy.unwrap(nets.G), beta)
            tracker.advance(progress.nimg)
            skipped, strategy.skipped = strategy.skipped, 0  # optimizer updates skipped for NaN/Inf gradients
            faults.consecutive = faults.consecutive + 1 if skipped else 0
            faults.skipped_steps += bool(skipped)
            if skipped:
                tracker.note(f"warning: NaN/Inf gradients at step {progress.step}: {skipped} update(s) skipped "
                             f"({faults.skipped_steps} bad steps so far)")
            if faults.consecutive >= cfg.faults.nonfinite_patience:
                rollback()
                continue
            if growth is not None:
                level = growth.resolution
                if growth.advance(n_real * ctx.world_size):  # a fade-in started or ended
                    if cfg.growth.reset_optimizer:
                        strategy.reset_optimizer("G")
                        strategy.reset_optimizer("D")
                    if growth.resolution != level:
                        if lead:
                            level_grid(level)
                        enter_level()
                        tracker.note(f"growing to {growth.resolution}×{growth.resolution} at "
                                     f"{progress.nimg / 1000:.1f} kimg (step {progress.step})")

            if log_step:
                now = time.perf_counter()
                metrics = _mean_across_ranks(stats, ctx)
                img_per_s = (progress.nimg - img_log) / (now - t_log)
                metrics.update({"perf/img_per_s": img_per_s, "perf/kimg_per_h": img_per_s * 3.6,
                                "perf/data_wait": data_wait / (now - t_log), "perf/peak_mem_mb": peak_memory_mb(device),
                                "ema/beta": beta, "data/bad_samples": loader.health.bad,
                                "lr/G": strategy.lr("G"), "lr/D": strategy.lr("D"),
                                "fault/skipped_steps": faults.skipped_steps, "fault/rollbacks": faults.rollbacks,
                                **(growth.metrics() if growth else {})})
                if monitor is not None:
                    samples = None
                    if monitor.diversity_due(progress.step // cfg.tracking.log_every, progress.nimg):
                        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                            samples = G_ema(health_z, health_c).float()
                    metrics.update(monitor.check(metrics, progress.step, samples))
                tracker.log(metrics, progress.step, progress.nimg)
                t_log, img_log, data_wait = now, progress.nimg, 0.0
                if evaluator is not None:
                    log_eval_rows(evaluator, tracker)
            if lead and _crossed(before, progress.nimg, cfg.tracking.sample_every_kimg):
                last_grid = save_grid(G_ema, grid_z, grid_c, grid_cols, grid_path(samples_dir, progress.nimg))
                tracker.log_image("samples/grid", last_grid, progress.step, f"G_ema at {progress.nimg / 1000:.1f} kimg")
            eval_due = bool(cfg.eval.enabled and cfg.eval.every_kimg and _crossed(before, progress.nimg, cfg.eval.every_kimg))
            if eval_due or _crossed(before, progress.nimg, cfg.checkpoint.every_kimg):
                last_ckpt = save(metrics)  # evaluated weights always have a checkpoint, so the best can be kept
            if eval_due and evaluator is not None and full_size():
                evaluator.submit(progress.step, progress.nimg, G_ema, last_ckpt)
            if _any_rank(stop.requested(), ctx, device):
                preempted = True
                break
        if last_ckpt is None or not last_ckpt.name.endswith(f"{progress.step:09d}"):
            last_ckpt = save(metrics)
        if preempted:
            stop.served()
            tracker.note(f"stopped on request at step {progress.step} with checkpoint {last_ckpt}; "
                         f"continue with --resume auto")
        elif evaluator is not None:
            if evaluator.last_step != progress.step and full_size():
                evaluator.submit(progress.step, progress.nimg, G_ema, last_ckpt)  # the FID at the end
            evaluator.finish()
            log_eval_rows(evaluator, tracker)
        if growth is not None:
            growth.set_lod(strategy.unwrap(nets.G), strategy.unwrap(nets.D), G_ema)
            if lead:
                level_grid(growth.resolution)
        if lead:
            final_grid = grid_path(samples_dir, progress.nimg)
            if last_grid != final_grid:
                last_grid = save_grid(G_ema, grid_z, grid_c, grid_cols, final_grid)
                tracker.log_image("samples/grid", last_grid, progress.step, f"G_ema at {progress.nimg / 1000:.1f} kimg")
        wandb_dir = tracker.wandb_dir
    finally:
        stop.uninstall()
        tracker.close()
    return TrainResult(run_dir, last_ckpt if lead else None, last_grid, run_dir / "config.yaml", wandb_dir,
                       progress.step, progress.nimg, preempted)


def _warn_config_changes(saved_yaml: str, cfg: JobConfig, path: Path) -> None:
    from orchestrator.config import config_diff, config_from_yaml_text

    changes = config_diff(config_from_yaml_text(saved_yaml, str(path)), cfg)
    if changes:
        print(f"note: config differs from the checkpoint's ({path}):\n  " + "\n  ".join(changes), flush=True)


