"""The exponential moving average of G's weights (Karras et al. 2018, appendix; StyleGAN2-ADA's G_ema).

β comes from a half-life in thousands of images, so it does not depend on the batch size:
``β = 0.5 ** (batch / (half_life_kimg · 1000))``. With a ramp-up the half-life is capped at
``rampup × images seen`` early in training. Before ``start_kimg`` the average is a copy (BigGAN).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from pydantic import Field

from core.config import StrictConfig


class EMAConfig(StrictConfig):
    """How fast G_ema follows G."""

    half_life_kimg: float = Field(10.0, gt=0, description="half-life of the average, in thousands of images")
    rampup: float | None = Field(None, gt=0, description="cap the half-life at rampup × images seen (None: off)")
    start_kimg: float = Field(0.0, ge=0, description="copy G into G_ema until this many kimg (BigGAN)")


def ema_beta(cfg: EMAConfig, batch_size: int, nimg: int) -> float:
    """The decay β for one step of ``batch_size`` images after ``nimg`` images have been seen."""
    if nimg < cfg.start_kimg * 1000:
        return 0.0
    half_life_img = cfg.half_life_kimg * 1000
    if cfg.rampup is not None:
        half_life_img = min(half_life_img, nimg * cfg.rampup)
    return 0.5 ** (batch_size / max(half_life_img, 1e-8))


def make_ema(net: nn.Module) -> nn.Module:
    """A frozen copy of ``net`` in eval mode."""
    return copy.deepcopy(net).eval().requires_grad_(False)


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """``ema ← β·ema + (1−β)·net`` for parameters; buffers (BatchNorm statistics, w_avg) are copied."""
    ema_params = list(ema.parameters())
    net_params = [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(ema_params, net_params, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)
