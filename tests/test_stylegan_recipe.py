"""StyleGAN (v1) in the loop: the noise → image recipe with progressive growing, style mixing and w_avg
tracking, exact resume in the middle of a fade-in, and the shipped presets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from conftest import assert_same_nets, preset_config
from conftest import growing_config as shared_growing_config

import architectures
from architectures.registry import count_params
from core.spec import ImageSpec
from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import load_config, validate_config
from orchestrator.growth import Growth
from orchestrator.train.run import train

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs" / "stylegan"
TINY_MODEL = {
    "arch": "stylegan", "z_dim": 8, "w_dim": 8, "mapping_layers": 2, "fmap_base": 64, "fmap_max": 16,
    "mbstd_group_size": 4, "start_resolution": 4,
}  # fmt: skip


def growing_config(shards: Path, **train_section) -> dict:
    """A tiny StyleGAN growing 4×4 → 16×16 (conftest's schedule) with R1 and style mixing."""
    loss = {"kind": "nonsaturating", "r1_gamma": 1.0, "r1_interval": 1, "style_mixing_prob": 0.9}
    return shared_growing_config(shards, TINY_MODEL, loss, **train_section)


def test_dev_preset_trains_two_steps_into_a_fade_in_with_style_mixing_and_w_avg(digits16, tmp_path):
    """The shipped dev preset, shortened to 2 steps: one at 4×4 (batch 64), one at the start of the 8×8 fade-in
    (batch 32). Preflight accepts growth for the family; G's w_avg moved (update_emas under growth) and
    G_ema holds G's buffers."""
    cfg = preset_config(
        CONFIGS / "dev.yaml",
        digits16,
        **{"growth.training_kimg": 0.064, "growth.transition_kimg": 0.064, "train.total_kimg": 0.096},
    )
    assert cfg.model.arch == "stylegan" and cfg.loss.style_mixing_prob == 0.9
    result = train(cfg, tmp_path / "run")
    assert result.step == 2 and result.nimg == 96
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt["growth"] == {"resolution": 8, "alpha": 0.5, "level_img": 32}
    w_avg = ckpt["G"]["mapping.w_avg"]
    assert w_avg.abs().sum() > 0 and torch.equal(ckpt["G_ema"]["mapping.w_avg"], w_avg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss/D" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss/D"]) and math.isfinite(r["loss/G"]) for r in rows)
    assert "reg/r1" in rows[-1]  # R1 on every D step (D_logistic_simplegp)


def test_resume_in_the_middle_of_fade_ins_reaches_the_same_weights(digits16, tmp_path):
    """Interrupted in the 8×8 fade-in (step 10, α = 0.75) and in the 16×16 one (step 22, α = 0.5), the run
    ends bit-identical to an uninterrupted one: G (with w_avg and the const noise), D and G_ema."""
    whole = train(validate_config(growing_config(digits16), "whole"), tmp_path / "whole")
    assert whole.step == 28
    run = tmp_path / "parts"
    train(validate_config(growing_config(digits16, stop_at_step=10), "a"), run)
    mid = load_checkpoint(run / "checkpoints" / "ckpt-000000010")
    assert mid["growth"] == {"resolution": 8, "alpha": 0.75, "level_img": 48}
    train(validate_config(growing_config(digits16, stop_at_step=22), "b"), run, resume="auto")
    assert load_checkpoint(run / "checkpoints" / "ckpt-000000022")["growth"]["alpha"] == 0.5
    parts = train(validate_config(growing_config(digits16), "c"), run, resume="auto")
    assert parts.step == 28 and parts.nimg == whole.nimg == 320
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(parts.checkpoint)
    assert_same_nets(a, b)
    assert a["growth"] == b["growth"] == {"resolution": 16, "alpha": 1.0, "level_img": 128}
    assert a["G"]["mapping.w_avg"].abs().sum() > 0


def test_ffhq_preset_is_the_official_network_and_schedule():
    """configs/stylegan/ffhq-1024.yaml: NVlabs/stylegan ``train.py`` (8 GPUs) and ``networks_stylegan.py``."""
    cfg = load_config(CONFIGS / "ffhq-1024.yaml")
    spec = ImageSpec(cfg.data.resolution, cfg.data.channels, cfg.data.num_classes)
    arch = architectures.get("stylegan")
    with torch.device("meta"):
        G, D = arch.build_generator(cfg.model, spec), arch.build_discriminator(cfg.model, spec)
    assert (count_params(G), count_params(G.mapping), count_params(D)) == (26_219_627, 2_101_248, 23_087_249)
    g = cfg.growth
    assert (g.training_kimg, g.transition_kimg, cfg.model.start_resolution, cfg.train.total_kimg) == (
        600,
        600,
        8,
        25000,
    )
    assert (cfg.loss.kind, cfg.loss.r1_gamma, cfg.loss.r1_interval, cfg.loss.style_mixing_prob) == (
        "nonsaturating", 10, 1, 0.9,
    )  # fmt: skip
    assert cfg.loss.pl_weight == 0 and cfg.ema.half_life_kimg == 10 and cfg.data.mirror
    assert cfg.optim.g.betas == (0.0, 0.99) and cfg.optim.g.eps == 1e-8
    growth = Growth(g, cfg.model.start_resolution, spec.resolution)
    assert growth.resolution == 8 and growth.batch_size(cfg.train.batch_size) == 256 and growth.lr(0.001) == 0.001
    growth.resolution = 1024
    assert growth.batch_size(cfg.train.batch_size) == 32 and growth.lr(0.001) == 0.003
