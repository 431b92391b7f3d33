"""Numerical faults: NaN/Inf in a step's gradients. The step is skipped and counted; after K bad steps in a
row the run rolls back to the last good checkpoint with a lower learning rate (or stops, as configured)
and says so; with ``faults.fp32_fallback`` the forward passes run in fp32 from then on. The fault is
injected for real: G's output is turned to NaN for chosen forward passes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

import architectures.stylegan2 as sg2
from architectures.mlp import MLPGenerator
from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import validate_config
from orchestrator.faults import NonfiniteError
from orchestrator.train.run import Run, train

pytestmark = pytest.mark.faults


def poisoner(monkeypatch, cls):
    """``cls.forward``'s output is NaN in the grad-enabled calls listed (the G phase of a step: the D phase's
    fake pass runs under no_grad); returns the function that adds calls to the list."""
    calls = {"n": 0, "steps": set()}
    forward = cls.forward

    def faulty(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in calls["steps"]:
                return out * float("nan")
        return out

    monkeypatch.setattr(cls, "forward", faulty)
    return lambda steps: calls["steps"].update(steps)


@pytest.fixture
def poison(monkeypatch):
    """``poison(steps)``: G's output is NaN in the training steps listed (counted by G's G-phase passes)."""
    return poisoner(monkeypatch, MLPGenerator)


@pytest.fixture
def dtypes(monkeypatch):
    """``dtypes(kinds)``: a list that receives ``(class name, output dtype)`` of every forward pass of a module
    of ``kinds``, and ``"rollback"`` where the run rolled back."""
    seen: list = []
    rollback = Run.rollback

    def marking(self):
        rollback(self)
        seen.append("rollback")

    def watch(kinds, reduced_only=False):
        def hook(module, args, out):
            if isinstance(module, kinds) and (not reduced_only or module.reduced_precision):
                seen.append((type(module).__name__, (out[0] if isinstance(out, tuple) else out).dtype))

        handles.append(torch.nn.modules.module.register_module_forward_hook(hook))
        return seen

    handles: list = []
    monkeypatch.setattr(Run, "rollback", marking)
    yield watch
    for handle in handles:
        handle.remove()


def split_at_rollback(seen: list) -> tuple[list, list]:
    """The dtypes recorded before and after the (single) rollback."""
    assert seen.count("rollback") == 1, "expected exactly one rollback"
    i = seen.index("rollback")
    return seen[:i], seen[i + 1 :]


def run(shards: Path, run_dir: Path, **faults):
    raw = tiny_config(
        shards,
        "mlp",
        train={"total_kimg": 100, "stop_at_step": 12},
        checkpoint={"every_kimg": 0.064, "keep_last": 5},
        faults=faults,
    )
    return train(validate_config(raw, "nonfinite"), run_dir)


def rows(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss/G" in r]


def finite(state: dict) -> bool:
    return all(
        torch.isfinite(v).all()
        for net in ("G", "D", "G_ema")
        for v in state[net].values()
        if torch.is_floating_point(v)
    )


def test_a_few_bad_steps_are_skipped_and_counted_and_weights_stay_finite(digits16, tmp_path, poison, capsys):
    poison({6, 7})
    result = run(digits16, tmp_path / "r", nonfinite_patience=3)
    assert result.step == 12
    state = load_checkpoint(result.checkpoint)
    assert finite(state)
    g_steps = {int(s["step"]) for s in state["optimizers"]["G"]["state"].values()}
    assert g_steps == {10}, g_steps  # 12 steps, 2 G updates skipped
    last = rows(tmp_path / "r")[-1]
    assert last["fault/skipped_steps"] == 2 and last["fault/rollbacks"] == 0
    assert capsys.readouterr().out.count("NaN/Inf gradients at step") == 2


def test_k_bad_steps_in_a_row_roll_back_with_a_lower_learning_rate(digits16, tmp_path, poison, capsys):
    poison({10, 11, 12})  # after the checkpoint at step 8
    result = run(digits16, tmp_path / "r", nonfinite_patience=3, lr_factor=0.25)
    out = capsys.readouterr().out
    assert "3 consecutive steps with NaN/Inf gradients at step 12: rolled back to ckpt-000000008" in out
    assert "learning rates × 0.25" in out
    state = load_checkpoint(result.checkpoint)
    assert finite(state) and result.step == 12
    assert state["faults"]["rollbacks"] == 1 and state["faults"]["lr_scale"] == 0.25
    assert state["optimizers"]["G"]["param_groups"][0]["lr"] == pytest.approx(2e-4 * 0.25)
    seen = rows(tmp_path / "r")
    steps = [r["step"] for r in seen]
    assert steps == [*range(1, 12), *range(9, 13)]  # step 12 triggered the rollback; 9-12 replayed from 8
    assert seen[-1]["fault/rollbacks"] == 1 and seen[-1]["lr/G"] == pytest.approx(2e-4 * 0.25)
    assert all(math.isfinite(r["loss/G"]) for r in seen[11:])


def test_a_resumed_run_keeps_the_lowered_learning_rate(digits16, tmp_path, poison):
    poison({10, 11, 12})
    run(digits16, tmp_path / "r", nonfinite_patience=3, lr_factor=0.25)
    raw = tiny_config(
        digits16,
        "mlp",
        train={"total_kimg": 100, "stop_at_step": 14},
        checkpoint={"every_kimg": 0.064, "keep_last": 5},
        faults={"nonfinite_patience": 3},
    )
    again = train(validate_config(raw, "resumed"), tmp_path / "r", resume="auto")
    state = load_checkpoint(again.checkpoint)
    assert state["optimizers"]["G"]["param_groups"][0]["lr"] == pytest.approx(2e-4 * 0.25)


def test_on_nonfinite_stop_ends_the_run_with_a_clear_error(digits16, tmp_path, poison):
    poison({10, 11, 12})
    with pytest.raises(
        NonfiniteError, match="3 consecutive steps with NaN/Inf gradients at step 12; faults.on_nonfinite is stop"
    ):
        run(digits16, tmp_path / "r", nonfinite_patience=3, on_nonfinite="stop")


def test_without_a_checkpoint_to_return_to_the_run_stops(digits16, tmp_path, poison):
    poison({1, 2, 3})
    with pytest.raises(NonfiniteError, match="no checkpoint to roll back to"):
        run(digits16, tmp_path / "r", nonfinite_patience=3)


def test_rollbacks_are_bounded(digits16, tmp_path, poison):
    poison(set(range(10, 40)))  # G breaks for good after step 8
    with pytest.raises(NonfiniteError, match=r"faults.max_rollbacks \(2\) reached"):
        run(digits16, tmp_path / "r", nonfinite_patience=2, max_rollbacks=2)


def test_fp32_fallback_runs_the_forward_passes_in_fp32_and_is_remembered(digits16, tmp_path, poison, dtypes):
    """bf16 autocast: before the rollback the Linear layers compute in bf16; after it every forward pass (G, D,
    G_ema) computes in fp32, and the checkpoint remembers the fallback."""
    seen = dtypes(torch.nn.Linear)
    poison({10, 11})
    raw = tiny_config(
        digits16,
        "mlp",
        train={"total_kimg": 100, "stop_at_step": 12, "precision": "bf16"},
        checkpoint={"every_kimg": 0.064, "keep_last": 5},
        faults={"nonfinite_patience": 2, "fp32_fallback": True},
    )
    result = train(validate_config(raw, "fp32"), tmp_path / "r")
    before, after = split_at_rollback(seen)
    assert ("Linear", torch.bfloat16) in before  # the hook sees reduced precision while it is on
    assert after and {d for _, d in after} == {torch.float32}, set(after)
    assert load_checkpoint(result.checkpoint)["faults"]["fp32"] is True


def test_fp32_fallback_turns_off_stylegan2_reduced_precision_blocks(digits16, tmp_path, monkeypatch, dtypes):
    """StyleGAN2 with ``num_fp16_res`` in bf16: its top blocks (G, G_ema and D) compute in bf16 until the rollback,
    in fp32 after it (the fallback clears each network's ``reduced_dtype``, the EMA copy's too)."""
    seen = dtypes((sg2.SynthesisBlock, sg2.DiscriminatorBlock), reduced_only=True)
    poisoner(monkeypatch, sg2.SynthesisNetwork)({4, 5})
    raw = tiny_config(
        digits16,
        train={"batch_size": 8, "total_kimg": 100, "stop_at_step": 6, "precision": "bf16"},
        checkpoint={"every_kimg": 0.016, "keep_last": 5},
        tracking={"sample_every_kimg": 0.024, "grid_size": 2},
        loss={"r1_gamma": 0.0, "style_mixing_prob": 0.0},
        faults={"nonfinite_patience": 2, "fp32_fallback": True},
    )
    raw["model"] = {
        "arch": "stylegan2",
        "z_dim": 8,
        "w_dim": 8,
        "mapping_layers": 1,
        "channel_base": 64,
        "channel_max": 4,
        "num_fp16_res": 2,
        "conv_clamp": 256,
        "mbstd_group_size": 2,
    }
    result = train(validate_config(raw, "sg2-fp32"), tmp_path / "r")
    assert result.step == 6
    before, after = split_at_rollback(seen)
    for kind in ("SynthesisBlock", "DiscriminatorBlock"):
        assert (kind, torch.bfloat16) in before, kind
        assert {d for k, d in after if k == kind} == {torch.float32}, (kind, after)
