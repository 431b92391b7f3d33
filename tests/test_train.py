"""The training loop: tiny runs in fp32 and bf16, exact resume, checkpoints, losses and EMA math."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import local_context, run_d_phase, run_g_phase, tiny_config

from orchestrator.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_into,
    mark_best,
    save_checkpoint,
)
from orchestrator.config import ConfigError, validate_config
from orchestrator.ema import EMAConfig, ema_beta, update_ema
from orchestrator.losses import LossConfig, d_loss, g_loss, gradient_penalty, r1_penalty
from orchestrator.optim import AdamConfig, make_adam
from orchestrator.precision import make_precision
from orchestrator.train.run import train


def run(shards: Path, run_dir: Path, arch: str = "dcgan", resume: str | None = None, **sections):
    cfg = validate_config(tiny_config(shards, arch, **sections), source="test")
    return train(cfg, run_dir, resume=resume)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
def test_tiny_run_fp32(digits16, tmp_path, arch):
    res = run(digits16, tmp_path / arch, arch)
    assert res.step == 10 and res.nimg == 160
    rows = metrics(tmp_path / arch)
    assert [r["step"] for r in rows] == list(range(1, 11))
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss/D", "loss/G", "D/real", "D/fake"))
    assert rows[0]["loss/D"] != rows[-1]["loss/D"]
    assert res.checkpoint == tmp_path / arch / "checkpoints" / "ckpt-000000010"
    assert res.grid.exists() and (tmp_path / arch / "config.yaml").exists()
    state = load_checkpoint(res.checkpoint)
    assert set(state) >= {"G", "D", "G_ema", "optimizers", "progress", "sampler", "ranks", "meta"}
    assert set(state["optimizers"]) == {"scaler", "G", "D"} and set(state["ranks"][0]) >= {"data", "torch_rng"}
    assert state["progress"] == {"step": 10, "nimg": 160, "phases": {"D": 10, "G": 10}}


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
def test_tiny_run_bf16_autocast(digits16, tmp_path, arch):
    # bf16 is ~60× slower than fp32 on this CPU: a few steps of a tiny model prove the path.
    res = run(digits16, tmp_path / arch, arch, train={"precision": "bf16", "total_kimg": 0.048})
    rows = metrics(tmp_path / arch)
    assert res.step == 3 and all(math.isfinite(r["loss/D"]) and math.isfinite(r["loss/G"]) for r in rows)
    # the weights stay fp32 (autocast computes in bf16 and keeps fp32 master weights)
    state = load_checkpoint(res.checkpoint)
    assert all(v.dtype == torch.float32 for v in state["G"].values() if v.is_floating_point())


def test_bf16_autocast_really_runs_in_bf16(digits16):
    from architectures import ImageSpec, get

    arch = get("dcgan")
    G = arch.build_generator(arch.config(z_dim=8, g_channels=4), ImageSpec(16, 1, 0))
    seen = []
    G.net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with make_precision("bf16", torch.device("cpu")).autocast():
        G(torch.randn(2, 8))
    assert seen == [torch.bfloat16]


def test_fp16_loss_scaling_path(digits16):
    """fp16 with a GradScaler is the CUDA path; the same code runs (slowly) on CPU, so test it here."""
    from architectures import ImageSpec, get

    torch.manual_seed(0)
    arch = get("mlp")
    spec = ImageSpec(8, 1, 0)
    G, D = (
        arch.build_generator(arch.config(z_dim=4, hidden=8, layers=1), spec),
        arch.build_discriminator(arch.config(z_dim=4, hidden=8, layers=1), spec),
    )
    precision = make_precision("fp16", torch.device("cpu"))
    assert precision.scaler.is_enabled() and precision.loss_scale == 65536.0
    ctx, caps = local_context(G, D, "mlp", precision="fp16", sampler_seed=0)
    precision = ctx.strategy.precision
    real = torch.rand(4, 1, 8, 8) * 2 - 1
    # fp16 overflows at the initial 2**16 scale: GradScaler skips those steps (weights untouched) and
    # halves the scale until the scaled gradients fit; after that the steps update the weights.
    for _ in range(30):
        before = [p.clone() for p in D.parameters()]
        scale = precision.loss_scale
        stats = run_d_phase(ctx, caps, LossConfig(r1_gamma=1.0), real, with_r1=True)
        changed = any(not torch.equal(a, b) for a, b in zip(before, D.parameters()))
        if all(torch.isfinite(v) for v in stats.values()):
            break
        assert not changed and precision.loss_scale == scale / 2
    assert changed and precision.loss_scale < 65536.0
    stats.update(run_g_phase(ctx, caps, LossConfig(), [4]))
    assert all(torch.isfinite(v) for v in stats.values())


def test_fp16_needs_cuda(digits16, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is allowed here")
    with pytest.raises(ConfigError, match="train.precision: 'fp16'.*CUDA path"):
        run(digits16, tmp_path / "r", train={"precision": "fp16"})


def test_resume_reaches_the_same_weights_and_losses(digits16, tmp_path):
    """Stopped at step N and resumed with --resume auto, a run reaches step 2N exactly as one that never stopped."""
    sections = dict(
        data={"workers": 2},
        train={"total_kimg": 0.32},
        loss={"r1_gamma": 1.0, "r1_interval": 4},
        ema={"half_life_kimg": 0.05, "rampup": 0.5},
    )
    straight = run(digits16, tmp_path / "straight", **sections)
    assert straight.step == 20
    stopped = run(digits16, tmp_path / "resumed", **{**sections, "train": {"total_kimg": 0.32, "stop_at_step": 10}})
    assert stopped.step == 10
    resumed = run(digits16, tmp_path / "resumed", resume="auto", **sections)
    assert resumed.step == 20

    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    for net in ("G", "D", "G_ema"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), f"{net}.{key} differs after resume"
    for opt in ("G", "D"):
        for pid, st in a["optimizers"][opt]["state"].items():
            assert all(torch.equal(st[k], b["optimizers"][opt]["state"][pid][k]) for k in st)
    assert a["progress"] == b["progress"] and a["ranks"][0]["data"] == b["ranks"][0]["data"]
    losses = lambda rows: [(r["step"], r["loss/D"], r["loss/G"], r.get("reg/r1")) for r in rows]
    assert losses(metrics(tmp_path / "resumed")) == losses(metrics(tmp_path / "straight"))


def test_resume_is_refused_into_a_used_run_dir_without_flag(digits16, tmp_path):
    run(digits16, tmp_path / "r", train={"total_kimg": 0.032})
    with pytest.raises(CheckpointError, match="already holds checkpoints; pass --resume auto"):
        run(digits16, tmp_path / "r", train={"total_kimg": 0.032})


def test_resume_from_explicit_path(digits16, tmp_path):
    first = run(digits16, tmp_path / "a", train={"total_kimg": 0.064})
    res = run(digits16, tmp_path / "b", resume=str(first.checkpoint), train={"total_kimg": 0.096})
    assert res.step == 6 and (tmp_path / "b" / "checkpoints" / "ckpt-000000006").exists()


# --- checkpoints -----------------------------------------------------------------------------------


def _state(v: float) -> dict:
    return {"w": torch.full((3,), v), "progress": {"step": int(v)}}


def test_checkpoint_retention_keeps_last_and_best(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, _state(step), "x: 1\n", keep_last=2)
        if step == 2:
            mark_best(list_checkpoints(tmp_path)[-1], {"fid": 1.0})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000002", "ckpt-000000004", "ckpt-000000005"]


def test_half_written_checkpoints_are_never_picked(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1), "x: 1\n", keep_last=5)
    good = save_checkpoint(tmp_path, 2, _state(2), "x: 1\n", keep_last=5)
    # a crash mid-write leaves a temporary directory, or a directory without its completion marker
    leftover = tmp_path / "checkpoints" / ".tmp-ckpt-000000003-1-1"
    shutil.copytree(good, leftover)
    no_marker = tmp_path / "checkpoints" / "ckpt-000000004"
    shutil.copytree(good, no_marker)
    (no_marker / "COMPLETE.json").unlink()
    assert latest_checkpoint(tmp_path) == good
    # a checkpoint whose state was cut short fails its checksum: skipped by auto, named on explicit load
    corrupt = save_checkpoint(tmp_path, 5, _state(5), "x: 1\n", keep_last=5)
    data = (corrupt / "state.pt").read_bytes()
    (corrupt / "state.pt").write_bytes(data[: len(data) // 2])
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match=r"ckpt-000000005/state.pt is missing or does not match its checksum"):
        load_checkpoint(corrupt)
    assert torch.equal(load_checkpoint(good)["w"], torch.full((3,), 2.0))


def test_checkpoints_never_run_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = save_checkpoint(tmp_path, 1, {"ok": torch.ones(1)}, "x: 1\n", keep_last=1)
    torch.save({"evil": Evil()}, path / "state.pt")
    import hashlib

    marker = json.loads((path / "COMPLETE.json").read_text())  # make the checksum match, as an attacker would
    marker["sha256"]["state.pt"] = hashlib.sha256((path / "state.pt").read_bytes()).hexdigest()
    (path / "COMPLETE.json").write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="cannot read .*state.pt.*Weights only load failed"):
        load_checkpoint(path)


def test_loading_into_another_architecture_lists_mismatches():
    a, b = nn.Linear(3, 4), nn.Sequential(nn.Linear(3, 5))
    with pytest.raises(CheckpointError, match=r"missing \['0.bias', '0.weight'\]; unexpected \['bias', 'weight'\]"):
        load_into(b, a.state_dict(), "G")
    with pytest.raises(CheckpointError, match=r"shape mismatch .*'weight: checkpoint \(4, 3\) vs model \(5, 3\)'"):
        load_into(nn.Linear(3, 5), a.state_dict(), "G")


# --- losses, regularizers and EMA --------------------------------------------------------------------


def test_adversarial_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0])
    sp = lambda x: math.log1p(math.exp(x))
    assert d_loss("nonsaturating", real, fake).item() == pytest.approx((sp(-2) + sp(0)) / 2 + (sp(-1) + sp(1)) / 2)
    assert g_loss("nonsaturating", fake).item() == pytest.approx((sp(1) + sp(-1)) / 2)
    assert g_loss("minimax", fake).item() == pytest.approx(-(sp(-1) + sp(1)) / 2)
    assert d_loss("hinge", real, fake).item() == pytest.approx((0 + 1) / 2 + (0 + 2) / 2)
    assert d_loss("wgan", real, fake).item() == pytest.approx(0.0 - 1.0)
    assert g_loss("hinge", fake).item() == g_loss("wgan", fake).item() == pytest.approx(0.0)


def test_r1_equals_squared_gradient_norm_of_a_toy_d():
    torch.manual_seed(0)
    w = torch.randn(12)
    D = lambda x: torch.tanh(x.flatten(1) @ w)  # a toy D whose input gradient is known in closed form
    x = torch.randn(5, 3, 2, 2, requires_grad=True)
    logits = D(x)
    got = r1_penalty(x, logits)
    expected = ((1 - torch.tanh(x.detach().flatten(1) @ w) ** 2)[:, None] * w).square().sum(1)
    assert torch.allclose(got, expected, rtol=1e-5)
    assert torch.allclose(r1_penalty(x, D(x), scale=1024.0), expected, rtol=1e-5)  # loss scale is undone
    got.sum().backward()  # differentiable: the penalty trains D
    assert x.grad is not None


def test_gradient_penalty_of_a_linear_critic():
    w = torch.tensor([3.0, 4.0])
    critic = lambda x: x.flatten(1) @ w  # ‖∇‖ = 5 everywhere, so the penalty is (5 − 1)² = 16
    gp = gradient_penalty(critic, torch.randn(4, 2, 1, 1), torch.randn(4, 2, 1, 1), torch.rand(4, 1, 1, 1))
    assert torch.allclose(gp, torch.full((4,), 16.0))


def test_ema_beta_half_life_rampup_and_start():
    cfg = EMAConfig(half_life_kimg=10)
    assert ema_beta(cfg, 10_000, 1) == pytest.approx(0.5)  # one half-life per step
    ramp = EMAConfig(half_life_kimg=10, rampup=0.05)
    assert ema_beta(ramp, 32, 1000) == pytest.approx(0.5 ** (32 / 50))  # capped at 0.05 × 1000 images
    assert ema_beta(ramp, 32, 10_000_000) == pytest.approx(0.5 ** (32 / 10_000))
    assert ema_beta(EMAConfig(start_kimg=5), 32, 4999) == 0.0  # a copy before the start


def test_update_ema_interpolates_parameters_and_copies_buffers():
    net, ema = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        net.weight.fill_(1.0), ema.weight.fill_(0.0)
        net.running_mean.fill_(7.0)
    update_ema(ema, net, beta=0.75)
    assert torch.allclose(ema.weight, torch.full((2,), 0.25)) and torch.equal(ema.running_mean, net.running_mean)


def test_lazy_regularization_corrects_adam():
    p = [nn.Parameter(torch.zeros(1))]
    opt = make_adam(p, AdamConfig(lr=0.002, betas=(0.0, 0.99)), reg_interval=16)
    g = opt.param_groups[0]
    assert g["lr"] == pytest.approx(0.002 * 16 / 17) and g["betas"][1] == pytest.approx(0.99 ** (16 / 17))


def test_adam_uses_the_fused_kernel_where_it_runs_and_takes_adams_step():
    """One kernel updates every tensor on CPU (and CUDA); a meta tensor falls back to the loop. The first step
    of Adam moves each weight by lr·g/(|g| + ε) (Kingma & Ba 2015, Algorithm 1 with bias correction)."""
    p = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.ones(2))]
    opt = make_adam(p, AdamConfig(lr=0.1, betas=(0.5, 0.9), eps=1e-8))
    assert opt.defaults["fused"] is True
    grads = [torch.tensor([2.0, -0.5, 1e-3]), torch.tensor([-4.0, 3.0])]
    for q, g in zip(p, grads):
        q.grad = g.clone()
    opt.step()
    for q, start, g in zip(p, (0.0, 1.0), grads):
        torch.testing.assert_close(q.detach(), start - 0.1 * g / (g.abs() + 1e-8), rtol=1e-6, atol=1e-7)
    assert not make_adam([nn.Parameter(torch.zeros(2, device="meta"))], AdamConfig()).defaults["fused"]
