"""Bad configuration: cross-field rules are checked before any work starts (no run directory, no Ray
workers), and each error names the field, the value and what would be valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from orchestrator.config import ConfigError, validate_config
from orchestrator.data.errors import DataError
from orchestrator.data.write import write_shards
from orchestrator.train.run import WorkerContext, train

pytestmark = pytest.mark.faults


def refused(raw: dict, run_dir: Path, ctx: WorkerContext | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        train(validate_config(raw, "job.yaml"), run_dir, ctx=ctx)
    assert not run_dir.exists(), "a refused config must not leave a run directory behind"
    return str(err.value)


def test_global_batch_must_split_into_workers_and_micro_batches(digits16, tmp_path):
    message = refused(tiny_config(digits16, train={"batch_size": 30, "micro_batch": 4}), tmp_path / "r")
    assert "global batch 30" in message and "train.micro_batch (4)" in message and "e.g. use a batch of" in message


def test_every_growth_level_batch_is_checked_up_front(digits16, tmp_path):
    raw = tiny_config(digits16, train={"batch_size": 16, "micro_batch": 8}, growth={"batch_size": {8: 12}})
    raw["model"] = {"arch": "progan", "z_dim": 8, "fmap_base": 64, "fmap_max": 16}
    raw["loss"] = {"kind": "wgan", "gp_weight": 10, "ac_weight": 1.0}
    assert "global batch 12" in refused(raw, tmp_path / "r")


def test_fp16_without_cuda_is_refused_naming_the_alternatives(digits16, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is allowed here")
    message = refused(tiny_config(digits16, train={"precision": "fp16"}), tmp_path / "r")
    assert "train.precision: 'fp16'" in message and "'fp32'" in message and "'bf16'" in message


def test_resolution_must_be_a_power_of_two_and_match_the_shards(digits16, tmp_path):
    with pytest.raises(DataError, match="--resolution 24: must be a power of two"):
        write_shards("builtin:digits", tmp_path / "digits24", resolution=24)
    with pytest.raises(DataError, match="data.resolution is 32 but the shards' manifest says 16"):
        train(validate_config(tiny_config(digits16, data={"resolution": 32}), "job.yaml"), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_the_ray_driver_refuses_before_starting_workers(digits16, tmp_path, capsys):
    import yaml

    from launch import ray_job

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_config(digits16, train={"batch_size": 30})))
    code = ray_job.main([str(config), "--run-dir", str(tmp_path / "r"), "--set", "ray.num_workers=4"])
    assert code == 2 and not (tmp_path / "r").exists()
    assert "global batch 30" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"train": {"batch_sise": 8}}, "unknown key 'train.batch_sise'; did you mean 'batch_size'?"),
        ({"train": {"batch_size": 0}}, "train.batch_size: Input should be greater than or equal to 1 (got 0)"),
        ({"faults": {"lr_factor": 2}}, "faults.lr_factor: Input should be less than or equal to 1 (got 2)"),
        ({"growth": {"batch_size": {12: 8}}}, "growth.batch_size: Value error, keys must be resolutions"),
    ],
)
def test_field_errors_name_the_field_value_and_the_valid_range(digits16, override, expected):
    raw = tiny_config(digits16)
    for section, values in override.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match=None) as err:
        validate_config(raw, "job.yaml")
    assert expected in str(err.value), str(err.value)
