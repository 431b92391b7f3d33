"""Images as WebDataset shards: writing them (``ganforge data shards``) and streaming them (``ShardStream``).

A shard set is a folder of ``train-NNNNNN.tar`` and ``holdout-NNNNNN.tar`` files plus a
``manifest.json`` (counts, resolution, channels, class names, sha256 of every shard). Each sample is
a PNG (``png``) and, for labelled data, its class index (``cls``). Image-to-image data has its own
layouts, named by the manifest's ``kind``: ``paired`` (``input.png`` beside ``png``), ``unpaired``
(``train-a-*``/``train-b-*`` shards, one per domain) and ``superres`` (high-resolution images only; the
input is :func:`downscale` of a crop, made when reading); docs/data.md describes them.

Reading is deterministic and resumable, so that a resumed run sees exactly the batches an
uninterrupted run would have seen. The stream of one rank is cut into one *role* per DataLoader
worker; role ``r`` of rank ``k`` reads, in each of its epochs, every ``n``-th shard of a seeded
permutation of the shard list (``n`` = ranks × workers), shuffles samples through a seeded buffer,
skips what an earlier run already consumed (before decoding), decodes, and batches. Every batch
carries its role's cursor ``(epoch, samples read)``; :class:`ShardLoader` keeps the cursor of the
last batch it handed out per role, and that is the data position saved in checkpoints. Bad samples
(unreadable tar members, non-images, wrong size or mode, labels out of range) are skipped and
reported with their shard and key; :class:`DataHealth` counts them and stops the run when too many.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import random
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from pydantic import Field
from webdataset import filters, shardlists, tariterators

from core.config import StrictConfig
from core.spec import ImageSpec

MANIFEST = "manifest.json"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DataError(ValueError):
    """Bad or missing data; the message names the file and what to do."""


class DataConfig(StrictConfig):
    """Where the training shards are and how to stream them."""

    shards: str = Field(description="training shards: a local glob, a brace pattern or a pipe: URL")
    manifest: str | None = Field(None, description="manifest.json (default: beside the shards)")
    holdout: str | None = Field(
        None, description="held-out shards for evaluation (default: holdout-*.tar beside the training shards)"
    )
    resolution: int | None = Field(None, ge=4, description="must match the manifest when both are given")
    channels: int | None = Field(None, ge=1, le=4, description="must match the manifest when both are given")
    num_classes: int | None = Field(None, ge=0, description="must match the manifest when both are given")
    workers: int = Field(
        2, ge=0, le=64, description="DataLoader worker processes per rank (0: read in the training process)"
    )
    shuffle_buffer: int = Field(1000, ge=1, description="samples held in the shuffle buffer")
    mirror: bool = Field(
        False,
        description="x-flips double the data: every sample also comes mirrored, with its label (official --mirror)",
    )
    max_bad_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="stop when more than this fraction of samples is bad"
    )
    min_samples_for_bad_check: int = Field(1000, ge=1, description="samples read before the bad fraction is judged")


# ---------------------------------------------------------------------------------------------
# Writing shards


@dataclass
class SourceImages:
    """Images read from a source, before resizing: PIL images, class indices (or None) and names, and the
    files that were skipped as ``(file, reason)``."""

    images: list[Image.Image]
    labels: list[int] | None
    class_names: list[str]
    keys: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def label(self, i: int) -> int | None:
        """Image ``i``'s class index, or None for unlabelled data."""
        return None if self.labels is None else self.labels[i]


BUILTINS = {
    "builtin:digits": "scikit-learn's 1,797 handwritten digits, 8×8 grey, labelled 0–9",
    "builtin:digits-edges": "Canny edge maps of those digits (upsampled to 32×32), grey, same keys and labels",
    "builtin:digits-m": "MNIST-M-style colour digits (digit over a photo patch), 32×32 RGB, same keys and labels",
    "builtin:photos": "scikit-image's bundled colour photos (astronaut, coffee, …), RGB, keyed by name",
}


def read_source(source: str) -> SourceImages:
    """Read an image folder (labels from subfolders), a .zip of one, an .npz, or a built-in set:
    ``builtin:digits``, ``builtin:digits-edges``, ``builtin:digits-m`` or ``builtin:photos`` (see ``BUILTINS``)."""
    if source.startswith("builtin:"):
        return _from_builtin(source)
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"data source {source} does not exist; give an image folder, a .zip, an .npz or one of {', '.join(BUILTINS)}"
        )
    if path.is_dir():
        files = {str(p.relative_to(path)): p.read_bytes for p in sorted(path.rglob("*")) if not p.is_dir()}
        return _from_named_files(source, files)
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                files = {n: (lambda n=n: zf.read(n)) for n in sorted(zf.namelist()) if not n.endswith("/")}
                return _from_named_files(source, files)
        except zipfile.BadZipFile as e:
            raise DataError(f"{source} is not a readable .zip ({e})") from None
    if path.suffix == ".npz":
        return _from_npz(path)
    raise DataError(f"cannot read {source}: expected a folder, a .zip, an .npz or one of {', '.join(BUILTINS)}")


def _from_builtin(source: str) -> SourceImages:
    """A built-in data set (no download); the digit sets share keys ``digits-NNNNN`` and labels."""
    from orchestrator.data import builtins

    if source not in BUILTINS:
        raise DataError(f"unknown built-in data set {source!r}; available: {', '.join(BUILTINS)}")
    try:
        if source == "builtin:photos":
            photos = builtins.photos()
            return SourceImages([Image.fromarray(photos[n]) for n in sorted(photos)], None, [], sorted(photos))
        arrays = {
            "builtin:digits": lambda: builtins.digits()[0],
            "builtin:digits-edges": builtins.digits_edges,
            "builtin:digits-m": lambda: builtins.digits_m()[0],
        }[source]()
    except builtins.BuiltinUnavailable as e:
        raise DataError(f"{source} {e}") from None
    labels = builtins.digits()[1]
    return SourceImages(
        [Image.fromarray(x) for x in arrays],
        [int(t) for t in labels],
        [str(n) for n in range(10)],
        [f"digits-{i:05d}" for i in range(len(arrays))],
    )


def _from_named_files(source: str, files: dict[str, Any]) -> SourceImages:
    """Images keyed by relative path; the first path component is the class when every image has one.

    Every file is tried; a file that is not an image or cannot be read is skipped with its reason."""
    images, keys, skipped = [], [], []
    for name, read in files.items():
        suffix = Path(name).suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            skipped.append((name, f"not an image file ({f'extension {suffix}' if suffix else 'no extension'})"))
            continue
        try:
            img = Image.open(io.BytesIO(read()))
            img.load()
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            skipped.append((name, f"not a readable image ({error_text(e)})"))
            continue
        images.append(img)
        keys.append(name)
    if not images:
        raise DataError(
            f"no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}"
            + (f"; skipped {len(skipped)} file(s):{skipped_lines(skipped)}" if skipped else "")
        )
    labelled = all(len(Path(n).parts) >= 2 for n in keys)
    class_names = sorted({Path(n).parts[0] for n in keys}) if labelled else []
    labels = [class_names.index(Path(n).parts[0]) for n in keys] if labelled else None
    return SourceImages(images, labels, class_names, keys, skipped)


def error_text(e: Exception) -> str:
    """An exception's message without Python object reprs such as ``<_io.BytesIO object at 0x7f…>``."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e)).strip() or type(e).__name__


def skipped_lines(skipped: list[tuple[str, str]]) -> str:
    """One indented ``file: reason`` line per skipped file, each after a newline."""
    return "".join(f"\n  {name}: {reason}" for name, reason in skipped)


def _from_npz(path: Path) -> SourceImages:
    with np.load(path, allow_pickle=False) as z:
        keys = list(z.keys())
        img_key = next((k for k in ("images", "x", "arr_0") if k in z), None)
        if img_key is None:
            raise DataError(f"{path}: no image array; expected a key 'images' (N×H×W or N×H×W×C uint8), found {keys}")
        arr = z[img_key]
        lab_key = next((k for k in ("labels", "y") if k in z), None)
        labels = [int(v) for v in z[lab_key]] if lab_key else None
        names = (
            [str(n) for n in z["class_names"]]
            if "class_names" in z
            else ([str(i) for i in range(max(labels) + 1)] if labels else [])
        )
        named = "class_names" in z
    out_of_range = [(i, v) for i, v in enumerate(labels or ()) if not 0 <= v < len(names)]
    if out_of_range:
        i, v = out_of_range[0]
        more = f" (and {len(out_of_range) - 1} more)" if len(out_of_range) > 1 else ""
        classes = f"{len(names)} class_names" if named else "classes 0 to the largest label"
        raise DataError(
            f"{path}: {lab_key}[{i}] is {v}, outside [0, {len(names)}) ({classes}){more}; labels must be class indices"
        )
    if arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)  # N×C×H×W → N×H×W×C
    if arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.round((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (3, 4):
        raise DataError(f"{path}: '{img_key}' has shape {arr.shape}; expected N×H×W or N×H×W×C")
    if labels is not None and len(labels) != len(arr):
        raise DataError(f"{path}: {len(arr)} images but {len(labels)} labels")
    images = [Image.fromarray(a) for a in arr]
    return SourceImages(images, labels, names, [f"npz-{i:07d}" for i in range(len(images))])


def prepare_image(img: Image.Image, resolution: int, channels: int) -> Image.Image:
    """Centre-crop to a square and resize to ``resolution`` with Lanczos; convert to L or RGB."""
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return img


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shards(
    source: str,
    out: str | Path,
    resolution: int,
    holdout: float = 0.1,
    shard_size: int = 1000,
    channels: int | None = None,
    seed: int = 0,
    strict: bool = False,
    max_train: int | None = None,
) -> dict:
    """Write ``train-*.tar``/``holdout-*.tar`` shards and ``manifest.json`` to ``out``; return the manifest.

    Images are split at random (``seed``) into held-out and training sets; an image whose pixels
    equal a held-out image's (after resizing) is dropped from training, so the two never share one.
    Files of the source that are not readable images are skipped and listed in the manifest's
    ``skipped``; with ``strict``, any such file is an error and nothing is written. ``max_train`` keeps only
    that many training images (a small-data experiment; the held-out split stays whole).
    """
    _check_resolution("--resolution", resolution)
    _check_holdout(holdout)
    src = read_source(source)
    if strict and src.skipped:
        raise DataError(
            f"{source}: {len(src.skipped)} file(s) are not readable images, so nothing was written "
            f"(--strict):{skipped_lines(src.skipped)}\n"
            f"remove or fix them, or leave out --strict to skip them"
        )
    channels = channels or guess_channels(src.images)
    encoded = {i: encode_png(prepare_image(img, resolution, channels)) for i, img in enumerate(src.images)}
    held, train, duplicates = split_holdout(list(range(len(encoded))), holdout, seed, lambda i: encoded[i][1])
    train = train[:max_train]
    manifest = _manifest_head("images", source, resolution, channels, src, seed, max_train)
    manifest["duplicates_dropped_from_train"] = duplicates
    manifest["skipped"] = [{"file": name, "reason": reason} for name, reason in src.skipped]
    out = _clean_out(out)
    for split, idx in (("holdout", held), ("train", train)):
        samples = (_sample(f"{i:08d}", src.keys[i], src.label(i), png=encoded[i][0]) for i in idx)
        manifest["splits"][split] = write_split(out, split, samples, shard_size)
    return save_manifest(out, manifest)


def _check_resolution(option: str, resolution: int) -> None:
    if resolution < 4 or resolution & (resolution - 1):
        raise DataError(f"{option} {resolution}: must be a power of two ≥ 4")


def _check_holdout(holdout: float) -> None:
    if not 0 <= holdout < 1:
        raise DataError(f"--holdout {holdout}: must be in [0, 1)")


def guess_channels(images: list[Image.Image]) -> int:
    """1 if every image is grey, else 3."""
    return 1 if all(im.mode in ("L", "1", "I", "I;16", "F") for im in images) else 3


def encode_png(img: Image.Image) -> tuple[bytes, str]:
    """PNG bytes of ``img`` and the sha256 of its pixels (for finding duplicates)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), hashlib.sha256(img.tobytes()).hexdigest()


def split_holdout(items: list, holdout: float, seed: int, pixels) -> tuple[list, list, int]:
    """``(held out, train, duplicates dropped)``: ``items`` shuffled with ``seed``, the first ``holdout``
    fraction held out; a training item whose ``pixels(item)`` hash equals a held-out one's is dropped."""
    order = list(items)
    random.Random(seed).shuffle(order)
    n_hold = int(round(holdout * len(order)))
    held_hashes = {pixels(i) for i in order[:n_hold]}
    train = [i for i in order[n_hold:] if pixels(i) not in held_hashes]
    return order[:n_hold], train, len(order) - n_hold - len(train)


def _manifest_head(kind, source, resolution, channels, src: SourceImages, seed, max_train) -> dict[str, Any]:
    head: dict[str, Any] = {"format": "ganforge-shards/1"}
    if kind != "images":  # manifests without a kind are images: those written before it existed stay valid
        head["kind"] = kind
    return {
        **head,
        "source": source,
        "resolution": resolution,
        "channels": channels,
        "num_classes": len(src.class_names) if src.labels is not None else 0,
        "class_names": src.class_names if src.labels is not None else [],
        "seed": seed,
        "max_train": max_train,
        "splits": {},
    }


def _clean_out(out: str | Path) -> Path:
    """``out``, created, without the shards of an earlier write."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("train-*.tar")) + list(out.glob("holdout-*.tar")):
        old.unlink()
    return out


def _sample(key: str, src_key: str, label: int | None, **members: bytes) -> dict:
    sample = {"__key__": key, **members, "src.txt": src_key}
    if label is not None:
        sample["cls"] = label
    return sample


def write_split(out: Path, split: str, samples, shard_size: int) -> dict:
    """Write ``samples`` to ``out/<split>-NNNNNN.tar`` shards; return the split's manifest entry."""
    count = 0
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
            count += 1
    shards = sorted(out.glob(f"{split}-{'[0-9]' * 6}.tar"))
    counts = _count_per_shard(count, shard_size, len(shards))
    return {
        "count": count,
        "shards": [{"name": p.name, "count": c, "sha256": sha256_file(p)} for p, c in zip(shards, counts)],
    }


def save_manifest(out: Path, manifest: dict) -> dict:
    """Write ``manifest.json`` atomically; return the manifest."""
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
    return manifest


def _count_per_shard(total: int, shard_size: int, n_shards: int) -> list[int]:
    return [min(shard_size, total - k * shard_size) for k in range(n_shards)]


# ---------------------------------------------------------------------------------------------
# Writing image-to-image shards: paired, unpaired, super-resolution


def pair_key(source_key: str) -> str:
    """The key that matches images across two sources: a file's relative path without its image
    extension (``cats/0.png`` → ``cats/0``); a built-in or .npz key as it is."""
    path = Path(source_key)
    return str(path.with_suffix("")) if path.suffix.lower() in IMAGE_SUFFIXES else source_key


def _by_pair_key(src: SourceImages, source: str) -> tuple[dict[str, int], list[dict]]:
    """Index of each pair key in ``src``; a second file with the same key is skipped (listed), not guessed at."""
    index: dict[str, int] = {}
    skipped = []
    for i, key in enumerate(src.keys):
        k = pair_key(key)
        if k in index:
            first = src.keys[index[k]]
            skipped.append(_skip(source, key, f"same name without extension as {first}: ambiguous, {first} kept"))
        else:
            index[k] = i
    return index, skipped


def _skip(source: str, file: str, reason: str) -> dict:
    return {"source": source, "file": file, "reason": reason}


def _read_skipped(source: str, src: SourceImages) -> list[dict]:
    return [_skip(source, name, reason) for name, reason in src.skipped]


def _aspect_mismatch(a: Image.Image, b: Image.Image) -> str | None:
    """Why two images cannot be a pair (different aspect ratios: their centre crops would not align), or None."""
    if a.width * b.height != a.height * b.width:
        return f"{a.width}×{a.height} input but {b.width}×{b.height} target: different aspect ratios"
    return None


def _translation_sizes(resolution: int, input_resolution: int | None, holdout: float) -> int:
    _check_resolution("--resolution", resolution)
    input_resolution = input_resolution or resolution
    _check_resolution("--input-resolution", input_resolution)
    _check_holdout(holdout)
    return input_resolution


def write_pairs(
    source_a: str,
    source_b: str,
    out: str | Path,
    resolution: int,
    input_resolution: int | None = None,
    holdout: float = 0.1,
    shard_size: int = 1000,
    seed: int = 0,
    channels: int | None = None,
    input_channels: int | None = None,
    max_train: int | None = None,
) -> dict:
    """Write paired shards (input A → target B, e.g. edges → photo) and ``manifest.json``; return the manifest.

    A and B are matched by :func:`pair_key`. Each sample holds ``input.png`` (A at ``input_resolution``),
    ``png`` (B at ``resolution``) and ``cls`` (B's label) when B is labelled. Files without a counterpart,
    unreadable files and pairs of different aspect ratios are skipped and listed in the manifest's
    ``skipped``. The held-out split is by pair; a training pair identical to a held-out one is dropped.
    """
    input_resolution = _translation_sizes(resolution, input_resolution, holdout)
    a, b = read_source(source_a), read_source(source_b)
    ka, skipped_a = _by_pair_key(a, source_a)
    kb, skipped_b = _by_pair_key(b, source_b)
    skipped = _read_skipped(source_a, a) + skipped_a + _read_skipped(source_b, b) + skipped_b
    skipped += [_skip(source_a, a.keys[ka[k]], f"no counterpart in {source_b}") for k in sorted(ka.keys() - kb.keys())]
    skipped += [_skip(source_b, b.keys[kb[k]], f"no counterpart in {source_a}") for k in sorted(kb.keys() - ka.keys())]
    shared = sorted(ka.keys() & kb.keys())
    if not shared:
        raise DataError(
            f"no image of {source_a} has a counterpart in {source_b} (matched by relative path without "
            f"extension, e.g. {pair_key(a.keys[0])!r} vs {pair_key(b.keys[0])!r}); name each pair's files alike"
        )
    channels = channels or guess_channels([b.images[kb[k]] for k in shared])
    input_channels = input_channels or guess_channels([a.images[ka[k]] for k in shared])
    pairs = {}
    for k in shared:
        img_a, img_b = a.images[ka[k]], b.images[kb[k]]
        reason = _aspect_mismatch(img_a, img_b)
        if reason:
            skipped.append(_skip(f"{source_a} + {source_b}", f"{a.keys[ka[k]]} + {b.keys[kb[k]]}", reason))
            continue
        pairs[k] = (
            encode_png(prepare_image(img_a, input_resolution, input_channels)),
            encode_png(prepare_image(img_b, resolution, channels)),
        )
    if not pairs:
        raise DataError(f"no usable pair in {source_a} + {source_b}:" + "".join(f"\n  {s}" for s in skipped[:10]))
    held, train, duplicates = split_holdout(sorted(pairs), holdout, seed, lambda k: pairs[k][0][1] + pairs[k][1][1])
    train = train[:max_train]
    manifest = _manifest_head("paired", source_b, resolution, channels, b, seed, max_train)
    manifest.update(input_source=source_a, input_resolution=input_resolution, input_channels=input_channels)
    manifest.update(pairs=len(pairs), duplicates_dropped_from_train=duplicates, skipped=skipped)
    out = _clean_out(out)
    number = {k: n for n, k in enumerate(shared)}
    for split, keys in (("holdout", held), ("train", train)):
        samples = (
            _sample(f"{number[k]:08d}", k, b.label(kb[k]), **{"input.png": pairs[k][0][0], "png": pairs[k][1][0]})
            for k in keys
        )
        manifest["splits"][split] = write_split(out, split, samples, shard_size)
    return save_manifest(out, manifest)


def write_unpaired(
    source_a: str,
    source_b: str,
    out: str | Path,
    resolution: int,
    input_resolution: int | None = None,
    holdout: float = 0.1,
    shard_size: int = 1000,
    seed: int = 0,
    channels: int | None = None,
    input_channels: int | None = None,
    max_train: int | None = None,
) -> dict:
    """Write two independent domains, A (input, at ``input_resolution``) and B (at ``resolution``), to
    ``train-a-*``, ``train-b-*``, ``holdout-a-*`` and ``holdout-b-*`` shards with ``manifest.json``.

    When the sources share keys (the same items, e.g. builtin:digits and builtin:digits-m), each shared key
    goes to one domain only, chosen at random (``seed``), so no image's counterpart is in the other domain
    (``shared_keys_split`` in the manifest). Labels are kept in ``cls`` for a labelled domain; ``max_train``
    caps each domain's training split.
    """
    input_resolution = _translation_sizes(resolution, input_resolution, holdout)
    a, b = read_source(source_a), read_source(source_b)
    ka, skipped_a = _by_pair_key(a, source_a)
    kb, skipped_b = _by_pair_key(b, source_b)
    shared = sorted(ka.keys() & kb.keys())
    random.Random(f"{seed}-domains").shuffle(shared)
    to_b = set(shared[len(shared) // 2 :])
    domains = {
        "a": (a, source_a, [i for k, i in sorted(ka.items()) if k not in to_b], input_resolution, input_channels),
        "b": (b, source_b, [i for k, i in sorted(kb.items()) if k in to_b or k not in ka], resolution, channels),
    }
    out = _clean_out(out)
    manifest = _manifest_head("unpaired", source_b, resolution, 0, b, seed, max_train)
    manifest.update(input_source=source_a, input_resolution=input_resolution, input_channels=0)
    manifest.update(
        input_num_classes=len(a.class_names) if a.labels is not None else 0,
        input_class_names=a.class_names if a.labels is not None else [],
        shared_keys_split=len(shared),
        duplicates_dropped_from_train={},
        skipped=_read_skipped(source_a, a) + skipped_a + _read_skipped(source_b, b) + skipped_b,
    )
    for d, (src, source, idx, res, ch) in domains.items():
        if not idx:
            raise DataError(f"domain {d.upper()} ({source}) has no image left: it needs images of its own")
        ch = ch or guess_channels([src.images[i] for i in idx])
        manifest["input_channels" if d == "a" else "channels"] = ch
        encoded = {i: encode_png(prepare_image(src.images[i], res, ch)) for i in idx}
        held, train, duplicates = split_holdout(idx, holdout, seed, lambda i, e=encoded: e[i][1])
        manifest["duplicates_dropped_from_train"][d] = duplicates
        for split, part in (("holdout", held), ("train", train[:max_train])):
            samples = (_sample(f"{d}-{i:08d}", src.keys[i], src.label(i), png=encoded[i][0]) for i in part)
            manifest["splits"][f"{split}-{d}"] = write_split(out, f"{split}-{d}", samples, shard_size)
    return save_manifest(out, manifest)


def write_superres(
    source: str,
    out: str | Path,
    resolution: int,
    crop: int,
    scale: int = 4,
    holdout: float = 0.1,
    shard_size: int = 1000,
    seed: int = 0,
    channels: int | None = None,
    max_train: int | None = None,
) -> dict:
    """Write super-resolution shards: whole images (centre square resized to ``resolution``) for training,
    and each held-out image cut into fixed, non-overlapping ``crop``×``crop`` tiles, so evaluation is the
    same every time. Only high-resolution images are stored; the low-resolution input is
    :func:`downscale` of a ``crop`` tile by ``scale``, made when reading (training crops at random)."""
    _check_resolution("--resolution", resolution)
    _check_holdout(holdout)
    if not scale <= crop <= resolution or crop % scale:
        raise DataError(
            f"--crop {crop} with --scale {scale} and --resolution {resolution}: the crop must be a multiple of "
            f"the scale and at most the resolution"
        )
    src = read_source(source)
    channels = channels or guess_channels(src.images)
    prepared = {i: prepare_image(img, resolution, channels) for i, img in enumerate(src.images)}
    encoded = {i: encode_png(img) for i, img in prepared.items()}
    held, train, duplicates = split_holdout(list(encoded), holdout, seed, lambda i: encoded[i][1])
    train = train[:max_train]
    per_side = resolution // crop
    manifest = _manifest_head("superres", source, crop, channels, src, seed, max_train)
    manifest.update(stored_resolution=resolution, scale=scale, input_resolution=crop // scale)
    manifest.update(input_channels=channels, holdout_images=len(held), tiles_per_image=per_side**2)
    manifest.update(duplicates_dropped_from_train=duplicates, skipped=_read_skipped(source, src))
    out = _clean_out(out)
    tiles = (
        _sample(
            f"{i:08d}-{ty:02d}{tx:02d}",
            f"{src.keys[i]}@{ty * crop},{tx * crop}",
            src.label(i),
            png=encode_png(prepared[i].crop((tx * crop, ty * crop, (tx + 1) * crop, (ty + 1) * crop)))[0],
        )
        for i in held
        for ty in range(per_side)
        for tx in range(per_side)
    )
    manifest["splits"]["holdout"] = write_split(out, "holdout", tiles, shard_size)
    whole = (_sample(f"{i:08d}", src.keys[i], src.label(i), png=encoded[i][0]) for i in train)
    manifest["splits"]["train"] = write_split(out, "train", whole, shard_size)
    return save_manifest(out, manifest)


# ---------------------------------------------------------------------------------------------
# Reading shards


def expand_shards(pattern: str) -> list[str]:
    """Shard URLs of a local glob, a brace pattern (``a-{000..009}.tar``) or ``pipe:`` URLs (``::``-separated)."""
    urls = []
    for url in shardlists.expand_urls(pattern):
        if url.startswith("pipe:") or "://" in url:
            urls.append(url)
        elif any(ch in url for ch in "*?["):
            urls.extend(sorted(glob.glob(url)))
        else:
            urls.append(url)
    missing = [u for u in urls if not (u.startswith("pipe:") or "://" in u) and not os.path.exists(u)]
    if not urls or missing:
        what = f"no shard matches {pattern!r}" if not urls else f"shard {missing[0]} does not exist"
        raise DataError(
            f"{what}; write shards with `ganforge data shards SOURCE OUT --resolution R` "
            f"and point data.shards at OUT/train-*.tar"
        )
    return urls


def load_manifest(cfg: DataConfig) -> dict | None:
    """The manifest named by ``data.manifest``, or the one beside local shards; None if there is none."""
    if cfg.manifest:
        path = Path(cfg.manifest)
        if not path.exists():
            raise DataError(f"data.manifest: {path} does not exist")
    else:
        first = cfg.shards.split("::")[0]
        if first.startswith("pipe:") or "://" in first:
            return None
        path = Path(os.path.dirname(first) or ".") / MANIFEST
        if not path.exists():
            if cfg.resolution is None or cfg.channels is None:
                expand_shards(cfg.shards)  # no shards there either: say that, rather than "resolution unknown"
            return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable manifest ({e}); rewrite it with `ganforge data shards`") from None


def image_spec(cfg: DataConfig, manifest: dict | None) -> ImageSpec:
    """Resolution, channels and classes from the manifest, checked against the config's own values."""
    values = {}
    for key in ("resolution", "channels", "num_classes"):
        mine, theirs = getattr(cfg, key), (manifest or {}).get(key)
        if mine is not None and theirs is not None and mine != theirs:
            raise DataError(
                f"data.{key} is {mine} but the shards' manifest says {theirs}; "
                f"remove data.{key} or point data.shards at matching shards"
            )
        values[key] = mine if mine is not None else theirs
    for key in ("resolution", "channels"):
        if values[key] is None:
            raise DataError(
                f"data.{key} is unknown: no manifest.json beside {cfg.shards!r}; set data.manifest or data.{key}"
            )
    names = tuple((manifest or {}).get("class_names") or ())
    kind = (manifest or {}).get("kind", "images")
    pairing = {"paired": "paired", "superres": "paired", "unpaired": "unpaired"}.get(kind, "none")
    return ImageSpec(
        values["resolution"],
        values["channels"],
        values["num_classes"] or 0,
        names,
        int((manifest or {}).get("input_resolution") or 0) if pairing != "none" else 0,
        int((manifest or {}).get("input_channels") or 0) if pairing != "none" else 0,
        pairing,
    )


@dataclass
class Batch:
    """What a ShardStream role yields: images in [-1, 1], labels, their sample keys, the role's cursor
    after this batch, the bad samples met since the previous batch as ``(shard, key, reason)``, and the
    torch intra-op threads of the process that decoded it (1 in a DataLoader worker)."""

    img: torch.Tensor
    label: torch.Tensor
    keys: list[str]
    role: int
    cursor: tuple[int, int]
    bad: list[tuple[str, str, str]] = field(default_factory=list)
    read: int = 0
    threads: int = field(default_factory=torch.get_num_threads)
    input: torch.Tensor | None = None  # image-to-image data: the input images G maps to ``img`` (else None)
    input_keys: list[str] | None = None  # unpaired data: the keys of ``input`` (domain A); ``keys`` are B's


class ShardStream(torch.utils.data.IterableDataset):
    """An endless, deterministic stream of batches from one rank's share of the shards."""

    def __init__(
        self,
        urls: list[str],
        spec: ImageSpec,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_roles: int = 1,
        role_offset: int = 0,
        cursors: list[tuple[int, int]] | None = None,
        shuffle_buffer: int = 1000,
        mirror: bool = False,
        domain: str = "",
        stored_resolution: int | None = None,
    ):
        """``domain`` sets this stream's seeds apart from another's (the two domains of unpaired data);
        ``stored_resolution``: super-resolution shards, whose stored images are cropped to the spec's
        resolution at a position drawn from (seed, epoch, stream, sample index) and downscaled to the input."""
        super().__init__()
        n_streams = world_size * num_roles
        if len(urls) < n_streams:
            raise DataError(
                f"{len(urls)} shard(s) cannot feed {world_size} rank(s) × {num_roles} loader worker(s); "
                f"write more, smaller shards (ganforge data shards --shard-size) or lower data.workers"
            )
        self.urls, self.spec, self.batch_size = list(urls), spec, batch_size
        self.seed, self.rank, self.world_size, self.num_roles = seed, rank, world_size, num_roles
        self.role_offset, self.shuffle_buffer, self.mirror = role_offset, shuffle_buffer, mirror
        self.cursors = list(cursors) if cursors else [(0, 0)] * num_roles
        self.domain, self.stored_resolution = domain, stored_resolution

    def _role(self) -> int:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        return (worker + self.role_offset) % self.num_roles

    def _decode(self, sample: dict, bad: list[tuple[str, str, str]], where: str) -> tuple | None:
        """``(image, label, input or None)`` of ``sample`` (x-flipped, input and image together, for a
        mirror), or None after adding it to ``bad`` (a bad mirror is not reported again). ``where`` names
        the sample and its epoch (``epoch-key``): it seeds a super-resolution crop, so that a sample's crop in an epoch
        is the same for any number of workers."""
        if self.spec.pairing == "paired":
            rng = random.Random(f"{self.seed}{self.domain}-crop-{where}") if self.stored_resolution else None
            decoded = decode_paired(sample, self.spec, rng, stored_resolution=self.stored_resolution)
            if not isinstance(decoded, str):
                decoded = (decoded[1], decoded[2], decoded[0])
        else:
            decoded = decode_sample(sample, self.spec)
            decoded = decoded if isinstance(decoded, str) else (*decoded, None)
        mirrored = sample.get(MIRRORED, False)
        if isinstance(decoded, str):
            if not mirrored:
                bad.append((sample.get("__url__", "?"), sample.get("__key__", "?"), decoded))
            return None
        if not mirrored:
            return decoded
        img, label, inp = decoded
        return img.flip(-1), label, None if inp is None else inp.flip(-1)

    def __iter__(self) -> Iterator[Batch]:
        role = self._role()
        stream = self.rank * self.num_roles + role
        n_streams = self.world_size * self.num_roles
        epoch, skip = self.cursors[role]
        imgs, labels, inputs, keys, bad, read = [], [], [], [], [], 0
        while True:
            shards = list(self.urls)
            random.Random(f"{self.seed}{self.domain}-shards-{epoch}").shuffle(shards)
            errors: list[tuple[str, str, str]] = []
            mine = shards[stream::n_streams]
            reported: set[str] = set()

            # bound as defaults: each epoch's closures keep that epoch's lists (ruff B023)
            def on_error(exn: Exception, mine=mine, reported=reported, errors=errors) -> bool:
                url = _url_of(exn, mine)
                reported.add(url)
                errors.append((url, "", f"unreadable: {exn}"))
                return True

            def read_shards(mine=mine, reported=reported, errors=errors, on_error=on_error) -> Iterator[dict]:
                for url in mine:
                    yield from tariterators.tarfile_samples([{"url": url}], handler=on_error)
                    # Python's tarfile takes a file cut at (or inside) a member header for a normal end
                    if url not in reported and not _ends_like_a_tar(url):
                        errors.append(
                            (
                                url,
                                "",
                                "truncated: the file ends without a tar end-of-archive marker; "
                                "the samples after the cut are lost (rewrite or re-copy the shard)",
                            )
                        )

            samples = with_mirrors(read_shards()) if self.mirror else read_shards()
            rng = random.Random(f"{self.seed}{self.domain}-samples-{epoch}-{stream}")
            good_in_epoch = 0
            for index, sample in enumerate(
                filters._shuffle(samples, self.shuffle_buffer, min(100, self.shuffle_buffer), rng)
            ):
                bad.extend(errors)
                errors.clear()
                if index < skip:
                    continue
                read += not sample.get(MIRRORED, False)  # a mirror is the same sample again: counted once
                decoded = self._decode(sample, bad, f"{epoch}-{sample.get('__key__', index)}")
                if decoded is None:
                    continue
                good_in_epoch += 1
                imgs.append(decoded[0])
                labels.append(decoded[1])
                inputs.append(decoded[2])
                keys.append(sample["__key__"])
                if len(imgs) == self.batch_size:
                    yield Batch(
                        torch.stack(imgs),
                        torch.tensor(labels, dtype=torch.long),
                        keys,
                        role,
                        (epoch, index + 1),
                        bad,
                        read,
                        input=torch.stack(inputs) if inputs[0] is not None else None,
                    )
                    imgs, labels, inputs, keys, bad, read = [], [], [], [], [], 0
            bad.extend(errors)
            if good_in_epoch == 0 and skip == 0:
                raise DataError(
                    f"rank {self.rank} loader role {role}: shards {shards[stream::n_streams]} hold no "
                    f"usable sample (bad: {bad[:3]}); check them with `tar tf` or rewrite them"
                )
            epoch, skip = epoch + 1, 0


MIRRORED = "__mirrored__"


def with_mirrors(samples: Iterator[dict]) -> Iterator[dict]:
    """Each sample, then the same sample marked to be x-flipped (key ``<key>:mirror``): the data doubled, as the
    official ``--mirror``; the shuffle buffer then parts the two."""
    for sample in samples:
        yield sample
        yield {**sample, "__key__": f"{sample.get('__key__', '?')}:mirror", MIRRORED: True}


def _ends_like_a_tar(url: str) -> bool:
    """Whether a local shard ends with the two zero blocks that close a tar file (streams: not checked)."""
    if url.startswith("pipe:") or "://" in url:
        return True
    try:
        with open(url, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < 1024 or size % 512:
                return False
            f.seek(size - 1024)
            return f.read(1024) == bytes(1024)
    except OSError:
        return True  # unreadable files are reported by the reader itself


def _url_of(exn: Exception, urls: list[str] = ()) -> str:
    for a in getattr(exn, "args", ()):
        if isinstance(a, str) and (a.endswith(".tar") or a.startswith("pipe:")):
            return a
    # a member cut short mid-read: webdataset only appends "@ <file object naming the shard>" to the message
    text = str(exn)
    return next((u for u in sorted(urls, key=len, reverse=True) if u in text), "?")


MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _open_png(data: bytes | None, sample: dict, member: str) -> Image.Image | str:
    if data is None:
        return f"no {member} member (has {sorted(k for k in sample if not k.startswith('__'))})"
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001
        return f"not an image: {type(e).__name__}"
    return img


def _wrong_shape(img: Image.Image, channels: int, resolution: int) -> str | None:
    want_mode = MODES.get(channels)
    if img.size != (resolution, resolution) or img.mode != want_mode:
        return f"{img.mode} {img.size[0]}×{img.size[1]}, expected {want_mode} {resolution}×{resolution}"
    return None


def _label(sample: dict, spec: ImageSpec) -> int | str:
    if not spec.num_classes:
        return 0
    try:
        label = int(sample["cls"])
    except (KeyError, ValueError):
        return "missing or unreadable label"
    if not 0 <= label < spec.num_classes:
        return f"label {label} out of range [0, {spec.num_classes})"
    return label


def to_uint8(img: Image.Image) -> torch.Tensor:
    """A PIL image as a C×H×W uint8 tensor."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as floats in [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def _decode_uint8(sample: dict, spec: ImageSpec) -> tuple[torch.Tensor, int] | str:
    img = _open_png(sample.get("png") or sample.get("jpg") or sample.get("jpeg"), sample, "image")
    if isinstance(img, str):
        return img
    wrong = _wrong_shape(img, spec.channels, spec.resolution)
    if wrong:
        return wrong
    label = _label(sample, spec)
    return label if isinstance(label, str) else (to_uint8(img), label)


def decode_sample(sample: dict, spec: ImageSpec) -> tuple[torch.Tensor, int] | str:
    """``(image in [-1, 1] as C×H×W float, label)`` or the reason the sample is bad."""
    decoded = _decode_uint8(sample, spec)
    return decoded if isinstance(decoded, str) else (to_unit(decoded[0]), decoded[1])


def downscale(img: Image.Image | torch.Tensor, scale: int) -> Image.Image | torch.Tensor:
    """The low-resolution input of super-resolution: ``img`` (a PIL image, or a uint8 C×H×W or N×C×H×W
    tensor) shrunk by ``scale`` with PIL's bicubic filter and quantised to uint8, as papers store their LR
    images. Returns the same kind it is given. Training and evaluation both make their inputs with it."""
    if isinstance(img, torch.Tensor):
        if img.ndim == 4:
            return torch.stack([downscale(x, scale) for x in img]) if len(img) else img[:, :, ::scale, ::scale]
        if img.dtype != torch.uint8 or img.ndim != 3:
            raise DataError(f"downscale: expected a uint8 C×H×W tensor, got {img.dtype} {tuple(img.shape)}")
        arr = img.permute(1, 2, 0).numpy()
        return to_uint8(downscale(Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr), scale))
    w, h = img.size
    if w % scale or h % scale:
        raise DataError(f"downscale: a {w}×{h} image cannot be shrunk by {scale}: its sides must be multiples")
    return img.resize((w // scale, h // scale), Image.Resampling.BICUBIC)


def _superres_pair(
    img: Image.Image, spec: ImageSpec, rng: random.Random | None, stored: int
) -> tuple[torch.Tensor, torch.Tensor] | str:
    """``(LR input, HR crop)`` as uint8 from a stored image: a crop of ``spec.resolution`` px at a
    position drawn from ``rng`` (centred without one), and its :func:`downscale`."""
    wrong = _wrong_shape(img, spec.channels, stored)
    if wrong:
        return wrong
    crop, room = spec.resolution, stored - spec.resolution
    y, x = (rng.randint(0, room), rng.randint(0, room)) if rng else (room // 2, room // 2)
    hr = img.crop((x, y, x + crop, y + crop)) if room else img
    return to_uint8(downscale(hr, spec.resolution // spec.input_resolution)), to_uint8(hr)


def _decode_paired_uint8(
    sample: dict, spec: ImageSpec, rng: random.Random | None, stored_resolution: int | None
) -> tuple[torch.Tensor, torch.Tensor, int] | str:
    img = _open_png(sample.get("png"), sample, "target image (png)")
    if isinstance(img, str):
        return img
    if stored_resolution:
        pair = _superres_pair(img, spec, rng, stored_resolution)
        if isinstance(pair, str):
            return pair
        inp, out = pair
    else:
        inp = _open_png(sample.get("input.png"), sample, "input image (input.png)")
        if isinstance(inp, str):
            return inp if inp.startswith("no ") else f"input: {inp}"
        wrong = _wrong_shape(inp, spec.input_channels, spec.input_resolution)
        if wrong:
            return f"input: {wrong}"
        wrong = _wrong_shape(img, spec.channels, spec.resolution)
        if wrong:
            return wrong
        inp, out = to_uint8(inp), to_uint8(img)
    label = _label(sample, spec)
    return label if isinstance(label, str) else (inp, out, label)


def decode_paired(
    sample: dict, spec: ImageSpec, rng: random.Random | None = None, *, stored_resolution: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int] | str:
    """``(input, image, label)`` of a paired sample (C×H×W floats in [-1, 1]) or the reason it is bad
    (missing ``input.png``, wrong size or mode of either image, bad label).

    With ``stored_resolution`` the sample is super-resolution data: its one stored image (that size) is
    cropped to ``spec.resolution`` at a position drawn from ``rng`` (centred when None) and the input is
    :func:`downscale` of the crop by ``spec.resolution // spec.input_resolution``."""
    decoded = _decode_paired_uint8(sample, spec, rng, stored_resolution)
    return decoded if isinstance(decoded, str) else (to_unit(decoded[0]), to_unit(decoded[1]), decoded[2])


class DataHealth:
    """Counts samples read and bad samples per shard; raises when the bad fraction is too high."""

    def __init__(self, max_bad_fraction: float, min_samples: int):
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples
        self.read = 0
        self.bad_by_shard: Counter[str] = Counter()
        self.examples: list[tuple[str, str, str]] = []

    @property
    def bad(self) -> int:
        return sum(self.bad_by_shard.values())

    def update(self, batch: Batch) -> list[tuple[str, str, str]]:
        """Count a batch's reads and bad samples; return the new bad samples (to be logged)."""
        self.read += batch.read
        for shard, key, reason in batch.bad:
            self.bad_by_shard[shard] += 1
            if len(self.examples) < 20:
                self.examples.append((shard, key, reason))
        if self.read >= self.min_samples and self.bad > self.max_bad_fraction * self.read:
            worst = ", ".join(f"{s} ({n})" for s, n in self.bad_by_shard.most_common(5))
            raise DataError(
                f"{self.bad} of {self.read} samples were bad (> data.max_bad_fraction="
                f"{self.max_bad_fraction}); worst shards: {worst}; first: {self.examples[:3]}"
            )
        return batch.bad

    def state_dict(self) -> dict:
        return {"read": self.read, "bad_by_shard": dict(self.bad_by_shard)}

    def load_state_dict(self, state: dict) -> None:
        self.read = state["read"]
        self.bad_by_shard = Counter(state["bad_by_shard"])


class _Reader:
    """One deterministic stream's DataLoader and its position: the cursor of the last batch handed out
    per role and how many batches were handed out."""

    def __init__(self, urls: list[str], spec: ImageSpec, num_roles: int, domain: str = "", stored=None):
        self.urls, self.spec, self.domain, self.stored = urls, spec, domain, stored
        self.batches = 0
        self.cursors: list[tuple[int, int]] = [(0, 0)] * num_roles
        self.it: Iterator[Batch] | None = None

    # the owning ShardLoader is passed in, not kept: a reference cycle would keep DataLoader workers alive
    def _start(self, ld: ShardLoader) -> None:
        cfg = ld.cfg
        stream = ShardStream(
            self.urls,
            self.spec,
            ld.batch_size,
            seed=ld.seed,
            rank=ld.rank,
            world_size=ld.world_size,
            num_roles=ld.num_roles,
            role_offset=self.batches % ld.num_roles,
            cursors=self.cursors,
            shuffle_buffer=cfg.shuffle_buffer,
            mirror=cfg.mirror,
            domain=self.domain,
            stored_resolution=self.stored,
        )
        # Its own generator: a DataLoader iterator otherwise draws its base seed from the global RNG,
        # which training also uses (noise inputs, style mixing) and a resumed run restores.
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=cfg.workers,
            collate_fn=lambda b: b,
            prefetch_factor=2 if cfg.workers else None,
            multiprocessing_context="fork" if cfg.workers else None,
            # no worker_init_fn: torch's worker loop already runs each loader worker with 1 thread
            generator=torch.Generator().manual_seed(ld.seed),
        )
        self.it = iter(loader)

    def next(self, ld: ShardLoader) -> Batch:
        if self.it is None:
            self._start(ld)
        batch = next(self.it)
        self.cursors[batch.role] = batch.cursor
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        return {"batches": self.batches, "cursors": [list(c) for c in self.cursors]}

    def load_state_dict(self, state: dict, same_readers: bool, num_roles: int) -> None:
        if same_readers:
            self.batches = state["batches"]
            self.cursors = [tuple(c) for c in state["cursors"]]
        else:
            next_epoch = max(e for e, _ in state["cursors"]) + 1
            self.cursors = [(next_epoch, 0)] * num_roles
        self.it = None


def split_domains(urls: list[str], pattern: str) -> tuple[list[str], list[str]]:
    """Unpaired data's shard URLs by domain: ``(A: *-a-NNNNNN.tar, B: *-b-NNNNNN.tar)``."""
    by = {"a": [], "b": [], "": []}
    for url in urls:
        m = re.search(r"-([ab])-\d+\.tar", os.path.basename(url))
        by[m.group(1) if m else ""].append(url)
    if by[""] or not by["a"] or not by["b"]:
        what = f"{by[''][0]} is of neither domain" if by[""] else f"no domain-{'A' if not by['a'] else 'B'} shard"
        raise DataError(
            f"unpaired data in {pattern!r}: {what}; unpaired shards are named train-a-NNNNNN.tar and "
            f"train-b-NNNNNN.tar (ganforge data unpaired): point data.shards at OUT/train-*.tar"
        )
    return by["a"], by["b"]


class ShardLoader:
    """This rank's batches, from a DataLoader over a :class:`ShardStream`, with a resumable position.

    The position is the cursor of the last batch handed out per role plus how many batches were
    handed out; on resume the roles are rotated so that the first new batch comes from the role
    whose turn it was (DataLoader takes batches from its workers in turn). Unpaired data is read as two
    independent streams, one per domain (each with its own shards, seeds and position): a batch's
    ``img``, ``label`` and ``keys`` are domain B's, ``input`` and ``input_keys`` domain A's.
    Super-resolution data needs its manifest (beside the shards, or ``data.manifest``).
    """

    def __init__(
        self, cfg: DataConfig, spec: ImageSpec, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ):
        self.cfg, self.spec, self.batch_size = cfg, spec, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.urls = expand_shards(cfg.shards)
        self.num_roles = max(1, cfg.workers)
        self.health = DataHealth(cfg.max_bad_fraction, cfg.min_samples_for_bad_check)
        manifest = (load_manifest(cfg) or {}) if spec.pairing != "none" else {}
        if spec.pairing == "unpaired":
            a, b = split_domains(self.urls, cfg.shards)
            spec_a = ImageSpec(spec.input_resolution, spec.input_channels)
            spec_b = ImageSpec(spec.resolution, spec.channels, spec.num_classes, spec.class_names)
            self.readers = {
                "b": _Reader(b, spec_b, self.num_roles, "-b"),
                "a": _Reader(a, spec_a, self.num_roles, "-a"),
            }
        else:
            stored = manifest.get("stored_resolution") if manifest.get("kind") == "superres" else None
            self.readers = {"": _Reader(self.urls, spec, self.num_roles, stored=stored)}

    def next(self) -> Batch:
        """The next batch; updates the position and the bad-sample counts."""
        if "" in self.readers:
            batch = self.readers[""].next(self)
        else:
            b, a = self.readers["b"].next(self), self.readers["a"].next(self)
            batch = Batch(
                b.img, b.label, b.keys, b.role, b.cursor, a.bad + b.bad, a.read + b.read, b.threads, a.img, a.keys
            )
        self.health.update(batch)
        return batch

    def set_batch_size(self, batch_size: int) -> None:
        """Hand out batches of ``batch_size`` from the next one on: the stream restarts at the current
        position, as a resumed run's does (progressive growing changes the batch per level)."""
        if batch_size != self.batch_size:
            self.batch_size = batch_size
            for reader in self.readers.values():
                reader.it = None

    def state_dict(self) -> dict:
        """The position (for unpaired data: B's, and A's under ``input``) and the bad-sample counts."""
        main = self.readers.get("", self.readers.get("b"))
        state = {**main.state_dict(), "num_roles": self.num_roles, "world_size": self.world_size}
        if "a" in self.readers:
            state["input"] = self.readers["a"].state_dict()
        return {**state, "health": self.health.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; with another worker or rank count, restart from the next epoch."""
        self.health.load_state_dict(state["health"])
        same = state["num_roles"] == self.num_roles and state["world_size"] == self.world_size
        if "a" in self.readers and "input" not in state:
            raise DataError("the saved data position is not of unpaired data, but data.shards are unpaired")
        for name, reader in self.readers.items():
            reader.load_state_dict(state["input"] if name == "a" else state, same, self.num_roles)


# ---------------------------------------------------------------------------------------------
# Held-out image-to-image data, for evaluation


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
        decoded = _decode_paired_uint8(sample, spec, None, spec.resolution if tile else None)
        inp, img, label = _or_raise(decoded, url, sample)
        inputs.append(inp)
        targets.append(img)
        labels.append(label)
    return HeldOut(torch.stack(inputs), torch.stack(targets), None, _labels(labels, spec.num_classes))


def _read_domain(urls: list[str], spec: ImageSpec, limit: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One domain's images and labels (its ``cls`` when every sample has one, whether or not the spec has classes)."""
    imgs, labels = [], []
    for url, sample in _samples_in_order(urls, limit):
        img, _ = _or_raise(_decode_uint8(sample, spec), url, sample)
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
        if not _ends_like_a_tar(url):
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
