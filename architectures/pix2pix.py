"""Pix2Pix (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks").

G is the U-Net of sec. 3.2.1 and app. 6.1.1 (encoder C64-C128-C256-C512-C512-C512-C512-C512, decoder the mirror
image, with skip connections between layer i and layer n − i), D the conditional 70×70 PatchGAN of sec. 3.2.2
that judges the input and output images stacked along the channels. Layer for layer this is the authors' code,
junyanz/pytorch-CycleGAN-and-pix2pix ``models/networks.py`` (``UnetGenerator`` with ``unet_256``,
``NLayerDiscriminator`` with ``basic``), with the same parameter counts (see ``docs/architectures.md``).

G's only noise is dropout (sec. 3.1, app. 6.1.1: 50% in the decoder's first three layers, which the authors'
code places in the ``num_downs - 5`` levels just outside the innermost one). It is an ``nn.Dropout``: active in train
mode and off in eval mode, as in the authors' test script (which calls ``.eval()``; the paper instead keeps it
on at test time, sec. 3.3).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from architectures.patchgan import Norm, PatchDiscriminator, conv_bias, init_normal, norm_layer
from architectures.registry import ArchConfig, Architecture, Capabilities, register
from core.spec import ImageSpec

__all__ = ["PatchDiscriminator", "Pix2PixConfig", "Pix2PixDiscriminator", "UnetGenerator"]


class Pix2PixConfig(ArchConfig):
    """Widths and options of the Pix2Pix U-Net and PatchGAN (defaults: the paper's 256 px networks)."""

    arch: Literal["pix2pix"] = "pix2pix"
    ngf: int = Field(64, ge=1, description="G width at the outermost level; doubles per level up to 8×")
    ndf: int = Field(64, ge=1, description="D width of the first layer; doubles per layer up to 8×")
    d_layers: int = Field(3, ge=1, description="stride-2 layers of the PatchGAN (3: 70×70 patches)")
    norm: Norm = Field(
        "batch", description="batch (the paper) or instance; convs before a norm have a bias only under instance"
    )
    dropout: float = Field(
        0.5, ge=0.0, lt=1.0, description="dropout in the three decoder blocks next to the innermost (0: none)"
    )
    num_downs: int | None = Field(
        None, ge=5, description="U-Net depth; None: log2(resolution), a 1×1 bottleneck (unet_256: 8)"
    )


class UnetBlock(nn.Module):
    """One level of the U-Net: ``x → [down → inner → up]``, returned as ``cat([x, that], 1)`` (the skip of
    sec. 3.2.1) except at the outermost level, whose up-conv gives the image through tanh. The authors'
    ``UnetSkipConnectionBlock``: down = LeakyReLU(0.2) → conv4 s2 → norm (no activation before the outermost
    conv, no norm on it or on the innermost one); up = ReLU → transposed conv4 s2 → norm (tanh at the outermost)."""

    def __init__(
        self,
        outer: int,
        inner: int,
        sub: nn.Module | None,
        norm: Norm,
        in_channels: int | None = None,
        outermost: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.outermost = outermost
        bias = conv_bias(norm)
        down: list[nn.Module] = [] if outermost else [nn.LeakyReLU(0.2, True)]
        down.append(nn.Conv2d(in_channels or outer, inner, 4, 2, 1, bias=bias))
        if sub is not None and not outermost:
            down.append(norm_layer(norm, inner))
        up_in = inner if sub is None else 2 * inner  # the level below returns its input and output stacked
        up: list[nn.Module] = [nn.ReLU(True)]
        if outermost:
            up += [nn.ConvTranspose2d(up_in, outer, 4, 2, 1), nn.Tanh()]
        else:
            up += [nn.ConvTranspose2d(up_in, outer, 4, 2, 1, bias=bias), norm_layer(norm, outer)]
            if dropout > 0:
                up.append(nn.Dropout(dropout))
        self.model = nn.Sequential(*down, *([sub] if sub is not None else []), *up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y if self.outermost else torch.cat([x, y], 1)


class UnetGenerator(nn.Module):
    """The Pix2Pix U-Net (sec. 3.2.1, app. 6.1.1): ``num_downs`` halvings from ``in_channels`` images to a
    ``resolution / 2**num_downs`` bottleneck and back to ``out_channels`` images in [-1, 1] (tanh), built from the
    innermost level outwards as the authors' ``UnetGenerator``. Widths ngf, 2ngf, 4ngf, then 8ngf for every
    deeper level; ``dropout`` in the ``num_downs - 5`` levels between the 8ngf ones and the innermost."""

    z_dim = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_downs: int = 8,
        ngf: int = 64,
        norm: Norm = "batch",
        dropout: float = 0.5,
    ):
        super().__init__()
        if num_downs < 5:
            raise ValueError(
                f"the U-Net needs num_downs >= 5 (the C64-C128-C256-C512 levels and a bottleneck), got {num_downs}"
            )
        block = UnetBlock(8 * ngf, 8 * ngf, None, norm)  # innermost
        for _ in range(num_downs - 5):
            block = UnetBlock(8 * ngf, 8 * ngf, block, norm, dropout=dropout)
        for mult in (4, 2, 1):
            block = UnetBlock(mult * ngf, 2 * mult * ngf, block, norm)
        self.model = UnetBlock(out_channels, ngf, block, norm, in_channels=in_channels, outermost=True)
        init_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Pix2PixDiscriminator(nn.Module):
    """The conditional PatchGAN of sec. 3.1 / 3.2.2: ``D(x, y)`` is the logit map ``[N, 1, h, w]`` of
    ``cat([x, y], 1)`` for an input image x and a (real or generated) output image y of the same size."""

    def __init__(self, in_channels: int, out_channels: int, ndf: int = 64, layers: int = 3, norm: Norm = "batch"):
        super().__init__()
        self.patch = PatchDiscriminator(in_channels + out_channels, ndf, layers, norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.patch(torch.cat([x, y], 1))


def _num_downs(cfg: Pix2PixConfig, spec: ImageSpec) -> int:
    if spec.input_channels < 1:
        raise ValueError("pix2pix translates images: the data must have an input image (spec.input_channels > 0)")
    if spec.input_resolution != spec.resolution:
        raise ValueError(
            f"pix2pix maps images to images of the same size: input_resolution {spec.input_resolution} "
            f"!= resolution {spec.resolution}"
        )
    n = cfg.num_downs if cfg.num_downs is not None else round(math.log2(spec.resolution))
    if spec.resolution % 2**n or n < 5:
        raise ValueError(
            f"the U-Net needs a resolution divisible by 2**num_downs with num_downs >= 5; got {spec.resolution} px, num_downs {n}"
        )
    return n


def build_generator(cfg: Pix2PixConfig, spec: ImageSpec) -> UnetGenerator:
    """The U-Net from ``spec.input_channels`` to ``spec.channels`` channels."""
    return UnetGenerator(spec.input_channels, spec.channels, _num_downs(cfg, spec), cfg.ngf, cfg.norm, cfg.dropout)


def build_discriminator(cfg: Pix2PixConfig, spec: ImageSpec) -> Pix2PixDiscriminator:
    """The conditional PatchGAN on ``spec.input_channels + spec.channels`` channels."""
    _num_downs(cfg, spec)
    return Pix2PixDiscriminator(spec.input_channels, spec.channels, cfg.ndf, cfg.d_layers, cfg.norm)


register(
    Architecture("pix2pix", Pix2PixConfig, build_generator, build_discriminator, Capabilities(conditioning="image"))
)
