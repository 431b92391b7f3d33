"""A dataset-specific feature extractor for FID/KID/IS/PR on small data, registered with torch-fidelity.

Inception features of 16×16 or 28×28 grey digits upsampled to 299×299 say little about them;
papers on MNIST-scale data instead measure FID in the feature space of a small classifier trained
on the data set's own training split. :func:`train_feature_extractor` trains such a classifier
(:class:`SmallCNN`) on the ``train-*.tar`` shards and saves its ``state_dict``;
:class:`DatasetCNNFeatureExtractor` is registered with torch-fidelity as ``dataset-cnn`` so that
``torch_fidelity.calculate_metrics(feature_extractor="dataset-cnn",
feature_extractor_weights_path=PATH, ...)`` uses it: the penultimate layer (``feat``) for FID, KID
and precision/recall, the class logits (``logits``) for the Inception Score.

The weights file holds tensors only (the architecture's sizes are a buffer in it) and is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from webdataset import tariterators

from core.spec import ImageSpec
from orchestrator.data.errors import DataError
from orchestrator.data.shards import DataConfig, decode_sample, expand_shards, image_spec, load_manifest

NAME = "dataset-cnn"


class SmallCNN(nn.Module):
    """A small image classifier: two conv stages, a ``feature_dim`` penultimate layer, class logits.

    It takes uint8 images ``N×C×H×W``; grey/RGB and size differences from what it was trained on
    are adapted (RGB → grey by channel mean, grey → RGB by repetition, resize to its resolution).
    """

    def __init__(self, in_channels: int, resolution: int, num_classes: int, feature_dim: int = 64, width: int = 32):
        super().__init__()
        # The sizes travel inside the state_dict, so a weights file alone rebuilds the network.
        self.register_buffer("arch", torch.tensor([in_channels, resolution, num_classes, feature_dim, width]))
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * w * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def in_channels(self) -> int:
        return int(self.arch[0])

    @property
    def resolution(self) -> int:
        return int(self.arch[1])

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``N×C×H×W`` (C = 1, 3 or 4) → float in [-1, 1] with this network's channels and size."""
        x = x.float()
        c, want = x.shape[1], self.in_channels
        if c != want:
            if want == 1:
                x = x[:, :3].mean(dim=1, keepdim=True)  # exact for grey images repeated to RGB
            elif c == 1:
                x = x.expand(-1, want, -1, -1)
            else:
                x = x[:, :want]
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(
                x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False, antialias=True
            )
        return x / 127.5 - 1.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and logits of prepared (float) images."""
        feat = self.body(x)
        return feat, self.head(feat)


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> SmallCNN:
    """A :class:`SmallCNN` from a weights file written by :func:`train_feature_extractor`."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        in_channels, resolution, num_classes, feature_dim, width = (int(v) for v in state["arch"])
        net = SmallCNN(in_channels, resolution, num_classes, feature_dim, width)
        net.load_state_dict(state)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable or foreign file gets the same advice
        raise ValueError(
            f"{path} is not a {NAME} weights file ({type(e).__name__}: {e}); train one with `ganforge extractor train`"
        ) from None
    return net.to(map_location).eval().requires_grad_(False)


class DatasetCNNFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity's view of a :class:`SmallCNN`: ``feat`` for FID/KID/PR, ``logits`` for IS.

    ``feature_extractor_weights_path`` is required (there is nothing to download).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if not feature_extractor_weights_path:
            raise ValueError(
                f"the {NAME} feature extractor needs feature_extractor_weights_path: a file written by "
                f"`ganforge extractor train`"
            )
        self.net = load_classifier(feature_extractor_weights_path)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"{NAME} expects uint8 images N×C×H×W, got {x.dtype} {tuple(x.shape)}")
        feat, logits = self.net(self.net.prepare(x))
        out = {"feat": feat, "logits": logits}
        return tuple(out[n] for n in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "feat", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "feat", "kid": "feat", "prc": "feat", "isc": "logits"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)


if NAME not in FEATURE_EXTRACTORS_REGISTRY:  # a module reload must not register twice
    register_feature_extractor(NAME, DatasetCNNFeatureExtractor)


# ---------------------------------------------------------------------------------------------
# Training


def shards_spec(pattern: str) -> ImageSpec:
    """Resolution, channels and classes of shards, from the manifest beside them; for unpaired shards, of the
    domain the shards belong to (``train-a-*``: domain A, the manifest's input image; else domain B)."""
    manifest = load_manifest(DataConfig(shards=pattern))
    spec = image_spec(DataConfig(shards=pattern), manifest)
    if spec.pairing == "unpaired" and all(Path(u).name.split("-")[1] == "a" for u in expand_shards(pattern)):
        names = tuple(manifest.get("input_class_names") or ())
        return ImageSpec(spec.input_resolution, spec.input_channels, int(manifest.get("input_num_classes", 0)), names)
    return ImageSpec(spec.resolution, spec.channels, spec.num_classes, spec.class_names)


def read_labelled_images(urls: list[str], spec: ImageSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of shards as uint8 ``N×C×H×W`` plus their labels; a bad sample is an error."""
    images, labels = [], []
    for sample in tariterators.tarfile_samples({"url": u} for u in urls):
        decoded = decode_sample(sample, spec)
        if isinstance(decoded, str):
            raise DataError(f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}: {decoded}")
        x, label = decoded
        images.append(x.add(1.0).mul(127.5).round().to(torch.uint8))
        labels.append(label)
    if not images:
        raise DataError(f"no images in {urls}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def classifier_accuracy(net: SmallCNN, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of ``images`` (uint8) that ``net`` classifies as ``labels``."""
    net.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        _, logits = net(net.prepare(images[i : i + batch_size]))
        correct += int((logits.argmax(1) == labels[i : i + batch_size]).sum())
    return correct / len(images)


@dataclass
class ExtractorTrainResult:
    """What :func:`train_feature_extractor` wrote and how well the classifier does."""

    path: Path
    train_accuracy: float
    holdout_accuracy: float | None
    num_train: int
    num_holdout: int
    num_classes: int
    seconds: float


def train_feature_extractor(
    train_shards: str,
    out_path: str | Path,
    epochs: int = 8,
    *,
    holdout_shards: str | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    feature_dim: int = 64,
    width: int = 32,
    seed: int = 0,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> ExtractorTrainResult:
    """Train a :class:`SmallCNN` classifier on labelled shards and save its ``state_dict`` to ``out_path``.

    ``holdout_shards`` (e.g. ``DIR/holdout-*.tar``) are only used to report accuracy. Training is
    seeded and leaves the global RNG as it was.
    """
    t0 = time.perf_counter()
    spec = shards_spec(train_shards)
    if spec.num_classes < 2:
        raise DataError(
            f"{train_shards}: the {NAME} feature extractor is a classifier and needs labelled shards "
            f"(the manifest says {spec.num_classes} classes); use inception-v3-compat instead"
        )
    x, y = read_labelled_images(expand_shards(train_shards), spec)
    hx = hy = None
    if holdout_shards:
        hx, hy = read_labelled_images(expand_shards(holdout_shards), spec)
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SmallCNN(spec.channels, spec.resolution, spec.num_classes, feature_dim, width).to(dev)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * -(-len(x) // batch_size)))
        order = list(range(len(x)))
        rng = random.Random(seed)
        for epoch in range(epochs):
            net.train()
            rng.shuffle(order)
            total, n = 0.0, 0
            for i in range(0, len(order), batch_size):
                idx = torch.tensor(order[i : i + batch_size])
                _, logits = net(net.prepare(x[idx].to(dev)))
                loss = F.cross_entropy(logits, y[idx].to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total, n = total + loss.item() * len(idx), n + len(idx)
            if log:
                log(f"epoch {epoch + 1}/{epochs}: loss {total / n:.4f}")
    net = net.cpu().eval().requires_grad_(False)
    train_acc = classifier_accuracy(net, x, y)
    hold_acc = classifier_accuracy(net, hx, hy) if hx is not None else None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(out_path)
    return ExtractorTrainResult(
        out_path, train_acc, hold_acc, len(x), 0 if hx is None else len(hx), spec.num_classes, time.perf_counter() - t0
    )
