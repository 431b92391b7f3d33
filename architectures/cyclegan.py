"""CycleGAN (Zhu et al. 2017, "Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial Networks").

Two generators G: A → B and F: B → A (sec. 3) and two discriminators, D_B on B images and D_A on A images. The
generator is Johnson et al.'s residual network (app. 7.2: c7s1-64, d128, d256, R256 × 9 (6 at 128 px), u128,
u64, c7s1-3, reflection padding, instance norm), the discriminators the 70×70 PatchGAN of Pix2Pix. Layer for
layer this is the authors' code, junyanz/pytorch-CycleGAN-and-pix2pix ``models/networks.py``
(``ResnetGenerator`` with ``resnet_9blocks``, ``NLayerDiscriminator`` with ``basic``, ``--norm instance``).

Names: the authors' ``netG_A`` (A → B) is our ``G.ab`` and their ``netG_B`` (B → A) our ``G.ba``; their
``netD_A`` judges B images (real B against ``netG_A``'s fakes), which is our ``D.b``, and their ``netD_B``, which
judges A images, is our ``D.a``. Ours are named by the domain they judge.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from architectures.patchgan import Norm, PatchDiscriminator, conv_bias, init_normal, norm_layer
from architectures.registry import ArchConfig, Architecture, Capabilities, register
from core.spec import ImageSpec

Padding = Literal["reflect", "replicate", "zero"]


class CycleGANConfig(ArchConfig):
    """Widths and options of the CycleGAN generators and PatchGANs (defaults: the paper's 256 px networks)."""

    arch: Literal["cyclegan"] = "cyclegan"
    ngf: int = Field(64, ge=1, description="G width of the first layer (c7s1-64); 2× and 4× after the two halvings")
    ndf: int = Field(64, ge=1, description="D width of the first layer; doubles per layer up to 8×")
    g_blocks: int = Field(9, ge=0, description="residual blocks of G (the paper: 9 at 256 px, 6 at 128 px)")
    d_layers: int = Field(3, ge=1, description="stride-2 layers of the PatchGAN (3: 70×70 patches)")
    norm: Norm = Field(
        "instance", description="instance (the paper) or batch; convs before a norm have a bias only under instance"
    )
    padding: Padding = Field("reflect", description="padding of G's 7×7 and residual convs (the paper: reflect)")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout inside each residual block (the authors' --no_dropout default: none)"
    )


def _pad(kind: Padding, width: int) -> tuple[list[nn.Module], int]:
    """Explicit padding layers and the conv's own zero padding that together keep the size."""
    if kind == "reflect":
        return [nn.ReflectionPad2d(width)], 0
    if kind == "replicate":
        return [nn.ReplicationPad2d(width)], 0
    return [], width


class ResnetBlock(nn.Module):
    """R256 of app. 7.2: ``x + [pad → conv3 → norm → ReLU → (dropout) → pad → conv3 → norm](x)``."""

    def __init__(self, channels: int, norm: Norm, padding: Padding, dropout: float = 0.0):
        super().__init__()
        bias = conv_bias(norm)
        pad, p = _pad(padding, 1)
        body: list[nn.Module] = [
            *pad,
            nn.Conv2d(channels, channels, 3, 1, p, bias=bias),
            norm_layer(norm, channels),
            nn.ReLU(True),
        ]
        if dropout > 0:
            body.append(nn.Dropout(dropout))
        body += [*_pad(padding, 1)[0], nn.Conv2d(channels, channels, 3, 1, p, bias=bias), norm_layer(norm, channels)]
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """The CycleGAN generator (app. 7.2, after Johnson et al. 2016): c7s1-ngf, d2ngf, d4ngf (3×3 stride-2 convs),
    ``blocks`` × R4ngf, u2ngf, ungf (3×3 stride-½ transposed convs), c7s1-out, tanh. Sizes divisible by 4."""

    z_dim = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        ngf: int = 64,
        blocks: int = 9,
        norm: Norm = "instance",
        padding: Padding = "reflect",
        dropout: float = 0.0,
    ):
        super().__init__()
        bias = conv_bias(norm)
        pad, p = _pad(padding, 3)
        layers: list[nn.Module] = [
            *pad,
            nn.Conv2d(in_channels, ngf, 7, 1, p, bias=bias),
            norm_layer(norm, ngf),
            nn.ReLU(True),
        ]
        for mult in (1, 2):  # d128, d256
            layers += [
                nn.Conv2d(mult * ngf, 2 * mult * ngf, 3, 2, 1, bias=bias),
                norm_layer(norm, 2 * mult * ngf),
                nn.ReLU(True),
            ]
        layers += [ResnetBlock(4 * ngf, norm, padding, dropout) for _ in range(blocks)]
        for mult in (4, 2):  # u128, u64
            layers += [
                nn.ConvTranspose2d(mult * ngf, mult * ngf // 2, 3, 2, 1, output_padding=1, bias=bias),
                norm_layer(norm, mult * ngf // 2),
                nn.ReLU(True),
            ]
        layers += [*_pad(padding, 3)[0], nn.Conv2d(ngf, out_channels, 7, 1, p), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        init_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class CycleGenerators(nn.Module):
    """Both CycleGAN generators (sec. 3): ``ab`` maps domain A (``spec.input_channels``) to B (``spec.channels``),
    ``ba`` maps back. ``G(a)`` is ``G.ab(a)`` (what evaluation and sampling run). ``G(a, b)`` runs both cycles of
    sec. 3.2 in one call, so that one pass through a DDP wrapper uses every parameter::

        {"fake_b": ab(a), "rec_a": ba(fake_b), "fake_a": ba(b), "rec_b": ab(fake_a)}

    and with ``identity=True`` also ``"idt_b": ab(b)`` and ``"idt_a": ba(a)`` for the identity loss of sec. 5.2
    (which needs A and B to have the same number of channels)."""

    z_dim = 0

    def __init__(self, ab: nn.Module, ba: nn.Module):
        super().__init__()
        self.ab = ab
        self.ba = ba

    def forward(
        self, a: torch.Tensor, b: torch.Tensor | None = None, identity: bool = False
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        if b is None:
            return self.ab(a)
        fake_b = self.ab(a)
        fake_a = self.ba(b)
        out = {"fake_b": fake_b, "rec_a": self.ba(fake_b), "fake_a": fake_a, "rec_b": self.ab(fake_a)}
        if identity:
            if a.shape[1] != b.shape[1]:
                raise ValueError(
                    f"the identity loss feeds B images to G.ab (A → B) and A images to G.ba; it needs domains with "
                    f"the same number of channels, got A {a.shape[1]} and B {b.shape[1]} (set its weight to 0)"
                )
            out["idt_b"] = self.ab(b)
            out["idt_a"] = self.ba(a)
        return out


class CycleDiscriminators(nn.Module):
    """Both CycleGAN PatchGANs: ``a`` judges domain-A images (the authors' ``netD_B``), ``b`` judges domain-B
    images (their ``netD_A``). ``D(x_a, x_b)`` returns the two logit maps ``(a(x_a), b(x_b))``."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a = a
        self.b = b

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x_a), self.b(x_b)


def _check(spec: ImageSpec) -> None:
    if spec.input_channels < 1:
        raise ValueError("cyclegan translates images: the data must have a domain A (spec.input_channels > 0)")
    if spec.input_resolution != spec.resolution:
        raise ValueError(
            f"cyclegan's domains must have one image size: input_resolution {spec.input_resolution} != resolution {spec.resolution}"
        )
    if spec.resolution % 4:
        raise ValueError(
            f"the CycleGAN generator halves the size twice: the resolution must be divisible by 4, got {spec.resolution}"
        )


def build_generator(cfg: CycleGANConfig, spec: ImageSpec) -> CycleGenerators:
    """``G.ab`` (A → B) and ``G.ba`` (B → A)."""
    _check(spec)
    opts = dict(ngf=cfg.ngf, blocks=cfg.g_blocks, norm=cfg.norm, padding=cfg.padding, dropout=cfg.dropout)
    return CycleGenerators(
        ResnetGenerator(spec.input_channels, spec.channels, **opts),
        ResnetGenerator(spec.channels, spec.input_channels, **opts),
    )


def build_discriminator(cfg: CycleGANConfig, spec: ImageSpec) -> CycleDiscriminators:
    """``D.a`` on domain-A images, ``D.b`` on domain-B images."""
    _check(spec)
    return CycleDiscriminators(
        PatchDiscriminator(spec.input_channels, cfg.ndf, cfg.d_layers, cfg.norm),
        PatchDiscriminator(spec.channels, cfg.ndf, cfg.d_layers, cfg.norm),
    )


register(
    Architecture(
        "cyclegan", CycleGANConfig, build_generator, build_discriminator, Capabilities(conditioning="image", cycle=True)
    )
)
