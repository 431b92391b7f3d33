"""Streaming WebDataset shards (``ShardStream``, ``ShardLoader``): the reading side of the data, which a Run uses.

A shard set (written by :mod:`orchestrator.data.write`; docs/data.md describes its layouts) is a folder of
``train-NNNNNN.tar`` and ``holdout-NNNNNN.tar`` files plus a ``manifest.json``, whose ``kind`` names the
layout: ``images``, ``paired``, ``unpaired`` or ``superres`` (whose input is :func:`downscale` of a crop, made
when reading).

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
import io
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from webdataset import filters, shardlists, tariterators

from core.config import StrictConfig
from core.spec import ImageSpec
from orchestrator.data.errors import DataError

MANIFEST = "manifest.json"


class DataConfig(StrictConfig):
    """Where the training shards are and how to stream them."""

    shards: str = Field(description="training shards: a local glob, a brace pattern or a pipe: URL")
    manifest: str | None = Field(None, description="manifest.json (default: beside the shards)")
    holdout: str | None = Field(
        None, description="held-out shards for evaluation (default: holdout-*.tar beside the training shards)"
    )
    resolution: int | None = Field(None, ge=4, description="must match the manifest when both are given")
    channels: int | None = Field(None, ge=1, le=4, description="must match the manifest when both are given")
    num_classes: int | None = Field(
        None,
        ge=0,
        description="must match the manifest when both are given; 0 trains unconditionally, ignoring the shards' "
        "labels (StyleGAN2-ADA without --cond)",
    )
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
        unconditional = key == "num_classes" and mine == 0  # labels in the shards, ignored
        if mine is not None and theirs is not None and mine != theirs and not unconditional:
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
                    if url not in reported and not ends_like_a_tar(url):
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


def ends_like_a_tar(url: str) -> bool:
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


def decode_uint8(sample: dict, spec: ImageSpec) -> tuple[torch.Tensor, int] | str:
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
    decoded = decode_uint8(sample, spec)
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


def decode_paired_uint8(
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
    decoded = decode_paired_uint8(sample, spec, rng, stored_resolution)
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
