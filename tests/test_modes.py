"""Stacked digits (``builtin:stacked-digits``), the mode counter (orchestrator/eval/modes.py) and the
non-training parts of the mode-coverage benchmark (benchmarks/modes.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import modes as bench
from orchestrator.data import builtins
from orchestrator.data.shards import image_spec, load_manifest
from orchestrator.data.sources import prepare_image, read_source
from orchestrator.data.write import write_shards
from orchestrator.eval import modes
from orchestrator.eval.extractors import SmallCNN, train_feature_extractor

# ---------------------------------------------------------------------------------------------
# The data set


def test_stacked_digits_are_three_digits_labelled_by_their_mode_and_fixed():
    images, labels, idx = builtins.stacked_digits()
    digits, digit_labels = builtins.digits()
    assert images.shape == (builtins.STACKED_COUNT, 8, 8, 3) and images.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(images[..., c], digits[idx[:, c]])
    np.testing.assert_array_equal(
        labels, 100 * digit_labels[idx[:, 0]] + 10 * digit_labels[idx[:, 1]] + digit_labels[idx[:, 2]]
    )
    builtins.stacked_digits.cache_clear()
    again = builtins.stacked_digits()
    np.testing.assert_array_equal(again[0], images)
    np.testing.assert_array_equal(again[1], labels)


def test_each_channel_is_resized_exactly_as_builtin_digits_is():
    images, _, idx = builtins.stacked_digits()
    digits = builtins.digits()[0]
    for i in range(20):
        rgb = np.asarray(prepare_image(Image.fromarray(images[i]), 16, 3))
        for c in range(3):
            grey = np.asarray(prepare_image(Image.fromarray(digits[idx[i, c]]), 16, 1))
            np.testing.assert_array_equal(rgb[..., c], grey)


def test_every_mode_is_in_the_training_split(tmp_path):
    manifest = write_shards("builtin:stacked-digits", tmp_path / "s", resolution=8, shard_size=10_000)
    assert manifest["num_classes"] == 1000 and manifest["class_names"][:3] == ["000", "001", "002"]
    assert manifest["channels"] == 3 and manifest["splits"]["holdout"]["count"] == 3000
    counts = modes.shard_mode_counts(str(tmp_path / "s" / "train-*.tar"))
    assert int(counts.sum()) == manifest["splits"]["train"]["count"] == 27_000
    assert int((counts > 0).sum()) == 1000 and int(counts.min()) >= 10
    src = read_source("builtin:stacked-digits")
    assert src.keys[0] == "stacked-00000" and src.labels[:5] == [int(m) for m in builtins.stacked_digits()[1][:5]]


# ---------------------------------------------------------------------------------------------
# The counter against hand computations


@pytest.mark.parametrize("k", [1, 10, 250, 1000])
def test_reverse_kl_of_uniform_samples_over_k_of_1000_uniform_modes_is_log_1000_over_k(k):
    data = torch.full((1000,), 27)
    gen = modes.mode_counts(torch.arange(k).repeat(7))
    assert modes.reverse_kl(gen, data) == pytest.approx(math.log(1000 / k), abs=1e-12)
    cov = modes.coverage(torch.arange(k).repeat(7), data)
    assert (cov.modes, cov.samples) == (k, 7 * k)


def test_reverse_kl_is_kl_of_the_samples_from_the_data_not_the_other_way():
    gen, data = torch.tensor([3, 1]), torch.tensor([5, 5])  # p = (3/4, 1/4), q = (1/2, 1/2)
    by_hand = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.1308; KL(q ‖ p) would be 0.1438
    assert modes.reverse_kl(gen, data) == pytest.approx(by_hand, abs=1e-12)
    assert modes.reverse_kl(torch.tensor([1, 0]), torch.tensor([1, 3])) == pytest.approx(math.log(4), abs=1e-12)


def test_a_sampled_mode_the_data_lacks_makes_reverse_kl_infinite():
    assert modes.reverse_kl(torch.tensor([1, 1]), torch.tensor([2, 0])) == math.inf


def test_modes_are_red_green_blue_digits_as_hundreds_tens_units():
    assert modes.modes_of(torch.tensor([[1, 2, 3], [0, 0, 7], [9, 0, 0]])).tolist() == [123, 7, 900]
    counts = modes.mode_counts(torch.tensor([5, 5, 999]))
    assert counts.shape == (1000,) and (counts[5], counts[999], int(counts.sum())) == (2, 1, 3)


# ---------------------------------------------------------------------------------------------
# The counter with a digit classifier on real stacked images


@pytest.fixture(scope="module")
def digit_classifier(digits16, tmp_path_factory):
    """The benchmark's 16×16 digit classifier (``CLASSIFIER_EPOCHS`` on the training split of builtin:digits)
    and the indices of the held-out digits, which it never saw."""
    from orchestrator.eval.extractors import load_classifier

    path = tmp_path_factory.mktemp("cnn") / "cnn.pt"
    train_feature_extractor(str(digits16 / "train-*.tar"), path, bench.CLASSIFIER_EPOCHS)
    held = [int(key.rsplit("-", 1)[1]) for shard in sorted(digits16.glob("holdout-*.tar")) for key in _keys(shard)]
    return load_classifier(path), held


def _keys(shard) -> list[str]:
    """The source keys (``digits-NNNNN``) of a shard's samples."""
    import tarfile

    with tarfile.open(shard) as tf:
        return [tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".src.txt")]


def _stacked16(triples: np.ndarray) -> torch.Tensor:
    """Stacked images of the digits ``triples`` (N×3 indices), at 16×16 as the shard writer makes them."""
    digits = builtins.digits()[0]
    rgb = [np.asarray(prepare_image(Image.fromarray(np.stack([digits[i] for i in t], -1)), 16, 3)) for t in triples]
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.slow  # trains the digit classifier: 10 s on a quiet 2-core machine, 90 s on a busy one
def test_the_counter_reads_the_modes_of_real_stacked_images(digit_classifier):
    net, _ = digit_classifier
    images, labels, idx = builtins.stacked_digits()
    x, y = _stacked16(idx[:2000]), torch.from_numpy(labels[:2000])
    per_channel, per_image = modes.channel_accuracy(net, x, y)
    assert per_channel >= 0.98 and per_image >= 0.95, (per_channel, per_image)  # measured 99.7%, 99.0%
    data = modes.mode_counts(torch.from_numpy(labels))
    counted, true = modes.count_modes(net, x, data), modes.coverage(y, data)
    assert abs(counted.modes - true.modes) <= 20 and counted.reverse_kl == pytest.approx(true.reverse_kl, abs=0.05)
    assert counted.confident >= 0.95  # measured 98.9% on 10,000 training images


@pytest.mark.slow
def test_noise_covers_modes_but_is_not_read_with_confidence(digit_classifier):
    """The classifier names a digit for anything: uniform noise "covers" about half the modes, which is what
    the confidence column is for."""
    net, _ = digit_classifier
    noise = torch.randint(0, 256, (2000, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    cov = modes.count_modes(net, noise, torch.ones(1000))
    assert cov.modes > 300 and cov.confident < 0.2, cov  # measured 539 modes, 4.1% confident


@pytest.mark.slow
def test_the_counter_reads_stacked_images_of_digits_the_classifier_never_saw(digit_classifier):
    """Most digits of a stacked image were in the classifier's training split; these 1,000 images are made of
    the 180 held-out digits only: the classifier's accuracy on digits it never saw."""
    net, held = digit_classifier
    assert len(held) == 180
    triples = np.random.default_rng(0).choice(held, size=(1000, 3))
    truth = torch.from_numpy(builtins.digits()[1][triples]) @ torch.tensor(modes.PLACES)
    per_channel, per_image = modes.channel_accuracy(net, _stacked16(triples), truth)
    assert per_channel >= 0.95 and per_image >= 0.88, (per_channel, per_image)  # measured 97.0%, 91.1%


def test_channel_digits_refuses_grey_images_and_rgb_classifiers():
    grey_net, rgb_net = SmallCNN(1, 16, 10).eval(), SmallCNN(3, 16, 10).eval()
    assert modes.channel_digits(grey_net, torch.zeros(2, 3, 16, 16, dtype=torch.uint8)).shape == (2, 3)
    with pytest.raises(ValueError, match="RGB"):
        modes.channel_digits(grey_net, torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        modes.channel_digits(grey_net, torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="grey digit classifier"):
        modes.channel_digits(rgb_net, torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# The benchmark's tables, variants and data


def _rows() -> list[bench.Row]:
    return [
        bench.Row("dcgan", 0, 600, 1.5, 30.0, confident=0.2),
        bench.Row("dcgan", 1, 700, 1.0, 34.0, confident=0.4),
        bench.Row("pack2", 0, 900, 0.25, 40.0),
        bench.Row("unroll5", 0, None, None, 3.0, "unknown key 'loss.unroll_steps'"),
    ]


def test_summary_is_mean_and_sample_sd_over_the_seeds_that_ran():
    summary = {s["variant"]: s for s in bench.summarize(_rows())}
    assert list(summary) == ["dcgan", "pack2", "unroll5"]
    assert summary["dcgan"]["modes"] == pytest.approx((650.0, math.sqrt(5000)))
    assert summary["dcgan"]["reverse_kl"] == pytest.approx((1.25, math.sqrt(0.125)))
    assert summary["dcgan"]["confident"] == pytest.approx((0.3, math.sqrt(0.02)))
    assert summary["pack2"]["confident"] is None
    assert summary["pack2"]["modes"] == (900.0, None) and summary["pack2"]["failed"] == 0
    assert (summary["unroll5"]["seeds"], summary["unroll5"]["failed"], summary["unroll5"]["modes"]) == (0, 1, None)


def test_markdown_tables_show_every_run_the_means_and_the_failures():
    rows = _rows()
    table = bench.markdown(rows, bench.summarize(rows), {"modes": 1000, "reverse_kl": 0.031, "confident": 0.989})
    assert "| dcgan | 1 | 700 | 1.000 | 40.0% | 34 |" in table
    assert "| dcgan | 2 | 650.0 ± 70.7 | 1.250 ± 0.354 | 30.0 ± 14.1 % | 32 ± 3 |" in table
    assert "| pack2 | 0 | 900 | 0.250 | – | 40 |" in table and "| pack2 | 1 | 900.0 | 0.250 | – | 40 |" in table
    assert "failed: unknown key 'loss.unroll_steps'" in table and "| unroll5 | 0 (1 failed) | – | – | – | – |" in table
    assert "| real training images | – | 1000 | 0.031 | 98.9% | – |" in table


def test_variants_are_the_chosen_presets_then_named_overrides():
    args = bench.parse_args(
        ["--variants", "dcgan", "pack2", "--variant", "lr", "optim.d.lr=0.0004", "train.batch_size=32"]
    )
    assert bench.variants_of(args) == {
        "dcgan": [],
        "pack2": ["loss.pack=2"],
        "lr": ["optim.d.lr=0.0004", "train.batch_size=32"],
    }
    with pytest.raises(SystemExit, match="unknown variant"):
        bench.variants_of(bench.parse_args(["--variants", "nope"]))


def test_train_command_puts_the_variant_after_the_benchmark_settings(tmp_path):
    cmd = bench.train_command(["loss.pack=2"], 3, 50.0, tmp_path, 1)
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert cmd[1:3] == ["train", bench.CONFIG] and sets[-1] == "loss.pack=2"
    assert {"train.seed=3", "train.total_kimg=50.0", "train.threads=1", "eval.enabled=false"} <= set(sets)


def test_the_benchmark_config_trains_unconditionally_on_the_labelled_shards(tmp_path):
    from orchestrator.config import load_config

    write_shards("builtin:digits", tmp_path, resolution=16, shard_size=2000)  # any labelled shards
    cfg = load_config(bench.ROOT / bench.CONFIG, [f"data.shards={tmp_path}/train-*.tar"])
    spec = image_spec(cfg.data, load_manifest(cfg.data))
    assert (spec.num_classes, spec.resolution) == (0, 16)
    labelled = json.loads((tmp_path / "manifest.json").read_text())
    assert labelled["num_classes"] == 10 and cfg.eval.enabled is False and cfg.ema.start_kimg > cfg.train.total_kimg


def test_a_variant_with_a_key_the_config_lacks_fails_alone_with_the_reason(tmp_path):
    args = bench.parse_args(["--kimg", "1", "--out", str(tmp_path)])
    row = bench.run_one("nope", ["loss.no_such_option=3"], 0, args, measure=lambda images: pytest.fail("measured"))
    assert (row.variant, row.seed, row.modes, row.reverse_kl) == ("nope", 0, None, None)
    assert "unknown key 'loss.no_such_option'" in row.error
