"""Pix2Pix, CycleGAN and SRGAN on the same loop as StyleGAN2: dev-mode runs on real offline data that resume
exactly (weights, optimizers, CycleGAN's pools and learning-rate schedule, SRGAN's stage), 2 DDP workers that
reach the weights of 1, evaluation of their checkpoints, ``generate --input``, and config errors for data that
does not fit the recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from test_distributed import torchrun

from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import ConfigError, validate_config
from orchestrator.data.write import write_pairs, write_superres, write_unpaired
from orchestrator.train.run import Run, train

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Edges → digits pairs, digits ↔ digits-M domains, photos for ×4 super-resolution; the pairs and domains in
    shards of 4 (a batch of 8 takes one shard per worker of 2, with a shuffle buffer of 1)."""
    out = tmp_path_factory.mktemp("i2i")
    write_pairs("builtin:digits-edges", "builtin:digits", out / "pairs", 32, holdout=0.02, shard_size=4, max_train=64)
    write_unpaired("builtin:digits", "builtin:digits-m", out / "cycle", 32, holdout=0.04, shard_size=4, max_train=32)
    write_superres("builtin:photos", out / "sr", 64, crop=16, scale=4, holdout=0.25, shard_size=1)
    return {"pix2pix": out / "pairs", "cyclegan": out / "cycle", "srgan": out / "sr"}


MODELS = {
    "pix2pix": {"arch": "pix2pix", "ngf": 4, "ndf": 4, "d_layers": 2, "norm": "instance", "dropout": 0.0},
    "cyclegan": {"arch": "cyclegan", "ngf": 4, "ndf": 4, "g_blocks": 1, "d_layers": 2},
    "srgan": {"arch": "srgan", "g_blocks": 1, "g_channels": 4, "d_channels": 4, "d_dense": 8, "norm": "none"},
}
OPTIONS = {
    "pix2pix": {"pix2pix": {"lr_decay_start": 0.5}},
    "cyclegan": {"cyclegan": {"identity_weight": 0.0, "pool_size": 6, "lr_decay_start": 0.5}},
    "srgan": {"srgan": {"content": "mse", "pretrain_kimg": 0.016}, "loss": {"kind": "nonsaturating"}},
}


def job(recipe: str, shards: Path, steps: int = 4, **sections) -> dict:
    """A tiny job of ``recipe``: batch 8, ``steps`` steps in all (learning rates decaying over the second half)."""
    cfg = {
        "model": MODELS[recipe],
        "data": {"shards": str(shards / "train-*.tar"), "workers": 0, "shuffle_buffer": 1},
        "train": {"recipe": recipe, "batch_size": 8, "total_kimg": steps * 8 / 1000, "seed": 0, "threads": 1},
        "loss": {"kind": "lsgan" if recipe == "cyclegan" else "nonsaturating"},
        "checkpoint": {"every_kimg": 1, "keep_last": 5},
        "tracking": {"log_every": 1, "sample_every_kimg": 1, "grid_size": 2, "progress_bar": False,
                     "wandb": {"mode": "disabled"}},
        **OPTIONS[recipe],
    }  # fmt: skip
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def state(run_dir: Path) -> dict:
    return load_checkpoint(sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1])


def assert_same_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("recipe", ["pix2pix", "cyclegan", "srgan"])
def test_a_resumed_run_is_the_uninterrupted_one(data, tmp_path, recipe):
    """Stopped after 2 steps and resumed, a run ends bit-identical to one that ran its 4 steps at once: weights,
    Adam states (with the decayed learning rates), CycleGAN's pools, the data position. SRGAN crosses from
    pre-training to its GAN phases on the way."""
    whole = train(validate_config(job(recipe, data[recipe]), "whole"), tmp_path / "whole")
    first = train(validate_config(job(recipe, data[recipe], train={"stop_at_step": 2}), "half"), tmp_path / "split")
    assert (whole.step, first.step) == (4, 2)
    second = train(validate_config(job(recipe, data[recipe]), "rest"), tmp_path / "split", resume="auto")
    assert second.step == 4
    a, b = state(tmp_path / "whole"), state(tmp_path / "split")
    for key in ("G", "D", "optimizers", "progress", "sampler", "ranks"):
        assert_same_tensors(a[key], b[key], key)
    if recipe == "cyclegan":
        assert len(a["recipe.pool_a"]["images"]) == 6
        assert_same_tensors(a["recipe.pool_a"], b["recipe.pool_a"], "pool_a")
        assert_same_tensors(a["recipe.pool_b"], b["recipe.pool_b"], "pool_b")
    if recipe == "srgan":
        assert a["progress"]["phases"] == {"Gmse": 2, "D": 2, "G": 2}
    lr = [g["lr"] for g in a["optimizers"]["G"]["param_groups"]]
    if recipe != "srgan":  # 32 images of 32: the decay from 16 reaches 0 at the end
        assert lr == [pytest.approx(0.0)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, strategy", [("pix2pix", "ddp"), ("cyclegan", "ddp"), ("srgan", "ddp"), ("cyclegan", "deepspeed")]
)
def test_two_ddp_workers_reach_the_weights_of_one(data, tmp_path, recipe, strategy):
    """Each worker takes half of every batch (different images), the history pool serves the global batch and a
    super-resolution crop depends on the sample, not the worker: 2 DDP workers (and 2 DeepSpeed ZeRO-2 workers,
    for CycleGAN's four networks in two engines) end where 1 worker does."""
    steps = 2
    # Adam's ε at 1e-3: conv biases before a non-affine instance norm have no gradient but float noise, which
    # Adam at ε = 1e-8 turns into full lr-sized steps; a real gradient (1e-2 and up) scaled by the worker
    # count would still move the weights by several percent
    adam = {"lr": 2e-4, "betas": [0.5, 0.999], "eps": 1e-3}
    raw = job(recipe, data[recipe], steps=steps, optim={"g": adam, "d": adam})
    if recipe == "srgan":
        raw["srgan"]["pretrain_kimg"] = 0.008
    one = train(validate_config(raw, "one"), tmp_path / "one")
    assert one.step == steps
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    ds = [f"distributed.deepspeed_config={ROOT / 'configs/deepspeed/zero2.yaml'}"] if strategy == "deepspeed" else []
    torchrun(config, tmp_path / "two", 2, f"distributed.strategy={strategy}", *ds)
    a, b = state(tmp_path / "one"), state(tmp_path / "two")
    for net in ("G", "D"):
        assert a[net].keys() == b[net].keys()
        for k in a[net]:
            # a bias that no real gradient moved (it stays below 2e-5 where a real one moves ~1.8e-4 a step) holds
            # float noise amplified by Adam, which differs between processors: equal to 1e-5, not to 1e-6
            noise = k.endswith("bias") and a[net][k].abs().max() < 2e-5
            atol = 1e-5 if noise else 1e-6
            torch.testing.assert_close(b[net][k], a[net][k], rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{net}.{k}: {m}")
    if recipe == "cyclegan":
        torch.testing.assert_close(b["recipe.pool_b"]["images"], a["recipe.pool_b"]["images"], rtol=1e-4, atol=1e-6)


def test_eval_and_generate_take_an_image_to_image_checkpoint(data, tmp_path):
    """``ganforge eval`` computes the paired metrics of a Pix2Pix checkpoint on its held-out pairs, and
    ``ganforge generate --input`` translates a folder (skipping a file that is not an image), labelling every
    output as synthetic; a noise → image option on it is refused."""
    train(validate_config(job("pix2pix", data["pix2pix"], steps=2), "p2p"), tmp_path / "run")
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*"))[-1]
    cli = [sys.executable, "-m", "launch.cli"]
    p = subprocess.run(cli + ["eval", str(ckpt), "--metrics", "l1,l1_input,psnr", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads(p.stdout)["metrics"]
    assert set(metrics) == {"l1", "l1_input", "psnr"} and 0 < metrics["l1_input"] < 2

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.new("L", (48, 40), 255).save(inputs / "a.png")
    Image.new("RGB", (32, 32), (0, 128, 255)).save(inputs / "b.jpg")
    (inputs / "notes.txt").write_text("not an image")
    p = subprocess.run(cli + ["generate", str(ckpt), "--input", str(inputs), "--out", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "skipped" in p.stdout and "notes.txt" in p.stdout
    written = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert written == ["a.png", "b.png", "grid.png"]
    for name in written:
        with Image.open(tmp_path / "out" / name) as img:
            assert img.text["ganforge:synthetic"] == "true"
            if name != "grid.png":
                assert img.size == (32, 32) and img.mode == "L"
    p = subprocess.run(cli + ["generate", str(ckpt), "--input", str(inputs), "--seeds", "0-1", "--out", "x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode != 0 and "--input translates images" in p.stderr


def test_cyclegan_generates_both_ways_and_grids_show_the_cycle(data, tmp_path):
    """CycleGAN's grid shows A | A → B | A → B → A rows (then B's), and ``--direction ba`` runs G.ba on B images."""
    result = train(validate_config(job("cyclegan", data["cyclegan"], steps=2), "cyc"), tmp_path / "run")
    with Image.open(result.grid) as grid:
        assert grid.mode == "RGB" and grid.size[0] == 6 * 33 + 1  # two examples of three images per row
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*"))[-1]
    from orchestrator.tools.generate import translate

    src = tmp_path / "b.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(src)
    paths = translate(ckpt, src, tmp_path / "out", direction="ba")
    with Image.open(paths[0]) as img:
        assert img.mode == "L" and img.text["ganforge:direction"] == "ba"


def test_info_shows_an_image_to_image_model(data, tmp_path):
    """``ganforge info`` builds G from the data's input image and counts both networks."""
    raw = job("cyclegan", data["cyclegan"])
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    p = subprocess.run([sys.executable, "-m", "launch.cli", "info", str(tmp_path / "job.yaml"), "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    info = json.loads(p.stdout)
    assert info["output_shape"] == [1, 3, 32, 32] and info["g_params"] > 0 and info["d_params"] > 0


@pytest.mark.parametrize(
    "recipe, shards, error",
    [
        ("noise_to_image", "pix2pix", "noise_to_image generates from noise"),
        ("pix2pix", "cyclegan", "pix2pix needs paired image → image shards"),
        ("cyclegan", "pix2pix", "cyclegan needs unpaired"),
        ("pix2pix", "pix2pix", "pix2pix does not use loss.label_smoothing"),
    ],
)
def test_data_that_does_not_fit_the_recipe_is_a_config_error(data, tmp_path, recipe, shards, error):
    raw = job("pix2pix" if recipe == "noise_to_image" else recipe, data[shards])
    raw["train"]["recipe"] = recipe
    if recipe == "noise_to_image":
        raw["model"] = {"arch": "dcgan", "z_dim": 8, "g_channels": 4, "d_channels": 4}
    if "label_smoothing" in error:
        raw["loss"]["label_smoothing"] = 0.1
    with pytest.raises(ConfigError, match=error):
        Run.build(validate_config(raw, "bad"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_classifier_trains_on_either_domain_of_unpaired_shards(data, tmp_path):
    """``ganforge extractor train --data 'OUT/train-a-*.tar'`` reads domain A as A (grey digits), B as B (RGB):
    the classifiers that CycleGAN's label metrics need."""
    from orchestrator.eval.extractors import load_classifier, train_feature_extractor

    for domain, channels in (("a", 1), ("b", 3)):
        out = tmp_path / f"classifier-{domain}.pt"
        train_feature_extractor(str(data["cyclegan"] / f"train-{domain}-*.tar"), out, epochs=1)
        assert load_classifier(out).in_channels == channels
