"""Config loading: validation errors name the file, line, key and the nearest valid key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, JobConfig, config_from_yaml_text, load_config

GOOD = """\
model:
  arch: dcgan
  z_dim: 16
data:
  shards: data/x/train-*.tar
train:
  batch_size: 8
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_good_config_fills_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.model.arch == "dcgan" and cfg.model.z_dim == 16 and cfg.model.g_channels == 64
    assert cfg.train.batch_size == 8 and cfg.loss.kind == "nonsaturating"


def test_unknown_key_names_file_line_and_nearest_key(tmp_path):
    path = write(tmp_path, GOOD.replace("  z_dim: 16", "  z_dim: 16\n  g_chanels: 8"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"{path}:4" in msg and "'model.g_chanels'" in msg and "did you mean 'g_channels'" in msg


def test_unknown_section_and_nested_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean 'train'"):
        load_config(write(tmp_path, GOOD + "trian: {}\n"))
    with pytest.raises(
        ConfigError, match=r"unknown key 'optim.g.learning_rate'.*valid keys here: betas, eps, kind, lr"
    ):
        load_config(write(tmp_path, GOOD + "optim:\n  g:\n    learning_rate: 0.1\n"))


def test_wrong_type_and_out_of_range(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD.replace("batch_size: 8", "batch_size: eight")))
    assert "job.yaml:7: train.batch_size" in str(e.value) and "'eight'" in str(e.value)
    with pytest.raises(ConfigError, match=r"train.batch_size: Input should be greater than or equal to 1 \(got 0\)"):
        load_config(write(tmp_path, GOOD.replace("batch_size: 8", "batch_size: 0")))
    with pytest.raises(ConfigError, match=r"optim.d.betas.1: Input should be less than 1"):
        load_config(write(tmp_path, GOOD + "optim:\n  d:\n    betas: [0.5, 1.5]\n"))


def test_unknown_architecture_suggests_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"'dcgna' is not a known architecture; did you mean 'dcgan'"):
        load_config(write(tmp_path, GOOD.replace("arch: dcgan", "arch: dcgna")))


def test_set_overrides_and_their_errors(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = load_config(path, ["train.batch_size=32", "loss.kind=hinge", "optim.g.betas=[0.0, 0.99]"])
    assert cfg.train.batch_size == 32 and cfg.loss.kind == "hinge" and cfg.optim.g.betas == (0.0, 0.99)
    with pytest.raises(
        ConfigError, match=r"--set train.bach_size: unknown key 'train.bach_size'; did you mean 'batch_size'"
    ):
        load_config(path, ["train.bach_size=3"])
    with pytest.raises(ConfigError, match=r"expected section.key=value"):
        load_config(path, ["train.batch_size"])


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            GOOD + '  total_kimg: "100"\n',
            "job.yaml:8: train.total_kimg: expected a number, not the string '100' (write it without quotes: 100)",
        ),
        (
            GOOD.replace("batch_size: 8", 'batch_size: "8"'),
            "job.yaml:7: train.batch_size: expected an integer, not the string '8' (write it without quotes: 8)",
        ),
        (
            GOOD + 'tracking:\n  progress_bar: "false"\n',
            "job.yaml:9: tracking.progress_bar: expected true or false, not the string 'false' "
            "(write it without quotes: false)",
        ),
        (
            GOOD.replace("batch_size: 8", "batch_size: yes"),
            "job.yaml:7: train.batch_size: expected an integer, not the boolean True",
        ),
        (
            GOOD + "tracking:\n  progress_bar: 1\n",
            "job.yaml:9: tracking.progress_bar: expected true or false, not the number 1",
        ),
        (
            GOOD.replace("z_dim: 16", 'z_dim: "16"'),
            "job.yaml:3: model.z_dim: expected an integer, not the string '16' (write it without quotes: 16)",
        ),
        (
            GOOD + 'optim:\n  g:\n    betas: ["0.0", 0.99]\n',
            "job.yaml:10: optim.g.betas.0: expected a number, not the string '0.0' (write it without quotes: 0.0)",
        ),
        (
            GOOD + 'growth:\n  batch_size: {8: "12"}\n',
            "job.yaml:9: growth.batch_size.8: expected an integer, not the string '12' (write it without quotes: 12)",
        ),
    ],
    ids=[
        "quoted-float",
        "quoted-int",
        "quoted-bool",
        "bool-for-int",
        "number-for-bool",
        "union-member",
        "tuple-item",
        "dict-value",
    ],
)
def test_scalars_must_have_their_own_type(tmp_path, text, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert str(e.value) == f"invalid config {tmp_path / 'job.yaml'}:\n  {tmp_path}/{expected}"


def test_ints_stay_floats_lists_stay_tuples_and_overrides_keep_their_yaml_types(tmp_path):
    path = write(tmp_path, GOOD + "  total_kimg: 100\noptim:\n  g:\n    betas: [0, 0.99]\n")
    cfg = load_config(
        path, ["train.batch_size=32", "tracking.progress_bar=false", "ema.rampup=1", "growth.batch_size={8: 4}"]
    )
    assert cfg.train.total_kimg == 100.0 and isinstance(cfg.train.total_kimg, float)
    assert cfg.optim.g.betas == (0.0, 0.99)
    assert (cfg.train.batch_size, cfg.tracking.progress_bar, cfg.ema.rampup) == (32, False, 1.0)
    assert config_from_yaml_text(cfg.to_yaml(), "resolved") == cfg  # saved configs write growth's keys as strings
    with pytest.raises(
        ConfigError,
        match=r"--set train.total_kimg: train.total_kimg: expected a number, not the "
        r"string '100' \(write it without quotes: 100\)",
    ):
        load_config(path, ["train.total_kimg='100'"])


def test_missing_required_section(tmp_path):
    with pytest.raises(ConfigError, match=r"data: required key is missing"):
        load_config(write(tmp_path, "model:\n  arch: mlp\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["ema.rampup=0.05"])
    again = config_from_yaml_text(cfg.to_yaml(), "resolved")
    assert again == cfg
    assert yaml.safe_load(cfg.to_yaml())["ema"]["rampup"] == 0.05


@pytest.mark.parametrize("name", ["zero1", "zero2"])
def test_a_deepspeed_config_is_named_as_one(name):
    path = Path(__file__).parents[1] / "configs" / "deepspeed" / f"{name}.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"{path} is a DeepSpeed config (top-level zero_optimization, gradient_clipping, "
        f"wall_clock_breakdown), not a ganforge job config; use it from a job config as "
        f"distributed.deepspeed_config: {path} (with distributed.strategy: deepspeed)"
    )


def test_a_deepspeed_json_config_is_named_as_one_and_a_job_config_is_not(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "bf16": {"enabled": true}}')
    with pytest.raises(
        ConfigError,
        match=r"ds.json is a DeepSpeed config \(top-level train_micro_batch_size_per_gpu, "
        r"gradient_accumulation_steps, bf16\), not a ganforge job config; use it "
        r"from a job config as distributed.deepspeed_config: .*ds.json",
    ):
        load_config(ds)
    with pytest.raises(
        ConfigError, match=r"job.yaml:8: unknown key 'fp16' \(valid keys here: augment, checkpoint, cyclegan, data"
    ):
        load_config(write(tmp_path, GOOD + "fp16: {enabled: true}\n"))


@pytest.mark.parametrize(
    "path", sorted(str(p) for p in Path(__file__).parents[1].glob("configs/**/*.yaml") if "deepspeed" not in p.parts)
)
def test_every_shipped_preset_validates(path):
    assert isinstance(load_config(path), JobConfig)
