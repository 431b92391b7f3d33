"""StyleGAN2's training recipe in the loop: path length, style mixing, w_avg tracking, lazy intervals,
the shipped presets, and the CPU dev preset (train, exact resume, truncated sampling)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_same_nets,
    local_context,
    preset_config,
    run_d_phase,
    run_g_phase,
    tiny_config,
    tiny_stylegan2,
)

import architectures
from architectures import ImageSpec, count_params
from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import ConfigError, load_config, validate_config
from orchestrator.losses import LossConfig, path_length_penalty
from orchestrator.recipes.noise_to_image import RegState, g_pl_phase
from orchestrator.recipes.recipe import run_phase
from orchestrator.train.run import train

CONFIGS = Path(__file__).parents[1] / "configs" / "stylegan2"


def test_path_length_penalty_matches_a_hand_computation():
    torch.manual_seed(0)
    n, num_ws, w_dim, h = 3, 4, 5, 2
    M = torch.randn(num_ws * w_dim, h * h, requires_grad=True)  # the "generator's weights"
    ws = torch.randn(n, num_ws, w_dim, requires_grad=True)
    img = (ws.flatten(1) @ M).view(n, 1, h, h)  # a linear "synthesis": its Jacobian is M
    noise = torch.randn(n, 1, h, h) / math.sqrt(h * h)
    pl_mean = torch.tensor(0.7)
    penalty, new_mean = path_length_penalty(img, ws, pl_mean, decay=0.01, noise=noise)
    jt_y = (noise.flatten(1) @ M.detach().T).view(n, num_ws, w_dim)  # J_wᵀ y per image
    lengths = jt_y.square().sum(2).mean(1).sqrt()
    expected_mean = 0.7 + 0.01 * (lengths.mean() - 0.7)
    assert torch.allclose(new_mean, expected_mean)
    assert torch.allclose(penalty, (lengths - expected_mean).square())
    penalty.sum().backward()  # differentiable w.r.t. the generator's weights (double backward)
    assert M.grad is not None and M.grad.abs().sum() > 0


def test_phases_track_w_avg_in_the_d_pass_and_update_pl_mean():
    G, D = tiny_stylegan2(mapping_layers=2, conv_clamp=None)
    ctx, caps = local_context(G, D, "stylegan2", sampler_seed=0)
    cfg = LossConfig(style_mixing_prob=0.9, pl_weight=2.0)
    w_avg = G.mapping.w_avg.clone()
    run_g_phase(ctx, caps, cfg, [4])
    assert torch.equal(G.mapping.w_avg, w_avg)  # the G pass leaves w_avg alone
    run_d_phase(ctx, caps, cfg, torch.rand(4, 1, 8, 8) * 2 - 1)
    assert not torch.equal(G.mapping.w_avg, w_avg)  # the D pass's fakes update it, as the official loss
    reg = RegState(pl_mean=torch.zeros([]))
    before = [p.clone() for p in G.parameters()]
    phase = g_pl_phase(cfg, reg)
    stats = run_phase(phase, ctx, phase.inputs(ctx, {}, 4), [4]).stats
    assert reg.pl_mean > 0 and torch.equal(stats["reg/pl_mean"], reg.pl_mean)
    assert any(not torch.equal(a, b) for a, b in zip(before, G.parameters()))


def test_recipe_needs_a_mapping_network(digits16, tmp_path):
    cfg = validate_config(tiny_config(digits16, loss={"pl_weight": 2.0}), "test")
    with pytest.raises(ConfigError, match="loss.pl_weight: 2.0 needs a generator with a mapping network"):
        train(cfg, tmp_path)


# The official networks' counts: NVlabs/stylegan2-ada-pytorch training/networks.py built as train.py's
# cfg_specs 'stylegan2', 'paper256' and 'cifar' say (sources in tests/test_stylegan2_networks.py).
@pytest.mark.parametrize(
    "name, classes, g, d",
    [
        pytest.param("config-f-1024", None, 30_370_060, 29_012_513, id="official-cfg-stylegan2-1024"),
        pytest.param("paper256", None, 24_767_458, 24_001_089, id="official-cfg-paper256"),
        pytest.param("cifar", None, 20_215_315, 23_089_664, id="official-cfg-cifar-cond"),
        pytest.param("cifar", 0, 19_947_539, 20_720_641, id="official-cfg-cifar-uncond"),
    ],
)
def test_shipped_presets_have_the_official_parameter_counts(name, classes, g, d):
    cfg = load_config(CONFIGS / f"{name}.yaml", [] if classes is None else [f"data.num_classes={classes}"])
    d_cfg = cfg.data
    spec = ImageSpec(d_cfg.resolution, d_cfg.channels, d_cfg.num_classes)
    arch = architectures.get(cfg.model.arch)
    with torch.device("meta"):
        assert count_params(arch.build_generator(cfg.model, spec)) == g
        assert count_params(arch.build_discriminator(cfg.model, spec)) == d


def test_presets_follow_the_official_recipes():
    f = load_config(CONFIGS / "config-f-1024.yaml")
    assert (f.loss.r1_gamma, f.loss.r1_interval, f.loss.pl_weight, f.loss.pl_interval, f.loss.style_mixing_prob) == (
        10,
        16,
        2,
        4,
        0.9,
    )
    assert (f.optim.g.lr, f.optim.g.betas, f.ema.half_life_kimg, f.train.batch_size) == (0.002, (0.0, 0.99), 10, 32)
    c = load_config(CONFIGS / "cifar.yaml")
    assert (c.loss.pl_weight, c.loss.style_mixing_prob, c.model.d_architecture, c.model.mapping_layers) == (
        0,
        0,
        "orig",
        2,
    )
    assert (c.loss.r1_gamma, c.ema.half_life_kimg, c.ema.rampup, c.model.mbstd_group_size) == (0.01, 500, 0.05, 32)


def dev_config(shards: Path, **extra):
    return preset_config(CONFIGS / "dev.yaml", shards, **extra)


def test_dev_preset_trains_resumes_exactly_and_samples_with_truncation(digits16, tmp_path):
    # 10 steps of 32 images: R1 on steps 0 (lazy, every 16 D steps), path length on G steps 0, 4, 8.
    straight = train(dev_config(digits16, **{"train.total_kimg": 0.32}), tmp_path / "straight")
    train(dev_config(digits16, **{"train.total_kimg": 0.32, "train.stop_at_step": 5}), tmp_path / "resumed")
    resumed = train(dev_config(digits16, **{"train.total_kimg": 0.32}), tmp_path / "resumed", resume="auto")
    assert straight.step == resumed.step == 10
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert_same_nets(a, b)
    assert torch.equal(a["recipe.reg"]["pl_mean"], b["recipe.reg"]["pl_mean"]) and a["recipe.reg"]["pl_mean"] > 0
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows(tmp_path / "straight")] and [
        (r["step"], r["loss/D"], r["loss/G"]) for r in rows(tmp_path / "straight")
    ] == [(r["step"], r["loss/D"], r["loss/G"]) for r in rows(tmp_path / "resumed")]
    assert sum("reg/pl_penalty" in r for r in rows(tmp_path / "straight")) == 3
    assert sum("reg/r1" in r for r in rows(tmp_path / "straight")) == 1

    from orchestrator.checkpoint import load_generator
    from orchestrator.tools.generate import generate

    paths = generate(resumed.checkpoint, tmp_path / "gen", num=4, seed=0, truncation=0.7, class_index=3)
    assert len(paths) == 5 and all(p.exists() for p in paths)
    G = load_generator(resumed.checkpoint).G
    z = torch.randn(2, G.z_dim)
    c = torch.tensor([3, 3])
    w_trunc0 = G.mapping(z, c, truncation_psi=0.0)
    assert torch.allclose(w_trunc0, G.mapping.w_avg.expand_as(w_trunc0))  # ψ = 0 collapses to w_avg


def test_lazy_path_length_corrects_g_adam(digits16, tmp_path):
    cfg = dev_config(digits16, **{"train.total_kimg": 0.032})
    train(cfg, tmp_path)
    state = load_checkpoint(next((tmp_path / "checkpoints").iterdir()))
    assert state["optimizers"]["G"]["param_groups"][0]["lr"] == pytest.approx(0.0025 * 4 / 5)
    assert state["optimizers"]["D"]["param_groups"][0]["lr"] == pytest.approx(0.0025 * 16 / 17)
