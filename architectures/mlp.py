"""The fully connected GAN of the original paper (Goodfellow et al. 2014) and most tutorials.

G: z → Dense → LeakyReLU → … → Dense → tanh, reshaped to an image. D: image → Dense → LeakyReLU →
… → Dense → one logit. Conditional models concatenate a learned label embedding to z (G) and to the
flattened image (D), as in Mirza & Osindero 2014.

``mbdisc_kernels`` B > 0 adds minibatch discrimination (Salimans et al. 2016, section 3.2) on D's last hidden
layer, whose B outputs feed the output layer beside it; ``D(img, c, return_features=True)`` also returns that
hidden layer (feature matching, section 3.1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from architectures.layers import MinibatchDiscrimination
from architectures.registry import ArchConfig, Architecture, Capabilities, register
from core.spec import ImageSpec


class MLPConfig(ArchConfig):
    """Sizes of the fully connected G and D."""

    arch: Literal["mlp"] = "mlp"
    z_dim: int = Field(64, ge=1, description="latent size")
    hidden: int = Field(256, ge=1, description="width of every hidden layer")
    layers: int = Field(3, ge=1, le=16, description="hidden layers in G and in D")
    label_dim: int = Field(16, ge=1, description="label embedding size (conditional models)")
    leak: float = Field(0.2, ge=0.0, lt=1.0, description="LeakyReLU negative slope")
    mbdisc_kernels: int = Field(
        0, ge=0, description="minibatch discrimination kernels B in D (Salimans et al. 2016: 100; 0: off)"
    )
    mbdisc_dim: int = Field(5, ge=1, description="minibatch discrimination: size C of each kernel's rows (paper: 5)")


def _mlp(sizes: list[int], leak: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(leak))
    return nn.Sequential(*layers)


class MLPGenerator(nn.Module):
    """z (and label) → flat vector → tanh image."""

    def __init__(self, cfg: MLPConfig, spec: ImageSpec):
        super().__init__()
        self.z_dim, self.spec = cfg.z_dim, spec
        self.embed = nn.Embedding(spec.num_classes, cfg.label_dim) if spec.num_classes else None
        n_in = cfg.z_dim + (cfg.label_dim if self.embed is not None else 0)
        n_out = spec.channels * spec.resolution**2
        self.net = _mlp([n_in] + [cfg.hidden] * cfg.layers + [n_out], cfg.leak)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(c)], dim=1)
        s = self.spec
        return torch.tanh(self.net(z)).view(-1, s.channels, s.resolution, s.resolution)


class MLPDiscriminator(nn.Module):
    """Flat image (and label) → one logit."""

    def __init__(self, cfg: MLPConfig, spec: ImageSpec):
        super().__init__()
        self.embed = nn.Embedding(spec.num_classes, cfg.label_dim) if spec.num_classes else None
        n_in = spec.channels * spec.resolution**2 + (cfg.label_dim if self.embed is not None else 0)
        self.net = _mlp([n_in] + [cfg.hidden] * cfg.layers + [1], cfg.leak)
        self.mbdisc = self.mbdisc_out = None
        if cfg.mbdisc_kernels:
            self.mbdisc = MinibatchDiscrimination(cfg.hidden, cfg.mbdisc_kernels, cfg.mbdisc_dim)
            self.mbdisc_out = nn.Linear(cfg.mbdisc_kernels, 1, bias=False)

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None, return_features: bool = False):
        """One logit per image; with ``return_features`` also the last hidden layer ``[N, hidden]``."""
        x = img.flatten(1)
        if self.embed is not None:
            x = torch.cat([x, self.embed(c)], dim=1)
        h = self.net[:-1](x)  # through the last hidden layer's activation
        logit = self.net[-1](h).squeeze(1)
        if self.mbdisc is not None:
            logit = logit + self.mbdisc_out(self.mbdisc(h)).squeeze(1)
        return (logit, h) if return_features else logit


register(Architecture("mlp", MLPConfig, MLPGenerator, MLPDiscriminator, Capabilities(features=True)))
