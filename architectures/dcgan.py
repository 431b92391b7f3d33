"""DCGAN (Radford et al. 2016, "Unsupervised Representation Learning with Deep Convolutional GANs").

Following the paper's guidelines (section 3): G is a stack of stride-2 transposed convolutions from
a 4×4 projection of z, with BatchNorm and ReLU, ending in tanh; D is a stack of stride-2
convolutions with LeakyReLU(0.2) and BatchNorm (none on D's input layer, none on G's output layer),
ending in a 4×4 convolution to one logit. No pooling and no fully connected hidden layers. Weights
start from N(0, 0.02) and BatchNorm gains from N(1, 0.02) (section 4).

Conditional models (an addition to the paper, as in most class-conditional DCGANs) concatenate a
label embedding to z in G and use a projection term (Miyato & Koyama 2018) in D.

``norm`` chooses D's normalisation: the paper's BatchNorm, instance norm (Ulyanov et al. 2016, "Instance
Normalization"; per image, so each logit depends on its own image only, as a per-sample critic penalty
such as WGAN-GP's assumes: Gulrajani et al. 2017, section 4) or none. G keeps BatchNorm, the paper's
choice, whose batch dependence does no harm there.

``mbdisc_kernels`` B > 0 adds minibatch discrimination (Salimans et al. 2016, section 3.2;
:class:`architectures.layers.MinibatchDiscrimination`) on D's last features: the logit gains a linear term of the
layer's B outputs, which is the paper's "concatenate and feed the next layer" with the 4×4 output convolution as
that layer. ``D(img, c, return_features=True)`` also returns those features (feature matching, section 3.1).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from architectures.layers import MinibatchDiscrimination
from architectures.registry import ArchConfig, Architecture, Capabilities, register
from core.spec import ImageSpec


class DCGANConfig(ArchConfig):
    """Widths of the DCGAN G and D."""

    arch: Literal["dcgan"] = "dcgan"
    z_dim: int = Field(100, ge=1, description="latent size (the paper uses 100)")
    g_channels: int = Field(64, ge=1, description="G width at the output resolution; doubles per halving")
    d_channels: int = Field(64, ge=1, description="D width at the input resolution; doubles per halving")
    max_channels: int = Field(512, ge=1, description="cap on any layer's width")
    label_dim: int = Field(32, ge=1, description="label embedding size (conditional models)")
    norm: Literal["batch", "instance", "none"] = Field(
        "batch",
        description="D's normalisation: batch (the paper) | instance (per image, affine) | none; G keeps batch",
    )
    mbdisc_kernels: int = Field(
        0, ge=0, description="minibatch discrimination kernels B in D (Salimans et al. 2016: 100; 0: off)"
    )
    mbdisc_dim: int = Field(5, ge=1, description="minibatch discrimination: size C of each kernel's rows (paper: 5)")


def _widths(base: int, cap: int, resolution: int) -> list[int]:
    """Channel widths from resolution/2 down to 4 px: base, 2·base, … capped."""
    n = int(math.log2(resolution)) - 2  # number of stride-2 stages between 4 px and resolution
    return [min(base * 2**i, cap) for i in range(n)]


def _norm(kind: str, channels: int) -> list[nn.Module]:
    """D's normalisation layer of ``model.norm`` (none: no layer)."""
    if kind == "batch":
        return [nn.BatchNorm2d(channels)]
    if kind == "instance":
        return [nn.InstanceNorm2d(channels, affine=True)]
    return []


def _init_dcgan(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """z → 4×4 → … → resolution, by stride-2 transposed convolutions."""

    def __init__(self, cfg: DCGANConfig, spec: ImageSpec):
        super().__init__()
        self.z_dim = cfg.z_dim
        widths = _widths(cfg.g_channels, cfg.max_channels, spec.resolution)[::-1]  # 4 px first
        self.embed = nn.Embedding(spec.num_classes, cfg.label_dim) if spec.num_classes else None
        n_in = cfg.z_dim + (cfg.label_dim if self.embed is not None else 0)
        layers: list[nn.Module] = [  # project z to 4×4 (a 4×4 transposed conv of a 1×1 input)
            nn.ConvTranspose2d(n_in, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], spec.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _init_dcgan(self)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(c)], dim=1)
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """resolution → … → 4×4 by stride-2 convolutions, then a 4×4 convolution to one logit."""

    def __init__(self, cfg: DCGANConfig, spec: ImageSpec):
        super().__init__()
        widths = _widths(cfg.d_channels, cfg.max_channels, spec.resolution)
        layers: list[nn.Module] = [nn.Conv2d(spec.channels, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), *_norm(cfg.norm, c_out), nn.LeakyReLU(0.2, True)]
        self.features = nn.Sequential(*layers)
        self.out = nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False)
        # Projection discriminator: logit += <embed(c), pooled features>.
        self.embed = nn.Embedding(spec.num_classes, widths[-1]) if spec.num_classes else None
        _init_dcgan(self)
        self.mbdisc = self.mbdisc_out = None
        if cfg.mbdisc_kernels:  # its own initialisation (the paper's), after DCGAN's
            self.mbdisc = MinibatchDiscrimination(widths[-1] * 16, cfg.mbdisc_kernels, cfg.mbdisc_dim)
            self.mbdisc_out = nn.Linear(cfg.mbdisc_kernels, 1, bias=False)
            nn.init.normal_(self.mbdisc_out.weight, 0.0, 0.02)

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None, return_features: bool = False):
        """One logit per image; with ``return_features`` also D's last features ``[N, C, 4, 4]``."""
        h = self.features(img)
        logit = self.out(h).flatten(1).squeeze(1)
        if self.mbdisc is not None:
            logit = logit + self.mbdisc_out(self.mbdisc(h)).squeeze(1)
        if self.embed is not None:
            logit = logit + (self.embed(c) * h.sum(dim=(2, 3))).sum(dim=1)
        return (logit, h) if return_features else logit


register(Architecture("dcgan", DCGANConfig, DCGANGenerator, DCGANDiscriminator, Capabilities(features=True)))
