"""ProGAN's training recipe in the loop: the growth schedule as checkpointed state, WGAN-GP with the drift
term, the AC-GAN label term, per-level batch sizes and learning rates, Adam reset at each fade-in,
exact resume in the middle of a fade-in, the presets, and the dev preset growing on CPU."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_nets, local_context, run_d_phase, run_g_phase, tiny_config
from conftest import growing_config as shared_growing_config
from PIL import Image

import architectures
from architectures import progan as pg
from architectures.registry import count_params
from core.spec import ImageSpec
from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import ConfigError, load_config, validate_config
from orchestrator.growth import Growth, GrowthConfig
from orchestrator.losses import LossConfig, class_loss, gradient_penalty
from orchestrator.optim import AdamConfig
from orchestrator.train.run import train

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs" / "progan"
TINY_MODEL = {"arch": "progan", "z_dim": 8, "fmap_base": 64, "fmap_max": 16, "mbstd_group_size": 4}


# ---------------------------------------------------------------------------------------------------
# The schedule.


# The official schedule of the celebahq preset, written out by hand from tkarras/progressive_growing_of_gans
# (commit 2504c3f): train.py TrainingSchedule (lines 85-127) with config.py's preset-v2-8gpus (line 103:
# num_gpus 8, minibatch_base 32, minibatch_dict {4: 512, 8: 256, 16: 128, 32: 64, 64: 32}, G_lrate_dict =
# D_lrate_dict {128: 0.0015, 256: 0.002, 512: 0.003, 1024: 0.003}, total_kimg 12000), -fp32 (line 106:
# max_minibatch_per_gpu {256: 16, 512: 8, 1024: 4}, i.e. at most 128 / 64 / 32 on 8 GPUs: no effect here) and
# the defaults lod_initial_resolution 4, lod_training_kimg = lod_transition_kimg = 600, G/D_lrate_base 0.001.
# The rules: phase_idx = floor(kimg / 1200), phase_kimg = kimg - 1200 * phase_idx,
# lod = max(10 - 2 - phase_idx - max(phase_kimg - 600, 0) / 600, 0), resolution = 2 ** (10 - floor(lod)),
# minibatch = minibatch_dict.get(resolution, 32) (a multiple of 8 already), lrate = G_lrate_dict.get(resolution, 0.001).
# Columns: kimg, lod, resolution, minibatch, G_lrate (= D_lrate).
OFFICIAL_CELEBAHQ_SCHEDULE = [
    (0, 8.0, 4, 512, 0.001),
    (450, 8.0, 4, 512, 0.001),
    (750, 7.75, 8, 256, 0.001),  # phase 0, 150 kimg into the 8x8 fade-in
    (1200, 7.0, 8, 256, 0.001),  # phase 1 starts: 8x8 fully in
    (1500, 7.0, 8, 256, 0.001),
    (2100, 6.5, 16, 128, 0.001),
    (3450, 5.25, 32, 64, 0.001),  # phase 2, 1050 kimg in: 32x32 three quarters in
    (4650, 4.25, 64, 32, 0.001),
    (5100, 4.0, 64, 32, 0.001),
    (5700, 3.5, 128, 32, 0.0015),  # minibatch_base from 128 on; the first lrate override
    (6900, 2.5, 256, 32, 0.002),
    (8250, 1.25, 512, 32, 0.003),
    (9150, 0.75, 1024, 32, 0.003),
    (11000, 0.0, 1024, 32, 0.003),  # lod clamped at 0
    (12000, 0.0, 1024, 32, 0.003),  # total_kimg
]


def _lod(resolution: int, alpha: float, max_resolution: int = 1024) -> float:
    """The official scalar level of detail of a (resolution, alpha) state: 0 at full resolution, +1 per halving,
    fractional while the level fades in."""
    return math.log2(max_resolution) - math.log2(resolution) + (1.0 - alpha)


def test_growth_follows_the_official_celebahq_schedule_with_the_presets_mixed_batches():
    """Driven as the loop drives it (each step shows the current level's batch: 512, 256, ... 32 images), the
    preset's growth state gives the official level, batch size and learning rate at each kimg of the table."""
    cfg = load_config(CONFIGS / "celebahq-1024.yaml")
    growth = Growth(cfg.growth, cfg.model.start_resolution, cfg.data.resolution)
    nimg, batches = 0, set()
    for kimg, lod, resolution, minibatch, lrate in OFFICIAL_CELEBAHQ_SCHEDULE:
        while nimg < kimg * 1000:
            images = min(growth.batch_size(cfg.train.batch_size), kimg * 1000 - nimg)  # partial to land on kimg
            batches.add(images)
            growth.advance(images)
            nimg += images
        state = (growth.resolution, _lod(growth.resolution, growth.alpha), growth.batch_size(cfg.train.batch_size))
        assert state == (resolution, pytest.approx(lod, abs=1e-12), minibatch), kimg
        assert growth.lr(cfg.optim.g.lr) == growth.lr(cfg.optim.d.lr) == lrate, kimg
    assert {512, 256, 128, 64, 32} <= batches and growth.complete
    # Exactly where a fade-in starts (600 kimg here) the official lod is still the integer 8.0, which it reads
    # as 4x4 (resolution 2 ** (10 - floor(lod))); ganforge already says 8x8 at alpha 0. The same lod, so the
    # same function of the networks; ganforge takes the 8x8 batch from that image on.
    start = Growth(cfg.growth, 4, 1024)
    start.advance(600_000)
    assert (start.resolution, start.alpha, _lod(start.resolution, start.alpha)) == (8, 0.0, 8.0)


def test_training_schedule_gives_the_official_celebahq_levels():
    """``progan.training_schedule`` (ganforge's transcription of TrainingSchedule) against the same table."""
    for kimg, lod, resolution, _, _ in OFFICIAL_CELEBAHQ_SCHEDULE:
        res, alpha = pg.training_schedule(kimg, 1024, start_resolution=4, training_kimg=600, transition_kimg=600)
        assert (res, _lod(res, alpha)) == (resolution, pytest.approx(lod, abs=1e-12)), kimg


def test_growth_and_training_schedule_agree_whatever_the_batches():
    """A consistency check of ganforge's two transcriptions of the schedule (``Growth`` and
    ``training_schedule``), not a check against the official code (the tests above do that): with random
    batch sizes, the growth state lands where ``training_schedule`` puts it, and says when a fade-in starts or ends."""
    growth = Growth(GrowthConfig(training_kimg=600, transition_kimg=600), start_resolution=4, max_resolution=1024)
    rng, nimg, events = random.Random(0), 0, []
    while nimg < 14_000_000:
        before = (growth.resolution, growth.fading)
        images = rng.choice([997, 4099, 16384, 31_337])
        changed = growth.advance(images)
        nimg += images
        res, alpha = pg.training_schedule(nimg / 1000, 1024)
        assert growth.resolution == res and math.isclose(growth.alpha, alpha, abs_tol=1e-9), nimg
        assert changed == ((growth.resolution, growth.fading) != before)
        if changed:
            events.append((growth.resolution, growth.fading))
    # fade-in start and end at every level from 8 to 1024
    assert events == [(r, f) for r in (8, 16, 32, 64, 128, 256, 512, 1024) for f in (True, False)]
    assert growth.complete and growth.alpha == 1.0


def test_growth_per_level_batch_and_lr_and_state_round_trip():
    cfg = GrowthConfig(training_kimg=1, transition_kimg=2, batch_size={4: 64, 8: 32}, lr={16: 0.003})
    growth = Growth(cfg, start_resolution=4, max_resolution=16)
    assert (growth.batch_size(16), growth.lr(0.001)) == (64, 0.001)
    growth.advance(1000 + 500)  # 4×4 done; 8×8 a quarter faded in
    assert (growth.resolution, growth.alpha, growth.batch_size(16)) == (8, 0.25, 32)
    growth.advance(1500 + 1000 + 2000)  # 8×8 done; 16×16 fully faded in
    assert (growth.resolution, growth.alpha, growth.batch_size(16), growth.lr(0.001)) == (16, 1.0, 16, 0.003)
    assert growth.complete
    copy = Growth(cfg, start_resolution=4, max_resolution=16)
    copy.load_state_dict({"resolution": 8, "alpha": 0.25, "level_img": 500})
    assert (copy.resolution, copy.alpha, copy.level_img) == (8, 0.25, 500)
    with pytest.raises(ValueError, match="outside this run's 4..16"):
        copy.load_state_dict({"resolution": 32, "alpha": 1.0, "level_img": 0})
    with pytest.raises(ValueError, match="powers of two"):
        GrowthConfig(batch_size={12: 8})


# ---------------------------------------------------------------------------------------------------
# Losses.


def test_gradient_penalty_matches_a_hand_computation_on_a_toy_critic():
    """Critic D(x) = a·Σx², so ∇D(x̂) = 2a·x̂ and the penalty is (2a‖x̂‖ − 1)² at x̂ = ε·real + (1 − ε)·fake."""
    a = torch.tensor(1.0, requires_grad=True)
    critic = lambda x: a * x.square().flatten(1).sum(1)  # noqa: E731
    real = torch.tensor([[[[3.0, 0.0]]], [[[0.0, 1.0]]]])  # [N=2, C=1, H=1, W=2]
    fake = torch.tensor([[[[1.0, 0.0]]], [[[0.0, -1.0]]]])
    eps = torch.tensor([0.5, 0.25]).view(2, 1, 1, 1)
    gp = gradient_penalty(critic, real, fake, eps)
    # x̂₀ = (2, 0): ‖∇‖ = 4, (4 − 1)² = 9.   x̂₁ = (0, −0.5): ‖∇‖ = 1, (1 − 1)² = 0.
    assert gp.tolist() == pytest.approx([9.0, 0.0])
    # Kept differentiable (create_graph): d/da (2a·2 − 1)² = 2·3·4 = 24 for the first image.
    (grad,) = torch.autograd.grad(gp[0], (a,))
    assert float(grad) == pytest.approx(24.0)


def _tiny_conditional(num_classes: int = 3):
    torch.manual_seed(0)
    cfg = pg.ProGANConfig(**{k: v for k, v in TINY_MODEL.items() if k != "arch"})
    spec = ImageSpec(16, 1, num_classes)
    G, D = pg.build_generator(cfg, spec), pg.build_discriminator(cfg, spec)
    for net in (G, D):
        net.set_lod(8, 0.5)
    return local_context(G, D, "progan", num_classes, opt=AdamConfig(lr=1e-3, betas=(0.0, 0.99)))


@pytest.mark.parametrize("ac_weight", [0.0, 1.0])
def test_acgan_term_trains_the_class_outputs_only_when_on(ac_weight):
    """D's class logits (the rows of its last dense layer after the first) get gradients from the AC-GAN
    term and from nothing else; the term is cross-entropy against the labels."""
    ctx, caps = _tiny_conditional()
    cfg = LossConfig(kind="wgan", gp_weight=10, drift=0.001, ac_weight=ac_weight)
    real = pg.blend_reals(torch.rand(8, 1, 16, 16) * 2 - 1, 8, 0.5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    captured = {}
    last = ctx.raw["D"].epilogue.dense1.weight
    last.register_hook(lambda g: captured.setdefault("grad", g.clone()))
    stats = run_d_phase(ctx, caps, cfg, real, labels)
    class_rows = captured["grad"][1:]
    assert ("loss/D_ac" in stats) == bool(ac_weight) and "reg/gp" in stats
    assert (class_rows.abs().sum() > 0) == bool(ac_weight)
    stats = run_g_phase(ctx, caps, cfg, [8])
    assert ("loss/G_ac" in stats) == bool(ac_weight)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(1 / 3)) / 2
    assert float(class_loss(logits, torch.tensor([0, 2]))) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------
# In the loop.


def growing_config(shards: Path, **train_section) -> dict:
    """A tiny conditional ProGAN growing 4×4 → 16×16 (conftest's schedule) with the paper's WGAN-GP, drift and
    AC-GAN terms."""
    loss = {"kind": "wgan", "gp_weight": 10, "drift": 0.001, "ac_weight": 1.0}
    return shared_growing_config(shards, TINY_MODEL, loss, **train_section)


def test_resume_in_the_middle_of_fade_ins_reaches_the_same_weights(digits16, tmp_path):
    """Interrupted in the 8×8 fade-in (step 10, α = 0.75) and again in the 16×16 one (step 22, α = 0.5),
    the run ends bit-identical to an uninterrupted one; the checkpoints hold the schedule and an Adam
    reset at the fade-in's start."""
    whole = train(validate_config(growing_config(digits16), "whole"), tmp_path / "whole")
    assert whole.step == 28
    run = tmp_path / "parts"
    train(validate_config(growing_config(digits16, stop_at_step=10), "a"), run)
    mid = load_checkpoint(run / "checkpoints" / "ckpt-000000010")
    assert mid["growth"] == {"resolution": 8, "alpha": 0.75, "level_img": 48}
    # Adam was reset after step 4, when the 8×8 fade-in started: 6 steps since.
    assert {int(s["step"]) for s in mid["optimizers"]["D"]["state"].values()} == {6}
    assert mid["optimizers"]["G"]["param_groups"][0]["lr"] == 0.001
    train(validate_config(growing_config(digits16, stop_at_step=22), "b"), run, resume="auto")
    assert load_checkpoint(run / "checkpoints" / "ckpt-000000022")["growth"]["alpha"] == 0.5
    parts = train(validate_config(growing_config(digits16), "c"), run, resume="auto")
    assert parts.step == 28 and parts.nimg == whole.nimg == 320
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(parts.checkpoint)
    assert_same_nets(a, b)
    assert a["growth"] == b["growth"] == {"resolution": 16, "alpha": 1.0, "level_img": 128}
    assert b["optimizers"]["G"]["param_groups"][0]["lr"] == 0.002  # growth.lr at 16×16

    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss/D" in r]
    per_level = {int(r["growth/resolution"]): r for r in rows}
    assert sorted(per_level) == [4, 8, 16]
    steps_at = {res: sum(1 for r in rows if r["growth/resolution"] == res) for res in (4, 8, 16)}
    assert steps_at == {4: 3, 8: 16, 16: 9}  # rows are logged after the step's advance
    assert [r["lr/D"] for r in rows][-1] == 0.002 and rows[5]["lr/D"] == 0.001
    assert {"loss/D_ac", "loss/G_ac", "reg/gp", "growth/alpha"} <= set(rows[-1])
    assert all(math.isfinite(r["loss/D"]) for r in rows)
    for res in (4, 8, 16):  # a grid per resolution, rendered at that resolution
        grid = Image.open(tmp_path / "whole" / "samples" / f"level-{res:04d}px.png")
        assert grid.width == 4 * (res + 1) + 1  # 4 columns of res px with 1 px padding


def test_generate_from_a_mid_growth_checkpoint_renders_its_level(digits16, tmp_path):
    from orchestrator.checkpoint import load_generator
    from orchestrator.eval.evaluator import EvalConfig, EvalError, evaluate_checkpoint
    from orchestrator.eval.extractors import train_feature_extractor

    result = train(validate_config(growing_config(digits16, stop_at_step=10), "a"), tmp_path / "r")
    loaded = load_generator(result.checkpoint)
    G, spec = loaded.G, loaded.spec
    assert (G.current_resolution, G.alpha) == (8, 0.75) and spec.resolution == 16
    assert G(torch.randn(2, G.z_dim), torch.tensor([1, 2])).shape == (2, 1, 8, 8)
    with pytest.raises(EvalError, match="grown to 8×8 of 16×16"):
        train_feature_extractor(str(digits16 / "train-*.tar"), tmp_path / "cnn.pt", epochs=1)
        evaluate_checkpoint(
            result.checkpoint,
            EvalConfig(
                feature_extractor="dataset-cnn",
                weights_path=str(tmp_path / "cnn.pt"),
                cache_dir=str(tmp_path / "cache"),
            ),
        )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"arch": "dcgan", "z_dim": 8, "g_channels": 4, "d_channels": 4}}, "growth: progressive growing"),
        ({"distributed": {"strategy": "deepspeed"}}, "distributed.strategy: deepspeed"),
        ({"distributed": {"strategy": "ddp"}}, "distributed.find_unused_parameters"),
        ({"loss": {"kind": "wgan", "ac_weight": 0.0}}, "loss.ac_weight: 0"),
    ],
)
def test_recipe_rules_fail_before_training(digits16, tmp_path, change, message):
    raw = growing_config(digits16)
    raw.update(change)
    with pytest.raises(ConfigError, match=message):
        train(validate_config(raw, "rules"), tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_acgan_weight_needs_a_classifying_discriminator(digits16, tmp_path):
    raw = tiny_config(digits16, loss={"ac_weight": 1.0})
    with pytest.raises(ConfigError, match="loss.ac_weight: 1.0 needs a class-conditional D"):
        train(validate_config(raw, "ac"), tmp_path / "r")


# ---------------------------------------------------------------------------------------------------
# Presets.


def test_celebahq_preset_is_the_official_network_and_schedule():
    cfg = load_config(CONFIGS / "celebahq-1024.yaml")
    spec = ImageSpec(cfg.data.resolution, cfg.data.channels, cfg.data.num_classes)
    arch = architectures.get("progan")
    with torch.device("meta"):
        G, D = arch.build_generator(cfg.model, spec), arch.build_discriminator(cfg.model, spec)
    # official: every level's ToRGB / FromRGB, as G_paper / D_paper hold and print them (per-layer sources in
    # tests/test_progan_networks.py: D is StyleGAN v1's D_basic printout, total 23,087,249)
    assert (count_params(G), count_params(D)) == (23_079_115, 23_087_249)
    # ganforge's own arithmetic, not an official figure: the final level's ToRGB / FromRGB only
    assert (pg.count_params_final_level(G), pg.count_params_final_level(D)) == (23_071_507, 23_077_137)
    g = cfg.growth
    assert (g.training_kimg, g.transition_kimg, cfg.loss.gp_weight, cfg.loss.drift) == (600, 600, 10, 0.001)
    assert cfg.distributed.find_unused_parameters and cfg.distributed.strategy == "ddp"
    growth = Growth(g, cfg.model.start_resolution, spec.resolution)
    assert growth.batch_size(cfg.train.batch_size) == 512  # the official minibatch_dict at 4×4


def test_dev_preset_grows_through_every_resolution_from_the_cli(digits16, tmp_path):
    """``ganforge train configs/progan/dev.yaml`` on a shortened schedule: 4 → 8 → 16 with a grid each."""
    run = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "ganforge"),
        "train",
        str(CONFIGS / "dev.yaml"),
        "--run-dir",
        str(run),
        "--set",
        f"data.shards={digits16}/train-*.tar",
        "--set",
        "growth.training_kimg=0.128",
        "--set",
        "growth.transition_kimg=0.128",
        "--set",
        "train.total_kimg=0.768",
        "--set",
        "tracking.progress_bar=false",
        "--set",
        "tracking.wandb.mode=disabled",
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "growing to 8×8" in p.stdout and "growing to 16×16" in p.stdout
    sizes = {res: Image.open(run / "samples" / f"level-{res:04d}px.png").size for res in (4, 8, 16)}
    assert sizes[4][0] < sizes[8][0] < sizes[16][0]
    final = load_checkpoint(sorted((run / "checkpoints").glob("ckpt-*"))[-1])
    assert final["growth"]["resolution"] == 16 and final["growth"]["alpha"] == 1.0
