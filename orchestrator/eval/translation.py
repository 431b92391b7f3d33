"""Evaluation of image-to-image generators (super-resolution, Pix2Pix, CycleGAN) on held-out images.

G maps held-out inputs to images, in eval mode, without gradients, a batch at a time on its own device; its
outputs are rounded to uint8 as ``ganforge generate`` rounds them, and every metric compares uint8 images.
Which metrics fit depends on the data (:func:`~orchestrator.eval.evaluator.data_kind`):

* **super-resolution** (paired, input smaller than the target): ``psnr`` and ``ssim`` of G(input) against
  the target on Y (BT.601) with ``scale`` border pixels cropped, as SR papers report them; ``psnr_bicubic``
  and ``ssim_bicubic``, the same for the input upsampled with PIL's bicubic filter (the classic baseline);
* **paired** (Pix2Pix, input and target of one size): ``l1`` (G(input) against the target, in [-1, 1] units,
  those of Pix2Pix's loss), ``l1_input`` (the input itself against the target, converted to the target's
  channels: the baseline a G must beat), ``psnr`` (RGB, no crop), ``fid`` (outputs against the held-out
  targets, in the configured feature extractor's space, through torch-fidelity);
* **unpaired** (CycleGAN, ``G.ab``: A → B, ``G.ba``: B → A): ``fid_b`` (G.ab(A) against the held-out B),
  ``fid_a`` (G.ba(B) against the held-out A), and label accuracies of ``dataset-cnn`` classifiers
  (``eval.classifier_a``, ``eval.classifier_b``): ``label_ab`` (B's classifier on G.ab(A) against A's labels:
  does the translation keep the class?), ``label_ba`` (A's classifier on G.ba(B) against B's labels),
  ``label_aba`` (A's classifier on G.ba(G.ab(A)) against A's labels: does the cycle keep it?). A label metric
  whose classifier is not set, or whose held-out images have no labels, is skipped with a note.

The held-out side of a FID is cached by torch-fidelity (as in :func:`~orchestrator.eval.evaluator.evaluate`)
when the held-out shard URLs are given; the key adds which side (``target``, ``a``, ``b``) to the key of
:func:`~orchestrator.eval.evaluator.holdout_cache_key`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from architectures.registry import Capabilities
from core.spec import ImageSpec
from orchestrator.eval import image_metrics as im
from orchestrator.eval.evaluator import (
    EvalConfig,
    EvalError,
    EvalResult,
    ExtractorWeights,
    as_rgb,
    check_feature_extractor,
    data_kind,
    default_metrics,
    fidelity_metrics,
    holdout_cache_key,
    needs_extractor,
    resolve_metrics,
    shard_sha256s,
    to_uint8,
)

if TYPE_CHECKING:
    from orchestrator.eval.extractors import SmallCNN

    class HeldOut:  # stand-in for orchestrator.data.heldout.HeldOut (any object with these attributes will do)
        a: torch.Tensor  # uint8 N×C×h×w: inputs (paired, super-resolution) or domain-A images (unpaired)
        b: torch.Tensor  # uint8 M×C×H×W: targets (paired: row i is a[i]'s target) or domain-B images
        a_labels: torch.Tensor | None
        b_labels: torch.Tensor | None


__all__ = ["evaluate_translation", "default_metrics", "load_classifiers", "bicubic_upscale", "match_channels"]

# which classifier (of domain A or B) each label metric uses, and the held-out labels it is scored against
LABEL_METRICS = {"label_ab": ("b", "a"), "label_ba": ("a", "b"), "label_aba": ("a", "a")}


def _extractor_howto(domain: str) -> str:
    return (
        f"train one on domain {domain.upper()}'s labelled training shards with `ganforge extractor train --data "
        f"'OUT/train-{domain}-*.tar' --out OUT/classifier-{domain}.pt` and set eval.classifier_{domain} to it"
    )


def load_classifiers(cfg: EvalConfig, metrics: list[str]) -> dict[str, SmallCNN]:
    """The domain classifiers (``"a"``, ``"b"``) that ``metrics`` need and ``eval.classifier_a/b`` name; an
    unset one is left out (its metrics are skipped), a missing or foreign file is an :class:`EvalError`."""
    from orchestrator.eval.extractors import load_classifier

    out = {}
    for domain in sorted({LABEL_METRICS[m][0] for m in metrics if m in LABEL_METRICS}):
        path = getattr(cfg, f"classifier_{domain}")
        if path is None:
            continue
        path = Path(path).expanduser()
        if not path.is_file():
            raise EvalError(
                f"eval.classifier_{domain} points at {path}, which does not exist: {_extractor_howto(domain)}"
            )
        try:
            out[domain] = load_classifier(path)
        except ValueError as e:
            raise EvalError(f"eval.classifier_{domain}: {e}") from None
    return out


# ---------------------------------------------------------------------------------------------
# Images


def bicubic_upscale(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``N×C×h×w`` → uint8 ``N×C×size×size`` with PIL's bicubic filter, a channel at a time (what PIL
    does to RGB images too)."""
    out = torch.empty(*img.shape[:2], size, size, dtype=torch.uint8)
    for i in range(img.shape[0]):
        for c in range(img.shape[1]):
            up = Image.fromarray(img[i, c].numpy()).resize((size, size), Image.Resampling.BICUBIC)
            out[i, c] = torch.from_numpy(np.array(up))
    return out


def match_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 ``N×C×H×W`` with ``channels`` channels: RGB → grey as PIL's ``convert("L")`` (ITU-R 601-2 luma,
    rounded), grey → RGB repeated, an alpha channel dropped or made opaque."""
    c = img.shape[1]
    if c == channels:
        return img
    rgb = as_rgb(img)
    if channels == 1:
        r, g, b = rgb.int().unbind(1)
        return ((r * 299 + g * 587 + b * 114 + 500) // 1000).unsqueeze(1).to(torch.uint8)
    if channels == 3:
        return rgb
    if channels == 4:
        return torch.cat([rgb, torch.full_like(rgb[:, :1], 255)], 1)
    raise EvalError(f"cannot convert {c}-channel images to {channels} channels")


class _Images(Dataset):
    """uint8 images as torch-fidelity takes them (``3×H×W``); ``reads`` counts images handed out."""

    def __init__(self, images: torch.Tensor):
        self.images, self.reads = images, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        return as_rgb(self.images[i])


def _device(G: torch.nn.Module) -> torch.device:
    return next(iter(G.parameters()), torch.zeros(())).device


@contextmanager
def _evaluating(G: torch.nn.Module) -> Iterator[None]:
    """G in eval mode, put back as it was afterwards."""
    was_training = G.training
    G.eval()
    try:
        yield
    finally:
        G.train(was_training)


@torch.no_grad()
def translate(net: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """``net`` applied to uint8 images a batch at a time (mapped to [-1, 1] on ``device``); uint8 outputs on
    the CPU."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float() / 127.5 - 1.0
        out.append(to_uint8(net(x)))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)


def _same_shape(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    if out.shape != ref.shape:
        raise EvalError(
            f"{what}: G made images of shape {tuple(out.shape[1:])}, the held-out ones are {tuple(ref.shape[1:])}"
        )


# ---------------------------------------------------------------------------------------------
# Evaluation


class _Fid:
    """FIDs of image sets against held-out ones, the held-out side cached when the shard URLs are known."""

    def __init__(self, cfg, extractor, device, verbose, holdout_urls, manifest):
        self.cfg, self.extractor, self.device, self.verbose = cfg, extractor, device, verbose
        self.key = None
        if holdout_urls:
            hashes = shard_sha256s(holdout_urls, manifest, cfg.cache_dir)
            self.key = holdout_cache_key(hashes, extractor, cfg.holdout_num)
        self.held: list[_Images] = []

    def __call__(self, images: torch.Tensor, held: torch.Tensor, side: str) -> float:
        if min(len(images), len(held)) < 2:
            raise EvalError(f"FID needs at least 2 images a side, got {len(images)} and {len(held)} ({side})")
        self.held.append(_Images(held))
        values = fidelity_metrics(
            _Images(images),
            self.held[-1],
            self.cfg,
            self.extractor,
            cache_name=f"{self.key}-{side}" if self.key else None,
            cuda=self.device.type == "cuda",
            verbose=self.verbose,
            fid=True,
        )
        return values["fid"]

    @property
    def cache_hit(self) -> bool | None:
        if not self.held or self.key is None:
            return None
        return all(h.reads == 0 for h in self.held)


def _superres(G, spec, cfg, metrics, heldout, fid, classifiers, notes) -> dict[str, float]:
    a, b = heldout.a, heldout.b
    out = translate(G, a, cfg.batch_size, _device(G))
    _same_shape(out, b, "super-resolution")
    scale = spec.resolution // spec.input_resolution
    values = {}
    if "psnr" in metrics:
        values["psnr"] = im.psnr_y(out, b, crop=scale)
    if "ssim" in metrics:
        values["ssim"] = im.ssim_y(out, b, crop=scale)
    if {"psnr_bicubic", "ssim_bicubic"} & set(metrics):
        up = bicubic_upscale(a, spec.resolution)
        if "psnr_bicubic" in metrics:
            values["psnr_bicubic"] = im.psnr_y(up, b, crop=scale)
        if "ssim_bicubic" in metrics:
            values["ssim_bicubic"] = im.ssim_y(up, b, crop=scale)
    return values


def _paired(G, spec, cfg, metrics, heldout, fid, classifiers, notes) -> dict[str, float]:
    a, b = heldout.a, heldout.b
    out = translate(G, a, cfg.batch_size, _device(G))
    _same_shape(out, b, "paired translation")
    values = {}
    if "l1" in metrics:
        values["l1"] = im.l1(out, b)
    if "l1_input" in metrics:
        values["l1_input"] = im.l1(match_channels(a, b.shape[1]), b)
    if "psnr" in metrics:
        values["psnr"] = im.psnr(out, b)
    if "fid" in metrics:
        values["fid"] = fid(out, b, "target")
    return values


def _unpaired(G, spec, cfg, metrics, heldout, fid, classifiers, notes) -> dict[str, float]:
    from orchestrator.eval.extractors import classifier_accuracy

    a, b, device = heldout.a, heldout.b, _device(G)
    wanted = set(metrics)
    ab = translate(G.ab, a, cfg.batch_size, device) if wanted & {"fid_b", "label_ab", "label_aba"} else None
    ba = translate(G.ba, b, cfg.batch_size, device) if wanted & {"fid_a", "label_ba"} else None
    labels = {"a": heldout.a_labels, "b": heldout.b_labels}
    values = {}
    if "fid_a" in metrics:
        values["fid_a"] = fid(ba, a, "a")
    if "fid_b" in metrics:
        values["fid_b"] = fid(ab, b, "b")
    for metric in (m for m in metrics if m in LABEL_METRICS):
        domain, source = LABEL_METRICS[metric]
        if domain not in classifiers:
            notes.append(f"{metric} skipped: eval.classifier_{domain} is not set; {_extractor_howto(domain)}")
        elif labels[source] is None:
            notes.append(f"{metric} skipped: the held-out {source.upper()} images have no labels")
        else:
            images = {"label_ab": ab, "label_ba": ba}.get(metric)
            if images is None:
                images = translate(G.ba, ab, cfg.batch_size, device)
            values[metric] = classifier_accuracy(classifiers[domain], images, labels[source].long(), cfg.batch_size)
    return values


class _Limited:
    """The first ``limit`` held-out images (and labels) of each side; all when ``limit`` is None."""

    def __init__(self, heldout, limit: int | None):
        cut = (lambda t: t) if limit is None else (lambda t: None if t is None else t[:limit])
        self.a, self.b = cut(heldout.a), cut(heldout.b)
        self.a_labels, self.b_labels = cut(heldout.a_labels), cut(heldout.b_labels)
        if len(self.a) == 0 or len(self.b) == 0:
            raise EvalError(f"no held-out images ({len(self.a)} inputs/A, {len(self.b)} targets/B)")


_KINDS = {"superres": _superres, "paired": _paired, "unpaired": _unpaired}


def evaluate_translation(
    G: torch.nn.Module,
    spec: ImageSpec,
    cfg: EvalConfig,
    heldout: HeldOut,
    *,
    capabilities: Capabilities,
    extractor: ExtractorWeights | None = None,
    verbose: bool = False,
    holdout_urls: list[str] | None = None,
    manifest: dict | None = None,
) -> EvalResult:
    """Compute ``cfg.metrics`` (default: :func:`default_metrics`) for an image-to-image ``G`` on held-out
    images (what ``orchestrator.data.heldout.read_heldout`` returns; ``cfg.holdout_num`` limits them here too).

    See the module docstring for what each metric compares. ``extractor``: what
    :func:`~orchestrator.eval.evaluator.check_feature_extractor` returned (checked here when a FID is asked
    for and it is omitted). ``holdout_urls`` (with ``manifest`` for shards that are not local files): the
    shards ``heldout`` was read from, so that the held-out side of a FID is cached. ``num_generated`` in the
    result counts G's outputs compared (both directions for unpaired data), ``num_holdout`` the held-out
    images (pairs for paired data); ``notes`` says which metrics were skipped and why.
    """
    t0 = time.perf_counter()
    kind = data_kind(spec, capabilities)
    metrics = resolve_metrics(cfg, spec, capabilities)
    if needs_extractor(metrics):
        extractor = extractor or check_feature_extractor(cfg)
    classifiers = load_classifiers(cfg, metrics)
    heldout = _Limited(heldout, cfg.holdout_num)
    device = _device(G)
    fid = _Fid(cfg, extractor, device, verbose, holdout_urls, manifest) if needs_extractor(metrics) else None
    notes: list[str] = []
    with _evaluating(G):
        values = _KINDS[kind](G, spec, cfg, metrics, heldout, fid, classifiers, notes)
    unpaired = kind == "unpaired"
    return EvalResult(
        metrics={m: values[m] for m in metrics if m in values},
        cache_hit=fid.cache_hit if fid else None,
        cache_key=fid.key if fid else None,
        num_generated=len(heldout.a) + (len(heldout.b) if unpaired else 0),
        num_holdout=len(heldout.a) + len(heldout.b) if unpaired else len(heldout.b),
        kid_subset_size=None,
        feature_extractor=extractor.name if fid else "none",
        weights_sha256=extractor.sha256 if fid else "",
        seconds=time.perf_counter() - t0,
        holdout_shards=list(holdout_urls or []),
        notes=notes,
    )
