"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"), following the
authors' ``DiffAugment_pytorch.py`` (mit-han-lab/data-efficient-gans).

The same random, differentiable transforms are applied to real and fake images before D (and to fakes in G's
step), always on; there is no probability. A policy is a comma-separated list of:

* ``color``: brightness (add ``U(-0.5, 0.5)``), saturation (scale the deviation from the channel mean by
  ``U(0, 2)``), contrast (scale the deviation from the image mean by ``U(0.5, 1.5)``), in that order;
* ``translation``: an integer shift of up to ``ratio = 1/8`` of the size along each axis, zero filled;
* ``cutout``: a square of side ``ratio = 1/2`` of the size set to zero (clipped at the image border).

One value per image, from torch's global RNG on the images' device, drawn in the authors' order. With one
channel saturation is the identity (the channel mean is the pixel itself); everything else applies as is.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _per_image_uniform(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)


def brightness(x: torch.Tensor) -> torch.Tensor:
    """Add a per-image constant drawn from ``U(-0.5, 0.5)``."""
    return x + (_per_image_uniform(x) - 0.5)


def saturation(x: torch.Tensor) -> torch.Tensor:
    """Scale each pixel's deviation from its channel mean by a per-image ``U(0, 2)``."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_per_image_uniform(x) * 2) + mean


def contrast(x: torch.Tensor) -> torch.Tensor:
    """Scale the deviation from the image's mean (over channels and pixels) by a per-image ``U(0.5, 1.5)``."""
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_per_image_uniform(x) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by integers ``(dy, dx)``, each uniform in ``[-round(ratio * size), +round(...)]``,
    filling with zeros: ``out[i, j] = x[i + dy, j + dx]`` (zero outside)."""
    n, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, size=[n, 1], device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, size=[n, 1], device=x.device)
    # Read from a copy with a one-pixel zero border; sources beyond it are clamped onto that border.
    rows = (torch.arange(h, device=x.device) + dy + 1).clamp(0, h + 1)  # [N, H]
    cols = (torch.arange(w, device=x.device) + dx + 1).clamp(0, w + 1)  # [N, W]
    padded = F.pad(x, [1, 1, 1, 1])
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero a square of ``round(ratio * size)`` pixels per side at a uniformly random centre (clipped at the
    border); the centre ranges over the image (one more position when the side is even, as in the original)."""
    n, _, h, w = x.shape
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - size_y % 2), size=[n, 1], device=x.device)
    cx = torch.randint(0, w + (1 - size_x % 2), size=[n, 1], device=x.device)
    top, left = cy - size_y // 2, cx - size_x // 2
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y = (ys >= top) & (ys < top + size_y)  # [N, H]
    in_x = (xs >= left) & (xs < left + size_x)  # [N, W]
    keep = ~(in_y[:, :, None] & in_x[:, None, :])
    return x * keep[:, None].to(x.dtype)


#: Policy item -> the transforms it applies, in order (the authors' ``AUGMENT_FNS``).
DIFF_AUGMENT_FNS: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "color": [brightness, saturation, contrast],
    "translation": [translation],
    "cutout": [cutout],
}
DEFAULT_POLICY = "color,translation,cutout"


def parse_policy(policy: str) -> list[str]:
    """The items of a comma-separated policy (blanks ignored); ValueError naming an unknown one."""
    items = [item.strip() for item in policy.split(",") if item.strip()]
    unknown = [item for item in items if item not in DIFF_AUGMENT_FNS]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy item(s) {unknown}; known: {', '.join(DIFF_AUGMENT_FNS)}")
    return items


def diff_augment(x: torch.Tensor, policy: str = DEFAULT_POLICY) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020) of ``x`` (``[N, C, H, W]``) with a comma-separated ``policy`` of
    ``color``, ``translation``, ``cutout``; an empty policy returns ``x`` itself. Differentiable in ``x``."""
    for item in parse_policy(policy):
        for fn in DIFF_AUGMENT_FNS[item]:
            x = fn(x)
    return x.contiguous()
