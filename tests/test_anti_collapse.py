"""The answers to mode collapse of the noise → image recipe: minibatch discrimination and feature matching
(Salimans et al. 2016), unrolled GAN (Metz et al. 2017) and PacGAN packing (Lin et al. 2018). Each is checked
against a hand computation or an independent reference (torch's own optimizers, finite differences), and
each resumes exactly."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_STYLEGAN2, assert_same_nets, local_context, no_augment, tiny_config

import architectures
from architectures.layers import MinibatchDiscrimination
from core.spec import ImageSpec
from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import ConfigError, validate_config
from orchestrator.losses import LossConfig, d_loss, feature_matching_loss, g_loss, pack
from orchestrator.optim import AdamConfig, make_optimizer
from orchestrator.recipes.noise_to_image import d_phase, g_phase
from orchestrator.recipes.recipe import Sampler, run_phase
from orchestrator.train.run import train
from orchestrator.unroll import lookahead

SPEC = ImageSpec(8, 1, 0)


def tiny(arch: str = "mlp", spec: ImageSpec = SPEC, dtype=torch.float32, **model):
    """G and D of a tiny ``arch`` for ``spec`` images, seeded."""
    family = architectures.get(arch)
    sizes = {"mlp": {"z_dim": 4, "hidden": 8, "layers": 1}, "dcgan": {"z_dim": 8, "g_channels": 8, "d_channels": 8}}
    cfg = family.config(arch=arch, **{**sizes[arch], **model})
    torch.manual_seed(0)
    G, D = family.build_generator(cfg, spec), family.build_discriminator(cfg, spec)
    return G.to(dtype), D.to(dtype)


@pytest.fixture
def float64():
    """Float64 by default (the sampler's latents too) for gradient comparisons; restored afterwards."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def images(n: int, seed: int = 3, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1).to(
        dtype
    )


# ---------------------------------------------------------------------------------------------------
# Minibatch discrimination (section 3.2).


def test_minibatch_discrimination_is_the_papers_sum_over_the_other_samples():
    layer = MinibatchDiscrimination(in_features=6, kernels=3, kernel_dim=2)
    f = torch.randn(5, 6)
    M = torch.einsum("na,ab->nb", f, layer.T.detach()).view(5, 3, 2)
    by_hand = torch.zeros(5, 3)
    for i in range(5):
        for j in range(5):
            if j != i:
                by_hand[i] += torch.exp(-(M[i] - M[j]).abs().sum(1))
    torch.testing.assert_close(layer(f), by_hand)
    assert sum(p.numel() for p in layer.parameters()) == 6 * 3 * 2  # T: A × B × C


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_minibatch_discrimination_makes_each_logit_depend_on_the_rest_of_the_batch(arch):
    spec = ImageSpec(16, 1, 0) if arch == "dcgan" else SPEC
    x = torch.rand(4, 1, spec.resolution, spec.resolution) * 2 - 1
    y = x.clone()
    y[0] = -y[0]
    for kernels, depends in ((0, False), (10, True)):
        _, D = tiny(arch, spec, mbdisc_kernels=kernels, **({"norm": "none"} if arch == "dcgan" else {}))
        a, b = D(x), D(y)
        assert a[0] != b[0]
        assert (not torch.equal(a[1:], b[1:])) == depends, f"{arch}, {kernels} kernels"


def test_minibatch_discrimination_adds_the_kernels_and_their_output_weights():
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    _, plain = tiny("mlp")
    _, mb = tiny("mlp", mbdisc_kernels=10, mbdisc_dim=5)
    assert count(mb) - count(plain) == 8 * 10 * 5 + 10  # T over the 8 hidden features, and a weight per kernel


# ---------------------------------------------------------------------------------------------------
# Feature matching (section 3.1).


def test_feature_matching_is_zero_for_identical_batches_and_the_mean_square_of_the_mean_gap():
    real = torch.randn(6, 3, 2, 2)
    assert feature_matching_loss(real, real.clone()) == 0
    fake = torch.randn(6, 3, 2, 2)
    gap = real.flatten(1).mean(0) - fake.flatten(1).mean(0)
    assert feature_matching_loss(real, fake).item() == pytest.approx(sum(gap.tolist()[i] ** 2 for i in range(12)) / 12)
    # only the means count: a permutation of the fake batch changes nothing
    assert feature_matching_loss(real, fake.flip(0)).item() == pytest.approx(feature_matching_loss(real, fake).item())


@pytest.mark.parametrize("mode", ["alone", "added"])
def test_feature_matching_g_phase_applies_the_gradient_of_the_papers_objective(mode, float64):
    G, D = tiny("mlp", dtype=torch.float64)
    ctx, caps = local_context(G, D, "mlp", opt=AdamConfig(lr=1e-12))
    cfg = LossConfig(feature_matching=mode, feature_matching_weight=0.5)
    real = images(6, dtype=torch.float64)
    phase = g_phase(cfg, caps, no_augment())
    data = phase.inputs(ctx, {"img": real, "label": None}, 6)
    stats = run_phase(phase, ctx, data, [6]).stats
    got = [p.grad.clone() for p in G.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in D.parameters())  # D is frozen in G's phase

    G.zero_grad()
    fake = G(data["z"])
    logits, f_fake = D(fake, return_features=True)
    f_real = D(real, return_features=True)[1].detach()
    objective = 0.5 * (f_real.mean(0) - f_fake.mean(0)).square().mean()
    if mode == "added":
        objective = objective + F.softplus(-logits).mean()
    objective.backward()
    for g, p in zip(got, G.parameters()):
        torch.testing.assert_close(g, p.grad)
    assert stats["loss/G_fm"].item() == pytest.approx(((f_real.mean(0) - f_fake.mean(0)).square().mean()).item())
    assert ("loss/G" in stats) == (mode == "added")


def test_feature_matching_needs_a_d_with_features(digits16, tmp_path):
    raw = tiny_config(digits16, "dcgan", loss={"feature_matching": "alone"}, data={"num_classes": 0})
    raw["model"] = dict(TINY_STYLEGAN2)
    with pytest.raises(ConfigError, match=r"loss.feature_matching.*stylegan2 D does not"):
        train(validate_config(raw, "fm"), tmp_path / "run")


# ---------------------------------------------------------------------------------------------------
# Unrolled GAN (Metz et al. 2017).


def d_objective(real, fake):
    return lambda D_k: d_loss("nonsaturating", D_k(real), D_k(fake))


@pytest.mark.parametrize("kind", ["adam", "rmsprop"])
def test_lookahead_steps_are_those_of_torchs_optimizer_and_leave_d_alone(kind):
    """k look-ahead steps from a D with optimizer state = a copy of D stepped k times by torch's own
    optimizer; D's parameters, BatchNorm statistics and optimizer state are bit for bit as before."""
    _, D = tiny("dcgan", ImageSpec(16, 1, 0), dtype=torch.float64)
    opt = make_optimizer(D.parameters(), AdamConfig(kind=kind, lr=1e-2, betas=(0.5, 0.99)), reg_interval=4)
    real, fake = images(8, 1, torch.float64).repeat(1, 1, 2, 2), images(8, 2, torch.float64).repeat(1, 1, 2, 2)
    for _ in range(2):  # some optimizer state to start the look-ahead from
        opt.zero_grad()
        d_objective(real, fake)(D).backward()
        opt.step()
    before = copy.deepcopy((D.state_dict(), opt.state_dict()))

    D_k = lookahead(D, opt, kind, d_objective(real, fake), steps=3)

    reference = copy.deepcopy(D)
    ref_opt = type(opt)(reference.parameters(), **{k: v for k, v in opt.defaults.items()})
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        ref_opt.zero_grad()
        d_objective(real, fake)(reference).backward()
        ref_opt.step()
    want = dict(reference.named_parameters())
    assert D_k.params.keys() == want.keys()
    for name, p in D_k.params.items():
        torch.testing.assert_close(p, want[name], msg=lambda m, name=name: f"{name}: {m}")
    assert any(not torch.equal(p, dict(D.named_parameters())[n]) for n, p in D_k.params.items())
    after = (D.state_dict(), opt.state_dict())
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    for pid, st in before[1]["state"].items():
        assert all(torch.equal(torch.as_tensor(st[k]), torch.as_tensor(after[1]["state"][pid][k])) for k in st)


def test_unrolled_g_gradient_is_the_derivative_of_the_loss_after_the_look_ahead(float64):
    """G's gradient from the unrolled phase against finite differences of ``G ↦ g_loss(D_K(G(z)))`` where D_K
    comes from torch's Adam stepping a copy of D on those fakes (float64): the dθ_D^K/dθ_G term is in."""
    G, D = tiny("mlp", dtype=torch.float64)
    opt_cfg = AdamConfig(lr=0.05, betas=(0.5, 0.9))
    ctx, caps = local_context(G, D, "mlp", opt=opt_cfg)
    real = images(6, dtype=torch.float64)
    warm = d_phase(LossConfig(), caps, False, no_augment())
    run_phase(warm, ctx, warm.inputs(ctx, {"img": real, "label": None}, 6), [6])  # Adam state to start from
    cfg = LossConfig(unroll_steps=2)
    phase = g_phase(cfg, caps, no_augment())
    data = phase.inputs(ctx, {"img": real, "label": None}, 6)
    G0 = copy.deepcopy(G.state_dict())
    run_phase(phase, ctx, data, [6])
    grad = [p.grad.clone() for p in G.parameters()]
    G.load_state_dict(G0)

    def loss_after_lookahead() -> float:
        with torch.no_grad():
            fake = G(data["z"])
        D_k = copy.deepcopy(D)
        adam = torch.optim.Adam(D_k.parameters())
        adam.load_state_dict(copy.deepcopy(ctx.strategy.optimizer("D").state_dict()))
        for _ in range(2):
            adam.zero_grad()
            d_objective(real, fake)(D_k).backward()
            adam.step()
        with torch.no_grad():
            return g_loss("nonsaturating", D_k(fake)).item()

    weight = next(G.parameters())
    for idx in [(0, 0), (3, 1), (5, 2)]:
        h = 1e-6
        with torch.no_grad():
            weight[idx] += h
        up = loss_after_lookahead()
        with torch.no_grad():
            weight[idx] -= 2 * h
        down = loss_after_lookahead()
        with torch.no_grad():
            weight[idx] += h
        assert grad[0][idx].item() == pytest.approx((up - down) / (2 * h), rel=1e-4, abs=1e-9)


def test_unrolled_gradient_differs_from_the_plain_one():
    grads = []
    for steps in (0, 3):
        G, D = tiny("mlp")
        ctx, caps = local_context(G, D, "mlp", opt=AdamConfig(lr=0.05))
        real = images(6)
        warm = d_phase(LossConfig(), caps, False, no_augment())
        run_phase(warm, ctx, warm.inputs(ctx, {"img": real, "label": None}, 6), [6])
        phase = g_phase(LossConfig(unroll_steps=steps), caps, no_augment())
        run_phase(phase, ctx, phase.inputs(ctx, {"img": real, "label": None}, 6), [6])
        grads.append(torch.cat([p.grad.flatten() for p in G.parameters()]))
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3)


def test_unroll_is_refused_under_deepspeed_and_with_clipping(digits16, tmp_path):
    raw = tiny_config(digits16, "mlp", loss={"unroll_steps": 2}, distributed={"strategy": "deepspeed"})
    with pytest.raises(ConfigError, match=r"loss.unroll_steps: 2.*deepspeed"):
        train(validate_config(raw, "ds"), tmp_path / "ds")
    raw = tiny_config(digits16, "mlp", loss={"unroll_steps": 2, "kind": "wgan", "clip": 0.01})
    with pytest.raises(ConfigError, match=r"loss.unroll_steps.*loss.clip"):
        train(validate_config(raw, "clip"), tmp_path / "clip")


# ---------------------------------------------------------------------------------------------------
# PacGAN (Lin et al. 2018).


def test_pack_concatenates_consecutive_images_along_channels():
    x = torch.arange(6 * 2 * 2 * 2, dtype=torch.float32).view(6, 2, 2, 2)
    p = pack(x, 3)
    assert p.shape == (2, 6, 2, 2)
    assert torch.equal(p[1], torch.cat([x[3], x[4], x[5]], dim=0))
    assert pack(x, 1) is x
    with pytest.raises(ValueError, match=r"loss.pack: 4.*6 images"):
        pack(x, 4)


def test_packed_d_phase_scores_packs_of_real_and_of_fake_images():
    """D has m× the input channels; the phase's loss is the loss of m-packs of the 8 reals and of 8 fresh fakes
    (4 real and 4 fake packs from one batch size), computed by hand from the same latents."""
    G, _ = tiny("mlp")
    _, D = tiny("mlp", replace(SPEC, channels=2))
    assert D.net[0].in_features == 2 * 8 * 8
    ctx, caps = local_context(G, D, "mlp", opt=AdamConfig(lr=1e-12))
    cfg = LossConfig(pack=2)
    real = images(8)
    z, _ = Sampler(G.z_dim, 0, torch.device("cpu"), torch.Generator().manual_seed(1)).latents(8)
    with torch.no_grad():
        by_hand = d_loss("nonsaturating", D(pack(real, 2)), D(pack(G(z), 2)))
    phase = d_phase(cfg, caps, False, no_augment())
    stats = run_phase(phase, ctx, phase.inputs(ctx, {"img": real, "label": None}, 8), [4, 4]).stats
    assert stats["loss/D"].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_pack_refuses_labels_and_micro_batches_that_do_not_split(digits16, tmp_path):
    raw = tiny_config(digits16, "mlp", loss={"pack": 2})
    with pytest.raises(ConfigError, match=r"loss.pack: 2.*data.num_classes"):
        train(validate_config(raw, "cond"), tmp_path / "cond")
    raw = tiny_config(digits16, "mlp", loss={"pack": 3}, data={"num_classes": 0})
    with pytest.raises(ConfigError, match=r"loss.pack: 3: each worker's micro-batch of 16"):
        train(validate_config(raw, "split"), tmp_path / "split")


# ---------------------------------------------------------------------------------------------------
# Each option in whole runs: it trains, and resumes exactly.

OPTIONS = {
    "pack": {"loss": {"pack": 2}},
    "minibatch_discrimination": {"model": {"mbdisc_kernels": 6, "mbdisc_dim": 3}},
    "feature_matching": {"loss": {"feature_matching": "added"}},
    "unrolled": {"loss": {"unroll_steps": 2}},
    "label_smoothing": {"loss": {"label_smoothing": 0.1}},
    "instance_norm_dcgan": {
        "model": {"arch": "dcgan", "z_dim": 16, "g_channels": 8, "d_channels": 8, "norm": "instance"}
    },
}


def option_config(shards, option: str, **train_section) -> dict:
    raw = tiny_config(shards, "mlp", data={"num_classes": 0}, train={"total_kimg": 0.064, **train_section})
    for section, values in OPTIONS[option].items():
        raw[section] = values if "arch" in values else {**raw.get(section, {}), **values}  # a whole other model
    return raw


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_each_option_resumes_exactly(digits16, tmp_path, option):
    # 4 steps of 16 images; a checkpoint at step 2
    straight = train(validate_config(option_config(digits16, option), "s"), tmp_path / "straight")
    train(validate_config(option_config(digits16, option, stop_at_step=2), "r"), tmp_path / "resumed")
    resumed = train(validate_config(option_config(digits16, option), "r"), tmp_path / "resumed", resume="auto")
    assert straight.step == resumed.step == 4
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert_same_nets(a, b)
    for opt in ("G", "D"):
        for pid, st in a["optimizers"][opt]["state"].items():
            assert all(torch.equal(st[k], b["optimizers"][opt]["state"][pid][k]) for k in st), (opt, pid)
