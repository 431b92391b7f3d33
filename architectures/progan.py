"""ProGAN (Karras et al. 2018, "Progressive Growing of GANs for Improved Quality, Stability, and Variation").

A plain-PyTorch rendering of ``G_paper`` / ``D_paper`` of the official code
(``tkarras/progressive_growing_of_gans``, ``networks.py`` defaults and ``config.py``), with the same
layers, gains and parameter counts. Shared blocks come from :mod:`architectures.layers`.

* :class:`Generator`: latent (+ one-hot label) normalised to unit second moment, a dense layer to
  4x4 (gain sqrt(2)/4 as in the official code), then per resolution nearest-neighbour upsampling and
  two 3x3 convs; every conv is followed by LeakyReLU(0.2) and pixelwise feature normalisation
  (sec. 4.2). A 1x1 ToRGB per resolution, linear.
* :class:`Discriminator`: a 1x1 FromRGB per resolution (LeakyReLU), per resolution two 3x3 convs,
  the second followed by 2x2 average pooling; at 4x4 minibatch standard deviation (sec. 3, one extra
  feature map averaged over all channels and pixels, groups of ``mbstd_group_size``), a 3x3 conv, and
  two dense layers.
* Equalized learning rate everywhere (sec. 4.1) with the He gain inside the weight scale, as the
  official ``get_weight`` (``he_gain`` of :mod:`architectures.layers`).

**Progressive growing (sec. 2, fig. 2).** Both networks always hold every block from 4x4 to the
target resolution. The level of detail is *state* set by the training loop with
``net.set_lod(resolution, alpha)`` before each step (on G, D and G_ema):

* ``G(z, c)`` returns images at the **current** ``resolution`` (not the target one);
* ``D(img, c)`` expects images at the **current** ``resolution``;
* while a new block fades in (``alpha < 1``), G returns
  ``alpha * toRGB(new_block(x)) + (1 - alpha) * upsample(toRGB_prev(x))`` (:func:`fade_in`) and D
  computes ``alpha * new_block(fromRGB(img)) + (1 - alpha) * fromRGB_prev(downsample(img))``;
* real images go through :func:`blend_reals`, the same :func:`fade_in` applied to the reals
  (official ``process_reals``, "FadeLOD"), so reals and fakes are blended alike.

A freshly built network is at the full resolution with ``alpha = 1`` (the complete network), so code
that knows nothing of growing (sampling, evaluation) gets full-size images. :func:`training_schedule`
gives ``(resolution, alpha)`` from the number of images shown, like the official ``TrainingSchedule``.
The official code instead runs the networks at full resolution and upsamples lower levels
(``UpscaleLOD``); working at the current resolution computes the same function, only cheaper.

**Labels.** As in the official code (AC-GAN, Odena et al. 2017): G concatenates the one-hot label to
the latent (before the latent normalisation); D takes no label input and has ``num_classes`` extra
outputs, the logits of an auxiliary classifier, returned by ``D(img, c, return_class_logits=True)``.
``D(img, c)`` alone returns only the real/fake score, so **labels only matter if the training loop
adds the AC-GAN term** (official ``loss.py``, weight 1): ``cross_entropy(class_logits, c)`` on reals
and fakes in the D loss and on fakes in the G loss.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator

from architectures.layers import (
    EqualizedConv2d,
    EqualizedLinear,
    bias_act,
    minibatch_stddev,
    normalize_2nd_moment,
    setup_filter,
    upfirdn2d,
)
from architectures.registry import ArchConfig, Architecture, Capabilities, count_params, register
from core.spec import ImageSpec

SQRT2 = math.sqrt(2)


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def num_features(stage: int, fmap_base: int = 8192, fmap_decay: float = 1.0, fmap_max: int = 512) -> int:
    """Feature maps of a stage (official ``nf``): ``min(int(fmap_base / 2**(stage * fmap_decay)), fmap_max)``.

    Resolution ``2**r`` uses ``nf(r - 1)`` maps: 512 up to 64x64 with the defaults, then 256, ..., 16 at 1024.
    """
    return min(int(fmap_base / (2.0 ** (stage * fmap_decay))), fmap_max)


# ----------------------------------------------------------------------------------------------
# Resampling and fading (sec. 2, fig. 2).


def upscale2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling: every pixel becomes a ``factor x factor`` block."""
    return x if factor == 1 else F.interpolate(x, scale_factor=factor, mode="nearest")


def downscale2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Box-filter downsampling: the mean of each ``factor x factor`` block (average pooling)."""
    return x if factor == 1 else F.avg_pool2d(x, factor)


def blur2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Low-pass each channel with the odd-sized 2-D filter ``f`` (:func:`~architectures.layers.setup_filter`),
    zero-padded to keep the size: StyleGAN v1's ``blur2d`` (``[1, 2, 1]``, a "SAME" depthwise conv)."""
    return upfirdn2d(x, f, padding=f.shape[-1] // 2)


def fade_in(new: torch.Tensor, old: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * new + (1 - alpha) * upscale2d(old)``: the output of a level being faded in,
    ``new`` at the current resolution and ``old`` at half of it (G's output and :func:`blend_reals`)."""
    return alpha * new + (1 - alpha) * upscale2d(old)


def blend_reals(x: torch.Tensor, resolution: int, alpha: float) -> torch.Tensor:
    """Real images for D at level ``(resolution, alpha)``, mirroring G's output.

    ``x`` (``[N, C, H, H]``, any power-of-two ``H >= resolution``) is box-downsampled to
    ``resolution``; during a fade-in (``alpha < 1``) the result is
    ``alpha * x_res + (1 - alpha) * upscale2d(downscale2d(x_res))`` (official ``process_reals``).
    ``alpha`` is ignored at 4x4, as by the networks.
    """
    h = x.shape[-1]
    if x.shape[-2] != h or not _is_pow2(h) or not _is_pow2(resolution) or not 4 <= resolution <= h:
        raise ValueError(f"blend_reals: cannot take {tuple(x.shape[-2:])} images to {resolution}x{resolution}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"blend_reals: alpha must be in [0, 1], got {alpha}")
    x = downscale2d(x, h // resolution)
    if alpha == 1.0 or resolution == 4:  # nothing below 4x4 to fade from (as in G and D)
        return x
    return fade_in(x, downscale2d(x), alpha)


def level_from_lod(lod: float, max_resolution: int) -> tuple[int, float]:
    """The official scalar level of detail (0 = full resolution, fractional = fading in) as the
    ``(resolution, alpha)`` used here: ``2**(log2(max_resolution) - floor(lod))`` and ``1 - frac(lod)``."""
    lod_floor = math.floor(lod)
    return 2 ** (int(math.log2(max_resolution)) - lod_floor), 1.0 - (lod - lod_floor)


def training_schedule(
    kimg: float,
    max_resolution: int,
    start_resolution: int = 4,
    training_kimg: float = 600,
    transition_kimg: float = 600,
) -> tuple[int, float]:
    """``(resolution, alpha)`` after ``kimg`` thousand real images (official ``TrainingSchedule``).

    Each phase first trains the current level for ``training_kimg``, then fades the next one in over
    ``transition_kimg`` (``alpha`` 0 -> 1 at the doubled resolution); after the last phase it stays at
    ``max_resolution``. The paper uses 800k + 800k images per phase (sec. 6.3); ``config.py`` defaults to 600k.
    """
    phase_dur = training_kimg + transition_kimg
    phase_idx = math.floor(kimg / phase_dur) if phase_dur > 0 else 0
    phase_kimg = kimg - phase_idx * phase_dur
    lod = math.log2(max_resolution) - math.floor(math.log2(start_resolution)) - phase_idx
    if transition_kimg > 0:
        lod -= max(phase_kimg - training_kimg, 0.0) / transition_kimg
    return level_from_lod(max(lod, 0.0), max_resolution)


def _as_onehot(c: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """Integer labels ``[N]`` -> float one-hot ``[N, num_classes]``; float ``[N, num_classes]`` passes."""
    if c is None:
        raise ValueError(f"this generator is conditional ({num_classes} classes): labels c are required")
    if not torch.is_floating_point(c):
        return F.one_hot(c.long(), num_classes).to(torch.float32)
    if c.ndim != 2 or c.shape[1] != num_classes:
        raise ValueError(f"float labels must have shape [N, {num_classes}], got {tuple(c.shape)}")
    return c


class _Progressive(nn.Module):
    """The level-of-detail state shared by G and D: ``current_resolution`` and ``alpha``."""

    img_resolution: int
    start_resolution: int = 4  # where training starts (the config's value, set by the builders)

    def set_lod(self, resolution: int, alpha: float = 1.0) -> None:
        """Run at ``resolution`` (a power of two from 4 to ``img_resolution``) with the block of that
        resolution faded in by ``alpha`` in [0, 1] (1: fully in). ``alpha`` is ignored at 4x4."""
        if not _is_pow2(resolution) or not 4 <= resolution <= self.img_resolution:
            raise ValueError(
                f"set_lod: resolution must be a power of two in [4, {self.img_resolution}], got {resolution}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"set_lod: alpha must be in [0, 1], got {alpha}")
        self.current_resolution, self.alpha = int(resolution), float(alpha)

    @property
    def fading(self) -> bool:
        """Whether a lower level still contributes (``alpha < 1`` above 4x4)."""
        return self.current_resolution > 4 and self.alpha < 1.0

    def extra_repr(self) -> str:
        return f"img_resolution={self.img_resolution}, current_resolution={self.current_resolution}, alpha={self.alpha}"


# ----------------------------------------------------------------------------------------------
# Generator.


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pixelwise feature vector normalisation (sec. 4.2): ``x / sqrt(mean_over_channels(x**2) + eps)``."""
    return normalize_2nd_moment(x, dim=1, eps=eps)


class GInputBlock(nn.Module):
    """4x4: normalised latent -> dense to ``channels x 4 x 4`` -> lrelu -> PN -> 3x3 conv -> lrelu -> PN.

    The dense layer has one bias per feature map (added after the reshape) and the gain sqrt(2)/4
    of the official code ("to match the original Theano implementation").
    """

    def __init__(self, in_features: int, channels: int, use_pixelnorm: bool):
        super().__init__()
        self.channels, self.use_pixelnorm = channels, use_pixelnorm
        self.dense = EqualizedLinear(in_features, channels * 16, bias=False, he_gain=SQRT2 / 4)
        self.bias = nn.Parameter(torch.zeros([channels]))
        self.conv = EqualizedConv2d(channels, channels, 3, activation="lrelu", he_gain=SQRT2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense(x).reshape(-1, self.channels, 4, 4)
        x = bias_act(x, self.bias, activation="lrelu", gain=1.0)
        x = pixel_norm(x) if self.use_pixelnorm else x
        x = self.conv(x)
        return pixel_norm(x) if self.use_pixelnorm else x


class GBlock(nn.Module):
    """Doubling the resolution: nearest upsampling -> (3x3 conv -> lrelu -> PN) x 2.

    The official default fuses the upsampling into a transposed conv (``fused_scale``); that is
    the same function with the same parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, use_pixelnorm: bool):
        super().__init__()
        self.use_pixelnorm = use_pixelnorm
        self.conv0 = EqualizedConv2d(in_channels, out_channels, 3, activation="lrelu", he_gain=SQRT2)
        self.conv1 = EqualizedConv2d(out_channels, out_channels, 3, activation="lrelu", he_gain=SQRT2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv0(upscale2d(x))
        x = pixel_norm(x) if self.use_pixelnorm else x
        x = self.conv1(x)
        return pixel_norm(x) if self.use_pixelnorm else x


class Generator(_Progressive):
    """ProGAN's G: ``G(z, c)`` -> images ``[N, img_channels, R, R]`` at the current resolution ``R``.

    ``blocks[str(res)]`` and ``to_rgb[str(res)]`` for ``res`` = 4, 8, ..., ``img_resolution``.
    """

    def __init__(
        self,
        z_dim: int = 512,
        img_resolution: int = 1024,
        img_channels: int = 3,
        num_classes: int = 0,
        fmap_base: int = 8192,
        fmap_decay: float = 1.0,
        fmap_max: int = 512,
        use_pixelnorm: bool = True,
    ):
        super().__init__()
        if not _is_pow2(img_resolution) or img_resolution < 4:
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        self.z_dim, self.img_resolution, self.img_channels = z_dim, img_resolution, img_channels
        self.num_classes = num_classes

        def nf(res: int) -> int:
            return num_features(int(math.log2(res)) - 1, fmap_base, fmap_decay, fmap_max)

        self.resolutions = [2**r for r in range(2, int(math.log2(img_resolution)) + 1)]
        self.blocks = nn.ModuleDict()
        self.to_rgb = nn.ModuleDict()
        for res in self.resolutions:
            if res == 4:
                self.blocks[str(res)] = GInputBlock(z_dim + num_classes, nf(res), use_pixelnorm)
            else:
                self.blocks[str(res)] = GBlock(nf(res // 2), nf(res), use_pixelnorm)
            self.to_rgb[str(res)] = EqualizedConv2d(nf(res), img_channels, 1, he_gain=1.0)
        self.set_lod(img_resolution, 1.0)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        x = z
        if self.num_classes:
            x = torch.cat([x, _as_onehot(c, self.num_classes).to(z.dtype)], dim=1)
        x = normalize_2nd_moment(x)  # latent normalisation (official `normalize_latents`), label included
        prev = x
        for res in self.resolutions:
            if res > self.current_resolution:
                break
            prev, x = x, self.blocks[str(res)](x)
        img = self.to_rgb[str(self.current_resolution)](x)
        if self.fading:
            img = fade_in(img, self.to_rgb[str(self.current_resolution // 2)](prev), self.alpha)
        return img


# ----------------------------------------------------------------------------------------------
# Discriminator.


class DBlock(nn.Module):
    """Halving the resolution: 3x3 conv -> lrelu -> 3x3 conv -> 2x2 average pool -> lrelu.

    The second conv is the official default fused ``conv2d_downscale2d`` (pooling before bias and
    activation): :class:`EqualizedConv2d` with ``down=2`` and a 2x2 box filter. ``blur_filter`` (StyleGAN
    v1's ``D_basic``: ``(1, 2, 1)``) low-passes the activations before that conv (:func:`blur2d`).
    """

    def __init__(self, in_channels: int, out_channels: int, blur_filter: tuple[float, ...] | None = None):
        super().__init__()
        if blur_filter is not None:
            self.register_buffer("blur_filter", setup_filter(blur_filter))
        else:
            self.blur_filter = None
        self.conv0 = EqualizedConv2d(in_channels, in_channels, 3, activation="lrelu", he_gain=SQRT2)
        self.conv1 = EqualizedConv2d(
            in_channels, out_channels, 3, activation="lrelu", down=2, resample_filter=(1, 1), he_gain=SQRT2
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv0(x)
        if self.blur_filter is not None:
            x = blur2d(x, self.blur_filter)
        return self.conv1(x)


class DEpilogue(nn.Module):
    """4x4: minibatch stddev -> 3x3 conv -> lrelu -> dense -> lrelu -> dense to ``1 + num_classes``."""

    def __init__(self, in_channels: int, hidden: int, num_classes: int, mbstd_group_size: int):
        super().__init__()
        self.mbstd_group_size = mbstd_group_size
        mbstd_channels = 1 if mbstd_group_size > 1 else 0
        self.conv = EqualizedConv2d(in_channels + mbstd_channels, in_channels, 3, activation="lrelu", he_gain=SQRT2)
        self.dense0 = EqualizedLinear(in_channels * 16, hidden, activation="lrelu", he_gain=SQRT2)
        self.dense1 = EqualizedLinear(hidden, 1 + num_classes, he_gain=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mbstd_group_size > 1:
            x = minibatch_stddev(x, self.mbstd_group_size, num_channels=1)
        x = self.conv(x)
        return self.dense1(self.dense0(x.flatten(1)))


class Discriminator(_Progressive):
    """ProGAN's D: ``D(img, c)`` -> scores ``[N]`` for images at the current resolution.

    ``from_rgb[str(res)]`` for every resolution; ``blocks[str(res)]`` for ``res >= 8`` halve the
    resolution; ``epilogue`` is the 4x4 part. ``c`` is accepted and ignored (AC-GAN: D predicts
    labels instead of reading them); ``return_class_logits=True`` also returns them ``[N, num_classes]``.
    ``blur_filter`` blurs before every downscaling conv (StyleGAN v1's ``D_basic``, see :class:`DBlock`).
    """

    def __init__(
        self,
        img_resolution: int = 1024,
        img_channels: int = 3,
        num_classes: int = 0,
        fmap_base: int = 8192,
        fmap_decay: float = 1.0,
        fmap_max: int = 512,
        mbstd_group_size: int = 4,
        blur_filter: tuple[float, ...] | None = None,
    ):
        super().__init__()
        if not _is_pow2(img_resolution) or img_resolution < 4:
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        self.img_resolution, self.img_channels, self.num_classes = img_resolution, img_channels, num_classes

        def nf(res: int) -> int:
            return num_features(int(math.log2(res)) - 1, fmap_base, fmap_decay, fmap_max)

        self.resolutions = [2**r for r in range(2, int(math.log2(img_resolution)) + 1)]
        self.from_rgb = nn.ModuleDict()
        self.blocks = nn.ModuleDict()
        for res in self.resolutions:
            self.from_rgb[str(res)] = EqualizedConv2d(img_channels, nf(res), 1, activation="lrelu", he_gain=SQRT2)
            if res > 4:
                self.blocks[str(res)] = DBlock(nf(res), nf(res // 2), blur_filter)
        self.epilogue = DEpilogue(
            nf(4), num_features(0, fmap_base, fmap_decay, fmap_max), num_classes, mbstd_group_size
        )
        self.set_lod(img_resolution, 1.0)

    def outputs(self, img: torch.Tensor) -> torch.Tensor:
        """The epilogue's outputs ``[N, 1 + num_classes]`` for images at the current level."""
        res = self.current_resolution
        if img.shape[-2:] != (res, res):
            raise ValueError(f"D is at {res}x{res} (set_lod) but got images {tuple(img.shape[-2:])}")
        x = self.from_rgb[str(res)](img)
        if res > 4:
            x = self.blocks[str(res)](x)
            if self.fading:
                old = self.from_rgb[str(res // 2)](downscale2d(img))
                x = self.alpha * x + (1 - self.alpha) * old
        for r in reversed(self.resolutions):
            if 4 < r < res:
                x = self.blocks[str(r)](x)
        return self.epilogue(x)

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None, return_class_logits: bool = False):
        out = self.outputs(img)
        if return_class_logits:
            return out[:, 0], out[:, 1:]
        return out[:, 0]


# ----------------------------------------------------------------------------------------------
# Parameter counting, config, registration.


def count_params_final_level(net: Generator | Discriminator) -> int:
    """Trainable parameters without the ToRGB (G) / FromRGB (D) layers of the lower resolutions: every
    block, but only the ToRGB / FromRGB of ``img_resolution``.

    This is **ganforge's own figure**, not an official one: the official ``G_paper`` / ``D_paper``
    (``networks.py``) hold a ToRGB / FromRGB for every level, and their printout (``print_layers``) counts
    them all, as :func:`~architectures.registry.count_params` does. At 1024x1024: G 23,079,115 and D 23,087,249
    with every level (official), 23,071,507 and 23,077,137 with the final level only (this function).
    """
    rgb = net.to_rgb if isinstance(net, Generator) else net.from_rgb
    unused = sum(count_params(m) for res, m in rgb.items() if int(res) != net.img_resolution)
    return count_params(net) - unused


def param_notes(G: Generator, D: Discriminator) -> tuple[dict[str, int], str]:
    """What ``ganforge info`` adds to the counts: the final-level-only figures (:func:`count_params_final_level`),
    as extra JSON keys and a sentence saying which count is which."""
    g, d = count_params_final_level(G), count_params_final_level(D)
    text = (
        f"counts include every level's ToRGB/FromRGB, as the official networks print them; final level only "
        f"(ganforge's figure, not an official one): G {g:,}, D {d:,}"
    )
    return {"g_params_final_level": g, "d_params_final_level": d}, text


class GrowingConfig(ArchConfig):
    """What every progressively grown family (progan, stylegan) configures alike: the feature-map schedule, the
    minibatch stddev group and the level of detail training starts at (official ``networks.py`` defaults)."""

    fmap_base: int = Field(
        8192, ge=1, description="fmaps at stage s: min(int(fmap_base / 2**(s * fmap_decay)), fmap_max)"
    )
    fmap_decay: float = Field(1.0, ge=0.0, le=4.0, description="log2 feature-map reduction per doubling")
    fmap_max: int = Field(512, ge=1, le=8192)
    mbstd_group_size: int = Field(4, ge=0, le=1024, description="minibatch stddev group size; 0 or 1: off")
    start_resolution: int = Field(4, ge=4, le=8192, description="level of detail the training starts at")

    @field_validator("start_resolution")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if not _is_pow2(v):
            raise ValueError(f"start_resolution must be a power of two, got {v}")
        return v


class ProGANConfig(GrowingConfig):
    """ProGAN hyper-parameters; the defaults are the official ``networks.py`` / ``config.py`` ones
    (the 1024x1024 CelebA-HQ networks of appendix A.1; CIFAR-10 used fmap_base 4096, fmap_max 128,
    z_dim 128)."""

    arch: Literal["progan"] = "progan"
    z_dim: int = Field(512, ge=1, le=8192, description="latent size")
    use_pixelnorm: bool = Field(True, description="pixelwise feature normalisation after G's convs")


def check_spec(cfg: GrowingConfig, spec: ImageSpec) -> None:
    """A growing network cannot start above the data's resolution."""
    if cfg.start_resolution > spec.resolution:
        raise ValueError(f"start_resolution {cfg.start_resolution} exceeds the data resolution {spec.resolution}")


def build_generator(cfg: ProGANConfig, spec: ImageSpec) -> Generator:
    check_spec(cfg, spec)
    G = Generator(
        z_dim=cfg.z_dim,
        img_resolution=spec.resolution,
        img_channels=spec.channels,
        num_classes=spec.num_classes,
        fmap_base=cfg.fmap_base,
        fmap_decay=cfg.fmap_decay,
        fmap_max=cfg.fmap_max,
        use_pixelnorm=cfg.use_pixelnorm,
    )
    G.start_resolution = cfg.start_resolution
    return G


def build_discriminator(cfg: GrowingConfig, spec: ImageSpec, cls: type[Discriminator] | None = None) -> Discriminator:
    """The D of ``cfg`` for ``spec`` images, of class ``cls`` (default: ProGAN's; StyleGAN's D_basic subclasses it)."""
    check_spec(cfg, spec)
    D = (cls or Discriminator)(
        img_resolution=spec.resolution,
        img_channels=spec.channels,
        num_classes=spec.num_classes,
        fmap_base=cfg.fmap_base,
        fmap_decay=cfg.fmap_decay,
        fmap_max=cfg.fmap_max,
        mbstd_group_size=cfg.mbstd_group_size,
    )
    D.start_resolution = cfg.start_resolution
    return D


register(
    Architecture(
        "progan",
        ProGANConfig,
        build_generator,
        build_discriminator,
        Capabilities(growth=True, class_logits=True),
        param_notes=param_notes,
    )
)
