"""Mode coverage on stacked digits (``builtin:stacked-digits``): how many of the 1,000 modes a generator's
samples cover, and the reverse KL divergence of their mode distribution from the data's.

This is the Stacked MNIST measurement of Metz et al. 2017 ("Unrolled Generative Adversarial Networks",
section 3.3.2) and Lin et al. 2018 ("PacGAN", section 5.1): each of an RGB image's three channels is given to
a grey digit classifier (a :class:`~orchestrator.eval.extractors.SmallCNN` trained on single digits, e.g. by
``ganforge extractor train``), and the three digits make its mode ``100·d_r + 10·d_g + d_b``. ``modes`` is
the number of distinct modes among the samples; ``reverse_kl`` is
``KL(p_gen ‖ p_data) = Σ_m p_gen(m) · log(p_gen(m) / p_data(m))`` (natural log), with ``p_gen`` the samples'
mode frequencies and ``p_data`` the modes' frequencies in the training data (the labels of its shards).

The classifier names a digit for any image, a blur included, so a generator of noise still "covers" modes;
``confident`` (the fraction of samples whose three digits the classifier gives a probability of at least
``CONFIDENT``) tells samples that look like stacked digits from those that do not. It is not part of the papers'
measurement; compare it with that of real images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from webdataset import tariterators

from orchestrator.data.errors import DataError
from orchestrator.data.shards import expand_shards
from orchestrator.eval.extractors import SmallCNN

NUM_MODES = 1000
PLACES = (100, 10, 1)  # red, green, blue digit → mode
CONFIDENT = 0.9  # a channel's digit is read with confidence when the classifier gives it this probability


@dataclass(frozen=True)
class ModeCoverage:
    """Modes covered (out of ``NUM_MODES``) and ``KL(p_gen ‖ p_data)`` of ``samples`` images, and the fraction
    of them whose three digits were read with confidence (None when not measured)."""

    modes: int
    reverse_kl: float
    samples: int
    confident: float | None = None


@torch.no_grad()
def channel_predictions(
    net: SmallCNN, images: torch.Tensor, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The digit ``net`` sees in each channel of uint8 ``N×3×H×W`` images and its probability, both ``N×3``."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 RGB images N×3×H×W, got {images.dtype} {tuple(images.shape)}")
    if net.in_channels != 1:
        raise ValueError(f"the mode counter needs a grey digit classifier; this one takes {net.in_channels} channels")
    n, _, h, w = images.shape
    grey = images.reshape(n * 3, 1, h, w)  # row-major: image 0's R, G, B, then image 1's …
    probs = [net(net.prepare(grey[i : i + batch_size]))[1].softmax(1) for i in range(0, len(grey), batch_size)]
    if not probs:
        return torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3)
    best, digits = torch.cat(probs).max(dim=1)
    return digits.reshape(n, 3), best.reshape(n, 3)


def channel_digits(net: SmallCNN, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The digit ``net`` sees in each channel of uint8 ``N×3×H×W`` images, as ``N×3`` class indices."""
    return channel_predictions(net, images, batch_size)[0]


def modes_of(digits: torch.Tensor) -> torch.Tensor:
    """``N×3`` channel digits → the ``N`` modes ``100·d_r + 10·d_g + d_b``."""
    return digits.long() @ torch.tensor(PLACES)


def mode_counts(modes: torch.Tensor, num_modes: int = NUM_MODES) -> torch.Tensor:
    """How often each mode ``0 … num_modes − 1`` occurs in ``modes``."""
    return torch.bincount(modes.long().flatten(), minlength=num_modes)[:num_modes]


def reverse_kl(gen_counts: torch.Tensor, data_counts: torch.Tensor) -> float:
    """``KL(p_gen ‖ p_data)`` of two mode histograms (each normalised to sum to 1); infinite when the samples
    have a mode the data lacks. Modes the samples miss add nothing (0 · log 0 = 0)."""
    p = gen_counts.double() / gen_counts.sum()
    q = data_counts.double() / data_counts.sum()
    seen = p > 0
    if bool((q[seen] == 0).any()):
        return math.inf
    return float((p[seen] * (p[seen] / q[seen]).log()).sum())


def coverage(gen_modes: torch.Tensor, data_counts: torch.Tensor) -> ModeCoverage:
    """:class:`ModeCoverage` of samples' modes against the data's mode histogram."""
    counts = mode_counts(gen_modes, len(data_counts))
    return ModeCoverage(int((counts > 0).sum()), reverse_kl(counts, data_counts), len(gen_modes))


def count_modes(net: SmallCNN, images: torch.Tensor, data_counts: torch.Tensor) -> ModeCoverage:
    """Classify each channel of uint8 RGB ``images`` with ``net`` and measure their mode coverage, with the
    fraction read with confidence."""
    digits, prob = channel_predictions(net, images)
    confident = float((prob >= CONFIDENT).all(dim=1).float().mean())
    cov = coverage(modes_of(digits), data_counts)
    return ModeCoverage(cov.modes, cov.reverse_kl, cov.samples, confident)


def shard_mode_counts(pattern: str, num_modes: int = NUM_MODES) -> torch.Tensor:
    """The mode histogram of labelled stacked-digit shards (their ``cls``), e.g. ``DIR/train-*.tar``."""
    labels = []
    for sample in tariterators.tarfile_samples({"url": u} for u in expand_shards(pattern)):
        if "cls" not in sample:
            raise DataError(f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')} has no label (cls)")
        labels.append(int(sample["cls"]))
    if not labels:
        raise DataError(f"no samples in {pattern}")
    return mode_counts(torch.tensor(labels), num_modes)


def channel_accuracy(net: SmallCNN, images: torch.Tensor, modes: torch.Tensor) -> tuple[float, float]:
    """How well the counter reads real stacked images of known ``modes``: the fraction of channels whose digit
    ``net`` gets right, and the fraction of images whose mode it gets right (all three channels)."""
    got = channel_digits(net, images)
    want = torch.stack([modes // p % 10 for p in PLACES], dim=1)
    right = got == want
    return float(right.float().mean()), float(right.all(dim=1).float().mean())
