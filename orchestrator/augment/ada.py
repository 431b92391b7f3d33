"""ADA's augmentation pipeline (Karras et al. 2020, "Training Generative Adversarial Networks with Limited
Data", sec. 2 and appendix B), following the behaviour of ``training/augment.py`` in NVlabs'
``stylegan2-ada-pytorch``.

Every operation has a *strength* (the official "probability multiplier"): it is applied to each image
independently with probability ``strength * p``, where ``p`` is the pipeline's overall augmentation probability,
a scalar buffer that ADA's controller adjusts during training. Because ``p`` is a tensor, changing it never
recompiles anything and the coin flips need no host sync.

The stages run in the official order: (1) pixel blitting and general geometric transforms, composed into one
inverse 2-D matrix per image and executed once (reflect padding, 2x upsampling with the ``sym6`` wavelet,
bilinear ``grid_sample``, downsampling with the same filter); (2) colour transforms, composed into one 4x4
affine colour matrix; (3) image-space filtering with a 4-band filter bank; (4) additive noise and cutout.
Random numbers come from torch's global RNG on the images' device, drawn in the official order.

Grayscale (``C == 1``): the colour matrix acts on the gray value as on an RGB pixel with ``r = g = b``, and the
result is the mean of the three output channels (the official rule). So brightness adds ``b``, contrast
multiplies by ``c``, luma flip negates the image, and hue rotation and saturation are skipped (they leave a gray
pixel unchanged anyway). All other operations treat channels alike.

Three deliberate differences from the official code, none of which changes the distribution:

* an image whose drawn geometric (or filter) transform is exactly the identity is returned bit-exact instead of
  being resampled (which costs ~1e-6 of rounding), so ``p = 0`` is exactly the identity;
* the filter bank's reflect padding also works for images smaller than the 43-tap filter (16x16 digits);
* when every image of the batch drew the identity geometry the warp is skipped.

The geometric stage reads its padding sizes back to the host once per call (shapes depend on the drawn
transforms, as in the official code); the other stages never sync.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.layers import downsample2d, setup_filter, upsample2d

#: Low-pass decomposition filters of two Symlet wavelets (published coefficients).
WAVELETS: dict[str, list[float]] = {
    "sym2": [-0.12940952255092145, 0.22414386804185735, 0.836516303737469, 0.48296291314469025],
    "sym6": [
        0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
    ],
}  # fmt: skip

#: Preset strengths, exactly the ``augpipe_specs`` of the official ``train.py`` (``bgc`` is its default).
_BLIT = dict(xflip=1, rotate90=1, xint=1)
_GEOM = dict(scale=1, rotate=1, aniso=1, xfrac=1)
_COLOR = dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
ADA_PRESETS: dict[str, dict[str, float]] = {
    "blit": dict(_BLIT),
    "geom": dict(_GEOM),
    "color": dict(_COLOR),
    "filter": dict(imgfilter=1),
    "noise": dict(noise=1),
    "cutout": dict(cutout=1),
    "bg": {**_BLIT, **_GEOM},
    "bgc": {**_BLIT, **_GEOM, **_COLOR},
    "bgcf": {**_BLIT, **_GEOM, **_COLOR, "imgfilter": 1},
    "bgcfn": {**_BLIT, **_GEOM, **_COLOR, "imgfilter": 1, "noise": 1},
    "bgcfnc": {**_BLIT, **_GEOM, **_COLOR, "imgfilter": 1, "noise": 1, "cutout": 1},
}
DEFAULT_PRESET = "bgc"

#: Expected power of the four filter-bank bands for natural images (a 1/f spectrum), used to renormalise
#: the random band gains so that the image's overall power stays about the same.
_BAND_POWER = (10 / 13, 1 / 13, 1 / 13, 1 / 13)

# ----------------------------------------------------------------------------------------------
# Batched homogeneous matrices: every argument is a scalar or a [N] tensor; the result is [N, k, k].


def _stack_matrix(rows: list[list[torch.Tensor | float]], like: torch.Tensor) -> torch.Tensor:
    elems = [torch.as_tensor(e, dtype=like.dtype, device=like.device).expand_as(like) for row in rows for e in row]
    return torch.stack(elems, dim=-1).reshape(*like.shape, len(rows), len(rows[0]))


def _translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _stack_matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def _scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _stack_matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def _rotate2d(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return _stack_matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


def _const2d(fn, *args: float, like: torch.Tensor) -> torch.Tensor:
    """A constant matrix (``[3, 3]``) built by one of the helpers above."""
    return fn(*(torch.tensor(a, dtype=like.dtype, device=like.device) for a in args))


def _translate3d(t: torch.Tensor) -> torch.Tensor:
    return _stack_matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], t)


def _scale3d(s: torch.Tensor) -> torch.Tensor:
    return _stack_matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], s)


def _rotate3d_about(axis: tuple[float, float, float], theta: torch.Tensor) -> torch.Tensor:
    """Rotation by ``theta`` about the unit ``axis`` (Rodrigues' formula), as a 4x4 homogeneous matrix."""
    vx, vy, vz = axis
    s, c = torch.sin(theta), torch.cos(theta)
    cc = 1 - c
    return _stack_matrix(
        [
            [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
            [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
            [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
            [0, 0, 0, 1],
        ],
        theta,
    )


def _filter_bank(lowpass: list[float], num_bands: int = 4) -> np.ndarray:
    """``[num_bands, taps]`` 1-D filters splitting the spectrum into octave bands, lowest first.

    From an orthogonal wavelet's low-pass ``H(z)``: ``lo2 = H(z) H(1/z) / 2`` and ``hi2 = H(-z) H(-1/z) / 2`` are
    power-complementary (``lo2 + hi2`` is a unit impulse). Each step dilates the existing bands by two (moving
    them an octave down) and low-passes them with ``lo2``, then adds ``hi2`` to the new finest band; so the rows
    sum to an impulse and equal band gains leave an image unchanged.
    """
    lo = np.asarray(lowpass, dtype=np.float64)
    hi = lo * (-1.0) ** np.arange(lo.size)
    lo2, hi2 = np.convolve(lo, lo[::-1]) / 2, np.convolve(hi, hi[::-1]) / 2
    bank = np.zeros([num_bands, 1])
    bank[0, 0] = 1
    for band in range(1, num_bands):
        dilated = np.zeros([num_bands, bank.shape[1] * 2 - 1])
        dilated[:, ::2] = bank
        bank = np.stack([np.convolve(row, lo2) for row in dilated])
        start = (bank.shape[1] - hi2.size) // 2
        bank[band, start : start + hi2.size] += hi2
    return bank


def _reflect_indices(size: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of a reflect-padded axis (edge not repeated, like ``F.pad(mode="reflect")``) for any ``pad``,
    even one larger than the axis: reflection is periodic with period ``2 * (size - 1)``."""
    i = torch.arange(-pad, size + pad, device=device)
    if size == 1:
        return torch.zeros_like(i)
    period = 2 * (size - 1)
    i = i.remainder(period)
    return torch.where(i < size, i, period - i)


def _reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    rows = _reflect_indices(x.shape[2], pad, x.device)
    cols = _reflect_indices(x.shape[3], pad, x.device)
    return x.index_select(2, rows).index_select(3, cols)


def _keep_identity(original: torch.Tensor, transformed: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """Per image: the original where its drawn transform is exactly the identity (``identity``: ``[N]`` bool)."""
    return torch.where(identity.reshape(-1, 1, 1, 1), original, transformed)


# ----------------------------------------------------------------------------------------------


class AugmentPipe(nn.Module):
    """ADA's augmentation pipeline (Karras et al. 2020); parameter names and defaults as in the official
    ``AugmentPipe``. Every strength defaults to 0 (off); ``p`` (default 0, the official buffer starts at 1 but
    its training loop sets it before use) is the overall probability, kept in the ``p`` buffer.

    Pixel blitting: ``xflip``, ``rotate90``, ``xint`` (integer translation up to ``xint_max`` of the size).
    General geometry: ``scale`` (log2 std ``scale_std``), ``rotate`` (up to ``rotate_max`` of a full turn, as a
    pre- and a post-rotation each with probability ``1 - sqrt(1 - rotate * p)``), ``aniso`` (log2 std
    ``aniso_std``), ``xfrac`` (fractional translation, std ``xfrac_std`` of the size).
    Colour: ``brightness`` (additive, std ``brightness_std``), ``contrast`` (multiplicative, log2 std
    ``contrast_std``), ``lumaflip`` (Householder reflection of the luma axis), ``hue`` (rotation about the luma
    axis, up to ``hue_max`` of a turn), ``saturation`` (log2 std ``saturation_std``). The luma axis is
    ``[1, 1, 1] / sqrt(3)``: the channel mean.
    Filtering: ``imgfilter`` with per-band strengths ``imgfilter_bands`` and log2 gain std ``imgfilter_std``.
    Corruptions: ``noise`` (Gaussian, std ``|N(0, 1)| * noise_std`` per image), ``cutout`` (a square of side
    ``cutout_size`` of the image, filled with zeros).
    """

    def __init__(
        self,
        xflip: float = 0,
        rotate90: float = 0,
        xint: float = 0,
        xint_max: float = 0.125,
        scale: float = 0,
        rotate: float = 0,
        aniso: float = 0,
        xfrac: float = 0,
        scale_std: float = 0.2,
        rotate_max: float = 1,
        aniso_std: float = 0.2,
        xfrac_std: float = 0.125,
        brightness: float = 0,
        contrast: float = 0,
        lumaflip: float = 0,
        hue: float = 0,
        saturation: float = 0,
        brightness_std: float = 0.2,
        contrast_std: float = 0.5,
        hue_max: float = 1,
        saturation_std: float = 1,
        imgfilter: float = 0,
        imgfilter_bands: tuple[float, ...] = (1, 1, 1, 1),
        imgfilter_std: float = 1,
        noise: float = 0,
        cutout: float = 0,
        noise_std: float = 0.1,
        cutout_size: float = 0.5,
        p: float = 0.0,
    ):
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)))
        self.xflip, self.rotate90, self.xint, self.xint_max = (
            float(xflip),
            float(rotate90),
            float(xint),
            float(xint_max),
        )
        self.scale, self.rotate, self.aniso, self.xfrac = float(scale), float(rotate), float(aniso), float(xfrac)
        self.scale_std, self.rotate_max = float(scale_std), float(rotate_max)
        self.aniso_std, self.xfrac_std = float(aniso_std), float(xfrac_std)
        self.brightness, self.contrast, self.lumaflip = float(brightness), float(contrast), float(lumaflip)
        self.hue, self.saturation = float(hue), float(saturation)
        self.brightness_std, self.contrast_std = float(brightness_std), float(contrast_std)
        self.hue_max, self.saturation_std = float(hue_max), float(saturation_std)
        self.imgfilter, self.imgfilter_std = float(imgfilter), float(imgfilter_std)
        self.imgfilter_bands = [float(b) for b in imgfilter_bands]
        if len(self.imgfilter_bands) != len(_BAND_POWER):
            raise ValueError(f"imgfilter_bands needs {len(_BAND_POWER)} strengths, got {len(self.imgfilter_bands)}")
        self.noise, self.cutout, self.noise_std, self.cutout_size = (
            float(noise),
            float(cutout),
            float(noise_std),
            float(cutout_size),
        )
        self.register_buffer("geom_filter", setup_filter(WAVELETS["sym6"]), persistent=False)
        bank = torch.as_tensor(_filter_bank(WAVELETS["sym2"]), dtype=torch.float32)
        self.register_buffer("band_filters", bank, persistent=False)

    # -- random draws ---------------------------------------------------------------------------

    def _prob(self, strength: float) -> torch.Tensor:
        """Probability that an operation of this strength fires for one image."""
        return strength * self.p

    def _gated(self, value: torch.Tensor, strength: float | torch.Tensor, neutral: float) -> torch.Tensor:
        """``value`` per image with probability ``strength * p`` (or the given probability tensor), else
        ``neutral``. One coin per image (the first axis), drawn after the value as in the official code."""
        prob = self._prob(strength) if isinstance(strength, float) else strength
        coin = torch.rand(value.shape[0], device=value.device) < prob
        return torch.where(coin.reshape(-1, *[1] * (value.ndim - 1)), value, torch.full_like(value, neutral))

    def _uniform(self, shape: list[int], device: torch.device, half_range: float) -> torch.Tensor:
        return (torch.rand(shape, device=device) * 2 - 1) * half_range

    def _lognormal(self, n: int, device: torch.device, log2_std: float) -> torch.Tensor:
        return torch.exp2(torch.randn(n, device=device) * log2_std)

    # -- geometry ---------------------------------------------------------------------------------

    def _blit_matrix(self, n: int, height: int, width: int, device: torch.device) -> list[torch.Tensor]:
        """Inverse matrices (output pixel -> input pixel) of x-flip, 90-degree rotations, integer translation."""
        mats = []
        if self.xflip > 0:
            flip = self._gated(torch.floor(torch.rand(n, device=device) * 2), self.xflip, 0)
            mats.append(_scale2d(1 - 2 * flip, torch.ones_like(flip)))
        if self.rotate90 > 0:
            quarter = self._gated(torch.floor(torch.rand(n, device=device) * 4), self.rotate90, 0)
            mats.append(_rotate2d(math.pi / 2 * quarter))
        if self.xint > 0:
            t = self._gated(self._uniform([n, 2], device, self.xint_max), self.xint, 0)
            mats.append(_translate2d(-torch.round(t[:, 0] * width), -torch.round(t[:, 1] * height)))
        return mats

    def _general_matrix(self, n: int, height: int, width: int, device: torch.device) -> list[torch.Tensor]:
        """Inverse matrices of isotropic scaling, rotation (pre and post), anisotropic scaling, fractional shift."""
        mats = []
        if self.scale > 0:
            s = self._gated(self._lognormal(n, device, self.scale_std), self.scale, 1)
            mats.append(_scale2d(1 / s, 1 / s))
        # Two independent rotations, each with probability p_rot, so that P(pre or post) = rotate * p.
        p_rot = 1 - torch.sqrt((1 - self._prob(self.rotate)).clamp(0, 1))
        if self.rotate > 0:
            theta = self._gated(self._uniform([n], device, math.pi * self.rotate_max), p_rot, 0)
            mats.append(_rotate2d(theta))
        if self.aniso > 0:
            s = self._gated(self._lognormal(n, device, self.aniso_std), self.aniso, 1)
            mats.append(_scale2d(1 / s, s))
        if self.rotate > 0:
            theta = self._gated(self._uniform([n], device, math.pi * self.rotate_max), p_rot, 0)
            mats.append(_rotate2d(theta))
        if self.xfrac > 0:
            t = self._gated(torch.randn(n, 2, device=device) * self.xfrac_std, self.xfrac, 0)
            mats.append(_translate2d(-t[:, 0] * width, -t[:, 1] * height))
        return mats

    def _geometry(self, images: torch.Tensor) -> torch.Tensor:
        n, _, height, width = images.shape
        mats = self._blit_matrix(n, height, width, images.device) + self._general_matrix(
            n, height, width, images.device
        )
        if not mats:
            return images
        g_inv = mats[0]
        for m in mats[1:]:
            g_inv = g_inv @ m
        identity = (g_inv == torch.eye(3, device=images.device)).flatten(1).all(dim=1)
        margins = self._margins(g_inv, height, width, identity)
        if margins is None:  # every image drew the identity (common while p is small): nothing to resample
            return images
        return _keep_identity(images, self._warp(images, g_inv, margins), identity)

    def _margins(self, g_inv: torch.Tensor, height: int, width: int, identity: torch.Tensor) -> list[int] | None:
        """Reflect padding ``[left, right, top, bottom]`` that covers, for every image in the batch, the input
        area its output reads from, plus room for the resampling filters; at most the size - 1 that reflect
        padding allows. None when every image's transform is the identity. The one host sync of the pipeline
        (padding sizes are shapes), so it only happens when geometric operations are enabled."""
        cx, cy = (width - 1) / 2, (height - 1) / 2
        corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device=g_inv.device)
        xy = (g_inv @ corners.t())[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, batch * corner]
        reach = torch.cat([-xy, xy]).amax(dim=1)  # [left, top, right, bottom] in pixels from the centre
        filter_room = 2 * (self.geom_filter.shape[0] // 4)
        margin = reach + torch.tensor([filter_room - cx, filter_room - cy] * 2, device=g_inv.device)
        lo, hi = torch.zeros(4, device=g_inv.device), torch.tensor([width - 1, height - 1] * 2, device=g_inv.device)
        plan = torch.cat([margin.clamp(lo, hi).ceil(), identity.all().reshape(1).float()])
        left, top, right, bottom, all_identity = plan.int().tolist()
        return None if all_identity else [left, right, top, bottom]

    def _warp(self, images: torch.Tensor, g_inv: torch.Tensor, margins: list[int]) -> torch.Tensor:
        """Apply the inverse transforms ``g_inv`` (``[N, 3, 3]``, pixel units, origin at the image centre) to
        the images reflect-padded by ``margins``."""
        n, c, height, width = images.shape
        mx0, mx1, my0, my1 = margins
        images = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")
        g_inv = _const2d(_translate2d, (mx0 - mx1) / 2, (my0 - my1) / 2, like=g_inv) @ g_inv

        # 2x upsampling: the same transform in the finer pixel grid (pixel centres sit at half-integers).
        images = upsample2d(images, self.geom_filter, up=2)
        up, down = _const2d(_scale2d, 2, 2, like=g_inv), _const2d(_scale2d, 0.5, 0.5, like=g_inv)
        g_inv = up @ g_inv @ down
        shift, unshift = (_const2d(_translate2d, v, v, like=g_inv) for v in (-0.5, 0.5))
        g_inv = shift @ g_inv @ unshift

        # Output covers the image plus the filter's reach; affine_grid wants normalised [-1, 1] coordinates.
        filter_room = self.geom_filter.shape[0] // 4
        out_h, out_w = (height + 2 * filter_room) * 2, (width + 2 * filter_room) * 2
        to_norm = _const2d(_scale2d, 2 / images.shape[3], 2 / images.shape[2], like=g_inv)
        from_norm = _const2d(_scale2d, out_w / 2, out_h / 2, like=g_inv)
        g_inv = to_norm @ g_inv @ from_norm
        grid = F.affine_grid(g_inv[:, :2, :], [n, c, out_h, out_w], align_corners=False)
        # torch's grid_sample differentiates its own backward (R1 on augmented reals); the official code needed
        # its grid_sample_gradfix for that
        images = F.grid_sample(
            images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
        )

        # Downsampling with the time-reversed filter: with the upsampling an orthogonal pair, so integer shifts
        # come out exact. sym6 is not linear-phase, so flips and quarter turns (here as in the official code)
        # leave a sub-pixel shift of ~0.13 px.
        return downsample2d(images, self.geom_filter.flip([0, 1]), down=2, padding=-2 * filter_room)

    # -- colour -----------------------------------------------------------------------------------

    def _color_matrix(self, n: int, channels: int, device: torch.device) -> torch.Tensor | None:
        """The composed ``[N, 4, 4]`` colour transform (``C @ [r, g, b, 1]``), or None when no colour op is on."""
        eye = torch.eye(4, device=device)
        luma = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device) / math.sqrt(3)
        luma_proj = torch.outer(luma, luma)
        mats = []
        if self.brightness > 0:
            b = self._gated(torch.randn(n, device=device) * self.brightness_std, self.brightness, 0)
            mats.append(_translate3d(b))
        if self.contrast > 0:
            mats.append(_scale3d(self._gated(self._lognormal(n, device, self.contrast_std), self.contrast, 1)))
        if self.lumaflip > 0:
            flip = self._gated(torch.floor(torch.rand(n, device=device) * 2), self.lumaflip, 0)
            mats.append(eye - 2 * luma_proj * flip.reshape(-1, 1, 1))  # Householder reflection of the luma axis
        if self.hue > 0 and channels > 1:
            theta = self._gated(self._uniform([n], device, math.pi * self.hue_max), self.hue, 0)
            mats.append(_rotate3d_about((1 / math.sqrt(3),) * 3, theta))
        if self.saturation > 0 and channels > 1:
            s = self._gated(self._lognormal(n, device, self.saturation_std), self.saturation, 1)
            mats.append(luma_proj + (eye - luma_proj) * s.reshape(-1, 1, 1))
        if not mats:
            return None
        color = mats[0]
        for m in mats[1:]:
            color = m @ color
        return color

    def _color(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        color = self._color_matrix(n, c, images.device)
        if color is None:
            return images
        color = color.to(images.dtype)
        flat = images.reshape(n, c, h * w)
        if c == 3:
            flat = color[:, :3, :3] @ flat + color[:, :3, 3:]
        else:  # gray as r = g = b: each output channel is (row sum) * x + offset; keep their mean
            rows = color[:, :3, :].mean(dim=1, keepdim=True)
            flat = flat * rows[:, :, :3].sum(dim=2, keepdim=True) + rows[:, :, 3:]
        return flat.reshape(n, c, h, w)

    # -- filtering and corruptions ----------------------------------------------------------------

    def _band_gains(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image gains ``[N, bands]`` of the filter bank, each band amplified with probability
        ``imgfilter * p * band_strength`` and the gains renormalised to keep the expected power; and whether
        every band's coin came up tails (the image is then left alone)."""
        power = torch.tensor(_BAND_POWER, device=device)
        num_bands = power.numel()
        gains = torch.ones(n, num_bands, device=device)
        untouched = torch.ones(n, dtype=torch.bool, device=device)
        for band, band_strength in enumerate(self.imgfilter_bands):
            g = self._lognormal(n, device, self.imgfilter_std)
            g = self._gated(g, self.imgfilter * band_strength, 1)
            untouched = untouched & (g == 1)
            t = torch.where(torch.arange(num_bands, device=device) == band, g[:, None], torch.ones_like(gains))
            gains = gains * t / (power * t.square()).sum(dim=1, keepdim=True).sqrt()
        return gains, untouched

    def _filter(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        gains, untouched = self._band_gains(n, images.device)
        taps = (gains @ self.band_filters).to(images.dtype)  # [N, taps]
        taps = taps.repeat_interleave(c, dim=0)[:, None, None, :]  # [N * C, 1, 1, taps]
        pad = taps.shape[-1] // 2
        x = _reflect_pad(images.reshape(1, n * c, h, w), pad)
        x = F.conv2d(x, taps, groups=n * c)  # horizontal
        x = F.conv2d(x, taps.transpose(2, 3), groups=n * c)  # vertical
        return _keep_identity(images, x.reshape(n, c, h, w), untouched)

    def _noise(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        sigma = self._gated(torch.randn(n, device=images.device).abs() * self.noise_std, self.noise, 0)
        noise = torch.randn(images.shape, device=images.device).to(images.dtype)
        return images + noise * sigma.to(images.dtype).reshape(-1, 1, 1, 1)

    def _cutout(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        size = self._gated(torch.full([n, 1], self.cutout_size, device=images.device), self.cutout, 0)
        center = torch.rand(n, 2, device=images.device)
        xs = (torch.arange(w, device=images.device) + 0.5) / w
        ys = (torch.arange(h, device=images.device) + 0.5) / h
        outside_x = (xs[None, :] - center[:, 0:1]).abs() >= size / 2  # [N, W]
        outside_y = (ys[None, :] - center[:, 1:2]).abs() >= size / 2  # [N, H]
        keep = outside_x[:, None, None, :] | outside_y[:, None, :, None]
        return images * keep.to(images.dtype)

    # -- the pipeline -----------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Augment ``images`` (``[N, C, H, W]``, ``C`` 1 or 3); same shape and dtype. Half-precision inputs are
        augmented in float32 and cast back."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"AugmentPipe wants [N, 1 or 3, H, W] images, got shape {tuple(images.shape)}")
        dtype = images.dtype
        x = images if dtype in (torch.float32, torch.float64) else images.float()
        x = self._geometry(x)
        x = self._color(x)
        if self.imgfilter > 0:
            x = self._filter(x)
        if self.noise > 0:
            x = self._noise(x)
        if self.cutout > 0:
            x = self._cutout(x)
        return x.to(dtype)

    def extra_repr(self) -> str:
        on = [f"{k}={v:g}" for k, v in vars(self).items() if isinstance(v, float) and v > 0 and k in _STRENGTHS]
        return ", ".join(on)


_STRENGTHS = {k for preset in ADA_PRESETS.values() for k in preset}


def make_augment_pipe(preset: str = DEFAULT_PRESET, p: float = 0.0) -> AugmentPipe:
    """An :class:`AugmentPipe` with the strengths of an official preset (``--augpipe`` of
    stylegan2-ada-pytorch's ``train.py``: :data:`ADA_PRESETS`) and overall probability ``p``."""
    if preset not in ADA_PRESETS:
        raise ValueError(f"unknown ADA augmentation preset {preset!r}; known: {', '.join(ADA_PRESETS)}")
    return AugmentPipe(**ADA_PRESETS[preset], p=p)
