"""Building blocks shared by the Karras-family GANs (ProGAN, StyleGAN2, ...), in plain PyTorch.

Everything here follows the behaviour of NVlabs' ``stylegan2-ada-pytorch`` (``training/networks.py``
and ``torch_utils/ops``) but is written with ordinary ``torch`` ops only, so it runs anywhere:

* equalized learning rate (ProGAN, Karras et al. 2018, sec. 4.1): weights are stored as N(0, 1) and
  scaled by ``1/sqrt(fan_in)`` at run time, so Adam's per-parameter step sizes are uniform;
* bias + activation with the official activation gains (``lrelu`` and ``relu`` are followed by a
  gain of sqrt(2) to keep unit variance) and an optional clamp used for reduced-precision training;
* FIR resampling with a fixed low-pass filter, by default the binomial ``[1, 3, 3, 1]``
  (StyleGAN, Karras et al. 2019, sec. 2 / appendix C: bilinear up/downsampling, after Zhang 2019);
* minibatch standard deviation (ProGAN sec. 3, grouped variant of StyleGAN2's code).

Filters are plain 2-D ``float32`` tensors (made by :func:`setup_filter`) that layers keep as buffers.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Padding = int | Sequence[int]

# ----------------------------------------------------------------------------------------------
# Bias + activation.

#: name -> (function, default gain). The gains are those of the official ``bias_act`` op: sqrt(2)
#: after (leaky) ReLU (He et al. 2015), 1 otherwise.
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    "linear": (lambda x: x, 1.0),
    "relu": (F.relu, math.sqrt(2)),
    "lrelu": (lambda x: F.leaky_relu(x, 0.2), math.sqrt(2)),
    "tanh": (torch.tanh, 1.0),
    "sigmoid": (torch.sigmoid, 1.0),
}


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    activation: str = "linear",
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """``clamp(act(x + b) * gain, -clamp, clamp)`` with the bias broadcast along dim 1.

    ``gain=None`` uses the activation's default gain (:data:`ACTIVATIONS`). ``clamp`` bounds the
    output to ``[-clamp, clamp]``; StyleGAN2-ADA clamps every conv output at 256 so that float16
    activations cannot overflow (mixed-precision training, Karras et al. 2020b).
    """
    fn, default_gain = ACTIVATIONS[activation]
    if b is not None:
        x = x + b.to(x.dtype).reshape([1, -1] + [1] * (x.ndim - 2))
    x = fn(x)
    gain = default_gain if gain is None else gain
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """``x / sqrt(mean(x**2, dim) + eps)``: StyleGAN's input normalisation of ``z`` (and of the label
    embedding); across channels of a feature map it is ProGAN's pixelwise feature norm (sec. 4.2)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


# ----------------------------------------------------------------------------------------------
# FIR filtering and resampling.


def setup_filter(
    f: Sequence[float] | torch.Tensor, normalize: bool = True, flip_filter: bool = False, gain: float = 1.0
) -> torch.Tensor:
    """A 2-D ``float32`` FIR filter from 1-D taps (separable: outer product) or a 2-D array.

    ``normalize`` makes the taps sum to 1 (unit DC gain); ``gain`` scales the result. The default
    ``[1, 3, 3, 1]`` gives the 4x4 binomial filter used for all resampling in StyleGAN2.
    """
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if f.ndim == 1:
        f = torch.outer(f, f)
    if f.ndim != 2 or f.numel() == 0:
        raise ValueError(f"filter must be 1-D or 2-D and non-empty, got shape {tuple(f.shape)}")
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip([0, 1])
    return f * gain


def _parse_padding(padding: Padding) -> tuple[int, int, int, int]:
    """``p`` or ``[px, py]`` or ``[px0, px1, py0, py1]`` -> ``(px0, px1, py0, py1)``."""
    if isinstance(padding, int):
        return padding, padding, padding, padding
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    px0, px1, py0, py1 = padding
    return px0, px1, py0, py1


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: int = 1,
    down: int = 1,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1.0,
) -> torch.Tensor:
    """Upsample, pad, FIR-filter and downsample each channel of ``x`` (``[N, C, H, W]``).

    The steps, as in ``scipy.signal.upfirdn`` and the official op: (1) insert ``up - 1`` zeros after
    every pixel; (2) pad with zeros by ``padding`` (negative values crop); (3) convolve with ``f``
    (correlate if ``flip_filter``), keeping only outputs whose footprint lies inside the padded
    image; (4) keep every ``down``-th pixel. ``gain`` scales the filter.
    """
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    n, c, h, w = x.shape
    px0, px1, py0, py1 = _parse_padding(padding)
    f = (f * gain).to(x.dtype)
    kh, kw = f.shape
    if up > 1:
        # A transposed convolution with stride ``up`` is zero insertion followed by the convolution, without the
        # multiplications by the inserted zeros (4× fewer for up = 2, and a cheap backward: a strided convolution).
        # Output j of the padded convolution is output j + k - 1 - p0 of the transposed one.
        weight = (f.flip([0, 1]) if flip_filter else f)[None, None].repeat(c, 1, 1, 1)
        x = F.conv_transpose2d(x, weight, stride=up, groups=c)
        out_h, out_w = h * up + py0 + py1 - kh + 1, w * up + px0 + px1 - kw + 1
        sy, sx = kh - 1 - py0, kw - 1 - px0
        x = F.pad(x, [-sx, sx + out_w - x.shape[3], -sy, sy + out_h - x.shape[2]])  # crop or pad with zeros
        return x[:, :, ::down, ::down] if down > 1 else x
    x = F.pad(x, [px0, px1, py0, py1])  # negative padding crops
    # conv2d computes a correlation; flipping the taps turns it into a true convolution. The stride computes
    # only the outputs that downsampling keeps.
    weight = (f if flip_filter else f.flip([0, 1]))[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(x, weight, groups=c, stride=down)


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2, padding: Padding = 0, gain: float = 1.0) -> torch.Tensor:
    """Upsample by ``up`` with FIR filter ``f``; the output is exactly ``up`` times larger.

    The filter gain is multiplied by ``up**2`` because zero insertion keeps only one pixel in
    ``up**2``.
    """
    fh, fw = f.shape
    px0, px1, py0, py1 = _parse_padding(padding)
    p = [px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2, py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2]
    return upfirdn2d(x, f, up=up, padding=p, gain=gain * up * up)


def downsample2d(
    x: torch.Tensor, f: torch.Tensor, down: int = 2, padding: Padding = 0, gain: float = 1.0
) -> torch.Tensor:
    """Low-pass filter with ``f`` then keep every ``down``-th pixel; the output is ``down`` times smaller."""
    fh, fw = f.shape
    px0, px1, py0, py1 = _parse_padding(padding)
    p = [px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2, py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2]
    return upfirdn2d(x, f, down=down, padding=p, gain=gain)


def conv2d_resample(
    x: torch.Tensor,
    w: torch.Tensor,
    f: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: int = 0,
    groups: int = 1,
    flip_weight: bool = True,
) -> torch.Tensor:
    """2-D convolution of ``x`` with ``w`` (``[O, I/groups, kh, kw]``) combined with FIR up- or
    downsampling by ``f``, equivalent to "upsample, then conv, then downsample" with ``padding``
    given with respect to the upsampled image (``conv2d_resample`` of the official code).

    ``flip_weight=True`` correlates like ``F.conv2d``; ``False`` is a true convolution. The official
    layers use ``False`` for upsampling layers (it saves a flip in the transposed convolution); the
    two are the same function up to a reparametrisation of the random weights.
    """
    if up > 1 and down > 1:
        raise NotImplementedError("conv2d_resample: up and down at once is not needed by these networks")
    _, _, kh, kw = w.shape
    fh, fw = f.shape if f is not None else (1, 1)
    px0 = px1 = py0 = py1 = padding
    # Extra padding so that the FIR filter keeps the output exactly `up` times larger or `down` smaller.
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2

    def conv(x, w, **kwargs):
        return F.conv2d(x, w if flip_weight else w.flip([2, 3]), groups=groups, **kwargs)

    if kh == 1 and kw == 1 and down > 1:  # 1x1: filter + subsample first, then the cheap conv
        x = upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1])
        return conv(x, w)
    if kh == 1 and kw == 1 and up > 1:  # 1x1: conv first, then upsample fewer channels
        x = conv(x, w)
        return upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up**2)
    if down > 1:  # filter, then a strided conv (= conv, then keep every `down`-th pixel)
        x = upfirdn2d(x, f, padding=[px0, px1, py0, py1])
        return conv(x, w, stride=down)
    if up > 1:
        # A stride-`up` transposed conv equals zero insertion followed by a full convolution with w,
        # so it replaces steps (1) and the conv; the FIR filter then runs on the result.
        o, i_per_group = w.shape[0], w.shape[1]
        w = w.reshape(groups, o // groups, i_per_group, kh, kw).transpose(1, 2)
        w = w.reshape(groups * i_per_group, o // groups, kh, kw)  # conv_transpose2d layout [I, O/groups, kh, kw]
        if flip_weight:  # conv_transpose2d convolves; flip to correlate instead
            w = w.flip([2, 3])
        px0, px1, py0, py1 = px0 - (kw - 1), px1 - (kw - up), py0 - (kh - 1), py1 - (kh - up)
        # Let the transposed conv crop what it can (non-negative padding only), the FIR pass does the rest.
        pxt, pyt = max(min(-px0, -px1), 0), max(min(-py0, -py1), 0)
        x = F.conv_transpose2d(x, w, stride=up, padding=[pyt, pxt], groups=groups)
        return upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up**2)
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return conv(x, w, padding=[py0, px0])
    return conv(F.pad(x, [px0, px1, py0, py1]), w)


# ----------------------------------------------------------------------------------------------
# Equalized-learning-rate layers.


class EqualizedLinear(nn.Module):
    """Fully connected layer with equalized learning rate (ProGAN sec. 4.1) and fused bias + activation.

    Weights are stored as ``N(0, 1) / lr_multiplier`` and used as ``weight * lr_multiplier / sqrt(in)``;
    the bias is used as ``bias * lr_multiplier``. With ``lr_multiplier=0.01`` this is StyleGAN's
    mapping network, whose effective learning rate is 100x lower (StyleGAN, Karras et al. 2019,
    appendix C). ``bias_init`` is the initial stored bias, so the effective one is
    ``bias_init * lr_multiplier`` as in the official code (StyleGAN2's style affines use 1, with
    ``lr_multiplier=1``).

    ``he_gain`` selects ProGAN's placement of the He gain (official ``get_weight(gain=...)``): the
    weight is used as ``weight * he_gain / sqrt(in)`` and the activation gets no gain afterwards, so
    the bias is added after the gained product. ``None`` (default) keeps StyleGAN2's placement, the
    activation's gain applied after the activation. Both give the same family of functions; they
    differ only in the scale of the bias parameter (hence its effective learning rate).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "linear",
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
        he_gain: float | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier
        self.act_gain: float | None = None  # None: the activation's default gain
        if he_gain is not None:
            self.weight_gain *= he_gain
            self.act_gain = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain if self.bias is not None else None
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, activation=self.activation, gain=self.act_gain)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class EqualizedConv2d(nn.Module):
    """Conv layer with equalized learning rate, optional FIR up/downsampling by 2 and fused bias + act.

    ``forward(x, gain)`` computes ``clamp(act(conv(x, w / sqrt(fan_in)) + b) * act_gain * gain)`` with the
    clamp at ``conv_clamp * gain`` (StyleGAN2-ADA's ``Conv2dLayer``). ``gain`` lets residual blocks
    apply their 1/sqrt(2) (StyleGAN2 sec. 4.1) inside the clamp.

    ``he_gain`` (ProGAN): scale the weight by ``he_gain / sqrt(fan_in)`` and apply no gain after the
    activation (see :class:`EqualizedLinear`). ``resample_filter=(1, 1)`` makes ``down=2`` a 3x3 conv
    followed by 2x2 average pooling, the fused ``conv2d_downscale2d`` of ProGAN's discriminator.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str = "linear",
        up: int = 1,
        down: int = 1,
        resample_filter: Sequence[float] = (1, 3, 3, 1),
        conv_clamp: float | None = None,
        he_gain: float | None = None,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.activation = activation
        self.up, self.down = up, down
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.act_gain = ACTIVATIONS[activation][1]
        if he_gain is not None:
            self.weight_gain *= he_gain
            self.act_gain = 1.0
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        x = conv2d_resample(
            x, w, self.resample_filter, up=self.up, down=self.down, padding=self.padding, flip_weight=(self.up == 1)
        )
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, activation=self.activation, gain=self.act_gain * gain, clamp=clamp)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, activation={self.activation}, "
            f"up={self.up}, down={self.down}"
        )


# ----------------------------------------------------------------------------------------------
# Minibatch standard deviation.


def minibatch_stddev(x: torch.Tensor, group_size: int | None, num_channels: int = 1) -> torch.Tensor:
    """Append ``num_channels`` feature maps holding the within-group standard deviation (ProGAN sec. 3).

    The batch is split into groups of ``min(group_size, N)`` samples (``None``: the whole batch);
    as in the official code, sample ``i`` belongs to group ``i % (N / G)``. The channels are split into
    ``num_channels`` slices; for each group and slice the per-pixel standard deviation over the group
    is averaged over the slice's channels and pixels, and the scalar is broadcast as a new channel to
    every member of the group.
    """
    n, c, h, w = x.shape
    g = min(group_size, n) if group_size is not None else n
    if n % g != 0:
        raise ValueError(f"minibatch_stddev: batch size {n} is not a multiple of the group size {g}")
    nf = num_channels
    y = x.reshape(g, -1, nf, c // nf, h, w)  # [G, n, F, c, H, W]
    y = y - y.mean(dim=0)
    y = (y.square().mean(dim=0) + 1e-8).sqrt()  # [n, F, c, H, W] stddev over each group
    y = y.mean(dim=[2, 3, 4])  # [n, F]
    y = y.reshape(-1, nf, 1, 1).repeat(g, 1, h, w)  # [N, F, H, W]
    return torch.cat([x, y], dim=1)


class MinibatchStdLayer(nn.Module):
    """Module form of :func:`minibatch_stddev` (adds ``num_channels`` channels)."""

    def __init__(self, group_size: int | None, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return minibatch_stddev(x, self.group_size, self.num_channels)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"


# ----------------------------------------------------------------------------------------------
# Minibatch discrimination.


class MinibatchDiscrimination(nn.Module):
    """Minibatch discrimination (Salimans et al. 2016, "Improved Techniques for Training GANs", section 3.2).

    Each sample's features ``f(x_i) ∈ R^A`` are multiplied by a learned tensor ``T ∈ R^{A×B×C}`` into ``B`` rows
    ``M_{i,b} ∈ R^C``; sample i's closeness to sample j under kernel b is ``c_b(x_i, x_j) = exp(−‖M_{i,b} − M_{j,b}‖₁)``
    and the layer outputs ``o(x_i)_b = Σ_{j≠i} c_b(x_i, x_j)``, the ``B`` features the next layer reads beside
    ``f(x_i)``. The sum leaves out ``j = i`` (a constant 1), as the authors' code does; ``T`` starts from
    N(0, 0.05²), their initialisation. "The batch" is the batch of one forward pass (a micro-batch), as for
    BatchNorm: real and fake batches are compared among themselves.

    Compare ProGAN's minibatch standard deviation (:class:`MinibatchStdLayer`): one parameter-free statistic
    per group of a few samples; this layer learns ``B`` similarity kernels over the whole batch."""

    def __init__(self, in_features: int, kernels: int, kernel_dim: int):
        super().__init__()
        self.kernels, self.kernel_dim = kernels, kernel_dim
        self.T = nn.Parameter(torch.randn(in_features, kernels * kernel_dim) * 0.05)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        m = (features.flatten(1) @ self.T).view(-1, self.kernels, self.kernel_dim)  # [N, B, C]
        l1 = (m[:, None] - m[None, :]).abs().sum(3)  # [N, N, B]: ‖M_{i,b} − M_{j,b}‖₁
        close = torch.exp(-l1)
        return close.sum(1) - 1  # Σ_j c_b minus the j = i term, exp(0) = 1

    def extra_repr(self) -> str:
        return f"in_features={self.T.shape[0]}, kernels={self.kernels}, kernel_dim={self.kernel_dim}"
