"""Evaluation of a generator against held-out shards: FID, KID, IS, precision/recall through torch-fidelity.

All metric math is torch-fidelity's (``torch_fidelity.calculate_metrics``); this module feeds it
two uint8 image sets and makes the run reproducible and cheap to repeat:

* generated images come from G_ema on fixed seeds: image ``i`` uses ``seed + i`` for its latent
  (and class label) exactly as ``ganforge generate --seed`` does, with the same truncation each time;
* held-out images are read from the ``holdout-*.tar`` shards;
* torch-fidelity caches the held-out features and FID statistics under ``cache_dir`` with a key
  made from the held-out shards' sha256, the feature extractor's name and its weights file's sha256
  (see :func:`holdout_cache_key`), so they are computed once and any change to a shard or to the
  weights gives a new key;
* the feature extractor's weights come from a local file only (:func:`check_feature_extractor`
  finds it and fails at once, saying what to place where, when it is missing): nothing is
  downloaded at run time (``ganforge weights get inception``, run on purpose, is what downloads).

Images are handed to torch-fidelity as ``3×H×W`` uint8: grey images are repeated to three channels
(what torch-fidelity does itself when it reads grey PNGs), and a fourth (alpha) channel is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch
import yaml
from pydantic import Field, field_validator
from torch.utils.data import Dataset
from webdataset import tariterators

import architectures
from architectures.registry import Capabilities
from core.config import StrictConfig
from core.spec import ImageSpec
from orchestrator.checkpoint import load_generator
from orchestrator.data.errors import DataError
from orchestrator.data.shards import DataConfig, decode_sample, expand_shards, load_manifest
from orchestrator.data.write import sha256_file
from orchestrator.eval.weights import INCEPTION_FILE, INCEPTION_URL, cached_inception

# torch-fidelity (and torchvision, which it imports) is imported where it is used: importing this
# module, e.g. for EvalConfig, stays cheap.

INCEPTION = "inception-v3-compat"
INCEPTION_ENV = "GANFORGE_INCEPTION_WEIGHTS"
DATASET_CNN = "dataset-cnn"  # orchestrator.eval.extractors.NAME
CACHE_KEY_VERSION = 1

Metric = Literal[
    "fid",
    "kid",
    "isc",
    "prc",
    "l1",
    "l1_input",
    "psnr",
    "ssim",
    "psnr_bicubic",
    "ssim_bicubic",
    "label_ab",
    "label_ba",
    "label_aba",
    "fid_a",
    "fid_b",
]
BINARY_METRICS = ("fid", "kid", "prc")  # the ones that need the held-out images
# The metrics that fit each kind of data (see data_kind), the defaults first, in the order they are reported.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "noise": ("fid", "kid", "isc", "prc"),
    "superres": ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic"),
    "paired": ("l1", "l1_input", "psnr", "fid"),
    "unpaired": ("fid_a", "fid_b", "label_ab", "label_ba", "label_aba"),
}
_DEFAULT_METRICS = {"noise": ("fid", "kid")}  # the other kinds: all that fit
KIND_NAMES = {
    "noise": "noise → image",
    "superres": "super-resolution",
    "paired": "paired image-to-image",
    "unpaired": "unpaired (cycle) image-to-image",
}
FEATURE_METRICS = ("fid", "kid", "isc", "prc", "fid_a", "fid_b")  # the ones computed in a feature extractor's space
_FIDELITY_KEYS = {  # torch-fidelity's result keys (KEY_METRIC_*) → ours
    "frechet_inception_distance": "fid",
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
    "inception_score_mean": "isc",
    "inception_score_std": "isc_std",
    "precision": "precision",
    "recall": "recall",
}


class EvalError(ValueError):
    """Evaluation cannot run as configured; the message says what is missing and how to fix it."""


class EvalConfig(StrictConfig):
    """How a generator is evaluated against held-out data, and what the evaluator actor may use."""

    enabled: bool = Field(
        False, description="evaluate during training: at the start, every `every_kimg`, and at the end"
    )
    metrics: list[Metric] | None = Field(
        None,
        min_length=1,
        description="metrics to compute; noise → image: fid, kid, isc (Inception Score), prc (precision/recall); "
        "super-resolution: psnr, ssim, psnr_bicubic, ssim_bicubic; paired image-to-image: l1, l1_input, psnr, "
        "fid; unpaired (CycleGAN): fid_a, fid_b, label_ab, label_ba, label_aba (docs/evaluation.md). None: the "
        "data's defaults (fid,kid for noise → image, all that fit for image-to-image: default_metrics)",
    )
    num_samples: int = Field(10000, ge=2, description="images generated from G_ema per evaluation")
    batch_size: int = Field(64, ge=1, description="images per generator and feature-extractor batch")
    seed: int = Field(0, ge=0, description="generated image i uses seed SEED+i for its latent and class label")
    truncation_psi: float | None = Field(
        None,
        ge=0.0,
        le=2.0,
        description="truncation ψ for generators whose forward takes truncation_psi (StyleGAN2); None: no truncation",
    )
    feature_extractor: str = Field(
        INCEPTION,
        pattern=r"^\S+$",
        description=f"torch-fidelity feature extractor: {INCEPTION} (Inception, needs its "
        f"weights file) or {DATASET_CNN} (a classifier trained on the train "
        f"split by `ganforge extractor train`) or another registered name",
    )
    weights_path: str | None = Field(
        None,
        description=f"the feature extractor's weights file; None, for {INCEPTION}: "
        f"${INCEPTION_ENV}, else the file `ganforge weights get "
        f"inception` wrote, else the torch hub cache (required for "
        f"the others)",
    )
    classifier_a: str | None = Field(
        None,
        description="unpaired image-to-image: a dataset-cnn classifier of domain A (`ganforge extractor train "
        "--data 'OUT/train-a-*.tar' --out FILE`) for label_ba and label_aba; None: those are skipped",
    )
    classifier_b: str | None = Field(
        None,
        description="unpaired image-to-image: a dataset-cnn classifier of domain B (`ganforge extractor train "
        "--data 'OUT/train-b-*.tar' --out FILE`) for label_ab; None: it is skipped",
    )
    kid_subset_size: int = Field(
        1000, ge=2, description="KID subset size (lowered to the smaller image count when there are fewer images)"
    )
    kid_subsets: int = Field(100, ge=1, description="number of KID subsets")
    isc_splits: int = Field(10, ge=1, description="number of Inception Score splits (at most one per image)")
    prc_neighborhood: int = Field(3, ge=1, description="k of the k-nearest-neighbour balls of precision/recall")
    cache_dir: str = Field(
        "~/.cache/ganforge/eval",
        min_length=1,
        description="held-out feature statistics cache (shared by runs; safe to delete)",
    )
    holdout: str | None = Field(
        None,
        description="held-out shards (glob, brace pattern or pipe: URLs); None: "
        "data.holdout, else holdout-*.tar beside data.shards",
    )
    holdout_num: int | None = Field(
        None, ge=2, description="use only the first N held-out images (shard order); None: all"
    )
    every_kimg: float | None = Field(
        None,
        gt=0,
        description="with `enabled`: also evaluate every this many thousand "
        "images (None: only at the start and the end)",
    )
    cpus: float = Field(0.5, ge=0, description="CPUs reserved for the evaluator actor")
    gpus: float = Field(0.0, ge=0, description="GPUs (or a fraction of one) reserved for the evaluator actor")
    resources: dict[str, float] = Field(
        {},
        description="extra custom Ray resources for the evaluator actor, e.g. "
        "{evaluator: 1} to keep it on its own worker group (k8s/)",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads of the evaluator actor's evaluating thread; None: `cpus` rounded up, at "
        "least 1 (dev mode evaluates in the training thread and keeps training's)",
    )
    nice: int = Field(
        19,
        ge=0,
        le=19,
        description="niceness the evaluator actor's threads run at, at least (19: the lowest CPU priority, "
        "below training's workers, which Ray starts at 15; 0: leave it alone). A GPU actor's device is its own "
        "either way; this only lowers its CPU side. Dev mode evaluates in the training thread and changes nothing",
    )
    sched_idle: bool = Field(
        True,
        description="run the evaluator actor's threads in Linux's SCHED_IDLE class as well: they get a core only "
        "when training leaves it idle (nice 19 alone still takes ~30% of a core from Ray's nice-15 workers)",
    )

    @field_validator("metrics", mode="before")
    @classmethod
    def _split_and_dedupe(cls, v):
        if isinstance(v, str):
            v = [m.strip() for m in v.split(",") if m.strip()]
        if isinstance(v, (list, tuple)):
            v = list(dict.fromkeys(v))
        return v


# ---------------------------------------------------------------------------------------------
# Which metrics fit the data


def data_kind(spec: ImageSpec, capabilities: Capabilities = Capabilities()) -> str:
    """``"noise"`` (noise → image), ``"superres"`` (paired, smaller input), ``"paired"`` (paired, same size:
    Pix2Pix) or ``"unpaired"`` (two domains: CycleGAN, whose G must have ``G.ab`` and ``G.ba``)."""
    if not spec.translates:
        return "noise"
    if spec.pairing == "unpaired" or capabilities.cycle:
        if not capabilities.cycle:
            raise EvalError(
                "unpaired image-to-image data is evaluated through G.ab and G.ba: the architecture must declare "
                "Capabilities(cycle=True)"
            )
        return "unpaired"
    if spec.pairing == "paired":
        return "superres" if spec.input_resolution < spec.resolution else "paired"
    raise EvalError(f"image-to-image data with pairing {spec.pairing!r}: expected 'paired' or 'unpaired'")


def default_metrics(spec: ImageSpec, capabilities: Capabilities = Capabilities()) -> list[str]:
    """The metrics computed when ``eval.metrics`` is not set: fid, kid for noise → image; for image-to-image
    data, all that fit it (label metrics are skipped with a note when their classifier is not set)."""
    kind = data_kind(spec, capabilities)
    return list(_DEFAULT_METRICS.get(kind, KIND_METRICS[kind]))


def resolve_metrics(cfg: EvalConfig, spec: ImageSpec, capabilities: Capabilities = Capabilities()) -> list[str]:
    """``eval.metrics`` (or :func:`default_metrics`), checked against the kind of data: a metric that does
    not fit is an :class:`EvalError` naming it and the ones that fit."""
    kind = data_kind(spec, capabilities)
    if cfg.metrics is None:
        return default_metrics(spec, capabilities)
    fit = KIND_METRICS[kind]
    wrong = [m for m in cfg.metrics if m not in fit]
    if wrong:
        raise EvalError(
            f"eval.metrics: {', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not fit {KIND_NAMES[kind]} "
            f"data; the metrics that fit it: {', '.join(fit)}"
        )
    return list(cfg.metrics)


def needs_extractor(metrics: list[str]) -> bool:
    """Whether any of ``metrics`` is computed in a feature extractor's space (so its weights must be there)."""
    return any(m in FEATURE_METRICS for m in metrics)


# ---------------------------------------------------------------------------------------------
# Feature extractor weights


@dataclass(frozen=True)
class ExtractorWeights:
    """A feature extractor resolved to a local weights file and that file's sha256."""

    name: str
    path: Path
    sha256: str


_hash_memo: dict[tuple, str] = {}


def _file_id(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _sha256_memo(path: Path) -> str:
    """sha256 of a file, remembered in this process for as long as the file is unchanged."""
    key = _file_id(path)
    if key not in _hash_memo:
        _hash_memo[key] = sha256_file(path)
    return _hash_memo[key]


def _inception_howto() -> str:
    return (
        f"ganforge never downloads at run time. Get torch-fidelity's Inception weights file {INCEPTION_FILE} once "
        f"with `ganforge weights get inception` (it verifies the sha256 and puts the file in {cached_inception()}, "
        f"where it is found without further settings); without internet access here, run that (or curl -L -O "
        f"{INCEPTION_URL}) on a machine that has it, copy it to this machine, and put it in that place or point "
        f"${INCEPTION_ENV} (or eval.weights_path, or --weights) at it"
    )


def _weights_location(cfg: EvalConfig) -> tuple[Path | None, str]:
    """Where the weights should be, and which setting said so (for messages)."""
    if cfg.weights_path:
        return Path(cfg.weights_path).expanduser(), "eval.weights_path (--weights)"
    if cfg.feature_extractor != INCEPTION:
        return None, "eval.weights_path"
    if os.environ.get(INCEPTION_ENV):
        return Path(os.environ[INCEPTION_ENV]).expanduser(), f"${INCEPTION_ENV}"
    cached = cached_inception()
    if cached.is_file():
        return cached, "ganforge weights cache"
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE  # where torch-fidelity itself would have put it
    return (hub, "torch hub cache") if hub.is_file() else (None, f"eval.weights_path / ${INCEPTION_ENV}")


def check_feature_extractor(cfg: EvalConfig) -> ExtractorWeights:
    """Find and check the feature extractor's weights file (and make ``cache_dir``); call it at start.

    Raises :class:`EvalError` naming the setting, the file needed and how to get it when the file
    is missing or is not the right kind of file. Loads tensors only (``weights_only=True``), so a
    file that would run code when torch-fidelity unpickles it is refused here.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from orchestrator.eval import extractors  # registers dataset-cnn with torch-fidelity

    name = cfg.feature_extractor
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise EvalError(
            f"eval.feature_extractor: unknown feature extractor {name!r}; registered: "
            f"{', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}"
        )
    path, source = _weights_location(cfg)
    if name == INCEPTION:
        _require_file(
            path,
            source,
            f"no Inception weights: neither eval.weights_path nor ${INCEPTION_ENV} is set "
            f"and {INCEPTION_FILE} is neither in ganforge's weights cache nor in the torch hub cache. "
            f"{_inception_howto()}",
            f"the {INCEPTION} feature extractor needs {INCEPTION_FILE} there. {_inception_howto()}",
        )
        try:
            state = _load_tensors(path)
            ok = state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3) and state["fc.weight"].shape == (1008, 2048)
        except Exception:  # noqa: BLE001 - whatever is wrong with the file, the advice is the same
            ok = False
        if not ok:
            raise EvalError(
                f"{source}: {path} is not torch-fidelity's Inception weights (a state_dict of "
                f"FeatureExtractorInceptionV3, {INCEPTION_FILE}). {_inception_howto()}"
            )
    elif name == extractors.NAME:
        howto = (
            f"train it once with `ganforge extractor train --data 'DIR/train-*.tar' --out DIR/{name}.pt` "
            f"and pass --weights DIR/{name}.pt (eval.weights_path)"
        )
        _require_file(
            path,
            source,
            f"eval.weights_path is not set: the {name} feature extractor is a classifier "
            f"trained on the data set's train split; {howto}",
            f"the {name} feature extractor needs its weights there; {howto}",
        )
        try:
            extractors.load_classifier(path)
        except ValueError as e:
            raise EvalError(f"{source}: {e}") from None
    else:
        if path is None or not path.is_file():
            raise EvalError(
                f"the {name} feature extractor needs a local weights file in eval.weights_path "
                f"({path or 'not set'}); ganforge never lets torch-fidelity download one"
            )
    cache = Path(cfg.cache_dir).expanduser()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"eval.cache_dir: cannot create {cache}: {e.strerror}") from None
    return ExtractorWeights(name, path, _sha256_memo(path))


def _require_file(path: Path | None, source: str, unset: str, needed: str) -> None:
    """Raise :class:`EvalError` with ``unset`` when no weights path is configured, or naming ``source`` and
    the path, then ``needed``, when the file is not there."""
    if path is None:
        raise EvalError(unset)
    if not path.is_file():
        raise EvalError(f"{source} points at {path}, which does not exist: {needed}")


def _load_tensors(path: Path) -> dict:
    """A state_dict, tensors only; memory-mapped when the file's format allows (no 100 MB read)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in torch's pre-1.6 (non-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


@contextmanager
def _no_downloads() -> Iterator[None]:
    """Make any torch-fidelity attempt to fetch weights from the internet fail loudly instead of hanging."""

    def refuse(url, *args, **kwargs):
        raise EvalError(
            f"torch-fidelity tried to download {url}; ganforge never downloads at run time: give the "
            f"feature extractor a local weights file (eval.weights_path)"
        )

    # torch-fidelity's modules bind load_state_dict_from_url by name; others go through torch.hub
    patched = [
        (m, "load_state_dict_from_url")
        for name, m in list(sys.modules.items())
        if name.startswith("torch_fidelity.") and hasattr(m, "load_state_dict_from_url")
    ]
    patched += [(torch.hub, attr) for attr in ("load", "load_state_dict_from_url", "download_url_to_file")]
    saved = [(m, attr, getattr(m, attr)) for m, attr in patched]
    for m, attr in patched:
        setattr(m, attr, refuse)
    try:
        yield
    finally:
        for m, attr, orig in saved:
            setattr(m, attr, orig)


# ---------------------------------------------------------------------------------------------
# The two image sets


def to_uint8_rgb(img: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], ``N×C×H×W`` → uint8 ``N×3×H×W`` (grey repeated, alpha dropped), on the CPU.

    The rounding is that of ``ganforge generate`` (and ``torchvision.utils.save_image``).
    """
    return as_rgb(to_uint8(img))


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → uint8 with the same channels, on the CPU (the rounding of :func:`to_uint8_rgb`)."""
    return ((img.detach().float().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to("cpu", torch.uint8)


def as_rgb(x: torch.Tensor) -> torch.Tensor:
    """uint8 images ``…×C×H×W`` → ``…×3×H×W``: grey repeated, alpha dropped (what torch-fidelity is fed)."""
    c = x.shape[-3]
    if c == 1:
        return x.repeat_interleave(3, dim=-3)
    if c == 4:
        return x[..., :3, :, :].contiguous()
    if c != 3:
        raise EvalError(f"cannot evaluate {c}-channel images (1, 3 or 4 are supported)")
    return x


class GeneratedImages(Dataset):
    """``num`` images from a generator as uint8 ``3×H×W``; image ``i`` from seed ``seed + i``.

    The latent (and, for a conditional model, the class label) of image ``i`` is drawn from a
    ``torch.Generator`` seeded with ``seed + i``, and StyleGAN2's per-layer noise is the generator's
    fixed buffer (``noise_mode="const"``), both as in ``ganforge generate``. Images are made a batch
    at a time when first asked for (torch-fidelity reads them in order). Any other noise a generator
    draws itself comes from the global RNG, reseeded with ``seed + first index`` for each batch and
    restored afterwards.
    """

    def __init__(
        self,
        G: torch.nn.Module,
        spec: ImageSpec,
        num: int,
        seed: int = 0,
        batch_size: int = 64,
        truncation_psi: float | None = None,
        capabilities: Capabilities = Capabilities(),
    ):
        self.G, self.spec, self.num, self.seed, self.batch_size = G, spec, num, seed, batch_size
        self.kwargs: dict[str, object] = {}
        if capabilities.noise_inputs:
            self.kwargs["noise_mode"] = "const"
        if truncation_psi is not None:
            if capabilities.truncation != "psi":
                raise EvalError(
                    f"eval.truncation_psi={truncation_psi}: {type(G).__name__} has no truncation trick; leave it unset"
                )
            self.kwargs["truncation_psi"] = truncation_psi
        self.device = next(iter(G.parameters()), torch.zeros(())).device
        self._batch: tuple[int, torch.Tensor | None] = (-1, None)

    def __len__(self) -> int:
        return self.num

    def latents(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents and labels of images ``start … stop-1``."""
        zs, cs = [], []
        for i in range(start, stop):
            g = torch.Generator().manual_seed(self.seed + i)
            zs.append(torch.randn(1, self.G.z_dim, generator=g))
            if self.spec.num_classes:
                cs.append(torch.randint(self.spec.num_classes, (1,), generator=g))
        z = torch.cat(zs).to(self.device)
        return z, (torch.cat(cs).to(self.device) if cs else None)

    @torch.no_grad()
    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num:
            raise IndexError(i)
        b = i // self.batch_size
        if self._batch[0] != b:
            start, stop = b * self.batch_size, min(self.num, (b + 1) * self.batch_size)
            z, c = self.latents(start, stop)
            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            was_training = self.G.training
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(self.seed + start)
                self.G.eval()
                img = self.G(z, c, **self.kwargs)
                self.G.train(was_training)
            self._batch = (b, to_uint8_rgb(img))
        return self._batch[1][i - b * self.batch_size]


class ShardImages(Dataset):
    """Images of shards as uint8 ``3×H×W``, in shard order (the first ``limit`` of them).

    Nothing is read until the length or an image is asked for; then the encoded samples are held in
    memory and decoded (with :func:`~orchestrator.data.shards.decode_sample`) one at a time. ``reads``
    counts images handed out: 0 after an evaluation means torch-fidelity took the held-out
    features from its cache.
    """

    def __init__(self, urls: list[str], spec: ImageSpec, limit: int | None = None):
        self.urls, self.limit = list(urls), limit
        self.spec = ImageSpec(spec.resolution, spec.channels, 0)  # labels are not needed
        self.reads = 0
        self._samples: list[dict] | None = None

    def _load(self) -> list[dict]:
        if self._samples is None:
            samples = []
            try:
                for s in tariterators.tarfile_samples({"url": u} for u in self.urls):
                    samples.append(s)
                    if self.limit is not None and len(samples) >= self.limit:
                        break
            except Exception as e:  # noqa: BLE001 - report which shards, whatever tar or I/O said
                raise DataError(f"cannot read held-out shards {self.urls}: {e}") from None
            self._samples = samples
        return self._samples

    def __len__(self) -> int:
        return len(self._load())

    def __getitem__(self, i: int) -> torch.Tensor:
        sample = self._load()[i]
        decoded = decode_sample(sample, self.spec)
        if isinstance(decoded, str):
            raise DataError(
                f"held-out shard {sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}: "
                f"{decoded}; the held-out images must match the model's image size and channels"
            )
        self.reads += 1
        return as_rgb(decoded[0].add(1).mul(127.5).round().to(torch.uint8))


# ---------------------------------------------------------------------------------------------
# The held-out statistics cache


def shard_sha256s(urls: list[str], manifest: dict | None = None, cache_dir: str | Path | None = None) -> list[str]:
    """sha256 of each held-out shard: computed for local files, from ``manifest`` for remote URLs.

    Hashes of local files are remembered in ``cache_dir/shard-sha256.json`` keyed by path, size,
    mtime, ctime and inode, so an unchanged shard is hashed once; a rewritten one is hashed again.
    """
    memo_path = Path(cache_dir).expanduser() / "shard-sha256.json" if cache_dir else None
    memo: dict = {}
    if memo_path and memo_path.exists():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, json.JSONDecodeError):
            memo = {}
    listed = {s["name"]: s["sha256"] for s in ((manifest or {}).get("splits", {}).get("holdout", {}).get("shards", []))}
    out, changed = [], False
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            name = url.rstrip("'\" ").rsplit("/", 1)[-1]
            if name not in listed:
                raise EvalError(
                    f"held-out shard {url} is not a local file and has no sha256 in a manifest: the "
                    f"statistics cache needs one; copy the held-out shards to local disk or give the manifest"
                )
            out.append(listed[name])
            continue
        ident = list(_file_id(Path(url)))
        entry = memo.get(ident[0])
        if entry and entry.get("id") == ident:
            out.append(entry["sha256"])
        else:
            digest = sha256_file(url)
            memo[ident[0]] = {"id": ident, "sha256": digest}
            out.append(digest)
            changed = True
    if memo_path and changed:
        _write_json(memo_path, memo)
    return out


def holdout_cache_key(shard_hashes: list[str], extractor: ExtractorWeights, holdout_num: int | None = None) -> str:
    """The name torch-fidelity caches the held-out side under: a hash of the shards' sha256 (in order),
    the image limit, the feature extractor's name and its weights' sha256."""
    blob = json.dumps(
        {
            "v": CACHE_KEY_VERSION,
            "shards": list(shard_hashes),
            "num": holdout_num,
            "extractor": extractor.name,
            "weights": extractor.sha256,
        },
        sort_keys=True,
    )
    return "ganforge-holdout-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def resolve_holdout(cfg: EvalConfig, data: DataConfig | None = None) -> list[str]:
    """Held-out shard URLs: ``eval.holdout``, else ``data.holdout``, else ``holdout-*.tar`` beside ``data.shards``."""
    pattern = cfg.holdout or (data.holdout if data else None)
    if pattern is None:
        if data is None:
            raise EvalError("no held-out shards: set eval.holdout (or --data 'DIR/holdout-*.tar')")
        first = data.shards.split("::")[0]
        if first.startswith("pipe:") or "://" in first:
            raise EvalError(f"data.shards {data.shards!r} is not local: set eval.holdout to the held-out shards")
        pattern = str(Path(os.path.dirname(first) or ".") / "holdout-*.tar")
    return expand_shards(pattern)


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalResult:
    """Metrics (plain floats, keys ``fid kid kid_std isc isc_std precision recall``, or those of
    :mod:`orchestrator.eval.translation` for image-to-image data) and how they were made."""

    metrics: dict[str, float]
    cache_hit: bool | None  # held-out features came from the cache (None: no metric needed them)
    cache_key: str | None
    num_generated: int
    num_holdout: int | None
    kid_subset_size: int | None
    feature_extractor: str
    weights_sha256: str
    seconds: float
    holdout_shards: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # metrics skipped and why

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {
            "metrics": self.metrics,
            "cache_hit": self.cache_hit,
            "cache_key": self.cache_key,
            "num_generated": self.num_generated,
            "num_holdout": self.num_holdout,
            "kid_subset_size": self.kid_subset_size,
            "feature_extractor": self.feature_extractor,
            "weights_sha256": self.weights_sha256,
            "seconds": self.seconds,
            "holdout_shards": self.holdout_shards,
            "notes": self.notes,
        }


def evaluate(
    G: torch.nn.Module,
    spec: ImageSpec,
    cfg: EvalConfig,
    holdout_urls: list[str],
    *,
    extractor: ExtractorWeights | None = None,
    manifest: dict | None = None,
    verbose: bool = False,
    capabilities: Capabilities = Capabilities(),
) -> EvalResult:
    """Compute ``cfg.metrics`` for ``G`` (G_ema) against the held-out shards with torch-fidelity.

    ``extractor`` is what :func:`check_feature_extractor` returned at start (checked again if
    omitted). ``manifest`` supplies the sha256 of held-out shards that are not local files. The
    generator runs on its own device; the feature extractor on CUDA when ``G`` is there.
    """
    t0 = time.perf_counter()
    metrics = resolve_metrics(cfg, spec, capabilities)
    if spec.translates:
        raise EvalError("image-to-image data: evaluate with orchestrator.eval.translation.evaluate_translation")
    extractor = extractor or check_feature_extractor(cfg)
    cache_dir = Path(cfg.cache_dir).expanduser()
    generated = GeneratedImages(G, spec, cfg.num_samples, cfg.seed, cfg.batch_size, cfg.truncation_psi, capabilities)
    binary = any(m in BINARY_METRICS for m in metrics)
    held = key = sidecar = num_holdout = None
    hashes: list[str] = []
    if binary:
        hashes = shard_sha256s(holdout_urls, manifest, cache_dir)
        key = holdout_cache_key(hashes, extractor, cfg.holdout_num)
        held = ShardImages(holdout_urls, spec, cfg.holdout_num)
        sidecar = cache_dir / f"{key}.json"
        try:
            num_holdout = json.loads(sidecar.read_text())["num_holdout"]
        except (OSError, ValueError, KeyError):
            num_holdout = len(held)
        if num_holdout < 2:
            raise EvalError(f"held-out shards {holdout_urls} hold {num_holdout} image(s); at least 2 are needed")
    counts = [cfg.num_samples] + ([num_holdout] if binary else [])
    kid_subset = min([cfg.kid_subset_size] + counts) if "kid" in metrics else None
    if "prc" in metrics and min(counts) <= cfg.prc_neighborhood:
        raise EvalError(
            f"precision/recall with prc_neighborhood={cfg.prc_neighborhood} needs more than "
            f"{cfg.prc_neighborhood} images per side (have {counts})"
        )
    values = fidelity_metrics(
        generated,
        held,
        cfg,
        extractor,
        cache_name=key,
        cuda=generated.device.type == "cuda",
        verbose=verbose,
        fid="fid" in metrics,
        kid="kid" in metrics,
        isc="isc" in metrics,
        prc="prc" in metrics,
        kid_subset_size=kid_subset or cfg.kid_subset_size,
        isc_splits=min(cfg.isc_splits, cfg.num_samples),
    )
    cache_hit = None
    if binary:
        cache_hit = held.reads == 0
        if not sidecar.exists():
            _write_json(
                sidecar,
                {
                    "key": key,
                    "num_holdout": num_holdout,
                    "holdout_num": cfg.holdout_num,
                    "shards": [{"url": u, "sha256": h} for u, h in zip(holdout_urls, hashes)],
                    "feature_extractor": extractor.name,
                    "weights_path": str(extractor.path),
                    "weights_sha256": extractor.sha256,
                    "created": time.time(),
                },
            )
    return EvalResult(
        values,
        cache_hit,
        key,
        cfg.num_samples,
        num_holdout,
        kid_subset,
        extractor.name,
        extractor.sha256,
        time.perf_counter() - t0,
        list(holdout_urls) if binary else [],
    )


def fidelity_metrics(
    input1: Dataset,
    input2: Dataset | None,
    cfg: EvalConfig,
    extractor: ExtractorWeights,
    *,
    cache_name: str | None = None,
    cuda: bool = False,
    verbose: bool = False,
    **options,
) -> dict[str, float]:
    """torch-fidelity on two sets of uint8 ``3×H×W`` images with the configured feature extractor, never
    downloading; ``cache_name`` caches ``input2``'s features under ``cfg.cache_dir`` (None: not cached).
    ``options``: which metrics (``fid=True``, …) and any of torch-fidelity's settings beyond ``cfg``'s.
    Returns our keys (``fid``, ``kid``, ``kid_std``, …)."""
    import torch_fidelity

    from orchestrator.eval import extractors  # noqa: F401 - registers dataset-cnn with torch-fidelity

    kwargs = dict(
        input1=input1,
        input2=input2,
        input2_cache_name=cache_name,
        cache_root=str(Path(cfg.cache_dir).expanduser()),
        cache=True,
        cuda=cuda,
        batch_size=cfg.batch_size,
        save_cpu_ram=True,
        verbose=verbose,
        feature_extractor=extractor.name,
        feature_extractor_weights_path=str(extractor.path),
        kid_subset_size=cfg.kid_subset_size,
        kid_subsets=cfg.kid_subsets,
        isc_splits=cfg.isc_splits,
        prc_neighborhood=cfg.prc_neighborhood,
    )
    with _no_downloads():
        raw = torch_fidelity.calculate_metrics(**{**kwargs, **options})
    return {ours: float(raw[theirs]) for theirs, ours in _FIDELITY_KEYS.items() if theirs in raw}


def compute_metrics(
    G: torch.nn.Module,
    spec: ImageSpec,
    cfg: EvalConfig,
    holdout_urls: list[str],
    *,
    extractor: ExtractorWeights | None = None,
    manifest: dict | None = None,
) -> dict[str, float]:
    """Just the metrics of :func:`evaluate`, e.g. ``{"fid": 12.3, "kid": 0.004, "kid_std": 0.001}``."""
    return evaluate(G, spec, cfg, holdout_urls, extractor=extractor, manifest=manifest).metrics


def evaluate_checkpoint(
    checkpoint: str | Path,
    cfg: EvalConfig,
    holdout: str | None = None,
    device: str | torch.device = "cpu",
    verbose: bool = False,
) -> EvalResult:
    """Evaluate a checkpoint's G_ema; ``holdout`` (a shard pattern) overrides :func:`resolve_holdout`.

    The checkpoint carries its generator's description, so only the held-out shards are read. When the metrics
    need a feature extractor, its weights are checked before anything else is loaded (unless the metrics are
    the data's defaults and the checkpoint's family is not known from its config.yaml), so a missing file fails
    in seconds. Image-to-image checkpoints go to :func:`~orchestrator.eval.translation.evaluate_translation`.
    """
    early = cfg.metrics if cfg.metrics is not None else _default_metrics_before_loading(checkpoint)
    extractor = check_feature_extractor(cfg) if early is not None and needs_extractor(early) else None
    loaded = load_generator(checkpoint, device)
    level = loaded.checkpoint.meta.get("level")
    if level and (level[0] != loaded.spec.resolution or level[1] < 1):
        raise EvalError(
            f"{checkpoint}: G has grown to {level[0]}×{level[0]} of "
            f"{loaded.spec.resolution}×{loaded.spec.resolution} only; evaluate a checkpoint written after "
            f"growth completed"
        )
    capabilities = loaded.arch.capabilities
    metrics = resolve_metrics(cfg, loaded.spec, capabilities)
    if extractor is None and needs_extractor(metrics):
        extractor = check_feature_extractor(cfg)
    data = DataConfig.model_validate((yaml.safe_load(loaded.checkpoint.meta["config"]) or {})["data"])
    urls = expand_shards(holdout) if holdout else resolve_holdout(cfg, data)
    manifest = None
    if not holdout and not cfg.holdout:  # the training data's manifest describes only its own held-out shards
        try:
            manifest = load_manifest(data)
        except DataError:
            pass
    if loaded.spec.translates:
        from orchestrator.data.heldout import read_heldout  # the held-out pairs or domains
        from orchestrator.eval.translation import evaluate_translation

        heldout = read_heldout(urls, loaded.spec, cfg.holdout_num)
        return evaluate_translation(
            loaded.G,
            loaded.spec,
            cfg,
            heldout,
            capabilities=capabilities,
            extractor=extractor,
            verbose=verbose,
            holdout_urls=urls,
            manifest=manifest,
        )
    return evaluate(
        loaded.G,
        loaded.spec,
        cfg,
        urls,
        extractor=extractor,
        manifest=manifest,
        verbose=verbose,
        capabilities=capabilities,
    )


def _default_metrics_before_loading(checkpoint: str | Path) -> list[str] | None:
    """The default metrics of a noise → image checkpoint, known from the family named in the run's saved
    config; None when that config is not there or the family is image-to-image (its data decides)."""
    path = Path(checkpoint)
    saved = (path if path.is_dir() else path.parent) / "config.yaml"
    try:
        arch = architectures.get((yaml.safe_load(saved.read_text()) or {})["model"]["arch"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    return list(_DEFAULT_METRICS["noise"]) if arch.capabilities.conditioning == "latent" else None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def eval_config_for(checkpoint: str | Path | None = None, **overrides) -> EvalConfig:
    """The evaluation settings of a run (its config's ``eval`` section, if it has one, else the
    defaults) with ``overrides`` (those that are not None) applied; errors name the setting."""
    from pydantic import ValidationError

    base: dict = {}
    if checkpoint is not None:
        path = Path(checkpoint)
        saved = (path.parent if path.is_file() else path) / "config.yaml"
        if saved.is_file():
            import yaml

            section = (yaml.safe_load(saved.read_text()) or {}).get("eval")
            base = dict(section) if isinstance(section, dict) else {}
    try:
        return EvalConfig.model_validate({**base, **{k: v for k, v in overrides.items() if v is not None}})
    except ValidationError as e:
        lines = [
            f"eval.{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})" for err in e.errors()
        ]
        raise EvalError("invalid evaluation settings:\n  " + "\n  ".join(lines)) from None
