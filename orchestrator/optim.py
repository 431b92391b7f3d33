"""The optimizers of G and D: Adam (with the learning-rate and β correction for lazy regularization) or RMSProp.

Each network has its own settings (``optim.g``, ``optim.d``): that is how the two time-scale update rule is
set (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule", section 4: a faster D, e.g. D
lr 4e-4 against G lr 1e-4 in their DCGAN experiments).
"""

from __future__ import annotations

from typing import Annotated, Iterable, Literal

import torch
from pydantic import Field

from core.config import StrictConfig

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused Adam kernel runs


class AdamConfig(StrictConfig):
    """One network's optimizer: Adam (Kingma & Ba 2015) or RMSProp without momentum, as WGAN's Algorithm 1
    uses (Arjovsky et al. 2017, section 3: momentum-based optimizers made the critic unstable)."""

    kind: Literal["adam", "rmsprop"] = Field(
        "adam", description="adam | rmsprop (WGAN with weight clipping: rmsprop, lr 5e-5; betas unused)"
    )
    lr: float = Field(2e-4, gt=0, le=1.0, description="learning rate")
    betas: tuple[Beta, Beta] = Field((0.5, 0.999), description="Adam β₁, β₂ (DCGAN uses 0.5, 0.999)")
    eps: float = Field(1e-8, gt=0, description="Adam or RMSProp ε")


class OptimConfig(StrictConfig):
    """The optimizers of G and D, one each (their own lr: the two time-scale update rule, Heusel et al. 2017)."""

    g: AdamConfig = AdamConfig()
    d: AdamConfig = AdamConfig()


def lazy_ratio(reg_interval: int) -> float:
    """The share ``interval / (interval + 1)`` of updates the main steps take beside a lazy regularizer."""
    return reg_interval / (reg_interval + 1) if reg_interval > 1 else 1.0


def lr_ratio(cfg: AdamConfig, reg_interval: int) -> float:
    """The factor on ``cfg.lr`` for a lazy regularizer every ``reg_interval`` steps: Adam's correction, none
    for RMSProp (the correction is StyleGAN2's, made for Adam)."""
    return lazy_ratio(reg_interval) if cfg.kind == "adam" else 1.0


def make_adam(params: Iterable[torch.nn.Parameter], cfg: AdamConfig, reg_interval: int = 1) -> torch.optim.Adam:
    """Adam with lr and betas corrected for a regularizer applied every ``reg_interval`` steps.

    A lazy regularizer adds one optimizer step per interval, so the main steps take a share
    ``interval / (interval + 1)`` of the updates (Karras et al. 2020, appendix B; StyleGAN2-ADA's
    ``mb_ratio``): lr and betas are scaled to keep the same effective averaging. torch's fused kernel
    updates the parameters where it can (:func:`_fusable`).
    """
    ratio = lazy_ratio(reg_interval)
    betas = (cfg.betas[0] ** ratio, cfg.betas[1] ** ratio)
    params = list(params)
    return torch.optim.Adam(params, lr=cfg.lr * ratio, betas=betas, eps=cfg.eps, fused=_fusable(params))


def _fusable(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused Adam kernel can update ``params``: one kernel for all tensors instead of a
    Python loop over them (a cost per tensor that a second DDP worker cannot divide; docs/benchmarks.md)."""
    return bool(params) and all(p.device.type in FUSED_DEVICES and p.dtype.is_floating_point for p in params)


def make_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: AdamConfig, reg_interval: int = 1
) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.kind``: :func:`make_adam`, or RMSProp with ``cfg.lr`` and no momentum
    (Arjovsky et al. 2017, Algorithm 1: α = 5e-5)."""
    if cfg.kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, eps=cfg.eps, momentum=0.0)
    return make_adam(params, cfg, reg_interval)
