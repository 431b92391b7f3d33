"""``train.compile``: compiled main passes train the same run as eager ones, and checkpoints move between them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import ConfigError, validate_config
from orchestrator.train.run import train

pytestmark = pytest.mark.slow  # torch.compile takes ~20 s per network here


def cfg(shards: Path, compile: bool, **train_extra):
    """The tiny DCGAN with non-lazy R1, so the D phase needs a second backward beside the compiled pass."""
    return validate_config(
        tiny_config(
            shards,
            train={"compile": compile, "total_kimg": 0.064, **train_extra},
            loss={"r1_gamma": 1.0, "r1_interval": 1},
            checkpoint={"every_kimg": 0.032},
        ),
        "test",
    )


def losses(run_dir: Path) -> list[tuple[float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss/D"], r["loss/G"]) for r in rows if "loss/D" in r]


def test_compiled_and_eager_runs_agree_and_checkpoints_cross_load(digits16, tmp_path, capsys):
    eager = train(cfg(digits16, False), tmp_path / "eager")
    compiled = train(cfg(digits16, True), tmp_path / "compiled")
    assert "compiled: the first step took" in capsys.readouterr().out
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(a) == len(b) == 4
    # compiled kernels fuse and reorder float32 arithmetic: equal to rounding over a few steps, not bit for bit
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    state = load_checkpoint(compiled.checkpoint)
    assert not any("_orig_mod" in k for net in ("G", "D", "G_ema") for k in state[net])
    assert state["G"].keys() == load_checkpoint(eager.checkpoint)["G"].keys()
    # a compiled run's checkpoint resumes eagerly, and an eager one compiled
    train(cfg(digits16, False, total_kimg=0.096), tmp_path / "compiled", resume="auto")
    train(cfg(digits16, True, total_kimg=0.096), tmp_path / "eager", resume="auto")
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "compiled")[-2:]), torch.tensor(losses(tmp_path / "eager")[-2:]),
        rtol=1e-3, atol=1e-4,
    )  # fmt: skip


def test_compile_is_refused_under_deepspeed(digits16, tmp_path):
    with pytest.raises(ConfigError, match="train.compile: not supported with distributed.strategy deepspeed"):
        train(validate_config(tiny_config(digits16, train={"compile": True}, distributed={"strategy": "deepspeed"}),
                              "test"), tmp_path)  # fmt: skip
