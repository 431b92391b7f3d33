"""Evaluation through torch-fidelity: its numbers checked against the metrics' formulas computed here from the
same features, held-out cache, offline weights, CLI."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import scipy.special
import torch
import torch_fidelity
from conftest import tiny_config
from PIL import Image
from webdataset import TarWriter, tariterators

import architectures
from core.spec import ImageSpec
from orchestrator.data.shards import expand_shards
from orchestrator.data.write import sha256_file
from orchestrator.eval import extractors
from orchestrator.eval.evaluator import (
    INCEPTION_ENV,
    INCEPTION_FILE,
    EvalConfig,
    EvalError,
    GeneratedImages,
    ShardImages,
    check_feature_extractor,
    eval_config_for,
    evaluate,
)
from orchestrator.eval.extractors import DatasetCNNFeatureExtractor, train_feature_extractor

GANFORGE = [str(Path(sys.executable).parent / "ganforge")]
SPEC = ImageSpec(16, 1, 10)


def cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}  # tests share two cores; one thread each runs faster
    p = subprocess.run(GANFORGE + list(args), capture_output=True, text=True, timeout=300, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"ganforge {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on two shared cores, two threads make Inception ~10x slower (oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_torch_hub(monkeypatch, tmp_path):
    """No Inception weights from the real torch hub cache or the environment unless a test puts them there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(INCEPTION_ENV, raising=False)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory, digits16):
    """The dataset-cnn extractor trained on the digits' train split (3 epochs, a few seconds)."""
    out = tmp_path_factory.mktemp("cnn") / "dataset-cnn.pt"
    return train_feature_extractor(
        str(digits16 / "train-*.tar"), out, epochs=3, holdout_shards=str(digits16 / "holdout-*.tar")
    )


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's own InceptionV3 architecture with He-initialised random weights (no download)."""
    import torch.nn as nn
    import torch_fidelity.feature_extractor_inceptionv3 as m

    out = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    orig_url, orig_load = m.load_state_dict_from_url, m.FeatureExtractorInceptionV3.load_state_dict
    m.load_state_dict_from_url = lambda *a, **k: {}
    m.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None  # keep the random init
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            fe = m.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
            # torch's default init shrinks activations layer by layer to ~0 features (FID 0); He init does not
            for mod in fe.modules():
                if isinstance(mod, nn.Conv2d):
                    nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                if isinstance(mod, nn.Linear):
                    nn.init.normal_(mod.weight, std=0.01)
                    nn.init.zeros_(mod.bias)
    finally:
        m.load_state_dict_from_url, m.FeatureExtractorInceptionV3.load_state_dict = orig_url, orig_load
    torch.save(fe.state_dict(), out)
    return out


def tiny_generator(spec: ImageSpec = SPEC, seed: int = 0):
    arch = architectures.get("dcgan")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return arch.build_generator(arch.config(**tiny_config(Path("."))["model"]), spec).eval()


def shard_images(urls: list[str], limit: int) -> torch.Tensor:
    """The first ``limit`` held-out images as uint8 N×3×H×W, decoded by PIL from the PNG bytes in the shards."""
    images = []
    for s in tariterators.tarfile_samples({"url": u} for u in urls):
        if len(images) == limit:
            break
        rgb = np.array(Image.open(io.BytesIO(s["png"])).convert("RGB"))
        images.append(torch.from_numpy(rgb).permute(2, 0, 1))
    return torch.stack(images)


def generated_images(G, num: int, seed: int, batch_size: int, num_classes: int) -> torch.Tensor:
    """Image i from seed SEED+i (latent, then class), as uint8 N×3×H×W: what eval.seed promises."""
    out = []
    with torch.no_grad():
        for start in range(0, num, batch_size):
            zs, cs = [], []
            for i in range(start, min(num, start + batch_size)):
                g = torch.Generator().manual_seed(seed + i)
                zs.append(torch.randn(1, G.z_dim, generator=g))
                cs.append(torch.randint(num_classes, (1,), generator=g))
            x = G(torch.cat(zs), torch.cat(cs))
            out.append(((x.clamp(-1, 1) + 1) * 127.5 + 0.5).floor().to(torch.uint8).expand(-1, 3, -1, -1))
    return torch.cat(out)


def features(extractor, images: torch.Tensor, batch_size: int) -> list[np.ndarray]:
    """Each of ``extractor``'s outputs for ``images``, in float64, batch by batch as torch-fidelity feeds it."""
    with torch.no_grad():
        parts = [extractor(b) for b in images.split(batch_size)]
    return [torch.cat(outs).double().numpy() for outs in zip(*parts)]


# Reference metrics, written from the papers' definitions with numpy/scipy (not torch-fidelity's code)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al. 2017), sample covariances.

    These covariances are singular (dead ReLU units; fewer images than dimensions); scipy warns, and the
    square root it finds is still accurate here (the comparisons below would say otherwise)."""
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def kernel_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """KID over all samples: the unbiased MMD^2 with the kernel (x.y/d + 1)^3 (Binkowski et al. 2018); equal sizes."""
    m, d = f1.shape
    assert f2.shape == (m, d)

    def k(a, b):
        return (a @ b.T / d + 1) ** 3

    kxx, kyy, kxy = k(f1, f1), k(f2, f2), k(f1, f2)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2)


def inception_score(logits: np.ndarray) -> float:
    """IS with one split: exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016)."""
    p = scipy.special.softmax(logits, axis=1)
    return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(axis=0))), axis=1))))


def precision_recall(generated: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the fraction of one set inside the union of the
    other set's balls, each ball reaching its centre's k-th nearest neighbour in its own set."""
    cdist = scipy.spatial.distance.cdist
    radius_gen = np.sort(cdist(generated, generated), axis=1)[:, k]  # column 0 is the point itself
    radius_real = np.sort(cdist(real, real), axis=1)[:, k]
    d = cdist(generated, real)
    return float((d <= radius_real[None, :]).any(axis=1).mean()), float((d.T <= radius_gen[None, :]).any(axis=1).mean())


class ReplayGenerator(torch.nn.Module):
    """A stand-in for a trained G on the digits: the latent picks one of ``bank`` (real digits); a second latent
    coordinate transposes about a third of them, so precision, recall and IS are all away from their bounds."""

    z_dim = 16

    def __init__(self, bank: torch.Tensor):
        super().__init__()
        self.register_buffer("bank", bank.float() / 127.5 - 1)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        x = self.bank[(z[:, 0].abs() * 1e4).long() % len(self.bank)]
        return torch.where((z[:, 1] > 0.5)[:, None, None, None], x.transpose(-1, -2), x)


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ---------------------------------------------------------------------------------------------
# Config and weights checks


def test_eval_config_fields_are_validated():
    cfg = EvalConfig(metrics="fid, kid,fid", feature_extractor="dataset-cnn")
    assert cfg.metrics == ["fid", "kid"] and cfg.cpus == 0.5 and cfg.gpus == 0
    for bad in (
        {"metrics": "fid,lpips"},
        {"metrics": []},
        {"num_samples": 1},
        {"batch_size": 0},
        {"truncation_psi": -0.5},
        {"kid_subset_size": 1},
        {"every_kimg": 0},
        {"cpus": -1},
        {"feature_extractor": "inception v4"},
        {"colour": "red"},
    ):
        with pytest.raises(ValueError):
            EvalConfig(**bad)
    with pytest.raises(
        EvalError, match=r"eval\.metrics\.1: Input should be 'fid', 'kid', 'isc', 'prc', 'l1', .* or 'fid_b'"
    ):
        eval_config_for(None, metrics="fid,lpips")
    with pytest.raises(
        EvalError,
        match=r"unknown feature extractor 'inception-v4'; registered: .*dataset-cnn.*"
        r"inception-v3-compat",
    ):
        check_feature_extractor(EvalConfig(feature_extractor="inception-v4"))


def test_constants_agree_with_torch_fidelity():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from orchestrator.eval.evaluator import DATASET_CNN, INCEPTION_URL

    assert INCEPTION_URL == URL_INCEPTION_V3 and DATASET_CNN == extractors.NAME


def test_missing_inception_weights_fail_fast_with_what_to_do(tmp_path, monkeypatch):
    t0 = time.perf_counter()
    with pytest.raises(EvalError) as e:
        check_feature_extractor(EvalConfig(cache_dir=str(tmp_path / "c")))
    msg = str(e.value)
    assert (
        INCEPTION_ENV in msg
        and "eval.weights_path" in msg
        and INCEPTION_FILE == "weights-inception-2015-12-05-6726825d.pth"
    )
    assert INCEPTION_FILE in msg and "https://github.com/toshas/torch-fidelity/releases/download/" in msg
    assert "never downloads" in msg and "copy it" in msg and "`ganforge weights get inception`" in msg

    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "nowhere" / INCEPTION_FILE))
    with pytest.raises(
        EvalError, match=rf"\${INCEPTION_ENV} points at .*nowhere/{INCEPTION_FILE}, which does not exist"
    ):
        check_feature_extractor(EvalConfig(cache_dir=str(tmp_path / "c")))
    with pytest.raises(
        EvalError, match=r"eval\.weights_path \(--weights\) points at .*other\.pth, which does not exist"
    ):
        check_feature_extractor(EvalConfig(weights_path=str(tmp_path / "other.pth"), cache_dir=str(tmp_path / "c")))
    assert time.perf_counter() - t0 < 2


def test_wrong_or_unsafe_weights_files_are_refused(tmp_path, cnn):
    with pytest.raises(EvalError, match="is not torch-fidelity's Inception weights"):
        check_feature_extractor(EvalConfig(weights_path=str(cnn.path), cache_dir=str(tmp_path)))
    # a pickle that would run code: torch-fidelity loads with weights_only=False, so it must never get that far
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "hook": print}, evil)
    with pytest.raises(EvalError, match="is not torch-fidelity's Inception weights"):
        check_feature_extractor(EvalConfig(weights_path=str(evil), cache_dir=str(tmp_path)))
    with pytest.raises(EvalError, match="ganforge extractor train"):
        check_feature_extractor(EvalConfig(feature_extractor="dataset-cnn", cache_dir=str(tmp_path)))
    with pytest.raises(EvalError, match="not a dataset-cnn weights file"):
        check_feature_extractor(
            EvalConfig(feature_extractor="dataset-cnn", weights_path=str(evil), cache_dir=str(tmp_path))
        )


def test_truncation_only_for_generators_that_have_it():
    with pytest.raises(EvalError, match="has no truncation trick"):
        GeneratedImages(tiny_generator(), SPEC, 4, truncation_psi=0.7)


# ---------------------------------------------------------------------------------------------
# The dataset-specific extractor


def test_digits_extractor_is_a_real_classifier_and_fid_separates_data_from_noise(cnn, digits16):
    assert cnn.num_classes == 10 and cnn.num_train == 1617 and cnn.num_holdout == 180
    assert cnn.holdout_accuracy > 0.8 and cnn.train_accuracy > 0.8
    # the weights file holds tensors only
    state = torch.load(cnn.path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())

    held = ShardImages(expand_shards(str(digits16 / "holdout-*.tar")), SPEC)
    train = ShardImages(expand_shards(str(digits16 / "train-*.tar")), SPEC, limit=500)
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(500, 1, 16, 16, generator=g) * 256).to(torch.uint8).repeat(1, 3, 1, 1)

    def fid(a):
        return torch_fidelity.calculate_metrics(
            input1=a,
            input2=held,
            fid=True,
            cuda=False,
            cache=False,
            verbose=False,
            save_cpu_ram=True,
            feature_extractor="dataset-cnn",
            feature_extractor_weights_path=str(cnn.path),
        )["frechet_inception_distance"]

    fid_train, fid_noise = fid(train), fid(_Tensors(noise))
    assert fid_train * 20 < fid_noise, (fid_train, fid_noise)


class _Tensors(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_extractor_takes_grey_and_rgb_uint8(cnn):
    fe = DatasetCNNFeatureExtractor("dataset-cnn", ["feat", "logits"], feature_extractor_weights_path=str(cnn.path))
    grey = (torch.rand(3, 1, 16, 16) * 255).to(torch.uint8)
    f1, l1 = fe(grey)
    f3, l3 = fe(grey.repeat(1, 3, 1, 1))
    assert f1.shape == (3, 64) and l1.shape == (3, 10)
    assert torch.equal(f1, f3) and torch.equal(l1, l3)
    assert fe(torch.nn.functional.interpolate(grey.float(), size=32).to(torch.uint8))[0].shape == (3, 64)


# ---------------------------------------------------------------------------------------------
# Our numbers are the metrics' definitions, computed here from the same features


def test_metrics_equal_an_independent_computation_from_the_same_features(cnn, digits16, tmp_path):
    """FID, KID, IS and precision/recall as reported equal the papers' formulas (numpy/scipy) applied to
    features extracted here from images made here: to 1e-5 relative (torch-fidelity extracts float32 features
    and computes KID's kernel in float32; the reference is float64), precision and recall exactly.

    KID's subsets are as large as both image sets (64), so each subset is the whole of both sets and the
    estimate is exact (its std over subsets is 0); IS has one split, so its shuffling does not matter."""
    n, batch = 64, 32
    urls = expand_shards(str(digits16 / "holdout-*.tar"))
    G = ReplayGenerator(shard_images(expand_shards(str(digits16 / "train-*.tar")), 96)[:, :1])
    cfg = EvalConfig(
        metrics="fid,kid,isc,prc",
        num_samples=n,
        holdout_num=n,
        batch_size=batch,
        feature_extractor="dataset-cnn",
        weights_path=str(cnn.path),
        cache_dir=str(tmp_path / "cache"),
        kid_subsets=3,
        isc_splits=1,
        prc_neighborhood=3,
    )
    ours = evaluate(G, SPEC, cfg, urls)
    assert ours.num_holdout == n and ours.kid_subset_size == n

    extractor = DatasetCNNFeatureExtractor(
        "dataset-cnn", ["feat", "logits"], feature_extractor_weights_path=str(cnn.path)
    )
    gen_feat, gen_logits = features(extractor, generated_images(G, n, cfg.seed, batch, SPEC.num_classes), batch)
    real_feat, _ = features(extractor, shard_images(urls, n), batch)
    precision, recall = precision_recall(gen_feat, real_feat, cfg.prc_neighborhood)
    reference = {
        "fid": frechet_distance(gen_feat, real_feat),
        "kid": kernel_distance(gen_feat, real_feat),
        "isc": inception_score(gen_logits),
    }
    for key, value in reference.items():
        assert relative_difference(ours.metrics[key], value) < 1e-5, (key, ours.metrics[key], value)
    assert (ours.metrics["precision"], ours.metrics["recall"]) == (precision, recall)
    assert ours.metrics["kid_std"] <= 1e-6 * ours.metrics["kid"] and ours.metrics["isc_std"] == 0
    # not a degenerate case: every metric is away from its bounds
    assert reference["fid"] > 1 and reference["kid"] > 0 and 1.5 < reference["isc"] < 10
    assert 0 < precision < 1 and 0 < recall < 1, (precision, recall)


def test_same_seeds_give_the_same_images():
    G = tiny_generator()
    a = torch.stack([GeneratedImages(G, SPEC, 10, seed=5, batch_size=4)[i] for i in range(10)])
    b = torch.stack([GeneratedImages(G, SPEC, 10, seed=5, batch_size=4)[i] for i in range(10)])
    c = GeneratedImages(G, SPEC, 10, seed=6, batch_size=4)[0]
    assert a.dtype == torch.uint8 and a.shape == (10, 3, 16, 16) and torch.equal(a, b)
    assert torch.equal(c, a[1])  # image i is seed+i, whatever the first seed


# ---------------------------------------------------------------------------------------------
# The held-out statistics cache


def test_holdout_statistics_are_cached_and_invalidated_by_a_changed_shard(cnn, digits16, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(digits16, data)
    urls = expand_shards(str(data / "holdout-*.tar"))
    cfg = EvalConfig(
        metrics="fid,kid",
        num_samples=32,
        feature_extractor="dataset-cnn",
        weights_path=str(cnn.path),
        cache_dir=str(tmp_path / "cache"),
        kid_subsets=10,
    )
    seen = []
    forward = DatasetCNNFeatureExtractor.forward
    monkeypatch.setattr(DatasetCNNFeatureExtractor, "forward", lambda self, x: seen.append(len(x)) or forward(self, x))

    first = evaluate(tiny_generator(), SPEC, cfg, urls)
    assert first.cache_hit is False and sum(seen) == 32 + 180
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert f"{first.cache_key}-dataset-cnn-features-feat.pt" in cached
    assert f"{first.cache_key}-dataset-cnn-stat-fid-feat.pt" in cached and f"{first.cache_key}.json" in cached

    seen.clear()  # a second start: only the generated images go through the extractor
    again = evaluate(tiny_generator(), SPEC, cfg, urls)
    assert again.cache_hit is True and sum(seen) == 32 and again.cache_key == first.cache_key
    assert again.metrics == first.metrics

    # rewrite one held-out shard (one sample fewer): new key, features recomputed
    shard = Path(urls[1])
    samples = list(tariterators.tarfile_samples([{"url": str(shard)}]))
    with TarWriter(str(shard)) as w:
        for s in samples[:-1]:
            w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
    seen.clear()
    changed = evaluate(tiny_generator(), SPEC, cfg, urls)
    assert changed.cache_hit is False and changed.cache_key != first.cache_key and changed.num_holdout == 179
    assert sum(seen) == 32 + 179 and changed.metrics["fid"] != first.metrics["fid"]

    # other extractor weights or another held-out subset: other keys too
    state = torch.load(cnn.path, weights_only=True)
    state["head.bias"] += 0.01
    torch.save(state, tmp_path / "other.pt")
    keys = {
        evaluate(tiny_generator(), SPEC, cfg.model_copy(update=u), urls).cache_key
        for u in ({"weights_path": str(tmp_path / "other.pt")}, {"holdout_num": 100})
    }
    assert len(keys | {changed.cache_key}) == 3


def test_inception_score_alone_needs_no_holdout(cnn, tmp_path):
    cfg = EvalConfig(
        metrics="isc",
        num_samples=20,
        feature_extractor="dataset-cnn",
        weights_path=str(cnn.path),
        cache_dir=str(tmp_path),
    )
    r = evaluate(tiny_generator(), SPEC, cfg, ["/does/not/matter.tar"])
    assert set(r.metrics) == {"isc", "isc_std"} and r.cache_hit is None and 1 <= r.metrics["isc"] <= 10


# ---------------------------------------------------------------------------------------------
# Inception, offline


@pytest.fixture
def offline_inception(inception_weights, monkeypatch):
    """$GANFORGE_INCEPTION_WEIGHTS set to the random-init file; any download attempt fails the test."""
    import torch.hub

    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setenv(INCEPTION_ENV, str(inception_weights))
    return inception_weights


def test_inception_fid_runs_offline_on_a_few_digits(offline_inception, digits16, tmp_path):
    cfg = EvalConfig(metrics="fid", num_samples=3, holdout_num=3, cache_dir=str(tmp_path))
    r = evaluate(tiny_generator(), SPEC, cfg, expand_shards(str(digits16 / "holdout-*.tar")))
    assert r.feature_extractor == "inception-v3-compat" and r.cache_hit is False and r.num_holdout == 3
    assert math.isfinite(r.metrics["fid"]) and r.metrics["fid"] > 0
    assert (tmp_path / f"{r.cache_key}-inception-v3-compat-stat-fid-2048.pt").exists()


def test_inception_weights_are_found_where_torch_fidelity_would_cache_them(inception_weights, tmp_path):
    hub = Path(torch.hub.get_dir()) / "checkpoints"  # under this test's $TORCH_HOME
    hub.mkdir(parents=True)
    (hub / INCEPTION_FILE).symlink_to(inception_weights)
    found = check_feature_extractor(EvalConfig(cache_dir=str(tmp_path / "c")))
    assert found.path == hub / INCEPTION_FILE and found.sha256 == sha256_file(inception_weights)


def test_inception_weights_from_ganforge_weights_get_are_the_default(inception_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("GANFORGE_CACHE", str(tmp_path / "ganforge"))
    cached = tmp_path / "ganforge" / "weights" / INCEPTION_FILE  # where `ganforge weights get inception` puts it
    cached.parent.mkdir(parents=True)
    cached.symlink_to(inception_weights)
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    hub.mkdir(parents=True)
    (hub / INCEPTION_FILE).write_bytes(b"an older copy")  # the ganforge cache comes first
    assert check_feature_extractor(EvalConfig(cache_dir=str(tmp_path / "c"))).path == cached
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "elsewhere.pth"))  # an explicit setting wins
    with pytest.raises(EvalError, match=r"GANFORGE_INCEPTION_WEIGHTS points at .*elsewhere\.pth"):
        check_feature_extractor(EvalConfig(cache_dir=str(tmp_path / "c")))


@pytest.mark.slow
def test_inception_fid_kid_equal_an_independent_computation(offline_inception, digits16, tmp_path):
    """As the dataset-cnn test above, through torch-fidelity's Inception (random weights: the numbers are not
    standard FIDs) on 8 images a side (2048-dim covariances of rank 7: the closed form still agrees)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    n = 8
    G = tiny_generator()
    urls = expand_shards(str(digits16 / "holdout-*.tar"))
    cfg = EvalConfig(
        metrics="fid,kid", num_samples=n, holdout_num=n, batch_size=n, cache_dir=str(tmp_path / "cache"), kid_subsets=2
    )
    ours = evaluate(G, SPEC, cfg, urls)
    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(offline_inception)
    )
    (gen_feat,) = features(extractor, generated_images(G, n, cfg.seed, n, SPEC.num_classes), n)
    (real_feat,) = features(extractor, shard_images(urls, n), n)
    fid, kid = frechet_distance(gen_feat, real_feat), kernel_distance(gen_feat, real_feat)
    assert gen_feat.shape == (n, 2048) and fid > 1 and kid > 0
    assert relative_difference(ours.metrics["fid"], fid) < 1e-5
    assert relative_difference(ours.metrics["kid"], kid) < 1e-5


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, digits16) -> Path:
    """A tiny trained run (in-process, as tests/test_train.py does)."""
    from orchestrator.config import validate_config
    from orchestrator.train.run import train

    run = tmp_path_factory.mktemp("evalrun")
    result = train(validate_config(tiny_config(digits16, train={"total_kimg": 0.064}), source="test"), run / "run")
    return result.checkpoint


def test_cli_eval_prints_metrics_and_json(checkpoint, cnn, digits16, tmp_path):
    args = [
        str(checkpoint),
        "--data",
        str(digits16 / "holdout-*.tar"),
        "--metrics",
        "fid,kid,isc,prc",
        "--num",
        "40",
        "--feature-extractor",
        "dataset-cnn",
        "--weights",
        str(cnn.path),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    out = cli("eval", *args).stdout
    for key in ("fid", "kid", "kid_std", "isc", "isc_std", "precision", "recall"):
        assert any(line.split()[:1] == [key] for line in out.splitlines()), out
    assert "computed and saved to the cache" in out and "40 images from G_ema (seeds 0-39)" in out
    result = json.loads(cli("eval", *args, "--json").stdout)
    assert result["cache_hit"] is True and result["num_generated"] == 40 and result["num_holdout"] == 180
    assert set(result["metrics"]) == {"fid", "kid", "kid_std", "isc", "isc_std", "precision", "recall"}
    fid_line = next(line for line in out.splitlines() if line.startswith("fid "))
    assert float(fid_line.split()[1]) == pytest.approx(result["metrics"]["fid"], rel=1e-5)


def test_cli_eval_missing_weights_exits_2_within_seconds(checkpoint, digits16, tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != INCEPTION_ENV}
    env["TORCH_HOME"] = str(tmp_path / "torch-home")
    t0 = time.perf_counter()
    p = cli("eval", str(checkpoint), "--num", "10", "--cache-dir", str(tmp_path), check=False, env=env)
    elapsed = time.perf_counter() - t0
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert INCEPTION_ENV in p.stderr and INCEPTION_FILE in p.stderr and "--weights" in p.stderr
    assert elapsed < 30, elapsed  # Python and torch start-up on a loaded machine; the check itself is instant


def test_eval_images_are_the_images_generate_writes(checkpoint, tmp_path):
    from orchestrator.checkpoint import load_generator
    from orchestrator.tools.generate import generate

    loaded = load_generator(checkpoint)
    G, spec = loaded.G, loaded.spec
    ours = GeneratedImages(G, spec, 4, seed=3, batch_size=4, capabilities=loaded.arch.capabilities)
    paths = generate(checkpoint, tmp_path, num=4, seed=3)
    for i, path in enumerate(paths[:-1]):
        png = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert (png.int() - ours[i].int()).abs().max() <= 1  # same latents and class; batching may move a rounding


def test_cli_extractor_train(digits16, tmp_path):
    out = tmp_path / "x.pt"  # small: trained on the 180 held-out digits, accuracy on one training shard
    r = json.loads(
        cli(
            "extractor",
            "train",
            "--data",
            str(digits16 / "holdout-*.tar"),
            "--out",
            str(out),
            "--holdout",
            str(digits16 / "train-000000.tar"),
            "--epochs",
            "1",
            "--json",
        ).stdout
    )
    assert out.exists() and r["num_classes"] == 10 and r["num_train"] == 180 and r["num_holdout"] == 128
    assert 0 <= r["holdout_accuracy"] <= 1
    assert extractors.load_classifier(out).resolution == 16


@pytest.mark.parametrize("command", [["eval"], ["extractor", "train"]])
def test_help_explains_every_option(command):
    text = cli(*command, "--help").stdout
    for option in {
        "eval": [
            "--data",
            "--metrics",
            "--num",
            "--feature-extractor",
            "--weights",
            "--cache-dir",
            "--truncation",
            "--json",
            "GANFORGE_INCEPTION_WEIGHTS",
        ],
        "extractor": ["--data", "--out", "--holdout", "--epochs", "--json"],
    }[command[0]]:
        assert option in text
