"""StyleGAN (Karras et al. 2019, "A Style-Based Generator Architecture for Generative Adversarial Networks").

A plain-PyTorch rendering of ``G_style`` / ``G_mapping`` / ``G_synthesis`` / ``D_basic`` of the official code
(``NVlabs/stylegan``, ``training/networks_stylegan.py``), with the same layers, gains, initialisation and
parameter counts, grown progressively as ProGAN (:mod:`architectures.progan`).

**Mapping network** (sec. 2, fig. 1b): ``z`` normalised to unit second moment, 8 equalized-lr dense layers
512 -> 512 with LeakyReLU(0.2) and a 100x lower learning rate (``mapping_lrmul`` 0.01), the He gain inside the
weights as in the official ``dense``. ``w`` is broadcast to one copy per synthesis layer (``num_ws`` = 18 at
1024x1024). Training tracks ``w_avg <- lerp(mean(w), w_avg, 0.995)`` (official ``dlatent_avg``); the truncation
trick (appendix B) ``w' = w_avg + psi (w - w_avg)`` applies to the first ``truncation_cutoff`` ws only
(official ``Gs`` defaults: psi 0.7, cutoff 8). :class:`Mapping` extends StyleGAN2's mapping network.

**Synthesis network** (sec. 2, fig. 1b): a learned constant ``4x4x512`` (initialised to ones), then per
resolution two 3x3 convs, the first after 2x nearest upsampling followed by a ``[1, 2, 1]`` blur (sec. 2 /
appendix C, after Zhang 2019). Each conv (and the constant) is followed by the layer epilogue

    ``x <- x + B * noise``   (per-channel learned strength ``B``, zero-initialised; sec. 3.2)
    ``x <- lrelu(x + b)``
    ``x <- AdaIN(x, y) = y_s * (x - mu(x)) / sigma(x) + y_b``   (eq. 1, instance norm then style)

with ``(y_s - 1, y_b) = A(w)``, a dense layer (gain 1) from this layer's ``w``: the official ``style_mod``
computes ``x * (style_s + 1) + style_b``, so a zero-initialised bias starts at the identity style. A 1x1
ToRGB per resolution. The official code fuses the upsampling into a transposed conv from 64x64 on
(``fused_scale='auto'``); that is the same function with the same parameters, so here it is always
"upsample, then conv".

**Discriminator**: ``D_basic`` is ProGAN's ``D_paper`` (same layers, same parameter count) with a ``[1, 2, 1]``
blur before every downscaling conv: :class:`Discriminator`, a :class:`architectures.progan.Discriminator`.

**Progressive growing** exactly as :mod:`architectures.progan`: ``net.set_lod(resolution, alpha)`` on G, D
and G_ema; G returns images at the current resolution, fading the new level in with
:func:`~architectures.progan.fade_in`; reals go through :func:`~architectures.progan.blend_reals`. Style
mixing (sec. 3.1) draws its crossover among the layers in use at the current level, as the official
``G_style`` (``cur_layers = num_layers - 2 * int(lod)``). Like ProGAN, the networks do not train under
``torch.compile`` (``compiles=False``): the level of detail is Python state that changes the graph at every
level and during each fade-in.

**Labels** as in the official code: G concatenates a learned embedding of the one-hot label
(``[num_classes, z_dim]``, N(0, 1), no weight scaling: ``LabelConcat``) to ``z`` before the normalisation;
D has one output per class and returns the one of the image's label (``LabelSwitch``, after Mescheder et
al. 2018), so labels need no extra loss term.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from architectures.layers import EqualizedConv2d, EqualizedLinear, bias_act, setup_filter
from architectures.progan import (
    SQRT2,
    GrowingConfig,
    _as_onehot,
    _is_pow2,
    _Progressive,
    blur2d,
    check_spec,
    fade_in,
    num_features,
    upscale2d,
)
from architectures.progan import Discriminator as ProGANDiscriminator
from architectures.progan import build_discriminator as build_progan_discriminator
from architectures.registry import Architecture, Capabilities, count_params, register
from architectures.stylegan2 import MappingNetwork, NoiseMode
from core.spec import ImageSpec

BLUR_FILTER = (1, 2, 1)


def instance_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise each feature map of each sample to zero mean and unit variance: ``(x - mu) / sqrt(var + eps)``
    over the pixels (official ``instance_norm``; the normalisation half of AdaIN, eq. 1)."""
    x = x - x.mean(dim=[2, 3], keepdim=True)
    return x * (x.square().mean(dim=[2, 3], keepdim=True) + eps).rsqrt()


class StyleMod(nn.Module):
    """The style half of AdaIN (eq. 1): ``x * (y_s + 1) + y_b`` with ``(y_s, y_b) = A(w)``, ``A`` an
    equalized-lr dense layer with gain 1 and a zero bias (official ``style_mod``)."""

    def __init__(self, w_dim: int, channels: int):
        super().__init__()
        self.channels = channels
        self.affine = EqualizedLinear(w_dim, 2 * channels, he_gain=1.0)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        style = self.affine(w).view(-1, 2, self.channels, 1, 1)
        return x * (style[:, 0] + 1) + style[:, 1]


class NoiseInput(nn.Module):
    """``x + noise * strength``: one noise image per sample broadcast over the channels, scaled per channel
    by a learned, zero-initialised ``strength`` (sec. 3.2, official ``apply_noise``).

    ``noise_mode``: ``"random"`` draws fresh noise, ``"const"`` uses the fixed buffer ``noise_const`` (the
    official non-trainable ``noise%d`` variables, ``randomize_noise=False``), ``"none"`` adds nothing."""

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.strength = nn.Parameter(torch.zeros([channels]))
        self.register_buffer("noise_const", torch.randn([1, 1, resolution, resolution]))

    def forward(self, x: torch.Tensor, noise_mode: NoiseMode = "random") -> torch.Tensor:
        if noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device, dtype=x.dtype)
        elif noise_mode == "const":
            noise = self.noise_const.to(x.dtype)
        elif noise_mode == "none":
            return x
        else:
            raise ValueError(f"noise_mode must be 'random', 'const' or 'none', got {noise_mode!r}")
        return x + noise * self.strength.to(x.dtype).view(1, -1, 1, 1)


class LayerEpilogue(nn.Module):
    """What follows every synthesis conv (official ``layer_epilogue``): noise, bias, LeakyReLU(0.2),
    instance norm, style (no pixel norm)."""

    def __init__(self, channels: int, w_dim: int, resolution: int):
        super().__init__()
        self.noise = NoiseInput(channels, resolution)
        self.bias = nn.Parameter(torch.zeros([channels]))
        self.style = StyleMod(w_dim, channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: NoiseMode = "random") -> torch.Tensor:
        x = self.noise(x, noise_mode)
        x = bias_act(x, self.bias, activation="lrelu", gain=1.0)  # the He gain sits in the conv weights
        return self.style(instance_norm(x), w)


def _conv3x3(in_channels: int, out_channels: int) -> EqualizedConv2d:
    """A 3x3 equalized-lr conv with the He gain sqrt(2) in its weights and no bias (the epilogue adds it)."""
    return EqualizedConv2d(in_channels, out_channels, 3, bias=False, he_gain=SQRT2)


class SynthesisInput(nn.Module):
    """4x4: the learned constant (ones) -> epilogue -> 3x3 conv -> epilogue; consumes ws 0 and 1."""

    def __init__(self, channels: int, w_dim: int):
        super().__init__()
        self.const = nn.Parameter(torch.ones([channels, 4, 4]))
        self.epilogue0 = LayerEpilogue(channels, w_dim, 4)
        self.conv = _conv3x3(channels, channels)
        self.epilogue1 = LayerEpilogue(channels, w_dim, 4)

    def forward(self, ws: torch.Tensor, noise_mode: NoiseMode = "random") -> torch.Tensor:
        x = self.const.unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
        x = self.epilogue0(x, ws[:, 0], noise_mode)
        return self.epilogue1(self.conv(x), ws[:, 1], noise_mode)


class SynthesisBlock(nn.Module):
    """Doubling the resolution: nearest 2x upsampling -> 3x3 conv -> blur -> epilogue -> 3x3 conv -> epilogue.

    Consumes the two ws ``2 * log2(resolution) - 4`` and ``- 3``.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.register_buffer("blur_filter", setup_filter(BLUR_FILTER))
        self.conv0 = _conv3x3(in_channels, out_channels)
        self.epilogue0 = LayerEpilogue(out_channels, w_dim, resolution)
        self.conv1 = _conv3x3(out_channels, out_channels)
        self.epilogue1 = LayerEpilogue(out_channels, w_dim, resolution)

    def forward(self, x: torch.Tensor, ws: torch.Tensor, noise_mode: NoiseMode = "random") -> torch.Tensor:
        x = blur2d(self.conv0(upscale2d(x)), self.blur_filter)
        x = self.epilogue0(x, ws[:, 0], noise_mode)
        return self.epilogue1(self.conv1(x), ws[:, 1], noise_mode)


def num_layers(img_resolution: int) -> int:
    """Synthesis layers (= ws) of a network: two per resolution from 4x4, ``2 * log2(R) - 2`` (18 at 1024)."""
    return 2 * int(math.log2(img_resolution)) - 2


class SynthesisNetwork(_Progressive):
    """``ws`` ``[N, num_ws, w_dim]`` -> images ``[N, img_channels, R, R]`` at the current resolution ``R``.

    ``blocks[str(res)]`` (:class:`SynthesisInput` at 4, :class:`SynthesisBlock` above) and ``to_rgb[str(res)]``
    (1x1, gain 1, linear) for ``res`` = 4, 8, ..., ``img_resolution``; ``nf`` as ProGAN's
    (:func:`~architectures.progan.num_features`). Levels above the current one ignore their ws.
    """

    def __init__(
        self,
        w_dim: int = 512,
        img_resolution: int = 1024,
        img_channels: int = 3,
        fmap_base: int = 8192,
        fmap_decay: float = 1.0,
        fmap_max: int = 512,
    ):
        super().__init__()
        if not _is_pow2(img_resolution) or img_resolution < 4:
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.num_ws = num_layers(img_resolution)

        def nf(res: int) -> int:
            return num_features(int(math.log2(res)) - 1, fmap_base, fmap_decay, fmap_max)

        self.resolutions = [2**r for r in range(2, int(math.log2(img_resolution)) + 1)]
        self.blocks = nn.ModuleDict()
        self.to_rgb = nn.ModuleDict()
        for res in self.resolutions:
            if res == 4:
                self.blocks[str(res)] = SynthesisInput(nf(res), w_dim)
            else:
                self.blocks[str(res)] = SynthesisBlock(nf(res // 2), nf(res), w_dim, res)
            self.to_rgb[str(res)] = EqualizedConv2d(nf(res), img_channels, 1, he_gain=1.0)
        self.set_lod(img_resolution, 1.0)

    def forward(self, ws: torch.Tensor, noise_mode: NoiseMode = "random") -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must have shape [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        ws = ws.to(self.to_rgb["4"].weight.dtype)  # the mapping computes in float32
        x = prev = None
        for res in self.resolutions:
            if res > self.current_resolution:
                break
            first = num_layers(res) - 2
            block_ws = ws[:, first : first + 2]
            prev, x = x, (self.blocks[str(res)](block_ws, noise_mode) if res == 4 else
                          self.blocks[str(res)](x, block_ws, noise_mode))  # fmt: skip
        img = self.to_rgb[str(self.current_resolution)](x)
        if self.fading:
            img = fade_in(img, self.to_rgb[str(self.current_resolution // 2)](prev), self.alpha)
        return img


class Generator(_Progressive):
    """StyleGAN's G (official ``G_style``): ``G(z, c) = synthesis(mapping(z))`` at the current level.

    Attributes the training loop and tools use: ``mapping`` (:class:`~architectures.stylegan2.MappingNetwork`
    with ``w_avg``), ``synthesis`` (:class:`SynthesisNetwork`), ``z_dim``, ``w_dim``, ``num_ws``,
    ``truncation_cutoff`` (the default of ``mapping``'s cutoff here). ``set_lod`` moves G and its synthesis.
    """

    def __init__(
        self,
        z_dim: int = 512,
        w_dim: int = 512,
        img_resolution: int = 1024,
        img_channels: int = 3,
        num_classes: int = 0,
        mapping_layers: int = 8,
        mapping_lr_multiplier: float = 0.01,
        w_avg_beta: float = 0.995,
        truncation_cutoff: int | None = 8,
        fmap_base: int = 8192,
        fmap_decay: float = 1.0,
        fmap_max: int = 512,
    ):
        super().__init__()
        self.z_dim, self.w_dim, self.num_classes = z_dim, w_dim, num_classes
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.truncation_cutoff = truncation_cutoff
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels, fmap_base, fmap_decay, fmap_max)
        self.num_ws = self.synthesis.num_ws
        self.mapping = Mapping(
            z_dim,
            num_classes,
            w_dim,
            self.num_ws,
            truncation_cutoff,
            num_layers=mapping_layers,
            lr_multiplier=mapping_lr_multiplier,
            w_avg_beta=w_avg_beta,
        )
        self.set_lod(img_resolution, 1.0)

    def set_lod(self, resolution: int, alpha: float = 1.0) -> None:
        """As :meth:`architectures.progan._Progressive.set_lod`, for G and its synthesis network."""
        super().set_lod(resolution, alpha)
        self.synthesis.set_lod(resolution, alpha)

    @property
    def layers_in_use(self) -> int:
        """Synthesis layers at the current level, as the official ``cur_layers = num_layers - 2 * int(lod)``
        with ``lod = log2(img_resolution / resolution) + 1 - alpha`` (a level at ``alpha = 0`` is not in use)."""
        lod = math.log2(self.img_resolution // self.current_resolution) + (0.0 if not self.fading else 1 - self.alpha)
        return self.num_ws - 2 * int(lod)

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        truncation_psi: float = 1,
        truncation_cutoff: int | None = None,
        noise_mode: NoiseMode = "random",
        update_emas: bool = False,
        style_mixing_prob: float = 0,
    ) -> torch.Tensor:
        """Images for latents ``z``; training passes ``style_mixing_prob`` (no truncation), sampling
        ``truncation_psi`` (``truncation_cutoff=None``: the configured cutoff, official 8)."""
        if style_mixing_prob:
            ws = self.mapping_with_style_mixing(z, c, style_mixing_prob, update_emas=update_emas)
        else:
            ws = self.mapping(
                z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff, update_emas=update_emas
            )
        return self.synthesis(ws, noise_mode=noise_mode)

    def mapping_with_style_mixing(
        self, z: torch.Tensor, c: torch.Tensor | None = None, mixing_prob: float = 0.9, update_emas: bool = False
    ) -> torch.Tensor:
        """``ws`` with style mixing regularisation (sec. 3.1, official ``G_style``): with probability
        ``mixing_prob`` the ws from a random crossover in ``[1, layers_in_use)`` on come from a second, fresh
        ``z``; otherwise the crossover is ``layers_in_use`` (no visible mixing). One draw per batch, on the
        device, like :meth:`architectures.stylegan2.Generator.mapping_with_style_mixing`."""
        ws = self.mapping(z, c, update_emas=update_emas)
        if mixing_prob > 0:
            in_use = self.layers_in_use
            cutoff = torch.randint(1, max(in_use, 2), [], device=ws.device)
            mixing = torch.rand([], device=ws.device) < mixing_prob
            cutoff = torch.where(mixing, cutoff, torch.full_like(cutoff, in_use))
            ws2 = self.mapping(torch.randn_like(z), c, update_emas=False)
            later = torch.arange(self.num_ws, device=ws.device).view(1, -1, 1) >= cutoff
            ws = torch.where(later, ws2, ws)
        return ws


class Mapping(MappingNetwork):
    """StyleGAN's ``G_mapping``: :class:`~architectures.stylegan2.MappingNetwork` with the He gain in the
    weights, the official label embedding (``LabelConcat``, see the module docstring) and a configured
    truncation cutoff: ``truncation_cutoff=None`` in :meth:`forward` means ``default_cutoff`` (official 8;
    ``None`` there: every layer)."""

    def __init__(
        self,
        z_dim: int,
        num_classes: int,
        w_dim: int,
        num_ws: int,
        default_cutoff: int | None = 8,
        **kwargs,
    ):
        super().__init__(z_dim * (2 if num_classes else 1), 0, w_dim, num_ws, he_gain=SQRT2, **kwargs)
        self.num_classes, self.default_cutoff = num_classes, default_cutoff
        self.label_embed = nn.Parameter(torch.randn([num_classes, z_dim])) if num_classes else None

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        truncation_psi: float = 1,
        truncation_cutoff: int | None = None,
        update_emas: bool = False,
    ) -> torch.Tensor:
        x = z.to(torch.float32)
        if self.label_embed is not None:
            y = _as_onehot(c, self.num_classes).to(self.label_embed) @ self.label_embed  # LabelConcat
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        cutoff = self.default_cutoff if truncation_cutoff is None else truncation_cutoff
        return super().forward(x, None, truncation_psi, cutoff, update_emas)


class Discriminator(ProGANDiscriminator):
    """StyleGAN's ``D_basic``: ProGAN's D (:class:`architectures.progan.Discriminator`) with a ``[1, 2, 1]`` blur
    before every downscaling conv and, for labelled data, one output per class of which ``D(img, c)``
    returns the label's (``LabelSwitch``) instead of AC-GAN logits."""

    def __init__(self, img_resolution: int = 1024, img_channels: int = 3, num_classes: int = 0, **kwargs):
        super().__init__(img_resolution, img_channels, 0, blur_filter=BLUR_FILTER, **kwargs)
        self.num_classes = num_classes
        if num_classes:
            hidden = self.epilogue.dense1.in_features
            self.epilogue.dense1 = EqualizedLinear(hidden, num_classes, he_gain=1.0)

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        out = self.outputs(img)
        if not self.num_classes:
            return out[:, 0]
        return (out * _as_onehot(c, self.num_classes).to(out)).sum(dim=1)


# ----------------------------------------------------------------------------------------------
# Parameter counting, config, registration.


def count_params_final_level(net: Generator | Discriminator) -> int:
    """Trainable parameters with only the full-resolution ToRGB (G) / FromRGB (D): **ganforge's own
    figure**; the official printout (``print_layers``) counts every level's, as
    :func:`~architectures.registry.count_params` does."""
    rgb = net.synthesis.to_rgb if isinstance(net, Generator) else net.from_rgb
    unused = sum(count_params(m) for res, m in rgb.items() if int(res) != net.img_resolution)
    return count_params(net) - unused


def param_notes(G: Generator, D: Discriminator) -> tuple[dict[str, int], str]:
    """What ``ganforge info`` adds: the mapping network's share of G and the final-level-only figures."""
    mapping, g, d = count_params(G.mapping), count_params_final_level(G), count_params_final_level(D)
    text = (
        f"G includes the mapping network ({mapping:,}); counts include every level's ToRGB/FromRGB, as the "
        f"official networks print them; final level only (ganforge's figure, not an official one): G {g:,}, D {d:,}"
    )
    return {"g_mapping_params": mapping, "g_params_final_level": g, "d_params_final_level": d}, text


class StyleGANConfig(GrowingConfig):
    """StyleGAN hyper-parameters; the defaults are the official ``networks_stylegan.py`` ones (the FFHQ
    1024x1024 networks of ``train.py``, which start growing at 8x8)."""

    arch: Literal["stylegan"] = "stylegan"
    z_dim: int = Field(512, ge=1, le=8192, description="latent size")
    w_dim: int = Field(512, ge=1, le=8192, description="intermediate latent (W) size")
    mapping_layers: int = Field(8, ge=1, description="depth of the mapping network")
    mapping_lr_multiplier: float = Field(0.01, gt=0)
    w_avg_beta: float = Field(0.995, ge=0, le=1, description="decay of the tracked w average (dlatent_avg)")
    truncation_cutoff: int | None = Field(
        8, ge=1, description="ws the truncation trick applies to (the first ones); None: all"
    )
    start_resolution: int = Field(8, ge=4, le=8192, description="level of detail the training starts at")


def build_generator(cfg: StyleGANConfig, spec: ImageSpec) -> Generator:
    check_spec(cfg, spec)
    G = Generator(
        z_dim=cfg.z_dim,
        w_dim=cfg.w_dim,
        img_resolution=spec.resolution,
        img_channels=spec.channels,
        num_classes=spec.num_classes,
        mapping_layers=cfg.mapping_layers,
        mapping_lr_multiplier=cfg.mapping_lr_multiplier,
        w_avg_beta=cfg.w_avg_beta,
        truncation_cutoff=cfg.truncation_cutoff,
        fmap_base=cfg.fmap_base,
        fmap_decay=cfg.fmap_decay,
        fmap_max=cfg.fmap_max,
    )
    G.start_resolution = G.synthesis.start_resolution = cfg.start_resolution
    return G


def build_discriminator(cfg: StyleGANConfig, spec: ImageSpec) -> Discriminator:
    """``D_basic``: ProGAN's D built the same way, with the blur (:class:`Discriminator`)."""
    return build_progan_discriminator(cfg, spec, cls=Discriminator)


register(
    Architecture(
        "stylegan",
        StyleGANConfig,
        build_generator,
        build_discriminator,
        Capabilities(mapping=True, growth=True, noise_inputs=True, truncation="psi", compiles=False),
        param_notes=param_notes,
    )
)
