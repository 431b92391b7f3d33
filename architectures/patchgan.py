"""Pieces shared by the Pix2Pix and CycleGAN networks (Isola et al. 2017; Zhu et al. 2017): the normalisation
choice with its bias rule, the authors' N(0, 0.02) initialisation, and the PatchGAN discriminator.

They follow the authors' code, junyanz/pytorch-CycleGAN-and-pix2pix ``models/networks.py``
(``get_norm_layer``, ``init_weights``, ``NLayerDiscriminator``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

Norm = Literal["batch", "instance"]


def norm_layer(kind: Norm, channels: int) -> nn.Module:
    """BatchNorm with a learned affine, or InstanceNorm without one (the authors' ``get_norm_layer``)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


def conv_bias(kind: Norm) -> bool:
    """A conv followed by a norm has a bias only under InstanceNorm: BatchNorm's shift already plays that part,
    while the affine-free InstanceNorm has none (the authors' ``use_bias`` rule)."""
    return kind == "instance"


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """Conv and linear weights from N(0, std) with zero biases, BatchNorm gains from N(1, std) with zero shifts:
    the authors' ``init_weights(net, 'normal', 0.02)`` (Pix2Pix sec. 6.2 / CycleGAN app. 7.1: "weights
    initialized from a Gaussian distribution with mean 0 and standard deviation 0.02")."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def patch_receptive_field(layers: int) -> int:
    """Receptive field in px of one PatchGAN logit: ``layers`` 4×4 stride-2 convs, then two 4×4 stride-1 convs
    (70 for the default 3 layers, Pix2Pix sec. 3.2.2 / 4.4)."""
    r = 1
    for stride in [1, 1] + [2] * layers:  # walk back from the logit to the image
        r = (r - 1) * stride + 4
    return r


class PatchDiscriminator(nn.Module):
    """The PatchGAN of Pix2Pix sec. 3.2.2 (C64-C128-C256-C512 for 3 layers, app. 6.1.2), the authors'
    ``NLayerDiscriminator``: 4×4 convs, stride 2 except the last two, LeakyReLU(0.2), no norm on the first
    layer, one logit per overlapping ``patch_receptive_field(layers)`` px patch: ``[N, C, H, W] → [N, 1, h, w]``.
    Widths double per layer up to 8× ``ndf``."""

    def __init__(self, in_channels: int, ndf: int = 64, layers: int = 3, norm: Norm = "batch"):
        super().__init__()
        bias = conv_bias(norm)
        seq: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = ndf
        for n in range(1, layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < layers else 1  # the last width-raising conv keeps the size
            seq += [nn.Conv2d(width, out, 4, stride, 1, bias=bias), norm_layer(norm, out), nn.LeakyReLU(0.2, True)]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.model = nn.Sequential(*seq)
        self.receptive_field = patch_receptive_field(layers)
        init_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
