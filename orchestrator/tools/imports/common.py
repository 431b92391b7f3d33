"""What every importer shares: a strict tensor-by-tensor load into a ganforge network, and the checkpoint writer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from architectures.registry import ArchConfig
from core.spec import ImageSpec
from orchestrator.checkpoint import META, list_checkpoints, save_checkpoint
from orchestrator.config import JobConfig
from orchestrator.data.shards import DataConfig
from orchestrator.tools.imports.pickles import NetworkImportError

#: ``data.shards`` of an imported checkpoint's config until the user points it at real data.
PLACEHOLDER_SHARDS = "data/REPLACE-ME/train-*.tar"


def fit_state(
    module: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    rename: Callable[[str], str],
    what: str,
    bookkeeping: Callable[[str], bool] = lambda name: False,
) -> dict[str, torch.Tensor]:
    """``module``'s state dict filled from ``tensors`` (official name → tensor) through ``rename`` (official
    name → ganforge name). Every official tensor must land on a ganforge tensor of the same shape and every
    ganforge tensor must be filled, except those ``bookkeeping`` names (counters the other format does not
    keep; they keep ganforge's initial value); otherwise :class:`NetworkImportError` names the tensors."""
    own = module.state_dict()
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    leftover, misshaped, seen = [], [], set()
    for name, t in tensors.items():
        target = rename(name)
        if target not in own:
            leftover.append(name)
        elif target in state:
            leftover.append(f"{name} (also {source[target]} maps to {target})")
        elif not _fits(t, own[target]):
            seen.add(target)
            misshaped.append(f"{name}: file {tuple(t.shape)}, ganforge {target} {tuple(own[target].shape)}")
        else:
            state[target] = t.detach().reshape(own[target].shape).to(own[target].dtype).clone()
            source[target] = name
    for k in own:
        if k not in state and bookkeeping(k):
            state[k] = own[k].clone()
    missing = [k for k in own if k not in state and k not in seen]
    problems = [
        f"tensors left over (no place in ganforge's network): {leftover}" if leftover else "",
        f"mis-shaped tensors: {misshaped}" if misshaped else "",
        f"ganforge tensors the file does not fill: {missing}" if missing else "",
    ]
    if any(problems):
        raise NetworkImportError(f"{what}: " + "; ".join(p for p in problems if p))
    return state


def _fits(t: torch.Tensor, own: torch.Tensor) -> bool:
    # Only a 0-dim official scalar may become ganforge's [1] (DeepSpeed cannot broadcast 0-dim parameters).
    return t.shape == own.shape or (t.ndim == 0 and own.shape == (1,))


def job_config(model: ArchConfig, spec: ImageSpec, shards: str = PLACEHOLDER_SHARDS) -> JobConfig:
    """A valid job config for an imported network: its model, its image spec, default training settings."""
    data = DataConfig(shards=shards, resolution=spec.resolution, channels=spec.channels, num_classes=spec.num_classes)
    return JobConfig(model=model, data=data)


def write_checkpoint(
    out_dir: str | Path,
    model: ArchConfig,
    spec: ImageSpec,
    networks: dict[str, dict[str, torch.Tensor]],
    imported_from: dict,
    shards: str | None = None,
) -> Path:
    """Write ``out_dir/checkpoints/ckpt-000000000`` (and ``out_dir/config.yaml``) as a run at step 0 would:
    the networks' states, ``meta`` as ``RunDescription`` writes it, ``progress`` at zero and ``imported_from``.
    Refuses a directory that already holds checkpoints. Returns the checkpoint's path."""
    out_dir = Path(out_dir)
    if list_checkpoints(out_dir):
        raise NetworkImportError(f"{out_dir} already holds checkpoints; import into a new directory")
    cfg = job_config(model, spec, shards or PLACEHOLDER_SHARDS)
    config_yaml = cfg.to_yaml()
    meta = {
        "spec": spec.to_dict(),
        "arch": model.arch,
        "model": model.model_dump(mode="json"),
        "recipe": cfg.train.recipe,
        "generator": "G_ema",
        "config": config_yaml,
        "level": None,
    }
    state = {
        **networks,
        "progress": {"step": 0, "nimg": 0, "phases": {}},
        META: meta,
        "imported_from": imported_from,
    }
    path = save_checkpoint(out_dir, 0, state, config_yaml, keep_last=1)
    (out_dir / "config.yaml").write_text(config_yaml)
    return path
