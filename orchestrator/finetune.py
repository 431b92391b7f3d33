"""Starting from trained networks: ``finetune.init_from`` (``ganforge train --init-from CKPT``) and Freeze-D.

A fine-tuning run is a *new* run: its counters, optimizers, augmentation p and data position start at 0, and
only the networks' weights come from the checkpoint (its G, D and G_ema, or whatever networks the recipe
and the checkpoint share). Resuming (``--resume``) is the other thing: it continues a run's whole state.
A network whose tensors do not fit stops the run with an error that names each tensor and both shapes, unless
``init_partial`` keeps every tensor that fits and leaves the rest as initialised (a new class embedding, a new
output layer), saying which.

Freeze-D (Mo et al. 2020, "Freeze the Discriminator: a Simple Baseline for Fine-Tuning GANs") trains D
without its first ``freeze_d`` blocks on the image side, which keep the pretrained low-level features.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from pydantic import Field

from architectures.registry import Architecture
from core.config import ConfigError, StrictConfig
from orchestrator.checkpoint import CheckpointError, read_checkpoint, state_mismatches


class FinetuneConfig(StrictConfig):
    """Where a new run's weights come from, and which of D's layers stay fixed."""

    init_from: str | None = Field(
        None, description="checkpoint whose networks (G, D, G_ema) a new run starts from (ganforge train --init-from)"
    )
    init_partial: bool = Field(
        False, description="keep every tensor that fits and initialise the rest, instead of refusing a mismatch"
    )
    freeze_d: int = Field(0, ge=0, description="Freeze-D: D's first this many blocks (image side) are not trained")


def freeze_d_blocks(D: nn.Module, k: int, arch: Architecture) -> None:
    """Stop gradients to D's first ``k`` blocks from the image side (Freeze-D)."""
    if k == 0:
        return
    if not arch.capabilities.d_blocks:
        raise ConfigError(
            f"finetune.freeze_d: {k}: the {arch.name} discriminator does not list its blocks "
            f"(stylegan2 and biggan do); set it to 0"
        )
    if k > len(D.blocks):
        raise ConfigError(
            f"finetune.freeze_d: {k}, but the {arch.name} discriminator has {len(D.blocks)} blocks before its "
            f"output layers; use at most {len(D.blocks)}"
        )
    for block in D.blocks[:k]:
        block.requires_grad_(False)


def _fit(own: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], name: str) -> tuple[dict, list[str]]:
    """The tensors of ``theirs`` that fit ``own``, and a line for each that does not (name and both shapes)."""
    missing, unexpected, shapes = state_mismatches(own, theirs)
    problems = [f"{name}.{key}: not in the checkpoint (model {tuple(own[key].shape)})" for key in missing]
    problems += [f"{name}.{line}" for line in shapes]
    problems += [f"{name}.{key}: in the checkpoint only" for key in unexpected]
    fits = {key: theirs[key] for key in own if key in theirs and theirs[key].shape == own[key].shape}
    return fits, problems


def init_networks(networks: dict[str, nn.Module], path: str | Path, partial: bool, arch: str) -> list[str]:
    """Load the weights of checkpoint ``path`` into ``networks`` (by name); returns what was left as initialised.

    Raises a :class:`ConfigError` naming every mismatched tensor with both shapes unless ``partial``."""
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"finetune.init_from: {e}") from None
    theirs = ckpt.meta.get("arch")
    if theirs != arch:
        raise ConfigError(
            f"finetune.init_from: {ckpt.path} holds {theirs} networks, this config trains {arch}; "
            f"start from a {arch} checkpoint (or import one: ganforge import …)"
        )
    loads, problems = {}, []
    for name, net in networks.items():
        if name not in ckpt.states:
            problems.append(f"{name}: no such network in the checkpoint (it has {sorted(ckpt.states)})")
            continue
        loads[name], more = _fit(net.state_dict(), ckpt.states[name], name)
        problems += more
    if problems and not partial:
        raise ConfigError(
            f"finetune.init_from: {ckpt.path} does not fit this config's networks:\n  "
            + "\n  ".join(problems)
            + "\nchange the model config to the checkpoint's, or set finetune.init_partial: true to keep "
            "what fits and initialise the rest"
        )
    for name, fits in loads.items():
        networks[name].load_state_dict(fits, strict=False)
    return problems
