"""SRGAN (Ledig et al. 2017, "Photo-Realistic Single Image Super-Resolution Using a Generative Adversarial
Network").

G is the SRResNet of sec. 2.1 and fig. 4: a 9×9 conv with PReLU, B residual blocks (conv3-BN-PReLU-conv3-BN and
a skip), conv3-BN with a skip from before the blocks, one sub-pixel upsampling block per factor 2 (conv3 to 256
channels → PixelShuffle(2) → PReLU, Shi et al. 2016) and a final 9×9 conv. D is the VGG-style network of sec. 2.1
and fig. 4: eight 3×3 convs, 64 to 512 channels, alternately stride 1 and 2, LeakyReLU(0.2) and BN (none after
the first), then Dense(1024), LeakyReLU(0.2), Dense(1) (a logit; the paper's sigmoid lives in the loss).

Choices where the paper is silent, as in the widely used reimplementations: every conv has a bias, each PReLU
has one slope, and the weights keep PyTorch's default initialisation. Images in and out are in [-1, 1] (the
paper feeds LR inputs in [0, 1]; ganforge's image-to-image contract has one range for every image) and G ends
in tanh: fig. 4 shows no activation after the last conv, but the paper trains against HR images scaled to
[-1, 1] (sec. 3.2), and tanh keeps every sample in the range that evaluation and image writing assume.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from architectures.registry import ArchConfig, Architecture, Capabilities, register
from core.spec import ImageSpec

D_WIDTHS = (1, 1, 2, 2, 4, 4, 8, 8)  # × d_channels: k3n64s1, k3n64s2, k3n128s1, …, k3n512s2 (fig. 4)
D_FEATURE_SIZE = 6  # the paper's 96 px crops after four stride-2 convs


class SRGANConfig(ArchConfig):
    """Widths of the SRResNet and the SRGAN discriminator (defaults: the paper's)."""

    arch: Literal["srgan"] = "srgan"
    g_blocks: int = Field(16, ge=1, description="residual blocks B of the SRResNet (the paper: 16)")
    g_channels: int = Field(64, ge=1, description="SRResNet width (the paper: 64)")
    d_channels: int = Field(64, ge=1, description="D width of the first two convs; 2×, 4×, 8× after (the paper: 64)")
    d_dense: int = Field(1024, ge=1, description="D's hidden dense layer (the paper: 1024)")
    norm: Literal["batch", "none"] = Field(
        "batch",
        description="batch: BatchNorm in G's blocks and D (the paper); none: no normalisation (as EDSR and ESRGAN "
        "found better for SR; also what lets data-parallel workers on CPU, which have no SyncBatchNorm, compute "
        "exactly what one worker does)",
    )


class ResidualBlock(nn.Module):
    """``x + BN(conv3(PReLU(BN(conv3(x)))))`` (sec. 2.1, after Gross & Wilber's layout); without the BNs when
    ``norm`` is False."""

    def __init__(self, channels: int, norm: bool = True):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1),
            _bn(channels, norm),
            nn.PReLU(),
            nn.Conv2d(channels, channels, 3, 1, 1),
            _bn(channels, norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _bn(channels: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm else nn.Identity()


def upsample_block(channels: int) -> nn.Sequential:
    """×2 by a sub-pixel conv: conv3 to 4·channels (256 for 64) → PixelShuffle(2) → PReLU (fig. 4)."""
    return nn.Sequential(nn.Conv2d(channels, 4 * channels, 3, 1, 1), nn.PixelShuffle(2), nn.PReLU())


class SRResNet(nn.Module):
    """The SRGAN generator G (fig. 4): ``[N, in_channels, s, s] → [N, out_channels, scale·s, scale·s]``, with
    ``scale`` a power of two (log2(scale) upsampling blocks) and images in [-1, 1]."""

    z_dim = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        scale: int = 4,
        blocks: int = 16,
        channels: int = 64,
        norm: bool = True,
    ):
        super().__init__()
        if scale < 2 or scale & (scale - 1):
            raise ValueError(f"the SRResNet upsamples by powers of two: scale must be 2, 4, 8, …, got {scale}")
        self.scale = scale
        self.head = nn.Sequential(nn.Conv2d(in_channels, channels, 9, 1, 4), nn.PReLU())
        self.blocks = nn.Sequential(*[ResidualBlock(channels, norm) for _ in range(blocks)])
        self.post = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), _bn(channels, norm))
        self.upsample = nn.Sequential(*[upsample_block(channels) for _ in range(int(math.log2(scale)))])
        self.tail = nn.Sequential(nn.Conv2d(channels, out_channels, 9, 1, 4), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        h = h + self.post(self.blocks(h))  # the long skip over all residual blocks
        return self.tail(self.upsample(h))


class SRDiscriminator(nn.Module):
    """The SRGAN discriminator (fig. 4): ``[N, channels, R, R] → [N]`` logits. Any crop size works: the
    features are average-pooled to the 6×6 that the paper's 96 px crops give, so at 96 px the pooling is the
    identity and the network is the paper's."""

    def __init__(self, in_channels: int, width: int = 64, dense: int = 1024, norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, mult in enumerate(D_WIDTHS):
            c_out = width * mult
            layers.append(nn.Conv2d(c_in, c_out, 3, 1 + i % 2, 1))
            if i > 0 and norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(D_FEATURE_SIZE)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * D_FEATURE_SIZE**2, dense), nn.LeakyReLU(0.2, True), nn.Linear(dense, 1)
        )

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(img))).squeeze(1)


def scale_of(spec: ImageSpec) -> int:
    """The upscaling factor ``spec.resolution / spec.input_resolution``: a power of two ≥ 2, or a ValueError."""
    if spec.input_channels < 1 or spec.input_resolution < 1:
        raise ValueError("srgan super-resolves images: the data must have a low-resolution input image")
    scale, rest = divmod(spec.resolution, spec.input_resolution)
    if rest or scale < 2 or scale & (scale - 1):
        raise ValueError(
            f"srgan upsamples by a power of two ≥ 2: resolution {spec.resolution} / input_resolution "
            f"{spec.input_resolution} is not one"
        )
    return scale


def build_generator(cfg: SRGANConfig, spec: ImageSpec) -> SRResNet:
    """The SRResNet from ``spec.input_channels`` at ``spec.input_resolution`` to ``spec.channels`` at ``spec.resolution``."""
    return SRResNet(
        spec.input_channels, spec.channels, scale_of(spec), cfg.g_blocks, cfg.g_channels, cfg.norm == "batch"
    )


def build_discriminator(cfg: SRGANConfig, spec: ImageSpec) -> SRDiscriminator:
    """The discriminator on ``spec.channels`` images at ``spec.resolution``."""
    scale_of(spec)
    return SRDiscriminator(spec.channels, cfg.d_channels, cfg.d_dense, cfg.norm == "batch")


register(Architecture("srgan", SRGANConfig, build_generator, build_discriminator, Capabilities(conditioning="image")))
