"""The classic stability toolkit of the noise → image recipe: WGAN weight clipping with RMSProp, one-sided
label smoothing, instance norm in the DCGAN D, and the TTUR and WGAN-clip dev presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_nets, local_context, no_augment, preset_config, run_d_phase

import architectures
from core.spec import ImageSpec
from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import ConfigError, load_config
from orchestrator.losses import LossConfig, d_loss, g_loss
from orchestrator.optim import AdamConfig, lr_ratio, make_optimizer
from orchestrator.train.run import train

ROOT = Path(__file__).resolve().parents[1]
WGAN_CLIP = ROOT / "configs/dev/wgan-clip-digits.yaml"
TTUR = ROOT / "configs/dev/dcgan-digits-ttur.yaml"


def tiny_dcgan(**model):
    """G and D of a tiny DCGAN for 16×16 grey images, seeded."""
    arch = architectures.get("dcgan")
    cfg = arch.config(arch="dcgan", z_dim=8, g_channels=8, d_channels=8, **model)
    spec = ImageSpec(16, 1, 0)
    torch.manual_seed(0)
    return arch.build_generator(cfg, spec), arch.build_discriminator(cfg, spec)


# ---------------------------------------------------------------------------------------------------
# WGAN with weight clipping (Arjovsky et al. 2017, Algorithm 1).


def test_clipping_bounds_every_d_weight_after_each_d_step_and_leaves_g_alone():
    G, D = tiny_dcgan()
    ctx, caps = local_context(G, D, "dcgan", opt=AdamConfig(lr=0.5))
    G0 = [p.detach().clone() for p in G.parameters()]  # parameters: the D phase's fakes move G's BN statistics
    cfg = LossConfig(kind="wgan", clip=0.01)
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    for _ in range(2):
        run_d_phase(ctx, caps, cfg, real)
        assert all(p.abs().max() <= 0.01 for p in D.parameters())
    assert max(p.abs().max().item() for p in D.parameters()) == pytest.approx(0.01)  # the huge lr reached the bound
    assert all(torch.equal(a, b) for a, b in zip(G0, G.parameters()))
    assert any(p.abs().max() > 0.01 for p in G.parameters())  # BatchNorm gains ≈ 1: G is not clipped


def test_clipping_also_follows_the_lazy_r1_phase():
    from orchestrator.recipes.noise_to_image import d_reg_phase
    from orchestrator.recipes.recipe import run_phase

    G, D = tiny_dcgan(norm="instance")
    ctx, _ = local_context(G, D, "dcgan", opt=AdamConfig(lr=0.5))
    cfg = LossConfig(kind="wgan", clip=0.01, r1_gamma=100.0, r1_interval=2)
    phase = d_reg_phase(cfg, no_augment())
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    run_phase(phase, ctx, {"img": real, "label": None}, [8])
    assert all(p.abs().max() <= 0.01 for p in D.parameters())


def test_rmsprop_has_the_configured_lr_no_momentum_and_no_lazy_correction():
    p = [torch.nn.Parameter(torch.zeros(3))]
    cfg = AdamConfig(kind="rmsprop", lr=5e-5)
    opt = make_optimizer(p, cfg, reg_interval=16)
    assert isinstance(opt, torch.optim.RMSprop)
    group = opt.param_groups[0]
    assert group["lr"] == 5e-5 and group["momentum"] == 0
    assert lr_ratio(cfg, 16) == 1.0 and lr_ratio(AdamConfig(), 16) == 16 / 17
    assert isinstance(make_optimizer(p, AdamConfig()), torch.optim.Adam)


def test_clip_is_refused_under_deepspeed(digits16, tmp_path):
    cfg = preset_config(
        WGAN_CLIP, digits16, **{"eval.enabled": "false", "train.batch_size": 16, "distributed.strategy": "deepspeed"}
    )
    with pytest.raises(ConfigError, match=r"loss.clip.*deepspeed"):
        train(cfg, tmp_path / "run")


# ---------------------------------------------------------------------------------------------------
# One-sided label smoothing (Salimans et al. 2016, section 3.4).


@pytest.mark.parametrize("kind", ["minimax", "nonsaturating"])
def test_label_smoothing_changes_only_the_real_term(kind):
    real = torch.tensor([-2.0, 0.0, 0.5, 3.0])
    fake = torch.tensor([-1.0, 0.3, 2.0, -4.0], requires_grad=True)
    s = 0.1
    smoothed = d_loss(kind, real, fake, smoothing=s)
    by_hand = (s * F.softplus(real) + (1 - s) * F.softplus(-real)).mean() + F.softplus(fake).mean()
    assert smoothed.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert smoothed.item() != pytest.approx(d_loss(kind, real, fake).item(), rel=1e-4)
    # the fake term's gradient and G's loss are those of the unsmoothed loss
    (g_smooth,) = torch.autograd.grad(smoothed, fake)
    (g_plain,) = torch.autograd.grad(d_loss(kind, real, fake), fake)
    assert torch.equal(g_smooth, g_plain)


def test_label_smoothing_reaches_the_d_phase():
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    losses = []
    for s in (0.0, 0.3):
        G, D = tiny_dcgan()
        ctx, caps = local_context(G, D, "dcgan", opt=AdamConfig(lr=1e-12))
        losses.append(run_d_phase(ctx, caps, LossConfig(kind="nonsaturating", label_smoothing=s), real)["loss/D"])
    assert losses[0] != losses[1]


@pytest.mark.parametrize("kind", ["hinge", "wgan", "lsgan"])
def test_label_smoothing_is_refused_without_a_cross_entropy(kind):
    with pytest.raises(ConfigError, match=r"label_smoothing.*set it to 0"):
        load_config(TTUR, [f"loss.kind={kind}", "loss.label_smoothing=0.1"])


def test_g_loss_has_no_smoothing():
    fake = torch.tensor([-1.0, 0.3, 2.0])
    assert g_loss("nonsaturating", fake) == F.softplus(-fake).mean()


# ---------------------------------------------------------------------------------------------------
# Instance norm in the DCGAN D.


def test_batch_norm_stays_the_default_with_the_same_parameters():
    _, D_default = tiny_dcgan()
    _, D_batch = tiny_dcgan(norm="batch")
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(D_default) == count(D_batch)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in D_default.modules())


@pytest.mark.parametrize("norm", ["instance", "none"])
def test_a_d_without_batch_norm_scores_each_image_on_its_own(norm):
    G, D = tiny_dcgan(norm=norm)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in D.modules())
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in D.modules()) == (norm == "instance")
    D.train()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    y = x.clone()
    y[0] = torch.rand(1, 16, 16)
    a, b = D(x), D(y)
    assert a[0] != b[0]
    assert torch.allclose(a[1:], b[1:], atol=0, rtol=0)


def test_batch_norm_d_does_depend_on_the_batch():
    _, D = tiny_dcgan()
    D.train()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    y = x.clone()
    y[0] = torch.rand(1, 16, 16)
    assert not torch.equal(D(x)[1:], D(y)[1:])  # the test above would see batch dependence


# ---------------------------------------------------------------------------------------------------
# The presets.


def dev(path: Path, shards: Path, **extra):
    return preset_config(path, shards, **{"eval.enabled": "false", "train.batch_size": 16, **extra})


def test_ttur_preset_sets_a_faster_d():
    cfg = load_config(TTUR)
    assert (cfg.optim.d.lr, cfg.optim.g.lr) == (4e-4, 1e-4)
    assert cfg.optim.d.betas == cfg.optim.g.betas == (0.5, 0.999) and cfg.optim.d.kind == "adam"


def test_wgan_clip_preset_is_the_papers_algorithm():
    cfg = load_config(WGAN_CLIP)
    assert (cfg.loss.kind, cfg.loss.d_steps, cfg.loss.clip) == ("wgan", 5, 0.01)
    assert cfg.optim.d.kind == cfg.optim.g.kind == "rmsprop" and cfg.optim.d.lr == cfg.optim.g.lr == 5e-5


def test_ttur_preset_trains_two_steps(digits16, tmp_path):
    res = train(dev(TTUR, digits16, **{"train.stop_at_step": 2}), tmp_path / "ttur")
    assert res.step == 2


def test_wgan_clip_preset_resumes_exactly_with_every_d_weight_clipped(digits16, tmp_path):
    # 4 steps of 5 D steps × 16 images = 0.32 kimg; a checkpoint at step 2 (0.16 kimg)
    straight = train(dev(WGAN_CLIP, digits16, **{"train.total_kimg": 0.32}), tmp_path / "straight")
    train(dev(WGAN_CLIP, digits16, **{"train.total_kimg": 0.32, "train.stop_at_step": 2}), tmp_path / "resumed")
    resumed = train(dev(WGAN_CLIP, digits16, **{"train.total_kimg": 0.32}), tmp_path / "resumed", resume="auto")
    assert straight.step == resumed.step == 4
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert_same_nets(a, b)
    for opt in ("G", "D"):
        for pid, st in a["optimizers"][opt]["state"].items():
            assert all(torch.equal(st[k], b["optimizers"][opt]["state"][pid][k]) for k in st)
    assert all(v.abs().max() <= 0.01 for k, v in a["D"].items() if v.is_floating_point() and "running" not in k)
    assert a["progress"]["phases"] == {"D": 20, "G": 4}
