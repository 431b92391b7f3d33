"""Checks and resolutions made before any work starts: device, batch split, resume point, run directory,
and the distributed rules a network family imposes. Each failure is a config error that says what to do."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from architectures.registry import Capabilities
from core.config import ConfigError
from orchestrator.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from orchestrator.config import JobConfig


def resolve_device(name: str, precision: str, local_rank: int = 0) -> torch.device:
    """The device of ``train.device`` (``auto``: CUDA when visible), checked against ``train.precision``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if precision == "fp16" and name != "cuda":
        raise ConfigError(
            "train.precision: 'fp16' (with loss scaling) is a CUDA path; on CPU use 'fp32' (fast here) or 'bf16'"
        )
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device("cpu")


def batch_split(batch: int, micro_batch: int | None, world_size: int) -> tuple[int, int]:
    """``(micro_batch, micro_batches_per_step)`` of one worker for a global ``batch`` (``train.batch_size``
    or the growth level's); ``micro_batch`` (``train.micro_batch``) caps the images per forward pass."""
    micro = min(micro_batch, batch // world_size) if micro_batch else batch // world_size
    if micro < 1 or batch % (world_size * micro):
        raise ConfigError(
            f"global batch {batch} (train.batch_size or growth.batch_size) must be divisible by "
            f"workers ({world_size}) × train.micro_batch ({micro_batch or 'batch / workers'}); "
            f"e.g. use a batch of {max(1, batch // world_size) * world_size}"
        )
    return micro, batch // (world_size * micro)


def check_batches(cfg: JobConfig, world_size: int) -> None:
    """Every global batch the run will use (``train.batch_size`` and each of ``growth.batch_size``) splits
    evenly into ``world_size`` workers × micro-batches."""
    for batch in {cfg.train.batch_size, *cfg.growth.batch_size.values()}:
        micro, _ = batch_split(batch, cfg.train.micro_batch, world_size)
        if micro % cfg.loss.pack:
            raise ConfigError(
                f"loss.pack: {cfg.loss.pack}: each worker's micro-batch of {micro} images (global batch {batch}, "
                f"{world_size} workers, train.micro_batch {cfg.train.micro_batch}) does not split into packs; "
                f"make it a multiple of {cfg.loss.pack}"
            )


def check_worker_counts(cfg: JobConfig) -> None:
    """The Ray job's worker counts: the global batch splits at each size an elastic run may have, and
    elastic runs use DDP (a ZeRO checkpoint holds one optimizer shard per worker: another count cannot load it)."""
    r = cfg.ray
    if r.elastic and cfg.distributed.strategy == "deepspeed":
        raise ConfigError(
            f"ray.min_workers: {r.min_workers} (elastic) with distributed.strategy: deepspeed: a ZeRO checkpoint "
            f"holds one optimizer shard per worker and cannot be loaded by another worker count; use ddp, or "
            f"drop ray.min_workers"
        )
    for n in r.worker_counts:
        try:
            check_batches(cfg, n)
        except ConfigError as e:
            if not r.elastic:
                raise
            raise ConfigError(
                f"ray.min_workers: {r.min_workers}: an elastic run may train on {n} worker(s), and then: {e}"
            ) from None


def check_distributed(cfg: JobConfig, caps: Capabilities) -> None:
    """Growth settings the family cannot honour, and strategies that cannot follow a growing network or compile."""
    if cfg.growth != type(cfg.growth)() and not caps.growth:
        raise ConfigError(
            f"growth: progressive growing needs a growing architecture (progan, stylegan); "
            f"model.arch is {cfg.model.arch}: remove the growth section"
        )
    if caps.growth and cfg.distributed.strategy == "deepspeed":
        raise ConfigError(
            "distributed.strategy: deepspeed cannot follow progressive growing (its batch sizes are "
            "fixed at start and its sharded Adam state cannot be reset per level); use ddp"
        )
    if cfg.train.compile is True and not caps.compiles:
        raise ConfigError(
            f"train.compile: the {cfg.model.arch} networks do not train correctly under torch.compile "
            f"(architectures/{cfg.model.arch}.py says why); set train.compile: false"
        )
    if cfg.train.compile is True and cfg.distributed.strategy == "deepspeed":
        raise ConfigError(
            "train.compile: not supported with distributed.strategy deepspeed (its engines own the "
            "forward pass and the optimizer step); use ddp, or set train.compile: false"
        )
    if cfg.distributed.strategy == "deepspeed" and (cfg.loss.clip is not None or cfg.loss.unroll_steps):
        # ZeRO steps its own fp32 master weights (a clamp would not hold) and partitions the optimizer state
        what = (
            f"loss.clip: {cfg.loss.clip}"
            if cfg.loss.clip is not None
            else f"loss.unroll_steps: {cfg.loss.unroll_steps}"
        )
        raise ConfigError(
            f"{what} needs D's own weights and whole optimizer state, which distributed.strategy: deepspeed "
            f"keeps in its engine; use strategy single or ddp"
        )
    if caps.growth and cfg.distributed.strategy == "ddp" and not cfg.distributed.find_unused_parameters:
        raise ConfigError(
            f"distributed.find_unused_parameters: must be true for {cfg.model.arch} under ddp (the blocks of "
            "levels not yet grown get no gradient)"
        )


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to start from: None (fresh), 'auto' (newest complete one, if any) or a path, which
    must exist. Nothing is created: a failed resume leaves no directory behind."""
    if resume is None:
        if list_checkpoints(run_dir):
            raise CheckpointError(
                f"{run_dir} already holds checkpoints; pass --resume auto to continue that run "
                f"or choose another --run-dir"
            )
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(
            f"--resume {resume}: no such checkpoint; pass a ckpt-NNNNNNNNN directory of a run, or --resume auto"
        )
    return path


def ensure_writable(run_dir: Path) -> None:
    """Create the run directory and prove it takes a file."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"run directory {run_dir} is not writable ({e.strerror}): choose another --run-dir or "
            f"fix the path or its permissions"
        ) from None


def compile_wanted(cfg: JobConfig, device: torch.device, caps: Capabilities) -> bool:
    """Whether to compile the trained networks: ``train.compile`` as given, or for ``auto`` on CUDA devices
    only (on CPU the minutes of compile time pay back only over long runs), not under DeepSpeed (its engines
    own the forward pass), not for growing families (every level is a new graph) and not for families that
    do not compile correctly (``Capabilities.compiles``)."""
    if cfg.train.compile != "auto":
        return cfg.train.compile
    return device.type == "cuda" and cfg.distributed.strategy != "deepspeed" and not caps.growth and caps.compiles
