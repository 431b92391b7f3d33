"""Adam for G and D, with the learning-rate and β correction for lazy regularization."""

from __future__ import annotations

from typing import Annotated, Iterable

import torch
from pydantic import Field

from core.config import StrictConfig

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class AdamConfig(StrictConfig):
    """One network's Adam settings."""

    lr: float = Field(2e-4, gt=0, le=1.0, description="learning rate")
    betas: tuple[Beta, Beta] = Field((0.5, 0.999), description="Adam β₁, β₂ (DCGAN uses 0.5, 0.999)")
    eps: float = Field(1e-8, gt=0, description="Adam ε")


class OptimConfig(StrictConfig):
    """Adam settings of G and D."""

    g: AdamConfig = AdamConfig()
    d: AdamConfig = AdamConfig()


def lazy_ratio(reg_interval: int) -> float:
    """The share ``interval / (interval + 1)`` of updates the main steps take beside a lazy regularizer."""
    return reg_interval / (reg_interval + 1) if reg_interval > 1 else 1.0


def make_adam(params: Iterable[torch.nn.Parameter], cfg: AdamConfig, reg_interval: int = 1) -> torch.optim.Adam:
    """Adam with lr and betas corrected for a regularizer applied every ``reg_interval`` steps.

    A lazy regularizer adds one optimizer step per interval, so the main steps take a share
    ``interval / (interval + 1)`` of the updates (Karras et al. 2020, appendix B; StyleGAN2-ADA's
    ``mb_ratio``): lr and betas are scaled to keep the same effective averaging.
    """
    ratio = lazy_ratio(reg_interval)
    betas = (cfg.betas[0] ** ratio, cfg.betas[1] ** ratio)
    return torch.optim.Adam(params, lr=cfg.lr * ratio, betas=betas, eps=cfg.eps)
