"""Full-reference image metrics of image-to-image GANs: PSNR, SSIM (on RGB or on Y), L1.

Every function takes images ``N×C×H×W`` (or one ``C×H×W``) on the 0-255 scale, uint8 or float, computes the
metric per image and returns the mean over the images as a float. The conventions are those of the papers
the recipes reproduce:

* **Y** (super-resolution papers, after MATLAB's ``rgb2ycbcr``): ITU-R BT.601 luma of studio range,
  ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for R, G, B in [0, 1], so Y lies in [16, 235]; it is not
  rounded (as BasicSR's ``calculate_psnr(..., test_y_channel=True)``). Grey images are taken as they are.
* **PSNR** ``10 log10(L² / MSE)`` with ``L = data_range`` (255), the MSE over channels and pixels of one
  image; identical images give ``inf``.
* **SSIM** (Wang et al. 2004): an 11×11 Gaussian window of σ 1.5, K1 0.01, K2 0.03, population (not sample)
  covariances, the map over the window positions that fit inside the image ("valid"), averaged over those
  positions and the channels. This is ``skimage.metrics.structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255)``.
* **L1**: the mean absolute difference of images mapped to [-1, 1] (``x / 127.5 - 1``), the units of
  Pix2Pix's L1 loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _batch(img: torch.Tensor) -> torch.Tensor:
    """``C×H×W`` or ``N×C×H×W`` → float64 ``N×C×H×W`` (still on the 0-255 scale)."""
    if img.dim() == 3:
        img = img.unsqueeze(0)
    if img.dim() != 4:
        raise ValueError(f"expected images N×C×H×W or C×H×W, got shape {tuple(img.shape)}")
    return img.to(torch.float64)


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _batch(a), _batch(b)
    if a.shape != b.shape:
        raise ValueError(f"images of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def crop_border(img: torch.Tensor, crop: int) -> torch.Tensor:
    """``img`` without ``crop`` pixels on each side (SR papers crop ``scale`` pixels: the border that
    upsampling cannot reconstruct)."""
    if crop < 0:
        raise ValueError(f"crop must be ≥ 0, got {crop}")
    if crop == 0:
        return img
    if 2 * crop >= min(img.shape[-2:]):
        raise ValueError(f"cropping {crop} px from each side leaves nothing of {tuple(img.shape[-2:])} images")
    return img[..., crop:-crop, crop:-crop]


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """BT.601 studio-range luma ``N×1×H×W`` (float64, in [16, 235] for RGB) of RGB images on the 0-255 scale
    (an alpha channel is ignored); grey images are returned as they are (as float64)."""
    x = _batch(img)
    c = x.shape[1]
    if c == 1:
        return x
    if c not in (3, 4):
        raise ValueError(f"rgb_to_y takes grey, RGB or RGBA images, got {c} channels")
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def psnr_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """PSNR of each image pair, float64 ``N`` (``inf`` where they are identical)."""
    a, b = _pair(a, b)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse 0 → inf


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> float:
    """Mean over the images of the PSNR (dB) between ``a[i]`` and ``b[i]``."""
    return float(psnr_per_image(a, b, data_range).mean())


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    return torch.outer(g, g)


def ssim_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """SSIM of each image pair (mean over channels and window positions), float64 ``N``."""
    a, b = _pair(a, b)
    n, c, h, w = a.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW} px, got {h}×{w}")
    window = _gaussian_window().to(a.device).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)
    blur = lambda x: F.conv2d(x, window, groups=c)  # one channel at a time, "valid" positions only
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> float:
    """Mean over the images of the SSIM between ``a[i]`` and ``b[i]`` (Wang et al. 2004; see the module)."""
    return float(ssim_per_image(a, b, data_range).mean())


def psnr_y(a: torch.Tensor, b: torch.Tensor, crop: int = 0) -> float:
    """PSNR on Y (:func:`rgb_to_y`) with ``crop`` border pixels removed: the super-resolution convention."""
    return psnr(rgb_to_y(crop_border(_batch(a), crop)), rgb_to_y(crop_border(_batch(b), crop)))


def ssim_y(a: torch.Tensor, b: torch.Tensor, crop: int = 0) -> float:
    """SSIM on Y (:func:`rgb_to_y`) with ``crop`` border pixels removed: the super-resolution convention."""
    return ssim(rgb_to_y(crop_border(_batch(a), crop)), rgb_to_y(crop_border(_batch(b), crop)))


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of the images mapped from 0-255 to [-1, 1] (Pix2Pix's L1 units): per image,
    then the mean over the images (the same as over all pixels, the images being of one size)."""
    a, b = _pair(a, b)
    return float(((a - b).abs() / 127.5).flatten(1).mean(1).mean())
