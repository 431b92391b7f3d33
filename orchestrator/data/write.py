"""Writing images as WebDataset shards: ``ganforge data shards`` (``write_shards``) and the image-to-image
layouts of ``ganforge data pairs / unpaired / superres`` (``write_pairs``, ``write_unpaired``, ``write_superres``).

A shard set is a folder of ``train-NNNNNN.tar`` and ``holdout-NNNNNN.tar`` files plus a
``manifest.json`` (counts, resolution, channels, class names, sha256 of every shard). Each sample is
a PNG (``png``) and, for labelled data, its class index (``cls``). Image-to-image data has its own
layouts, named by the manifest's ``kind``: ``paired`` (``input.png`` beside ``png``), ``unpaired``
(``train-a-*``/``train-b-*`` shards, one per domain) and ``superres`` (high-resolution images only; the
input is :func:`orchestrator.data.shards.downscale` of a crop, made when reading); docs/data.md describes
them.

The images come from :func:`orchestrator.data.sources.read_source`; :mod:`orchestrator.data.shards` reads the shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from orchestrator.data.errors import DataError
from orchestrator.data.shards import MANIFEST
from orchestrator.data.sources import IMAGE_SUFFIXES, SourceImages, prepare_image, read_source, skipped_lines


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
