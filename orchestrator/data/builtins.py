"""Built-in data sets that need no download: scikit-learn's digits, their edge maps, MNIST-M-style colour
digits, stacked digits (1,000 modes, for measuring mode coverage), and scikit-image's bundled colour photos.

``builtin:digits-edges`` and ``builtin:digits-m`` have the keys (``digits-00000`` …) and labels of
``builtin:digits``, so each is a paired counterpart of it (edges → digit, colour digit → grey digit).
"""

from __future__ import annotations

import functools

import numpy as np

DIGITS_SIZE = 32  # digits are upsampled to this size before edges or colour are made
DIGITS_M_SEED = 2016  # fixed: builtin:digits-m is the same every time
STACKED_SEED = 2017  # fixed: builtin:stacked-digits is the same every time (Metz et al. 2017's Stacked MNIST)
STACKED_COUNT = 30_000  # 30 images per mode on average; every one of the 1,000 modes is in the training split
# scikit-image's colour photos shipped inside its wheel (no pooch download). ``cat`` is left out: it is
# the same photo as ``chelsea``, and duplicates would cross the held-out split.
PHOTO_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "colorwheel",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
)


class BuiltinUnavailable(RuntimeError):
    """A built-in data set's library is not installed."""


def _skimage():
    try:
        import skimage.data
        import skimage.feature
    except ImportError:
        raise BuiltinUnavailable("needs scikit-image: pip install scikit-image") from None
    return skimage


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits as N×8×8 uint8 (0–255) and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def digits_upsampled() -> np.ndarray:
    """The digits bilinearly upsampled (PIL) to 32×32, N×32×32 uint8."""
    from PIL import Image

    return np.stack(
        [
            np.asarray(Image.fromarray(x).resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BILINEAR))
            for x in digits()[0]
        ]
    )


@functools.lru_cache(maxsize=1)
def digits_edges() -> np.ndarray:
    """Edge maps of the digits: Canny (σ = 1, scikit-image's default thresholds) of each upsampled
    digit, 255 on an edge and 0 elsewhere, N×32×32 uint8."""
    feature = _skimage().feature
    return np.stack([feature.canny(x / 255.0, sigma=1.0) for x in digits_upsampled()]).astype(np.uint8) * 255


@functools.lru_cache(maxsize=1)
def photos() -> dict[str, np.ndarray]:
    """scikit-image's bundled colour photos (H×W×3 uint8) by name; any that cannot be read offline is left out."""
    data = _skimage().data
    out = {}
    for name in PHOTO_NAMES:
        try:
            img = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001 - a photo that needs a download (or is gone) is just not offered
            continue
        if img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8:
            out[name] = img
    return out


@functools.lru_cache(maxsize=1)
def digits_m() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-M's recipe (Ganin et al. 2016) on the digits: each upsampled digit ``m`` (a [0, 1] mask) over a
    random 32×32 patch ``p`` of a random bundled photo, as ``|p − 255·m|`` per channel (the digit
    inverts the photo). Returns the N×32×32×3 uint8 images and the patches they were made from."""
    pics = [photos()[n] for n in sorted(photos())]
    if not pics:
        raise BuiltinUnavailable("scikit-image's bundled photos cannot be read")
    rng = np.random.default_rng(DIGITS_M_SEED)
    s = DIGITS_SIZE
    patches = np.empty((len(digits_upsampled()), s, s, 3), np.uint8)
    for i in range(len(patches)):
        pic = pics[rng.integers(len(pics))]
        y, x = rng.integers(pic.shape[0] - s + 1), rng.integers(pic.shape[1] - s + 1)
        patches[i] = pic[y : y + s, x : x + s]
    mask = digits_upsampled()[..., None].astype(np.float64) / 255.0
    images = np.round(np.abs(patches.astype(np.float64) - 255.0 * mask)).astype(np.uint8)
    return images, patches


@functools.lru_cache(maxsize=1)
def stacked_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stacked digits, the Stacked MNIST of Metz et al. 2017 ("Unrolled GANs") and Lin et al. 2018 ("PacGAN")
    on scikit-learn's digits: each image's red, green and blue channels are three digits drawn independently
    and uniformly (seeded, ``STACKED_SEED``) from the 1,797, so its mode ``100·d_r + 10·d_g + d_b`` is one of
    1,000. Returns the ``STACKED_COUNT``×8×8×3 uint8 images (each channel exactly a ``digits()`` image: a
    writer's resize treats the channels alike, as it treats a grey digit), their modes, and the N×3 indices of
    the digits they were made from."""
    images, labels = digits()
    idx = np.random.default_rng(STACKED_SEED).integers(len(images), size=(STACKED_COUNT, 3))
    modes = labels[idx] @ np.array([100, 10, 1])
    return np.stack([images[idx[:, c]] for c in range(3)], axis=-1), modes, idx
