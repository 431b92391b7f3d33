"""ADA's augmentation pipeline and DiffAugment (orchestrator/augment): identity at p = 0, each operation's
exact property or an independent reference transform, gradients and double backward (R1 on augmented reals)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn as nn
import torch.nn.functional as F

from orchestrator.augment import diffaugment as da
from orchestrator.augment.ada import ADA_PRESETS, AugmentPipe, make_augment_pipe
from orchestrator.augment.diffaugment import diff_augment

OPS = [
    "xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac",
    "brightness", "contrast", "lumaflip", "hue", "saturation", "imgfilter", "noise", "cutout",
]  # fmt: skip
GEOMETRIC = {"xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac"}
SIZE = 16


def smooth_image(channels: int = 3, size: int = SIZE, freq: float = 0.04) -> torch.Tensor:
    """A band-limited, asymmetric test image ``[1, C, size, size]`` (a few sinusoids of frequency ~``freq``
    cycles per pixel, amplitude about 1): resampling it is accurate, and no flip or quarter turn maps it
    onto itself."""
    y, x = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    waves = [
        torch.cos(2 * math.pi * freq * (x + 0.7 * y) + 1.0),
        torch.sin(2 * math.pi * freq * (0.5 * x - y) + 0.3),
        torch.cos(2 * math.pi * freq * 1.3 * x + 0.3) * torch.sin(2 * math.pi * freq * y + 0.2),
    ]
    return torch.stack(waves[:channels])[None]


def closest(out: torch.Tensor, candidates: dict) -> tuple[object, float]:
    """The key of the candidate image nearest to ``out`` (max abs difference), and that difference."""
    errors = {k: (out - v).abs().max().item() for k, v in candidates.items()}
    key = min(errors, key=errors.get)
    return key, errors[key]


def tiny_d(channels: int) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 1, 3, stride=2))


def r1_param_grads(aug, x: torch.Tensor, d: nn.Module) -> list[torch.Tensor]:
    """R1 as ADA computes it: the gradient of D(aug(x)) with respect to the un-augmented ``x``, squared,
    then backpropagated to D's weights (double backward through the augmentation). D's last bias cannot
    reach the penalty, so only the weights are returned."""
    x = x.detach().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(d(aug(x)).sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    return [p.grad for name, p in d.named_parameters() if name.endswith("weight")]


# ----------------------------------------------------------------------------------------------
# ADA: identity, presets, per-op generic properties


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("preset", list(ADA_PRESETS))
def test_p_zero_is_the_identity_for_every_preset(preset, channels):
    torch.manual_seed(0)
    x = torch.randn(6, channels, SIZE, SIZE)
    assert torch.equal(make_augment_pipe(preset, p=0.0)(x), x)


def test_presets_are_the_official_ones_and_an_unknown_one_is_named():
    assert set(ADA_PRESETS) == {
        "blit",
        "geom",
        "color",
        "filter",
        "noise",
        "cutout",
        "bg",
        "bgc",
        "bgcf",
        "bgcfn",
        "bgcfnc",
    }
    bgc = make_augment_pipe()  # the default preset
    assert (bgc.xflip, bgc.rotate, bgc.saturation, bgc.imgfilter, bgc.noise) == (1, 1, 1, 0, 0)
    full = make_augment_pipe("bgcfnc", p=0.25)
    assert all(getattr(full, op) == 1 for op in OPS) and full.p.item() == 0.25
    with pytest.raises(ValueError, match=r"'bgx'.*bgcfnc"):
        make_augment_pipe("bgx")


@pytest.mark.parametrize("op", OPS)
def test_each_op_alone_keeps_shape_and_supports_double_backward(op):
    torch.manual_seed(0)
    channels = 1 if op in {"brightness", "noise"} else 3  # grayscale on two ops, RGB elsewhere
    pipe = AugmentPipe(**{op: 1}, p=1.0)
    x = torch.randn(4, channels, SIZE, SIZE)
    out = pipe(x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    xg = x.clone().requires_grad_(True)
    pipe(xg).square().sum().backward()
    assert xg.grad.abs().sum() > 0
    grads = r1_param_grads(pipe, x, tiny_d(channels))
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_dtype_and_grayscale_color_ops():
    torch.manual_seed(0)
    x = torch.randn(8, 1, SIZE, SIZE)
    assert make_augment_pipe("bgcfnc", p=1.0)(x.half()).dtype == torch.float16
    # On gray images hue and saturation are skipped: they leave a gray pixel unchanged anyway.
    assert torch.equal(AugmentPipe(hue=1, saturation=1, p=1.0)(x), x)
    out = AugmentPipe(lumaflip=1, p=1.0)(x)  # the luma flip of a gray image is its negative
    flipped = [torch.allclose(o, -i, atol=1e-6) for o, i in zip(out, x)]
    assert all(f or torch.equal(o, i) for f, o, i in zip(flipped, out, x)) and 0 < sum(flipped) < len(x)
    with pytest.raises(ValueError, match="1 or 3"):
        AugmentPipe(xflip=1)(torch.zeros(1, 2, SIZE, SIZE))


def test_p_is_a_tensor_buffer_and_scales_how_often_ops_fire():
    pipe = AugmentPipe(brightness=1)
    assert "p" in dict(pipe.named_buffers()) and pipe.p.ndim == 0
    x = torch.zeros(400, 1, 2, 2)
    torch.manual_seed(0)
    for p in (0.25, 0.75):
        pipe.p.fill_(p)
        fired = (pipe(x)[:, 0, 0, 0] != 0).float().mean().item()
        assert abs(fired - p) < 0.08


# ----------------------------------------------------------------------------------------------
# ADA: geometric ops against independent references


def test_xflip_equals_torch_flip_or_the_image():
    torch.manual_seed(0)
    img = smooth_image()
    out = AugmentPipe(xflip=1, p=1.0)(img.repeat(16, 1, 1, 1))
    refs = {"same": img[0], "flip": torch.flip(img[0], dims=[-1])}
    assert (refs["same"] - refs["flip"]).abs().max() > 0.5
    # ADA executes flips through the sym6 up/down-sampling pair, which is not linear-phase: the official code
    # also leaves a flipped image shifted by ~0.13 px, an error of ~2*pi*f*0.13 = 0.033 at f = 0.04 cycles/px.
    matches = [closest(o, refs) for o in out]
    assert all(err < 0.05 for _, err in matches)
    assert {k for k, _ in matches} == {"same", "flip"}
    assert all(torch.equal(o, img[0]) for o, (k, _) in zip(out, matches) if k == "same")  # untouched: exact


def test_rotate90_equals_one_of_the_torch_rot90_turns():
    torch.manual_seed(0)
    img = smooth_image()
    out = AugmentPipe(rotate90=1, p=1.0)(img.repeat(24, 1, 1, 1))
    refs = {k: torch.rot90(img[0], k, dims=(1, 2)) for k in range(4)}
    matches = [closest(o, refs) for o in out]
    assert all(err < 0.06 for _, err in matches), matches  # same sub-pixel shift as the flip, in 2-D
    assert {k for k, _ in matches} == {0, 1, 2, 3}


def reflect_shifts(img: torch.Tensor, max_shift: int) -> dict:
    """Every integer shift of ``img`` (``[C, H, W]``) by up to ``max_shift`` pixels, the uncovered border filled by
    reflection (numpy's ``reflect``: the edge pixel is not repeated)."""
    m = max_shift
    padded = np.pad(img.numpy(), ((0, 0), (m, m), (m, m)), mode="reflect")
    h, w = img.shape[1:]
    return {
        (dy, dx): torch.from_numpy(padded[:, m + dy : m + dy + h, m + dx : m + dx + w].copy())
        for dy in range(-m, m + 1)
        for dx in range(-m, m + 1)
    }


def test_xint_equals_a_reflect_padded_integer_shift():
    torch.manual_seed(0)
    img = torch.randn(1, 3, SIZE, SIZE)  # white noise: integer shifts are lossless, any content works
    out = AugmentPipe(xint=1, p=1.0)(img.repeat(24, 1, 1, 1))
    max_shift = round(0.125 * SIZE)  # official xint_max
    matches = [closest(o, reflect_shifts(img[0], max_shift)) for o in out]
    # Whole image, borders included: the reflected border is part of the spec. The wavelet up/down pair is
    # orthogonal, so an integer shift is exact up to float32 rounding.
    assert all(err < 1e-4 for _, err in matches), matches
    shifts = {k for k, _ in matches}
    assert len(shifts) >= 6 and any(abs(dy) == max_shift or abs(dx) == max_shift for dy, dx in shifts)


def scipy_warp(img: torch.Tensor, inv_xy: np.ndarray) -> torch.Tensor:
    """Independent reference: ``out(p) = img(inv_xy @ (p - c) + c)`` per channel with scipy's cubic spline,
    ``p`` in (x, y) pixel coordinates and ``c`` the image centre."""
    m = inv_xy[::-1, ::-1]  # (x, y) -> (row, col)
    centre = (np.array(img.shape[1:]) - 1) / 2
    offset = centre - m @ centre
    return torch.stack(
        [
            torch.from_numpy(scipy.ndimage.affine_transform(ch.double().numpy(), m, offset, order=3, mode="reflect"))
            for ch in img
        ]
    ).float()


# Replays of the official draw order (value, then coin per image) for one op at p = 1.
def _drawn_scales(n: int) -> torch.Tensor:
    return torch.exp2(torch.randn(n) * 0.2)


def _drawn_rotation(n: int) -> torch.Tensor:
    pre = (torch.rand(n) * 2 - 1) * math.pi
    torch.rand(n)  # its coin (p_rot = 1 at p = 1: always heads)
    post = (torch.rand(n) * 2 - 1) * math.pi
    return pre + post


@pytest.mark.parametrize("op", ["scale", "rotate"])
def test_scale_and_rotate_match_an_independent_warp_in_the_centre(op):
    n, size = 6, 24
    img = smooth_image(size=size, freq=0.04)
    torch.manual_seed(3)
    out = AugmentPipe(**{op: 1}, p=1.0)(img.repeat(n, 1, 1, 1))
    torch.manual_seed(3)
    if op == "scale":
        params = _drawn_scales(n)
        invs = [np.diag([1 / s, 1 / s]) for s in params.tolist()]
    else:
        params = _drawn_rotation(n)
        invs = [np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]) for t in params.tolist()]
    lo, hi = size // 4, size - size // 4
    for o, inv in zip(out, invs):
        ref = scipy_warp(img[0], inv)
        # Central half only (the border depends on the padding rule). Tolerance: the sym6 up/down pair's
        # sub-pixel shift of <= ~0.15 px (error <= 2*pi*0.04*0.15*amplitude ~ 0.04) plus bilinear interpolation
        # on the 2x grid (h^2/8 * |f''| < 0.01); a wrong angle or scale by a few percent exceeds it.
        assert (o - ref)[:, lo:hi, lo:hi].abs().max() < 0.06


def test_reflect_padding_is_used_by_continuous_ops_too():
    torch.manual_seed(0)
    img = torch.ones(1, 1, SIZE, SIZE)  # a constant image stays constant under any warp with reflect padding
    out = AugmentPipe(scale=1, rotate=1, aniso=1, xfrac=1, p=1.0)(img.repeat(8, 1, 1, 1))
    assert (out - 1).abs().max() < 1e-3


def test_torch_grid_sample_has_the_double_backward_r1_needs():
    """ADA's warp uses torch's grid_sample directly: its backward must itself be differentiable (the official
    code needed grid_sample_gradfix for that; torch now does it)."""
    torch.manual_seed(0)
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    grid = torch.rand(2, 4, 3, 2, dtype=torch.float64) * 2.4 - 1.2  # some samples fall outside (zeros)
    sample = lambda t: F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert torch.autograd.gradcheck(sample, (x,)) and torch.autograd.gradgradcheck(sample, (x,))


# ----------------------------------------------------------------------------------------------
# ADA: colour and corruption ops, exact properties


def rgb_batch(n: int = 16) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, 3, 8, 8)


def test_brightness_adds_a_constant_per_image():
    for channels in (1, 3):
        x = torch.randn(16, channels, 8, 8)
        d = AugmentPipe(brightness=1, p=1.0)(x) - x
        assert torch.allclose(d, d.flatten(1)[:, :1, None, None].expand_as(d), atol=1e-6)
        assert d.flatten(1)[:, 0].std() > 0.1  # official brightness_std = 0.2


def test_contrast_scales_each_image_about_zero():
    x = rgb_batch()
    out = AugmentPipe(contrast=1, p=1.0)(x)
    ratio = out / x  # ADA's contrast is a pure scale (about 0, mid-gray for [-1, 1] images)
    assert torch.allclose(ratio, ratio.flatten(1)[:, :1, None, None].expand_as(ratio), atol=1e-4)


def luma_and_chroma(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ADA's luma axis is [1, 1, 1]/sqrt(3): the channel mean, and the rest (chroma)."""
    luma = x.mean(dim=1, keepdim=True)
    return luma, x - luma


def test_lumaflip_negates_luma_and_keeps_chroma():
    x = rgb_batch()
    out = AugmentPipe(lumaflip=1, p=1.0)(x)
    (l_in, c_in), (l_out, c_out) = luma_and_chroma(x), luma_and_chroma(out)
    assert torch.allclose(c_out, c_in, atol=1e-5)
    flipped = [torch.allclose(lo, -li, atol=1e-5) for lo, li in zip(l_out, l_in)]
    assert all(f or torch.allclose(lo, li, atol=1e-5) for f, lo, li in zip(flipped, l_out, l_in))
    assert 0 < sum(flipped) < len(x)


def test_hue_rotates_chroma_about_the_luma_axis():
    x = rgb_batch()
    out = AugmentPipe(hue=1, p=1.0)(x)
    (l_in, c_in), (l_out, c_out) = luma_and_chroma(x), luma_and_chroma(out)
    assert torch.allclose(l_out, l_in, atol=1e-5)
    assert torch.allclose(c_out.norm(dim=1), c_in.norm(dim=1), atol=1e-4)  # a rotation keeps the length
    assert (c_out - c_in).abs().max() > 0.1


def test_saturation_scales_chroma_per_image_and_keeps_luma():
    x = rgb_batch()
    out = AugmentPipe(saturation=1, p=1.0)(x)
    (l_in, c_in), (l_out, c_out) = luma_and_chroma(x), luma_and_chroma(out)
    assert torch.allclose(l_out, l_in, atol=1e-5)
    s = (c_out * c_in).flatten(1).sum(1) / c_in.square().flatten(1).sum(1)
    assert torch.allclose(c_out, c_in * s[:, None, None, None], atol=1e-4)
    assert s.std() > 0.1


def test_noise_is_gaussian_with_the_official_std():
    torch.manual_seed(0)
    x = torch.zeros(256, 3, 16, 16)
    d = AugmentPipe(noise=1, p=1.0)(x)
    per_image = d.flatten(1).std(dim=1)  # sigma = |N(0, 1)| * noise_std per image
    expected = 0.1 * math.sqrt(2 / math.pi)  # E|N(0, 1)| * 0.1
    assert abs(per_image.mean().item() - expected) < 0.15 * expected
    assert d.flatten(1).mean(dim=1).abs().max() < 0.02


def test_cutout_zeroes_a_square_of_the_official_size():
    torch.manual_seed(0)
    x = torch.ones(64, 1, SIZE, SIZE)
    out = AugmentPipe(cutout=1, p=1.0)(x)
    side = int(0.5 * SIZE)  # official cutout_size = 0.5
    interior = 0
    for o in out[:, 0]:
        zero = o == 0
        rows, cols = zero.any(dim=1).nonzero()[:, 0], zero.any(dim=0).nonzero()[:, 0]
        assert zero.sum() == len(rows) * len(cols)  # one axis-aligned rectangle
        assert len(rows) <= side and len(cols) <= side
        if 0 < rows.min() and rows.max() < SIZE - 1 and 0 < cols.min() and cols.max() < SIZE - 1:
            assert len(rows) == len(cols) == side
            interior += 1
    assert interior > 0 and (out == 1).sum() == out.numel() - (out == 0).sum()


# ----------------------------------------------------------------------------------------------
# DiffAugment


def test_diff_augment_empty_policy_is_the_identity_and_unknown_items_are_named():
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(diff_augment(x, ""), x)
    with pytest.raises(ValueError, match="'colour'"):
        diff_augment(x, "colour,translation")


def zero_shifts(img: torch.Tensor, m: int) -> dict:
    padded = F.pad(img, [m, m, m, m])
    h, w = img.shape[1:]
    return {
        (dy, dx): padded[:, m + dy : m + dy + h, m + dx : m + dx + w]
        for dy in range(-m, m + 1)
        for dx in range(-m, m + 1)
    }


@pytest.mark.parametrize("channels", [1, 3])
def test_diff_augment_translation_is_a_zero_filled_integer_shift(channels):
    torch.manual_seed(0)
    img = torch.randn(1, channels, SIZE, SIZE)
    out = diff_augment(img.repeat(32, 1, 1, 1), "translation")
    m = int(SIZE * 0.125 + 0.5)
    matches = [closest(o, zero_shifts(img[0], m)) for o in out]
    assert all(err == 0 for _, err in matches)
    assert len({k for k, _ in matches}) >= 8


def test_diff_augment_cutout_zeroes_a_square_of_half_the_size():
    torch.manual_seed(0)
    out = diff_augment(torch.ones(64, 3, SIZE, SIZE), "cutout")
    side = int(SIZE * 0.5 + 0.5)
    assert torch.equal(out, out[:, :1].expand_as(out))
    full = 0
    for o in out[:, 0]:
        zero = o == 0
        rows, cols = zero.any(dim=1).nonzero()[:, 0], zero.any(dim=0).nonzero()[:, 0]
        assert zero.sum() == len(rows) * len(cols) and 0 < len(rows) <= side and 0 < len(cols) <= side
        full += len(rows) == len(cols) == side
    assert full > 0


def test_diff_augment_color_ops():
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    d = da.brightness(x) - x
    b = d.flatten(1)[:, 0]
    assert torch.allclose(d, b[:, None, None, None].expand_as(d), atol=1e-6) and b.abs().max() <= 0.5
    mean = x.mean(dim=1, keepdim=True)
    dev = da.saturation(x) - mean
    s = dev.flatten(1)[:, 0] / (x - mean).flatten(1)[:, 0]
    assert torch.allclose(dev, (x - mean) * s[:, None, None, None], atol=1e-5) and 0 <= s.min() and s.max() <= 2
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    dev = da.contrast(x) - mean
    c = dev.flatten(1)[:, 0] / (x - mean).flatten(1)[:, 0]
    assert torch.allclose(dev, (x - mean) * c[:, None, None, None], atol=1e-5) and 0.5 <= c.min() and c.max() <= 1.5
    gray = torch.randn(4, 1, 8, 8)
    assert torch.equal(da.saturation(gray), gray)  # one channel: its own mean


def test_diff_augment_gradients_flow_through_every_item():
    torch.manual_seed(0)
    x = torch.randn(4, 3, SIZE, SIZE, requires_grad=True)
    diff_augment(x).square().sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    grads = r1_param_grads(lambda t: diff_augment(t, "color,translation,cutout"), x, tiny_d(3))
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
