"""StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN", CVPR).

A plain-PyTorch rendering of the networks of NVlabs' ``stylegan2-ada-pytorch`` (``training/networks.py``),
with the same layers, initialisation, gains and parameter counts; only the custom CUDA kernels are
replaced by the ordinary ``torch`` ops of :mod:`architectures.layers`.

* :class:`MappingNetwork`: ``z`` (normalised) and an optional label embedding -> ``w``, an MLP of
  equalized-lr layers with a 100x lower learning rate; tracks ``w_avg`` for the truncation trick.
* :class:`SynthesisNetwork`: a learned 4x4 constant, then per resolution two 3x3 modulated convs
  (weight demodulation, sec. 2.2, eqs. 1-3) with per-pixel noise and bias outside the style block
  (sec. 2.1, fig. 2c), and the "skip" output architecture: a ToRGB at every resolution whose
  outputs are upsampled and summed (sec. 4.1, fig. 7b).
* :class:`Discriminator`: "resnet" (default, sec. 4.1, fig. 7c), "skip" or "orig" blocks down to
  4x4, then minibatch stddev, a conv and two fully connected layers; class-conditional models
  project the output onto a label embedding ``cmap`` (as the official ``DiscriminatorEpilogue``).

Reduced precision follows StyleGAN2-ADA: the blocks of the ``num_fp16_res`` highest resolutions
compute in a reduced dtype and every conv output is clamped to ``+-conv_clamp``. Here the dtype is the
``reduced_dtype`` attribute of :class:`Generator` / :class:`Discriminator` (``None``: all float32),
read at every forward, so the orchestrator can pick ``torch.float16`` or ``torch.bfloat16``.

Labels ``c`` are integer class indices ``[N]`` (or ``None``); they are one-hot encoded internally,
so the layers (and parameter counts) are those of the official one-hot ``c_dim`` models. Float
``[N, num_classes]`` label vectors (one-hot or soft) are accepted as well.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from architectures.layers import (
    ACTIVATIONS,
    EqualizedConv2d,
    EqualizedLinear,
    MinibatchStdLayer,
    bias_act,
    conv2d_resample,
    downsample2d,
    normalize_2nd_moment,
    setup_filter,
    upsample2d,
)
from architectures.registry import ArchConfig, Architecture, Capabilities, register
from core.spec import ImageSpec

FIR_FILTER = (1, 3, 3, 1)
Arch = Literal["orig", "skip", "resnet"]
NoiseMode = Literal["random", "const", "none"]


def _as_onehot(c: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """Integer labels ``[N]`` -> float one-hot ``[N, num_classes]``; float ``[N, num_classes]`` passes."""
    if c is None:
        raise ValueError(f"this network is conditional ({num_classes} classes): labels c are required")
    if not torch.is_floating_point(c):
        if c.ndim != 1:
            raise ValueError(f"integer labels must have shape [N], got {tuple(c.shape)}")
        return F.one_hot(c.long(), num_classes).to(torch.float32)
    if c.ndim != 2 or c.shape[1] != num_classes:
        raise ValueError(f"float labels must have shape [N, {num_classes}], got {tuple(c.shape)}")
    return c.to(torch.float32)


def _channels(res: int, channel_base: int, channel_max: int) -> int:
    """Feature maps at resolution ``res`` (official ``channels_dict``): ``min(channel_base // res, channel_max)``."""
    return min(channel_base // res, channel_max)


def _reduced_from(img_resolution: int, num_fp16_res: int) -> int:
    """Lowest resolution computed in reduced precision: the top ``num_fp16_res`` ones, never 4x4."""
    return max(2 ** (int(math.log2(img_resolution)) + 1 - num_fp16_res), 8)


# ----------------------------------------------------------------------------------------------
# Modulated convolution (sec. 2.2).


def modulate_weights(weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True) -> torch.Tensor:
    """Per-sample conv weights ``[N, O, I, kh, kw]`` from ``weight`` ``[O, I, kh, kw]`` and styles ``[N, I]``.

    Modulation, eq. 1: ``w'_ijk = s_i * w_ijk``. Demodulation, eq. 3:
    ``w''_ijk = w'_ijk / sqrt(sum_{i,k} w'_ijk^2 + eps)``, so each output channel's filter has unit
    L2 norm and, for unit-variance inputs, unit-variance outputs (eq. 2).
    """
    w = weight.unsqueeze(0) * styles[:, None, :, None, None]
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).rsqrt()
    return w


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = True,
) -> torch.Tensor:
    """Convolve each sample of ``x`` ``[N, I, H, W]`` with its own modulated/demodulated ``weight``
    (:func:`modulate_weights`, eqs. 1 and 3), optionally upsampling by ``up`` with the FIR filter,
    then add ``noise`` (broadcast to ``[N, O, H', W']``).

    ``fused_modconv=True`` builds the per-sample weights and runs one grouped conv (``groups=N``);
    ``False`` scales the activations instead: ``(conv(x * s, w)) * d`` with the demodulation
    coefficients ``d``: the same result (sec. 2.2 notes that demodulation may scale either the weights
    or the output feature maps), with one shared weight, which is faster for training batches.
    """
    n = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    if styles.shape != (n, in_channels):
        raise ValueError(f"styles must have shape [{n}, {in_channels}], got {tuple(styles.shape)}")

    # float16 only: pre-scale weight and styles by their max so that the products below cannot
    # overflow; demodulation removes the scale again. (bfloat16 has float32's range.)
    if x.dtype == torch.float16 and demodulate:
        weight_max = weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True)
        weight = weight * (1 / math.sqrt(in_channels * kh * kw) / weight_max)
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)

    if not fused_modconv:
        x = x * styles.to(x.dtype)[:, :, None, None]
        x = conv2d_resample(x, weight.to(x.dtype), resample_filter, up=up, padding=padding, flip_weight=flip_weight)
        if demodulate:
            dcoefs = (modulate_weights(weight, styles, demodulate=False).square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
            x = x * dcoefs.to(x.dtype)[:, :, None, None]
        if noise is not None:
            x = x + noise.to(x.dtype)
        return x

    w = modulate_weights(weight, styles, demodulate=demodulate)  # [N, O, I, kh, kw]
    x = x.reshape(1, n * in_channels, *x.shape[2:])
    w = w.reshape(n * out_channels, in_channels, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), resample_filter, up=up, padding=padding, groups=n, flip_weight=flip_weight)
    x = x.reshape(n, out_channels, *x.shape[2:])
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x


# ----------------------------------------------------------------------------------------------
# Mapping network.


class MappingNetwork(nn.Module):
    """``(z, c) -> w`` broadcast to ``[N, num_ws, w_dim]`` (``num_ws=None``: ``[N, w_dim]``).

    ``z`` is normalised to unit second moment; a label embedding (a linear layer from the one-hot
    label, also normalised) is concatenated; then ``num_layers`` equalized-lr lrelu layers with learning
    rate multiplier ``lr_multiplier`` (StyleGAN sec. 2 and appendix C). With ``update_emas=True`` the
    running mean ``w_avg`` moves towards the batch mean: ``w_avg <- lerp(mean(w), w_avg, w_avg_beta)``.
    ``truncation_psi`` applies the truncation trick ``w' = w_avg + psi * (w - w_avg)`` (StyleGAN
    appendix B) to all ``ws`` or to the first ``truncation_cutoff`` of them.

    ``he_gain`` places the He gain in the weights as StyleGAN v1's ``G_mapping`` does (see
    :class:`~architectures.layers.EqualizedLinear`); ``None`` is StyleGAN2's placement.
    """

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_ws: int | None,
        num_layers: int = 8,
        embed_features: int | None = None,
        layer_features: int | None = None,
        activation: str = "lrelu",
        lr_multiplier: float = 0.01,
        w_avg_beta: float | None = 0.995,
        he_gain: float | None = None,
    ):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.w_avg_beta = w_avg_beta
        embed_features = (w_dim if embed_features is None else embed_features) if c_dim > 0 else 0
        layer_features = w_dim if layer_features is None else layer_features
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]

        self.embed = EqualizedLinear(c_dim, embed_features) if c_dim > 0 else None
        self.layers = nn.ModuleList(
            EqualizedLinear(fin, fout, activation=activation, lr_multiplier=lr_multiplier, he_gain=he_gain)
            for fin, fout in zip(features[:-1], features[1:])
        )
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self,
        z: torch.Tensor | None,
        c: torch.Tensor | None = None,
        truncation_psi: float = 1,
        truncation_cutoff: int | None = None,
        update_emas: bool = False,
    ) -> torch.Tensor:
        x = normalize_2nd_moment(z.to(torch.float32)) if self.z_dim > 0 else None
        if self.embed is not None:
            y = normalize_2nd_moment(self.embed(_as_onehot(c, self.c_dim)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for layer in self.layers:
            x = layer(x)

        if update_emas and self.w_avg_beta is not None:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))

        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat(1, self.num_ws, 1)

        if truncation_psi != 1:
            if self.w_avg_beta is None:
                raise ValueError("truncation needs w_avg, which this mapping network does not track")
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                head = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
                x = torch.cat([head, x[:, truncation_cutoff:]], dim=1)
        return x

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim}, c_dim={self.c_dim}, w_dim={self.w_dim}, num_ws={self.num_ws}"


# ----------------------------------------------------------------------------------------------
# Synthesis network.


class SynthesisLayer(nn.Module):
    """One style block (fig. 2c): affine ``A`` (bias init 1) -> modulated conv with demodulation ->
    ``+ noise * noise_strength`` (``B``) -> ``+ bias`` -> lrelu (gain sqrt(2)) -> clamp.

    ``noise_mode``: ``"random"`` draws fresh per-pixel noise ``[N, 1, H, W]`` (StyleGAN sec. 3.2),
    ``"const"`` uses the fixed buffer ``noise_const``, ``"none"`` adds nothing.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        kernel_size: int = 3,
        up: int = 1,
        use_noise: bool = True,
        activation: str = "lrelu",
        resample_filter: Sequence[float] = FIR_FILTER,
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.up, self.use_noise, self.activation, self.conv_clamp = up, use_noise, activation, conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = ACTIVATIONS[activation][1]

        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            # shape [1], not a 0-dim scalar as in the official code: DeepSpeed cannot broadcast 0-dim parameters
            self.noise_strength = nn.Parameter(torch.zeros([1]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        noise_mode: NoiseMode = "random",
        fused_modconv: bool = True,
        gain: float = 1,
    ) -> torch.Tensor:
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device)
            noise = noise * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        elif noise_mode not in ("random", "const", "none"):
            raise ValueError(f"noise_mode must be 'random', 'const' or 'none', got {noise_mode!r}")

        x = modulated_conv2d(
            x,
            self.weight,
            styles,
            noise=noise,
            up=self.up,
            padding=self.padding,
            resample_filter=self.resample_filter,
            flip_weight=(self.up == 1),
            fused_modconv=fused_modconv,
        )
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, activation=self.activation, gain=self.act_gain * gain, clamp=clamp)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"resolution={self.resolution}, up={self.up}"
        )


class ToRGBLayer(nn.Module):
    """1x1 modulated conv to image channels, without demodulation (fig. 7b's "tRGB"); equalized lr is
    applied to the styles, as in the official code."""

    def __init__(
        self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1, conv_clamp: float | None = None
    ):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network: (const 4x4 | conv0 with 2x upsampling) -> conv1, and a
    ToRGB. ``architecture``: ``"skip"`` (StyleGAN2's choice, fig. 7b) sums the upsampled image of the
    previous block with this block's ToRGB; ``"resnet"`` adds a 1x1 upsampling shortcut scaled, like
    the main path, by 1/sqrt(2) (sec. 4.1); ``"orig"`` has only the final ToRGB.

    Consumes ``num_conv + num_torgb`` ws; the ToRGB's w is shared with the next block's first conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        is_last: bool,
        architecture: Arch = "skip",
        resample_filter: Sequence[float] = FIR_FILTER,
        conv_clamp: float | None = None,
        reduced_precision: bool = False,
        use_noise: bool = True,
    ):
        super().__init__()
        if architecture not in ("orig", "skip", "resnet"):
            raise ValueError(f"unknown synthesis architecture {architecture!r}")
        self.in_channels, self.resolution, self.img_channels = in_channels, resolution, img_channels
        self.is_last, self.architecture, self.reduced_precision = is_last, architecture, reduced_precision
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        layer_kwargs = dict(w_dim=w_dim, resolution=resolution, conv_clamp=conv_clamp, use_noise=use_noise)

        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(
                in_channels, out_channels, up=2, resample_filter=resample_filter, **layer_kwargs
            )
        self.conv1 = SynthesisLayer(out_channels, out_channels, **layer_kwargs)
        self.num_conv = 1 if in_channels == 0 else 2

        self.num_torgb = 1 if (is_last or architecture == "skip") else 0
        if self.num_torgb:
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
        if in_channels != 0 and architecture == "resnet":
            self.skip = EqualizedConv2d(
                in_channels, out_channels, kernel_size=1, bias=False, up=2, resample_filter=resample_filter
            )

    def forward(
        self,
        x: torch.Tensor | None,
        img: torch.Tensor | None,
        ws: torch.Tensor,
        reduced_dtype: torch.dtype | None = None,
        noise_mode: NoiseMode = "random",
        fused_modconv: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = reduced_dtype if (self.reduced_precision and reduced_dtype is not None) else torch.float32
        if fused_modconv is None:  # official heuristic: grouped conv for inference, shared weights for training
            fused_modconv = (not self.training) and (dtype == torch.float32 or ws.shape[0] == 1)
        w_iter = iter(ws.unbind(dim=1))
        kw = dict(noise_mode=noise_mode, fused_modconv=fused_modconv)

        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
            x = self.conv1(x, next(w_iter), **kw)
        elif self.architecture == "resnet":
            x = x.to(dtype)
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x, next(w_iter), **kw)
            x = self.conv1(x, next(w_iter), gain=math.sqrt(0.5), **kw)
            x = y + x
        else:
            x = x.to(dtype)
            x = self.conv0(x, next(w_iter), **kw)
            x = self.conv1(x, next(w_iter), **kw)

        # The image path stays in float32.
        if img is not None:
            img = upsample2d(img, self.resample_filter)
        if self.num_torgb:
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
            img = img + y if img is not None else y
        return x, img

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, architecture={self.architecture}, reduced={self.reduced_precision}"


class SynthesisNetwork(nn.Module):
    """``ws`` ``[N, num_ws, w_dim]`` -> image ``[N, img_channels, R, R]`` (float32), one
    :class:`SynthesisBlock` per resolution 4, 8, ..., R with ``min(channel_base // res, channel_max)``
    channels. ``reduced_dtype`` (default ``None``) is the dtype of the top ``num_fp16_res`` blocks.
    """

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int = 32768,
        channel_max: int = 512,
        num_fp16_res: int = 0,
        architecture: Arch = "skip",
        conv_clamp: float | None = None,
        use_noise: bool = True,
        resample_filter: Sequence[float] = FIR_FILTER,
    ):
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.reduced_dtype: torch.dtype | None = None
        self.block_resolutions = [2**i for i in range(2, int(math.log2(img_resolution)) + 1)]
        reduced_from = _reduced_from(img_resolution, num_fp16_res)

        self.blocks = nn.ModuleList()
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(
                in_channels=_channels(res // 2, channel_base, channel_max) if res > 4 else 0,
                out_channels=_channels(res, channel_base, channel_max),
                w_dim=w_dim,
                resolution=res,
                img_channels=img_channels,
                is_last=(res == img_resolution),
                architecture=architecture,
                resample_filter=resample_filter,
                conv_clamp=conv_clamp,
                reduced_precision=(res >= reduced_from),
                use_noise=use_noise,
            )
            self.blocks.append(block)
            self.num_ws += block.num_conv
        self.num_ws += self.blocks[-1].num_torgb

    def forward(
        self, ws: torch.Tensor, noise_mode: NoiseMode = "random", fused_modconv: bool | None = None
    ) -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must have shape [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for block in self.blocks:
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(
                x, img, block_ws, reduced_dtype=self.reduced_dtype, noise_mode=noise_mode, fused_modconv=fused_modconv
            )
        return img


class Generator(nn.Module):
    """StyleGAN2 generator ``G(z, c) = synthesis(mapping(z, c))``.

    Attributes used by training loops: ``mapping`` (:class:`MappingNetwork`), ``synthesis``
    (:class:`SynthesisNetwork`), ``z_dim``, ``w_dim``, ``num_ws``, ``num_classes``,
    ``mapping.w_avg`` and ``reduced_dtype`` (stored on ``synthesis``; the mapping is always float32).
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
        channel_base: int = 32768,
        channel_max: int = 512,
        num_fp16_res: int = 0,
        conv_clamp: float | None = None,
        architecture: Arch = "skip",
        use_noise: bool = True,
    ):
        super().__init__()
        self.z_dim, self.w_dim, self.num_classes = z_dim, w_dim, num_classes
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.synthesis = SynthesisNetwork(
            w_dim,
            img_resolution,
            img_channels,
            channel_base=channel_base,
            channel_max=channel_max,
            num_fp16_res=num_fp16_res,
            architecture=architecture,
            conv_clamp=conv_clamp,
            use_noise=use_noise,
        )
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(
            z_dim,
            num_classes,
            w_dim,
            num_ws=self.num_ws,
            num_layers=mapping_layers,
            lr_multiplier=mapping_lr_multiplier,
            w_avg_beta=w_avg_beta,
        )

    @property
    def reduced_dtype(self) -> torch.dtype | None:
        """Dtype of the reduced-precision synthesis blocks (``None``: everything in float32)."""
        return self.synthesis.reduced_dtype

    @reduced_dtype.setter
    def reduced_dtype(self, dtype: torch.dtype | None) -> None:
        self.synthesis.reduced_dtype = dtype

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        truncation_psi: float = 1,
        truncation_cutoff: int | None = None,
        noise_mode: NoiseMode = "random",
        update_emas: bool = False,
        fused_modconv: bool | None = None,
        style_mixing_prob: float = 0,
    ) -> torch.Tensor:
        """Images for latents ``z`` (and labels ``c``); training passes ``style_mixing_prob`` (no truncation)."""
        if style_mixing_prob:
            ws = self.mapping_with_style_mixing(z, c, style_mixing_prob, update_emas=update_emas)
        else:
            ws = self.mapping(
                z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff, update_emas=update_emas
            )
        return self.synthesis(ws, noise_mode=noise_mode, fused_modconv=fused_modconv)

    def mapping_with_style_mixing(
        self, z: torch.Tensor, c: torch.Tensor | None = None, mixing_prob: float = 0.9, update_emas: bool = False
    ) -> torch.Tensor:
        """``ws`` for training with style mixing regularisation (StyleGAN sec. 3.1), as the official loss:
        with probability ``mixing_prob`` one random cutoff in ``[1, num_ws)`` is drawn for the batch
        and the ws from that index on come from a second, fresh ``z`` (same labels). As in the official
        code the choice stays on the device (no host sync, one graph for torch.compile): the second ``z``
        is always mapped, and a cutoff of ``num_ws`` keeps the first ws whole."""
        ws = self.mapping(z, c, update_emas=update_emas)
        if mixing_prob > 0:
            cutoff = torch.randint(1, self.num_ws, [], device=ws.device)
            mixing = torch.rand([], device=ws.device) < mixing_prob
            cutoff = torch.where(mixing, cutoff, torch.full_like(cutoff, self.num_ws))
            ws2 = self.mapping(torch.randn_like(z), c, update_emas=False)
            later = torch.arange(self.num_ws, device=ws.device).view(1, -1, 1) >= cutoff
            ws = torch.where(later, ws2, ws)
        return ws


# ----------------------------------------------------------------------------------------------
# Discriminator.


class DiscriminatorBlock(nn.Module):
    """One resolution of D: (FromRGB) -> 3x3 conv -> 3x3 conv with FIR 2x downsampling.

    ``"resnet"`` adds a 1x1 downsampling shortcut and scales both paths by 1/sqrt(2) (sec. 4.1,
    fig. 7c); ``"skip"`` has a FromRGB at every resolution fed by the downsampled input image
    (fig. 7b); ``"orig"`` is a plain feed-forward stack.
    """

    def __init__(
        self,
        in_channels: int,
        tmp_channels: int,
        out_channels: int,
        resolution: int,
        img_channels: int,
        architecture: Arch = "resnet",
        activation: str = "lrelu",
        resample_filter: Sequence[float] = FIR_FILTER,
        conv_clamp: float | None = None,
        reduced_precision: bool = False,
    ):
        super().__init__()
        if architecture not in ("orig", "skip", "resnet"):
            raise ValueError(f"unknown discriminator architecture {architecture!r}")
        self.in_channels, self.resolution, self.architecture = in_channels, resolution, architecture
        self.reduced_precision = reduced_precision
        self.register_buffer("resample_filter", setup_filter(resample_filter))

        if in_channels == 0 or architecture == "skip":
            self.fromrgb = EqualizedConv2d(img_channels, tmp_channels, 1, activation=activation, conv_clamp=conv_clamp)
        self.conv0 = EqualizedConv2d(tmp_channels, tmp_channels, 3, activation=activation, conv_clamp=conv_clamp)
        self.conv1 = EqualizedConv2d(
            tmp_channels,
            out_channels,
            3,
            activation=activation,
            down=2,
            resample_filter=resample_filter,
            conv_clamp=conv_clamp,
        )
        if architecture == "resnet":
            self.skip = EqualizedConv2d(
                tmp_channels, out_channels, 1, bias=False, down=2, resample_filter=resample_filter
            )

    def forward(
        self, x: torch.Tensor | None, img: torch.Tensor | None, reduced_dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = reduced_dtype if (self.reduced_precision and reduced_dtype is not None) else torch.float32
        if x is not None:
            x = x.to(dtype)
        if self.in_channels == 0 or self.architecture == "skip":
            img = img.to(dtype)
            y = self.fromrgb(img)
            x = x + y if x is not None else y
            img = downsample2d(img, self.resample_filter) if self.architecture == "skip" else None

        if self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x)
            x = self.conv1(x, gain=math.sqrt(0.5))
            x = y + x
        else:
            x = self.conv1(self.conv0(x))
        return x, img

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, architecture={self.architecture}, reduced={self.reduced_precision}"


class DiscriminatorEpilogue(nn.Module):
    """The 4x4 head of D, always float32: (FromRGB for "skip") -> minibatch stddev -> 3x3 conv ->
    fully connected (lrelu) -> fully connected to 1 logit, or to ``cmap_dim`` features that are
    projected onto the label embedding ``cmap``: ``<out, cmap> / sqrt(cmap_dim)`` (the projection
    discriminator of Miyato & Koyama 2018, as in the official code)."""

    def __init__(
        self,
        in_channels: int,
        cmap_dim: int,
        resolution: int,
        img_channels: int,
        architecture: Arch = "resnet",
        mbstd_group_size: int | None = 4,
        mbstd_num_channels: int = 1,
        activation: str = "lrelu",
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.in_channels, self.cmap_dim, self.resolution = in_channels, cmap_dim, resolution
        self.architecture = architecture
        if architecture == "skip":
            self.fromrgb = EqualizedConv2d(img_channels, in_channels, 1, activation=activation)
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = EqualizedConv2d(
            in_channels + mbstd_num_channels, in_channels, 3, activation=activation, conv_clamp=conv_clamp
        )
        self.fc = EqualizedLinear(in_channels * resolution**2, in_channels, activation=activation)
        self.out = EqualizedLinear(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: torch.Tensor, img: torch.Tensor | None, cmap: torch.Tensor | None) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.architecture == "skip":
            x = x + self.fromrgb(img.to(torch.float32))
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)
        if self.cmap_dim > 0:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x  # [N, 1]


class Discriminator(nn.Module):
    """StyleGAN2 discriminator: ``D(img, c)`` -> logits ``[N]``.

    Blocks at resolutions R, R/2, ..., 8 (``min(channel_base // res, channel_max)`` channels) followed by
    :class:`DiscriminatorEpilogue` at 4x4. A conditional D maps the one-hot label through a
    :class:`MappingNetwork` (no ``z``, ``mapping_layers`` layers, no ``w_avg``) to ``cmap``
    (``cmap_dim`` defaults to the 4x4 channel count). ``reduced_dtype`` as in :class:`Generator`.
    """

    def __init__(
        self,
        img_resolution: int = 1024,
        img_channels: int = 3,
        num_classes: int = 0,
        architecture: Arch = "resnet",
        channel_base: int = 32768,
        channel_max: int = 512,
        num_fp16_res: int = 0,
        conv_clamp: float | None = None,
        cmap_dim: int | None = None,
        mbstd_group_size: int | None = 4,
        mbstd_num_channels: int = 1,
        mapping_layers: int = 8,
    ):
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        self.img_resolution, self.img_channels, self.num_classes = img_resolution, img_channels, num_classes
        self.reduced_dtype: torch.dtype | None = None
        self.block_resolutions = [2**i for i in range(int(math.log2(img_resolution)), 2, -1)]
        reduced_from = _reduced_from(img_resolution, num_fp16_res)
        cmap_dim = (_channels(4, channel_base, channel_max) if cmap_dim is None else cmap_dim) if num_classes > 0 else 0

        self.blocks = nn.ModuleList(
            DiscriminatorBlock(
                in_channels=_channels(res, channel_base, channel_max) if res < img_resolution else 0,
                tmp_channels=_channels(res, channel_base, channel_max),
                out_channels=_channels(res // 2, channel_base, channel_max),
                resolution=res,
                img_channels=img_channels,
                architecture=architecture,
                conv_clamp=conv_clamp,
                reduced_precision=(res >= reduced_from),
            )
            for res in self.block_resolutions
        )
        self.mapping = None
        if num_classes > 0:
            self.mapping = MappingNetwork(
                0, num_classes, cmap_dim, num_ws=None, num_layers=mapping_layers, w_avg_beta=None
            )
        self.b4 = DiscriminatorEpilogue(
            _channels(4, channel_base, channel_max),
            cmap_dim=cmap_dim,
            resolution=4,
            img_channels=img_channels,
            architecture=architecture,
            mbstd_group_size=mbstd_group_size,
            mbstd_num_channels=mbstd_num_channels,
            conv_clamp=conv_clamp,
        )

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        x = None
        for block in self.blocks:
            x, img = block(x, img, reduced_dtype=self.reduced_dtype)
        cmap = self.mapping(None, c) if self.mapping is not None else None
        return self.b4(x, img, cmap).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Config, presets and registration.


class StyleGAN2Config(ArchConfig):
    """StyleGAN2 hyper-parameters; defaults are the official ``stylegan2`` (config F) preset of
    ``stylegan2-ada-pytorch``'s ``train.py`` (mixed precision on the top 4 resolutions, clamp 256).
    For pure float32 training as with the official ``--fp32`` flag, set ``conv_clamp=None``."""

    arch: Literal["stylegan2"] = "stylegan2"
    z_dim: int = Field(512, ge=1)
    w_dim: int = Field(512, ge=1)
    mapping_layers: int = Field(8, ge=1, description="depth of G's mapping network (the preset's `map`)")
    mapping_lr_multiplier: float = Field(0.01, gt=0)
    w_avg_beta: float = Field(0.995, ge=0, le=1, description="decay of the tracked w average")
    channel_base: int = Field(
        32768, ge=1, description="fmaps * 32768; channels = min(channel_base // res, channel_max)"
    )
    channel_max: int = Field(512, ge=1)
    num_fp16_res: int = Field(4, ge=0, description="how many top resolutions run in `reduced_dtype`")
    conv_clamp: float | None = Field(256, gt=0)
    g_architecture: Arch = "skip"
    d_architecture: Arch = "resnet"
    mbstd_group_size: int = Field(4, ge=1, description="must divide the per-device batch (or exceed it)")
    mbstd_num_channels: int = Field(1, ge=0)
    cmap_dim: int | None = Field(None, ge=1, description="D label-embedding size; None = channels at 4x4")


#: The ``cfg_specs`` of the official ``train.py`` that change the networks (``fmaps``, ``map``,
#: ``mbstd``, and ``orig`` D for cifar). The ``auto`` spec depends on resolution and GPU count.
PRESETS: dict[str, dict] = {
    "stylegan2": dict(channel_base=32768, mapping_layers=8, mbstd_group_size=4),
    "paper256": dict(channel_base=16384, mapping_layers=8, mbstd_group_size=8),
    "paper512": dict(channel_base=32768, mapping_layers=8, mbstd_group_size=8),
    "paper1024": dict(channel_base=32768, mapping_layers=8, mbstd_group_size=4),
    "cifar": dict(channel_base=32768, mapping_layers=2, mbstd_group_size=32, d_architecture="orig"),
}


def preset(name: str, **overrides) -> StyleGAN2Config:
    """The config of an official preset (:data:`PRESETS`), with optional overrides."""
    return StyleGAN2Config(**{**PRESETS[name], **overrides})


def build_generator(cfg: StyleGAN2Config, spec: ImageSpec) -> Generator:
    return Generator(
        z_dim=cfg.z_dim,
        w_dim=cfg.w_dim,
        img_resolution=spec.resolution,
        img_channels=spec.channels,
        num_classes=spec.num_classes,
        mapping_layers=cfg.mapping_layers,
        mapping_lr_multiplier=cfg.mapping_lr_multiplier,
        w_avg_beta=cfg.w_avg_beta,
        channel_base=cfg.channel_base,
        channel_max=cfg.channel_max,
        num_fp16_res=cfg.num_fp16_res,
        conv_clamp=cfg.conv_clamp,
        architecture=cfg.g_architecture,
    )


def build_discriminator(cfg: StyleGAN2Config, spec: ImageSpec) -> Discriminator:
    return Discriminator(
        img_resolution=spec.resolution,
        img_channels=spec.channels,
        num_classes=spec.num_classes,
        architecture=cfg.d_architecture,
        channel_base=cfg.channel_base,
        channel_max=cfg.channel_max,
        num_fp16_res=cfg.num_fp16_res,
        conv_clamp=cfg.conv_clamp,
        cmap_dim=cfg.cmap_dim,
        mbstd_group_size=cfg.mbstd_group_size,
        mbstd_num_channels=cfg.mbstd_num_channels,
    )


register(
    Architecture(
        "stylegan2",
        StyleGAN2Config,
        build_generator,
        build_discriminator,
        Capabilities(mapping=True, reduced_dtype=True, noise_inputs=True, truncation="psi", d_blocks=True),
    )
)
