"""Metrics of image-to-image generators: PSNR, SSIM, Y and L1 against scikit-image and closed forms; the
evaluation of super-resolution, paired and unpaired generators on hand-built networks and held-out tensors
whose answers are known; which metrics fit which data; the evaluator service's wiring."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from architectures.registry import REGISTRY, ArchConfig, Architecture, Capabilities
from core.spec import ImageSpec
from orchestrator.eval import image_metrics as im
from orchestrator.eval.evaluator import EvalConfig, EvalError, default_metrics, resolve_metrics
from orchestrator.eval.extractors import SmallCNN
from orchestrator.eval.translation import bicubic_upscale, evaluate_translation, match_channels

SR = ImageSpec(32, 3, input_resolution=16, input_channels=3, pairing="paired")
PAIRED = ImageSpec(16, 3, input_resolution=16, input_channels=3, pairing="paired")
UNPAIRED = ImageSpec(16, 1, input_resolution=16, input_channels=1, pairing="unpaired")
IMAGE = Capabilities(conditioning="image")
CYCLE = Capabilities(conditioning="image", cycle=True)


@dataclass
class HeldOut:  # what orchestrator.data.heldout.read_heldout returns
    a: torch.Tensor
    b: torch.Tensor
    a_labels: torch.Tensor | None = None
    b_labels: torch.Tensor | None = None


def smooth_images(n: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """uint8 images with structure (upsampled noise), so that SSIM and upsampling are not degenerate."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, size // 4, size // 4, generator=g)
    return (F.interpolate(coarse, size=size, mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def noisy(x: torch.Tensor, amount: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x.int() + torch.randint(-amount, amount + 1, x.shape, generator=g)).clamp(0, 255).to(torch.uint8)


def hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


def sk_ssim(a: torch.Tensor, b: torch.Tensor, **kw) -> float:
    """scikit-image's SSIM with the settings of Wang et al. 2004, per image, then the mean."""
    opts = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255) | kw
    return float(np.mean([structural_similarity(x.numpy(), y.numpy(), channel_axis=0, **opts) for x, y in zip(a, b)]))


def sk_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.mean([peak_signal_noise_ratio(x.numpy(), y.numpy(), data_range=255) for x, y in zip(a, b)]))


def sk_y(x: torch.Tensor) -> torch.Tensor:
    """Y of uint8 RGB images by scikit-image's rgb2ycbcr (the same BT.601 matrix, on [0, 1] images)."""
    return torch.stack([torch.from_numpy(rgb2ycbcr(hwc(i) / 255.0)[..., 0]) for i in x]).unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# The metric functions


def test_y_of_white_black_and_grey():
    white, black = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8), torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    assert torch.allclose(im.rgb_to_y(white), torch.tensor(235.0, dtype=torch.float64))
    assert torch.allclose(im.rgb_to_y(black), torch.tensor(16.0, dtype=torch.float64))
    grey = smooth_images(2, 8, channels=1)
    assert torch.equal(im.rgb_to_y(grey), grey.double())  # grey images as they are


def test_y_equals_scikit_image():
    x = smooth_images(3, 16)
    assert torch.allclose(im.rgb_to_y(x), sk_y(x), atol=1e-9)
    assert torch.allclose(im.rgb_to_y(x.float()), sk_y(x), atol=1e-4)  # float on the 0-255 scale too


def test_psnr_equals_scikit_image_and_the_closed_form():
    a = smooth_images(4, 16)
    b = noisy(a, 20)
    assert im.psnr(a, b) == pytest.approx(sk_psnr(a, b), rel=1e-12)
    offset = (a.int().clamp(0, 240) + 7).to(torch.uint8)  # every pixel exactly 7 higher
    assert im.psnr(a.clamp(0, 240), offset) == pytest.approx(20 * math.log10(255 / 7), rel=1e-12)
    assert im.psnr(a, a) == math.inf


def test_psnr_is_per_image_then_the_mean():
    a = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    b = torch.stack([torch.full((1, 4, 4), 1), torch.full((1, 4, 4), 10)]).to(torch.uint8)
    per_image = (20 * math.log10(255 / 1) + 20 * math.log10(255 / 10)) / 2
    pooled = 10 * math.log10(255**2 / ((1 + 100) / 2))
    assert im.psnr(a, b) == pytest.approx(per_image) and abs(per_image - pooled) > 1


def test_ssim_equals_scikit_image_and_not_with_other_settings():
    a = smooth_images(3, 24)
    b = noisy(a, 25)
    ours = im.ssim(a, b)
    assert ours == pytest.approx(sk_ssim(a, b), abs=1e-10)
    assert im.ssim(a[:, :1], b[:, :1]) == pytest.approx(sk_ssim(a[:, :1], b[:, :1]), abs=1e-10)  # grey
    # the comparison can tell: another σ (window), uniform weights or sample covariances all move it
    for other in ({"sigma": 1.0}, {"gaussian_weights": False, "win_size": 11}, {"use_sample_covariance": True}):
        assert abs(ours - sk_ssim(a, b, **other)) > 1e-6, other  # the match above is to 1e-10
    assert im.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert 0 < ours < 0.99


def test_y_metrics_crop_the_border_as_scikit_image_on_cropped_y():
    a = smooth_images(2, 32)
    b = noisy(a, 3)
    b[..., :2, :] = 255 - b[..., :2, :]  # large errors in the top two rows only
    crop = 2
    ya, yb = sk_y(a)[..., crop:-crop, crop:-crop], sk_y(b)[..., crop:-crop, crop:-crop]
    ref_psnr = np.mean([peak_signal_noise_ratio(x[0].numpy(), y[0].numpy(), data_range=255) for x, y in zip(ya, yb)])
    ref_ssim = np.mean(
        [
            structural_similarity(
                x[0].numpy(),
                y[0].numpy(),
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=255,
            )
            for x, y in zip(ya, yb)
        ]
    )
    assert im.psnr_y(a, b, crop=crop) == pytest.approx(ref_psnr, rel=1e-9)
    assert im.ssim_y(a, b, crop=crop) == pytest.approx(ref_ssim, abs=1e-9)
    assert im.psnr_y(a, b, crop=crop) > im.psnr_y(a, b) + 5  # without the crop the bad rows count
    assert im.ssim_y(a, b, crop=crop) > im.ssim_y(a, b) + 0.002


def test_l1_is_in_minus_one_to_one_units():
    black, white = torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    assert im.l1(black, white) == pytest.approx(2.0)
    assert im.l1(black, torch.full_like(black, 51)) == pytest.approx(0.4)
    a = smooth_images(2, 8)
    assert im.l1(a, a) == 0.0
    ref = float(((a.double() / 127.5 - 1) - (noisy(a, 9).double() / 127.5 - 1)).abs().mean())
    assert im.l1(a, noisy(a, 9)) == pytest.approx(ref, rel=1e-12)


def test_bicubic_upscale_is_pils_on_whole_images_and_grey_conversion_is_pils():
    x = smooth_images(2, 8)
    ours = bicubic_upscale(x, 16)
    pil = [np.array(Image.fromarray(hwc(i)).resize((16, 16), Image.Resampling.BICUBIC)) for i in x]
    assert torch.equal(ours, torch.from_numpy(np.stack(pil)).permute(0, 3, 1, 2))
    grey = [np.array(Image.fromarray(hwc(i)).convert("L")) for i in x]
    assert torch.equal(match_channels(x, 1)[:, 0], torch.from_numpy(np.stack(grey)))
    assert torch.equal(match_channels(x[:, :1], 3), x[:, :1].repeat(1, 3, 1, 1))


# ---------------------------------------------------------------------------------------------
# Which metrics fit the data


def test_default_metrics_and_what_fits():
    assert default_metrics(ImageSpec(16, 1)) == ["fid", "kid"]  # noise → image: unchanged
    assert resolve_metrics(EvalConfig(), ImageSpec(16, 1)) == ["fid", "kid"]
    assert default_metrics(SR, IMAGE) == ["psnr", "ssim", "psnr_bicubic", "ssim_bicubic"]
    assert default_metrics(PAIRED, IMAGE) == ["l1", "l1_input", "psnr", "fid"]
    assert default_metrics(UNPAIRED, CYCLE) == ["fid_a", "fid_b", "label_ab", "label_ba", "label_aba"]
    with pytest.raises(EvalError, match=r"kid does not fit super-resolution data; .*psnr, ssim, psnr_bicubic"):
        resolve_metrics(EvalConfig(metrics="psnr,kid"), SR, IMAGE)
    with pytest.raises(EvalError, match=r"l1, psnr do not fit noise → image data; .*fid, kid, isc, prc"):
        resolve_metrics(EvalConfig(metrics="fid,l1,psnr"), ImageSpec(16, 1))
    with pytest.raises(EvalError, match="cycle=True"):
        resolve_metrics(EvalConfig(), UNPAIRED, IMAGE)
    with pytest.raises(ValueError, match="label_aba"):  # pydantic lists the known names
        EvalConfig(metrics="psnr,lpips")
    assert EvalConfig(metrics="psnr, ssim,psnr").metrics == ["psnr", "ssim"]


# ---------------------------------------------------------------------------------------------
# evaluate_translation on networks whose answers are known


class Bicubic(nn.Module):
    """G = PIL's bicubic upsampling (exactly, after uint8 rounding)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):
        u8 = ((x + 1) * 127.5).round().to(torch.uint8)
        return bicubic_upscale(u8, self.size).float() / 127.5 - 1


class Nearest(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest")


def sr_heldout(n: int = 3) -> HeldOut:
    b = smooth_images(n, 32)
    a = [np.array(Image.fromarray(hwc(i)).resize((16, 16), Image.Resampling.BICUBIC)) for i in b]
    return HeldOut(torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).contiguous(), b)


def test_super_resolution_bicubic_g_equals_the_bicubic_baseline():
    held = sr_heldout()
    cfg = EvalConfig(batch_size=2)  # batches of 2 over 3 images
    r = evaluate_translation(Bicubic(32), SR, cfg, held, capabilities=IMAGE)
    m = r.metrics
    assert list(m) == ["psnr", "ssim", "psnr_bicubic", "ssim_bicubic"] and r.feature_extractor == "none"
    assert m["psnr"] == m["psnr_bicubic"] and m["ssim"] == m["ssim_bicubic"]
    # independently: PIL's RGB bicubic, scikit-image's Y, crop = scale = 2
    up = torch.stack([torch.from_numpy(np.array(Image.fromarray(hwc(i)).resize((32, 32), 3))) for i in held.a])
    ya, yb = sk_y(up.permute(0, 3, 1, 2))[..., 2:-2, 2:-2], sk_y(held.b)[..., 2:-2, 2:-2]
    assert m["psnr_bicubic"] == pytest.approx(sk_psnr(ya, yb), rel=1e-9)
    assert m["ssim_bicubic"] == pytest.approx(sk_ssim(ya, yb), abs=1e-9)
    nearest = evaluate_translation(Nearest(), SR, EvalConfig(metrics="psnr,psnr_bicubic"), held, capabilities=IMAGE)
    assert nearest.metrics["psnr"] < nearest.metrics["psnr_bicubic"] - 0.5  # the comparison can tell


def test_paired_identity_g():
    b = smooth_images(4, 16)
    same = evaluate_translation(
        nn.Identity(), PAIRED, EvalConfig(metrics="l1,l1_input,psnr"), HeldOut(b, b), capabilities=IMAGE
    )
    assert same.metrics == {"l1": 0.0, "l1_input": 0.0, "psnr": math.inf}
    a = b.clamp(0, 245)
    shifted = (a.int() + 10).to(torch.uint8)  # the target is the input 10 levels brighter
    r = evaluate_translation(
        nn.Identity(), PAIRED, EvalConfig(metrics="l1,l1_input,psnr"), HeldOut(a, shifted), capabilities=IMAGE
    )
    assert r.metrics["l1"] == pytest.approx(10 / 127.5) and r.metrics["l1_input"] == pytest.approx(10 / 127.5)
    assert r.metrics["psnr"] == pytest.approx(20 * math.log10(255 / 10))
    assert r.num_generated == 4 and r.num_holdout == 4 and r.cache_hit is None


def test_paired_l1_input_converts_grey_inputs_to_the_targets_channels():
    spec = ImageSpec(16, 3, input_resolution=16, input_channels=1, pairing="paired")  # colourisation
    b = smooth_images(2, 16)
    grey = match_channels(b, 1)

    class Colour(nn.Module):  # "colours" by repeating the grey channel
        def forward(self, x):
            return x.repeat(1, 3, 1, 1)

    r = evaluate_translation(Colour(), spec, EvalConfig(metrics="l1,l1_input"), HeldOut(grey, b), capabilities=IMAGE)
    assert r.metrics["l1"] == r.metrics["l1_input"] == pytest.approx(im.l1(grey.repeat(1, 3, 1, 1), b))
    assert r.metrics["l1"] > 0.01


@pytest.fixture
def cnn_weights(tmp_path):
    """A dataset-cnn weights file: a SmallCNN with seeded random weights (no training needed for FID 0), He
    initialised (torch's default init shrinks the features towards 0, and every FID with them)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = SmallCNN(3, 16, 10)
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path / "dataset-cnn.pt"
    torch.save(net.state_dict(), path)
    return path


def test_paired_fid_of_outputs_equal_to_the_targets_is_zero_and_cached(cnn_weights, tmp_path):
    b = smooth_images(80, 16)  # more images than the 64 features: a full-rank covariance
    cfg = EvalConfig(
        metrics="fid", feature_extractor="dataset-cnn", weights_path=str(cnn_weights), cache_dir=str(tmp_path / "c")
    )
    shard = tmp_path / "holdout-000000.tar"  # hashed for the cache key only
    shard.write_bytes(b"stand-in")
    r = evaluate_translation(nn.Identity(), PAIRED, cfg, HeldOut(b, b), capabilities=IMAGE, holdout_urls=[str(shard)])
    assert abs(r.metrics["fid"]) < 1e-3 and r.cache_hit is False and r.feature_extractor == "dataset-cnn"
    again = evaluate_translation(
        nn.Identity(), PAIRED, cfg, HeldOut(b, b), capabilities=IMAGE, holdout_urls=[str(shard)]
    )
    assert again.cache_hit is True and again.cache_key == r.cache_key
    assert abs(again.metrics["fid"]) < 1e-3
    worse = evaluate_translation(nn.Identity(), PAIRED, cfg, HeldOut(noisy(b, 80), b), capabilities=IMAGE)
    assert worse.metrics["fid"] > 100 * max(abs(r.metrics["fid"]), 1e-3) and worse.cache_hit is None


def brightness_classifier(path, channels: int = 1) -> str:
    """A SmallCNN that says class 1 for images brighter than mid-grey and class 0 otherwise (uniform images).

    Built by hand: every layer passes channel 0 on unchanged (first conv: the image + 1, so ReLU keeps it), the
    features' first unit is its mean (image + 1) and the head's logits are (0, f - 1)."""
    net = SmallCNN(channels, 16, 2, feature_dim=4, width=2)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        convs = [m for m in net.body if isinstance(m, nn.Conv2d)]
        convs[0].weight[0, :, 1, 1] = 1.0 / channels
        convs[0].bias[0] = 1.0
        for conv in convs[1:]:
            conv.weight[0, 0, 1, 1] = 1.0
        linear = net.body[-2]
        linear.weight[0, :16] = 1.0 / 16  # the 4×4 pooled cells of channel 0
        net.head.weight[1, 0] = 1.0
        net.head.bias[1] = -1.0
    torch.save(net.state_dict(), path)
    return str(path)


class Negate(nn.Module):
    def forward(self, x):
        return -x


class Darker(nn.Module):
    def forward(self, x):
        return (x - 1) / 2


class Cycle(nn.Module):
    def __init__(self, ab: nn.Module, ba: nn.Module):
        super().__init__()
        self.ab, self.ba = ab, ba

    def forward(self, x):
        return self.ab(x)


def uniform(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 16, 16).contiguous()


def test_unpaired_label_accuracies_by_hand(tmp_path):
    # A: 3 bright and 1 dark image, labelled by brightness except the last (a wrong label)
    a, a_labels = uniform([200, 220, 40, 180]), torch.tensor([1, 1, 0, 0])
    # B: 2 dark and 2 bright, labelled by brightness
    b, b_labels = uniform([30, 50, 230, 210]), torch.tensor([0, 0, 1, 1])
    cfg = EvalConfig(
        metrics="label_ab,label_ba,label_aba",
        classifier_a=brightness_classifier(tmp_path / "a.pt"),
        classifier_b=brightness_classifier(tmp_path / "b.pt"),
    )
    held = HeldOut(a, b, a_labels, b_labels)
    same = evaluate_translation(Cycle(nn.Identity(), nn.Identity()), UNPAIRED, cfg, held, capabilities=CYCLE)
    assert same.metrics == {"label_ab": 3 / 4, "label_ba": 1.0, "label_aba": 3 / 4}
    # G.ab inverts brightness (the class flips), G.ba leaves it: the cycle flips once
    flip = evaluate_translation(Cycle(Negate(), nn.Identity()), UNPAIRED, cfg, held, capabilities=CYCLE)
    assert flip.metrics == {"label_ab": 1 / 4, "label_ba": 1.0, "label_aba": 1 / 4}
    # both invert: the translations lose the class, the cycle keeps it
    both = evaluate_translation(Cycle(Negate(), Negate()), UNPAIRED, cfg, held, capabilities=CYCLE)
    assert both.metrics == {"label_ab": 1 / 4, "label_ba": 0.0, "label_aba": 3 / 4}
    assert both.num_generated == 8 and both.num_holdout == 8 and both.notes == []


def test_unpaired_label_metrics_are_skipped_with_a_note_or_refused(tmp_path):
    held = HeldOut(uniform([200, 40]), uniform([30, 230]), torch.tensor([1, 0]), None)
    G = Cycle(nn.Identity(), nn.Identity())
    cfg = EvalConfig(metrics="label_ab,label_ba,label_aba", classifier_a=brightness_classifier(tmp_path / "a.pt"))
    r = evaluate_translation(G, UNPAIRED, cfg, held, capabilities=CYCLE)
    assert r.metrics == {"label_aba": 1.0}
    assert any(n.startswith("label_ab skipped: eval.classifier_b is not set") and "train-b-*.tar" in n for n in r.notes)
    assert any(n.startswith("label_ba skipped: the held-out B images have no labels") for n in r.notes)
    missing = cfg.model_copy(update={"classifier_b": str(tmp_path / "nope.pt")})
    with pytest.raises(
        EvalError, match=r"classifier_b points at .*nope\.pt.*ganforge extractor train --data 'OUT/train-b-\*\.tar'"
    ):
        evaluate_translation(G, UNPAIRED, missing, held, capabilities=CYCLE)


def test_unpaired_fid_of_identical_domains_is_zero(cnn_weights, tmp_path):
    x = smooth_images(72, 16, channels=1)
    cfg = EvalConfig(
        metrics="fid_a,fid_b",
        feature_extractor="dataset-cnn",
        weights_path=str(cnn_weights),
        cache_dir=str(tmp_path / "c"),
        batch_size=32,
    )
    r = evaluate_translation(Cycle(nn.Identity(), nn.Identity()), UNPAIRED, cfg, HeldOut(x, x), capabilities=CYCLE)
    assert abs(r.metrics["fid_a"]) < 1e-3 and abs(r.metrics["fid_b"]) < 1e-3
    r = evaluate_translation(Cycle(Darker(), nn.Identity()), UNPAIRED, cfg, HeldOut(x, x), capabilities=CYCLE)
    assert r.metrics["fid_b"] > 1 and abs(r.metrics["fid_a"]) < 1e-3  # only G.ab changed the images


def test_g_is_evaluated_in_eval_mode_and_put_back():
    seen = []

    class Spy(nn.Identity):
        def forward(self, x):
            seen.append(self.training)
            return x

    G = Spy().train()
    b = smooth_images(2, 16)
    evaluate_translation(G, PAIRED, EvalConfig(metrics="l1"), HeldOut(b, b), capabilities=IMAGE)
    assert seen == [False] and G.training


# ---------------------------------------------------------------------------------------------
# The evaluator service


class TinyPix2PixConfig(ArchConfig):
    arch: Literal["test-tiny-pix2pix"] = "test-tiny-pix2pix"


class TinyPix2Pix(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.gain


@pytest.fixture
def tiny_pix2pix(monkeypatch):
    arch = Architecture(
        "test-tiny-pix2pix", TinyPix2PixConfig, lambda cfg, spec: TinyPix2Pix(), lambda cfg, spec: nn.Identity(), IMAGE
    )
    monkeypatch.setitem(REGISTRY, arch.name, arch)
    return arch


def test_evaluator_service_reads_the_heldout_once_and_writes_eval_rows(tiny_pix2pix, tmp_path, monkeypatch):
    import orchestrator.data.heldout as heldout
    from orchestrator.eval.service import EvalJob, Evaluator

    b = smooth_images(3, 16)
    reads = []

    def read_heldout(urls, spec, limit=None):
        reads.append((list(urls), spec, limit))
        return HeldOut(b, b)

    monkeypatch.setattr(heldout, "read_heldout", read_heldout, raising=False)
    cfg = EvalConfig(metrics="l1,psnr", holdout_num=3)
    evaluator = Evaluator(EvalJob(cfg, "test-tiny-pix2pix", TinyPix2PixConfig(), PAIRED, ["h.tar"]), str(tmp_path))
    first = evaluator.evaluate(1, 0.1, {"gain": torch.ones(())})
    second = evaluator.evaluate(2, 0.2, {"gain": torch.tensor(0.5)})
    assert reads == [(["h.tar"], PAIRED, 3)]
    assert first["eval/l1"] == 0.0 and first["eval/psnr"] == math.inf and second["eval/l1"] > 0.1
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and set(rows[1]) >= {"eval/l1", "eval/psnr", "eval/seconds"}
    with pytest.raises(EvalError, match="fid does not fit super-resolution"):  # at start, not at the first evaluation
        Evaluator(
            EvalJob(cfg.model_copy(update={"metrics": ["fid"]}), "test-tiny-pix2pix", TinyPix2PixConfig(), SR, []),
            str(tmp_path),
        )
