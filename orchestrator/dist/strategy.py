"""How a worker runs a phase: the :class:`Strategy` protocol, its config, and the factory.

Three siblings implement it: :class:`~orchestrator.dist.local.LocalStrategy` (one process),
:class:`~orchestrator.dist.ddp.DDPStrategy` (DistributedDataParallel through Accelerate) and
:class:`~orchestrator.dist.deepspeed.DeepSpeedStrategy` (ZeRO engines). The phase runner and the Run
talk to networks and optimizers by name (``"G"``, ``"D"``, ``"G_AB"``, …) through these operations only.

The rule that makes regularizers correct under every strategy: a regularizer's input gradient (R1's
∇ₓD, path length's ∇_w) is taken through the **raw module** (:meth:`Strategy.unwrap`), never through
the DDP wrapper or the DeepSpeed engine, and the loss handed to ``backward`` always contains a term
computed through the wrapper (a zero-weighted one in lazy phases, as the official code anchors its R1
pass with ``real_logits * 0``). The wrapper then synchronises the complete gradient, first and second
order terms together, exactly once (``Strategy.wrapped`` tells a recipe whether to add that term).
DeepSpeed ≥ 0.18 runs its ZeRO epilogue on any backward through an engine's outputs, including
``autograd.grad``; DDP would sync nothing for a graph that never went through its forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import ContextManager, Literal, Protocol, Sequence

import torch
import torch.nn as nn
from pydantic import Field

from core.config import StrictConfig
from orchestrator.precision import Precision

StrategyName = Literal["single", "ddp", "deepspeed"]


class DistributedConfig(StrictConfig):
    """Which strategy the workers use, and its settings."""

    strategy: StrategyName = Field(
        "single", description="single | ddp (DistributedDataParallel via Accelerate) | deepspeed"
    )
    deepspeed_config: str = Field(
        "configs/deepspeed/zero2.yaml",
        description="DeepSpeed config (JSON or YAML); batch sizes and precision are filled in from train.*",
    )
    zero_stage: int | None = Field(None, ge=0, le=2, description="override the DeepSpeed config's ZeRO stage")
    sync_batchnorm: bool = Field(False, description="synchronise BatchNorm statistics across workers (BigGAN)")
    find_unused_parameters: bool = Field(False, description="DDP: allow parameters without gradients (ProGAN)")
    broadcast_buffers: bool = Field(
        False,
        description="DDP: broadcast rank 0's buffers before every forward pass (a collective per pass). Off, as "
        "in the official StyleGAN2-ADA code: the buffers that shape training (spectral norm's u, fixed noise and "
        "filters) evolve identically on every rank, BatchNorm trains on batch statistics (sync_batchnorm to share "
        "them), StyleGAN2's w_avg is per rank as in the official code, and checkpoints hold rank 0's",
    )


class Strategy(Protocol):
    """What every strategy offers. ``names`` are the keys of the networks given to :meth:`prepare`."""

    wrapped: bool  # networks run through a wrapper (DDP module, DeepSpeed engine) that synchronises gradients
    sharded: bool  # part of the state is written by every rank (:meth:`save_sharded`)

    def prepare(self, nets: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, nn.Module]:
        """Wrap the trained networks (each with its optimizer); returns them as the phases call them."""

    def unwrap(self, name: str) -> nn.Module:
        """The raw module of network ``name`` (its state dict, input gradients of regularizers)."""

    def autocast(self, name: str) -> ContextManager:
        """The autocast context for a forward pass through network ``name``."""

    @property
    def loss_scale(self) -> float:
        """The current fp16 loss scale (1.0 when not scaling)."""

    def zero_grad(self, name: str) -> None:
        """Clear the gradients of network ``name``."""

    def sync(self, names: Sequence[str], last: bool) -> ContextManager:
        """Context of one micro-batch's backward: gradients of ``names`` are synchronised only when ``last``."""

    def backward(self, loss: torch.Tensor, names: Sequence[str], num_micro: int) -> None:
        """Accumulate the gradient of ``loss / num_micro`` into networks ``names``."""

    def step(self, name: str) -> bool:
        """Apply the optimizer of ``name``; False when the update was skipped (non-finite gradients)."""

    def lr(self, name: str) -> float:
        """The learning rate of ``name``'s optimizer."""

    def optimizer(self, name: str) -> torch.optim.Optimizer | None:
        """``name``'s optimizer, whole on this rank (for a look-ahead that reads its state: unrolled GAN); None
        where the strategy shards it (DeepSpeed)."""

    def set_lr(self, name: str, lr: float) -> None:
        """Set the learning rate of ``name``'s optimizer."""

    def reset_optimizer(self, name: str) -> None:
        """Forget the optimizer's moments and step count (ProGAN's reset at a new level of detail)."""

    def use_fp32(self) -> None:
        """Run in fp32 from now on (after a NaN/Inf rollback): no autocast, no reduced-precision blocks."""

    def state_dict(self) -> dict:
        """``{"scaler": …, <name>: optimizer state, …}`` as rank 0 holds it (empty when sharded)."""

    def load_state_dict(self, state: dict, directory: Path) -> None:
        """Restore from :meth:`state_dict` and, when sharded, from the checkpoint ``directory``."""

    def save_sharded(self, directory: Path) -> None:
        """Every rank writes its part of the state into ``directory`` (a collective call; no-op unless sharded)."""


def nonfinite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any gradient the optimizer would apply holds a NaN or Inf (one host sync)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class Optimizers:
    """The optimizers a strategy steps itself (single, DDP), by network name: zeroing, the NaN/Inf guard,
    learning rates, resets and their state."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], skip_nonfinite: bool):
        self.by_name, self.skip_nonfinite = dict(optimizers), skip_nonfinite

    def zero_grad(self, name: str) -> None:
        self.by_name[name].zero_grad(set_to_none=True)

    def skip(self, name: str) -> bool:
        """True (and the gradients cleared) when guarding and a gradient of ``name`` is NaN/Inf."""
        if self.skip_nonfinite and nonfinite(self.by_name[name]):
            self.zero_grad(name)
            return True
        return False

    def lr(self, name: str) -> float:
        return self.by_name[name].param_groups[0]["lr"]

    def set_lr(self, name: str, lr: float) -> None:
        set_lr(self.by_name[name], lr)

    def reset(self, name: str) -> None:
        self.by_name[name].state.clear()

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.by_name.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.by_name.items():
            opt.load_state_dict(state[name])


def make_strategy(
    cfg: DistributedConfig,
    precision: Precision,
    own_dtype: set[str],
    skip_nonfinite: bool,
    micro_batch: int,
    num_micro: int,
    world_size: int,
) -> Strategy:
    """The strategy of ``cfg.strategy``. ``own_dtype``: networks that choose their own per-block precision;
    ``skip_nonfinite``: skip (and report) updates whose gradients hold NaN/Inf (single and DDP)."""
    if cfg.strategy == "single":
        from orchestrator.dist.local import LocalStrategy

        return LocalStrategy(precision, own_dtype, skip_nonfinite)
    if cfg.strategy == "ddp":
        from orchestrator.dist.ddp import DDPStrategy

        return DDPStrategy(precision, own_dtype, skip_nonfinite, cfg)
    from orchestrator.dist.deepspeed import DeepSpeedStrategy, deepspeed_config

    return DeepSpeedStrategy(
        precision, own_dtype, deepspeed_config(cfg, precision.name, micro_batch, num_micro, world_size)
    )
