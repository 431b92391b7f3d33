"""Held-out image-to-image data, for evaluation: ``read_heldout`` reads the held-out shards of paired,
unpaired or super-resolution data in shard order, whole, as uint8 tensors (:class:`HeldOut`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from webdataset import tariterators

from core.spec import ImageSpec
from orchestrator.data.errors import DataError
from orchestrator.data.shards import MANIFEST, decode_paired_uint8, decode_uint8, ends_like_a_tar, split_domains
from orchestrator.data.sources import error_text


@dataclass
class HeldOut:
    """Held-out image-to-image data as uint8 N×C×H×W tensors. Paired and super-resolution data: ``a`` are
    the inputs and ``b`` the targets, row i of ``a`` belonging to row i of ``b`` (the pair's label is in
    ``b_labels``; ``a_labels`` is None). Unpaired data: ``a`` are domain A's images and ``b`` domain B's,
    in counts that may differ, each with its labels when its domain is labelled."""

    a: torch.Tensor
    b: torch.Tensor
    a_labels: torch.Tensor | None
    b_labels: torch.Tensor | None


def read_heldout(urls: list[str], spec: ImageSpec, limit: int | None = None) -> HeldOut:
    """The held-out samples of ``urls`` in shard order (at most ``limit`` rows, per domain for unpaired data).

    Super-resolution tiles get their input from :func:`downscale`, as in training. For unpaired data ``urls``
    holds both domains' holdout shards (told apart by ``-a-``/``-b-`` in their names). A bad sample raises
    :class:`DataError` naming its shard and key."""
    if spec.pairing == "unpaired":
        urls_a, urls_b = split_domains(urls, " ".join(urls))
        spec_a = ImageSpec(spec.input_resolution, spec.input_channels)
        spec_b = ImageSpec(spec.resolution, spec.channels, spec.num_classes, spec.class_names)
        a, a_labels = _read_domain(urls_a, spec_a, limit)
        b, b_labels = _read_domain(urls_b, spec_b, limit)
        return HeldOut(a, b, a_labels, b_labels)
    if spec.pairing != "paired":
        raise DataError(
            "read_heldout reads image-to-image data (paired, unpaired or super-resolution shards); "
            f"these shards hold plain images (pairing {spec.pairing!r})"
        )
    kind = _kind_beside(urls)
    inputs, targets, labels = [], [], []
    for url, sample in _samples_in_order(urls, limit):
        if kind is None:  # no manifest (e.g. pipe: URLs): the first sample tells, and holds for all
            kind = "paired" if "input.png" in sample else "superres"
        tile = kind == "superres"
        decoded = decode_paired_uint8(sample, spec, None, spec.resolution if tile else None)
        inp, img, label = _or_raise(decoded, url, sample)
        inputs.append(inp)
        targets.append(img)
        labels.append(label)
    return HeldOut(torch.stack(inputs), torch.stack(targets), None, _labels(labels, spec.num_classes))


def _read_domain(urls: list[str], spec: ImageSpec, limit: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One domain's images and labels (its ``cls`` when every sample has one, whether or not the spec has classes)."""
    imgs, labels = [], []
    for url, sample in _samples_in_order(urls, limit):
        img, _ = _or_raise(decode_uint8(sample, spec), url, sample)
        imgs.append(img)
        labels.append(int(sample["cls"]) if "cls" in sample else None)
    return torch.stack(imgs), (torch.tensor(labels, dtype=torch.long) if None not in labels else None)


def _labels(labels: list[int], num_classes: int) -> torch.Tensor | None:
    return torch.tensor(labels, dtype=torch.long) if num_classes else None


def _or_raise(decoded, url: str, sample: dict):
    if isinstance(decoded, str):
        raise DataError(
            f"held-out shard {url}, sample {sample.get('__key__', '?')}: {decoded}; "
            f"rewrite the shards (ganforge data pairs / unpaired / superres)"
        )
    return decoded


def _samples_in_order(urls: list[str], limit: int | None) -> Iterator[tuple[str, dict]]:
    """``(shard, sample)`` of every sample of ``urls`` in order, up to ``limit``; an unreadable shard raises."""
    if not urls:
        raise DataError("no held-out shards given")
    n = 0
    for url in urls:
        try:
            for sample in tariterators.tarfile_samples([{"url": url}]):
                if limit is not None and n >= limit:
                    return
                n += 1
                yield url, sample
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure of a shard is reported the same way
            raise DataError(f"held-out shard {url} is not readable ({error_text(e)}); rewrite or re-copy it") from None
        if not ends_like_a_tar(url):
            raise DataError(f"held-out shard {url} is truncated (no tar end-of-archive marker); rewrite or re-copy it")
    if n == 0:
        raise DataError(f"the held-out shards {urls} hold no sample")


def _kind_beside(urls: list[str]) -> str | None:
    """The ``kind`` of the manifest beside the first local shard (``images`` for old manifests); None if none."""
    first = urls[0] if urls else ""
    if first.startswith("pipe:") or "://" in first:
        return None
    path = Path(os.path.dirname(first) or ".") / MANIFEST
    try:
        return json.loads(path.read_text()).get("kind", "images")
    except (OSError, json.JSONDecodeError):
        return None
