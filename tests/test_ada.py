"""ADA in training: the adaptive p (hand-computed steps, a stand-in D whose sign statistics we set), every image D
sees goes through the augmentation, p's schedule, and an exact resume with p included."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import local_context, run_d_phase, run_g_phase, tiny_config, tiny_stylegan2

from orchestrator.augment.control import Augment, AugmentConfig, scheduled_p
from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import ConfigError, validate_config
from orchestrator.losses import LossConfig
from orchestrator.recipes.noise_to_image import d_reg_phase
from orchestrator.recipes.recipe import run_phase
from orchestrator.train.run import train

CPU = torch.device("cpu")


def logits_with(positive: int, negative: int) -> torch.Tensor:
    """Real logits of which ``positive`` are > 0 and ``negative`` < 0."""
    return torch.cat([torch.full([positive], 2.0), torch.full([negative], -3.0)])


def test_adaptive_p_moves_by_the_official_formula():
    """p += sign(r_t − target) · batch · interval / (speed_kimg · 1000) at steps 0, 4, 8 … with r_t from the
    signs gathered since the previous adjustment; p never goes below 0 (hand-computed values)."""
    aug = Augment(AugmentConfig(kind="ada", target=0.6, interval=4, speed_kimg=1.0), CPU)
    step_size = 16 * 4 / 1000
    aug.observe(logits_with(14, 2))  # step 0: r_t = 12/16 = 0.75 > 0.6
    stats = aug.end_step(0, 16, 16)
    assert stats["aug/rt"].item() == pytest.approx(0.75) and aug.p.item() == pytest.approx(step_size)
    for step in (1, 2, 3):  # gathered, not yet applied
        aug.observe(logits_with(4, 12))
        assert aug.end_step(step, 16, 16 * (step + 1))["aug/p"].item() == pytest.approx(step_size)
    aug.observe(logits_with(4, 12))  # steps 1-4: r_t = 4 · (4 − 12) / 64 = −0.5 < 0.6
    stats = aug.end_step(4, 16, 80)
    assert stats["aug/rt"].item() == pytest.approx(-0.5) and aug.p.item() == pytest.approx(0.0)
    for step in range(5, 9):
        aug.observe(logits_with(0, 16))
        aug.end_step(step, 16, 16 * (step + 1))
    assert aug.p.item() == 0.0  # clamped at 0, not −0.064


def test_adaptive_p_settles_where_the_stand_in_d_meets_the_target():
    """A stand-in D whose r_t falls as p rises (r_t = 0.9 − p) drives p up from 0 to 0.3 and holds it there."""
    aug = Augment(AugmentConfig(kind="ada", target=0.6, interval=4, speed_kimg=2.0), CPU)
    step_size, batch, history = 64 * 4 / 2000, 64, []
    for step in range(400):
        rt = 0.9 - aug.p.item()
        positive = round((1 + rt) / 2 * batch)
        aug.observe(logits_with(positive, batch - positive))
        aug.end_step(step, batch, batch * (step + 1))
        history.append(aug.p.item())
    assert history[:12] == sorted(history[:12]) and history[11] > history[0]  # rising from 0 at first
    assert all(abs(p - 0.3) <= 2 * step_size for p in history[-100:])


def test_fixed_and_scheduled_p():
    fixed = Augment(AugmentConfig(kind="ada", adjust="fixed", p=0.25), CPU)
    fixed.observe(logits_with(12, 4))
    stats = fixed.end_step(0, 16, 16)  # r_t is measured and logged, p stays
    assert stats["aug/p"].item() == 0.25 and stats["aug/rt"].item() == 0.5
    diffaugment = Augment(AugmentConfig(kind="diffaugment"), CPU)
    diffaugment.observe(logits_with(4, 12))
    assert {k: v.item() for k, v in diffaugment.end_step(0, 16, 16).items()} == {"aug/p": 1.0, "aug/rt": -0.5}
    points = [(0.0, 0.0), (10.0, 0.5), (20.0, 0.5), (30.0, 0.0)]
    assert [scheduled_p(points, k) for k in (0, 5, 10, 15, 25, 40)] == [0.0, 0.25, 0.5, 0.5, 0.25, 0.0]
    scheduled = Augment(AugmentConfig(kind="ada", adjust="schedule", schedule=points), CPU)
    assert scheduled.end_step(0, 16, 5000)["aug/p"].item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="augment.schedule"):
        AugmentConfig(kind="ada", adjust="schedule", schedule=[(10.0, 0.5), (0.0, 0.1)])
    with pytest.raises(ValueError, match="augment.preset: unknown 'bgx'"):
        AugmentConfig(kind="ada", preset="bgx")
    with pytest.raises(ValueError, match=r"augment.policy: unknown DiffAugment policy item\(s\) \['flip'\]"):
        AugmentConfig(kind="diffaugment", policy="color,flip")


def test_p_and_the_gathered_signs_survive_a_state_round_trip():
    a = Augment(AugmentConfig(kind="ada", interval=4, speed_kimg=1.0), CPU)
    a.observe(logits_with(16, 0))
    a.end_step(0, 16, 16)
    a.observe(logits_with(3, 13))
    b = Augment(AugmentConfig(kind="ada", interval=4, speed_kimg=1.0), CPU)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.p, b.p) and torch.equal(a.signs, b.signs) and torch.equal(a.rt, b.rt)
    c = Augment(AugmentConfig(kind="ada", interval=4, speed_kimg=1.0), CPU)  # written by 3 workers, read by 1
    c.load_state_dict({**a.state_dict(), "signs_per_rank": [a.signs, a.signs, torch.zeros(2)]})
    assert torch.equal(c.signs, 2 * a.signs)


class Marking:
    """A stand-in augmentation that adds 1000 to every image, so that D can tell which inputs went through it."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1000

    def observe(self, logits: torch.Tensor) -> None:
        self.seen = logits.numel()


@pytest.mark.parametrize("with_r1", [False, True])
def test_every_image_d_sees_is_augmented(with_r1):
    """Reals, fakes, the reals of R1 (in D's pass and lazy), WGAN-GP's mixes and G's fakes all reach D through
    the augmentation (every image D gets is > 500 after the stand-in's +1000), and G's gradient flows through it."""
    G, D = tiny_stylegan2()
    ctx, caps = local_context(G, D, "stylegan2", sampler_seed=0)
    inputs = []
    D.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    aug, real = Marking(), torch.rand(4, 1, 8, 8) * 2 - 1
    run_d_phase(ctx, caps, LossConfig(r1_gamma=1.0 if with_r1 else 0.0, gp_weight=1.0), real, with_r1=with_r1, aug=aug)
    assert aug.seen == 4
    phase = d_reg_phase(LossConfig(r1_gamma=1.0, r1_interval=4), aug)
    run_phase(phase, ctx, phase.inputs(ctx, {"img": real, "label": None}, 4), [4])
    G_before = [p.clone() for p in G.parameters()]
    run_g_phase(ctx, caps, LossConfig(), [4], aug=aug)
    assert len(inputs) >= 5 and all(x.min() > 500 for x in inputs)
    assert any(not torch.equal(a, b) for a, b in zip(G_before, G.parameters()))


def _ada_run(shards, run_dir, resume=None, **train_extra):
    sections = dict(
        train={"total_kimg": 0.32, **train_extra},
        augment={"kind": "ada", "preset": "bgc", "interval": 2, "speed_kimg": 0.2, "target": 0.3},
        loss={"r1_gamma": 1.0, "r1_interval": 4},
    )
    return train(validate_config(tiny_config(shards, **sections), "test"), run_dir, resume=resume)


def test_a_run_with_ada_resumes_exactly_p_included(digits16, tmp_path):
    straight = _ada_run(digits16, tmp_path / "straight")
    assert _ada_run(digits16, tmp_path / "resumed", stop_at_step=9).step == 9
    resumed = _ada_run(digits16, tmp_path / "resumed", resume="auto")
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["recipe.augment"]["p"] > 0  # p moved, so the comparison means something
    sa, sb = a["recipe.augment"], b["recipe.augment"]
    assert torch.equal(sa["p"], sb["p"]) and torch.equal(sa["rt"], sb["rt"])
    assert all(torch.equal(x, y) for x, y in zip(sa["signs_per_rank"], sb["signs_per_rank"], strict=True))
    for net in ("G", "D", "G_ema"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net
    rows = lambda d: [(r["step"], r["aug/p"], r.get("aug/rt")) for r in map(json.loads, open(d / "metrics.jsonl"))]
    assert rows(tmp_path / "straight") == rows(tmp_path / "resumed")


def test_augment_config_errors_name_the_key(digits16):
    with pytest.raises(ConfigError, match="augment.kind"):
        validate_config(tiny_config(digits16, augment={"kind": "adaptive"}), "test")
