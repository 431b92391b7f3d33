"""``train.compile``: compiled networks train the same run as eager ones (single, DDP; StyleGAN2 with its
regularizers run eagerly beside the compiled passes), and checkpoints move between them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_STYLEGAN2, tiny_config

from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import ConfigError, validate_config
from orchestrator.train.run import Run, train

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


@pytest.fixture
def eager_random_numbers(monkeypatch):
    """Compiled graphs draw their random numbers (StyleGAN2's noise inputs and style mixing) from the same
    generator as eager code, so that a compiled and an eager run can be compared number for number."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "fallback_random", True)


def test_stylegan2_compiled_with_eager_regularizers_matches_eager(digits16, tmp_path, eager_random_numbers):
    """Lazy R1 and path length (double backward) run eagerly through the compiled modules' parameters, beside
    compiled D, G and style mixing: the losses and regularizers of an eager run, to rounding, at every step."""
    raw = tiny_config(
        digits16,
        train={"batch_size": 8, "total_kimg": 1, "stop_at_step": 4},
        loss={"r1_gamma": 1.0, "r1_interval": 2, "pl_weight": 2.0, "pl_interval": 2, "style_mixing_prob": 0.9},
        checkpoint={"every_kimg": 1},
    )
    raw["model"] = dict(TINY_STYLEGAN2)
    rows = {}
    for compiled in (False, True):
        run = Run.build(
            validate_config({**raw, "train": {**raw["train"], "compile": compiled}}, "t"), tmp_path / str(compiled)
        )
        rows[compiled] = [{k: float(v) for k, v in run.step().items()} for _ in range(4)]
        keys = run.state.state_dict()["G"].keys()
        assert not any("_orig_mod" in k for k in keys)
    assert {"reg/r1", "reg/pl_penalty", "loss/G", "loss/D"} <= set(rows[True][0])
    for eager, compiled in zip(rows[False], rows[True]):
        assert eager.keys() == compiled.keys()
        for k in eager:
            assert compiled[k] == pytest.approx(eager[k], rel=1e-3, abs=1e-5), k


def test_compiled_ddp_workers_train_as_eager_ones(digits16, tmp_path):
    """Two DDP workers with compiled networks (and non-lazy R1 beside them) reach the weights of two eager ones."""
    from test_distributed import torchrun, weights

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg(digits16, False, threads=1, stop_at_step=3).model_dump(mode="json")))
    torchrun(config, tmp_path / "eager", 2, "distributed.strategy=ddp")
    torchrun(config, tmp_path / "compiled", 2, "distributed.strategy=ddp", "train.compile=true")
    eager, compiled = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_compile_auto_is_off_on_cpu(digits16, tmp_path):
    assert not Run.build(cfg(digits16, "auto"), tmp_path).compiled


def test_compile_is_refused_under_deepspeed(digits16, tmp_path):
    with pytest.raises(ConfigError, match="train.compile: not supported with distributed.strategy deepspeed"):
        train(validate_config(tiny_config(digits16, train={"compile": True}, distributed={"strategy": "deepspeed"}),
                              "test"), tmp_path)  # fmt: skip


def test_compile_is_refused_for_a_family_that_does_not_compile(digits16, tmp_path):
    """BigGAN's D fails its backward when compiled: an explicit ``train.compile: true`` is a config error, not a
    crash minutes later; ``auto`` leaves it eager."""
    from conftest import preset_config

    from orchestrator.train.preflight import compile_wanted

    cfg = preset_config(Path(__file__).parents[1] / "configs/biggan/dev.yaml", digits16, **{"data.resolution": 16})
    assert not compile_wanted(cfg, torch.device("cuda"), __import__("architectures").get("biggan").capabilities)
    cfg.train.compile = True
    with pytest.raises(ConfigError, match="train.compile: the biggan networks do not train correctly"):
        Run.build(cfg, tmp_path / "run")
