"""The ganforge command line, run as users run it (subprocesses of the installed console script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config
from PIL import Image

GANFORGE = [str(Path(sys.executable).parent / "ganforge")]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(GANFORGE + list(args), capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"ganforge {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits16) -> Path:
    """A tiny trained run, through the CLI."""
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(digits16, tracking={"wandb": {"mode": "offline"}})))
    out = cli("train", str(cfg), "--run-dir", str(tmp / "run"), "--set", "train.total_kimg=0.064")
    assert "checkpoint:" in out.stdout and "sample grid:" in out.stdout and "W&B run:" in out.stdout
    return tmp / "run"


def test_train_prints_where_everything_is(trained):
    ckpt = trained / "checkpoints" / "ckpt-000000004"
    assert (ckpt / "COMPLETE.json").exists() and (trained / "config.yaml").exists()
    assert list((trained / "samples").glob("grid-*.png"))
    runs = list((trained / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert list(runs[0].glob("files/media/images/samples/grid_*.png"))


def test_generate_writes_images_and_grid(trained, tmp_path):
    ckpt = trained / "checkpoints" / "ckpt-000000004"
    cli("generate", str(ckpt), "--num", "5", "--out", str(tmp_path / "gen"), "--seed", "7", "--class", "3")
    names = sorted(p.name for p in (tmp_path / "gen").iterdir())
    assert names == ["grid.png", "seed0007.png", "seed0008.png", "seed0009.png", "seed0010.png", "seed0011.png"]
    assert Image.open(tmp_path / "gen" / "seed0007.png").size == (16, 16)
    # the same seed gives the same image
    cli("generate", str(ckpt), "--num", "1", "--out", str(tmp_path / "again"), "--seed", "7", "--class", "3")
    assert (tmp_path / "again" / "seed0007.png").read_bytes() == (tmp_path / "gen" / "seed0007.png").read_bytes()


def test_generate_rejects_what_the_model_cannot_do(trained, tmp_path):
    ckpt = trained / "checkpoints" / "ckpt-000000004"
    p = cli("generate", str(ckpt), "--out", str(tmp_path), "--truncation", "0.7", check=False)
    assert p.returncode == 2 and "dcgan generator has no truncation trick" in p.stderr
    p = cli("generate", str(ckpt), "--out", str(tmp_path), "--class", "12", check=False)
    assert p.returncode == 2 and "this model has 10 classes" in p.stderr


def test_info_json(digits16, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(digits16)))
    info = json.loads(cli("info", str(cfg), "--json").stdout)
    from architectures import ImageSpec, count_params, get

    arch = get("dcgan")
    model = arch.config(**tiny_config(digits16)["model"])
    spec = ImageSpec(16, 1, 10)
    assert info["g_params"] == count_params(arch.build_generator(model, spec))
    assert info["d_params"] == count_params(arch.build_discriminator(model, spec))
    assert info["output_shape"] == [1, 1, 16, 16] and info["config"]["train"]["batch_size"] == 16
    human = cli("info", str(cfg), "--set", "model.g_channels=4").stdout
    assert "g_channels: 4" in human and "trainable parameters" in human


def test_info_counts_a_packed_d_with_minibatch_discrimination(digits16, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(digits16, data={"num_classes": 0})))
    extra = ("--set", "loss.pack=2", "--set", "model.mbdisc_kernels=10", "--set", "model.mbdisc_dim=5")
    info = json.loads(cli("info", str(cfg), "--json", *extra).stdout)
    plain = json.loads(cli("info", str(cfg), "--json").stdout)
    # the first conv (4×4, no bias) takes 2 channels instead of 1: 4·4·8 more weights; T is 16·16·10·5 (the 4×4
    # features of the 16 channels at 4×4 px: d_channels 8 doubled once), plus a weight per kernel
    assert info["d_params"] - plain["d_params"] == 4 * 4 * 8 + 16 * 16 * 10 * 5 + 10
    assert info["d_output_shape"] == [1] and info["g_params"] == plain["g_params"]


def test_info_on_a_deepspeed_config_says_what_it_is():
    path = Path(__file__).parents[1] / "configs" / "deepspeed" / "zero1.yaml"
    p = cli("info", str(path), check=False)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == (
        f"ganforge info: error: {path} is a DeepSpeed config (top-level zero_optimization, "
        f"gradient_clipping, wall_clock_breakdown), not a ganforge job config; use it from a job "
        f"config as distributed.deepspeed_config: {path} (with distributed.strategy: deepspeed)\n"
    )


def test_quoted_numbers_exit_2_naming_the_key_and_the_type(digits16, tmp_path):
    cfg = tmp_path / "quoted.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(digits16, train={"total_kimg": "100"})))
    p = cli("info", str(cfg), check=False)
    line = next(i for i, text in enumerate(cfg.read_text().splitlines(), 1) if "total_kimg" in text)
    assert p.returncode == 2
    assert p.stderr == (
        f"ganforge info: error: invalid config {cfg}:\n  {cfg}:{line}: train.total_kimg: "
        f"expected a number, not the string '100' (write it without quotes: 100)\n"
    )
    p = cli("info", str(cfg), "--set", "train.total_kimg=100", "--set", "tracking.progress_bar='false'", check=False)
    assert p.returncode == 2 and p.stderr.splitlines()[1:] == [
        "  --set tracking.progress_bar: tracking.progress_bar: expected true or false, not the string 'false' "
        "(write it without quotes: false)"
    ]
    assert "total_kimg: 100.0" in cli("info", str(cfg), "--set", "train.total_kimg=100").stdout


def test_info_progan_shows_the_official_count_and_names_the_final_level_only_one():
    """ProGAN: the official count (every level's ToRGB/FromRGB, as the official networks print it; sources in
    tests/test_progan_networks.py) and ganforge's final-level-only figure, named as such."""
    config = str(Path(__file__).parents[1] / "configs" / "progan" / "celebahq-1024.yaml")
    info = json.loads(cli("info", config, "--json").stdout)
    assert (info["g_params"], info["d_params"]) == (23_079_115, 23_087_249)
    assert (info["g_params_final_level"], info["d_params_final_level"]) == (23_071_507, 23_077_137)
    human = cli("info", config).stdout
    assert "# progan: G 23,079,115 trainable parameters, D 23,087,249;" in human
    assert "as the official networks print them" in human
    assert "final level only (ganforge's figure, not an official one): G 23,071,507, D 23,077,137" in human


def test_info_stylegan_shows_the_official_counts_with_the_mapping_share():
    """StyleGAN (v1) FFHQ 1024: the official G_style / D_basic totals (sources in tests/test_stylegan_networks.py),
    the mapping network's share and ganforge's final-level-only figures."""
    config = str(Path(__file__).parents[1] / "configs" / "stylegan" / "ffhq-1024.yaml")
    info = json.loads(cli("info", config, "--json").stdout)
    assert (info["g_params"], info["g_mapping_params"], info["d_params"]) == (26_219_627, 2_101_248, 23_087_249)
    assert (info["g_params_final_level"], info["d_params_final_level"]) == (26_212_019, 23_077_137)
    human = cli("info", config).stdout
    assert "# stylegan: G 26,219,627 trainable parameters, D 23,087,249;" in human
    assert "G includes the mapping network (2,101,248)" in human


def test_data_shards_command(tmp_path):
    out = cli(
        "data",
        "shards",
        "builtin:digits",
        str(tmp_path / "d"),
        "--resolution",
        "8",
        "--holdout",
        "0.2",
        "--shard-size",
        "500",
    ).stdout
    assert "1438 training images in 3 shard(s) and 359 held-out images in 1 shard(s)" in out
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["splits"]["holdout"]["count"] == 359


def _folder_with_bad_files(root: Path) -> Path:
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10, 10), (40 * i, 200 if cls == "cats" else 0, 90)).save(root / cls / f"{i}.png")
    (root / "cats" / "fake.jpg").write_bytes(b"this is text, not a JPEG")
    (root / "notes.txt").write_text("where the photos came from")
    return root


def test_data_shards_skips_bad_files_and_lists_them_at_the_end(tmp_path):
    src = _folder_with_bad_files(tmp_path / "imgs")
    out = cli("data", "shards", str(src), str(tmp_path / "d"), "--resolution", "8", "--holdout", "0").stdout
    assert out.splitlines()[1:] == [
        "skipped 2 file(s) that are not readable images (also listed in manifest.json):",
        "  cats/fake.jpg: not a readable image (cannot identify image file)",
        "  notes.txt: not an image file (extension .txt)",
    ]
    assert out.startswith("wrote 6 training images in 1 shard(s)")


def test_data_shards_strict_fails_naming_every_bad_file_and_writes_nothing(tmp_path):
    src = _folder_with_bad_files(tmp_path / "imgs")
    p = cli("data", "shards", str(src), str(tmp_path / "d"), "--resolution", "8", "--strict", check=False)
    assert p.returncode == 2 and p.stdout == "" and not (tmp_path / "d").exists()
    assert p.stderr.splitlines() == [
        f"ganforge data: error: {src}: 2 file(s) are not readable images, so nothing was written (--strict):",
        "  cats/fake.jpg: not a readable image (cannot identify image file)",
        "  notes.txt: not an image file (extension .txt)",
        "remove or fix them, or leave out --strict to skip them",
    ]


def test_config_errors_exit_2_with_the_message(digits16, tmp_path):
    cfg = tmp_path / "bad.yaml"
    raw = tiny_config(digits16)
    raw["train"]["bach_size"] = 3
    cfg.write_text(yaml.safe_dump(raw))
    p = cli("train", str(cfg), "--run-dir", str(tmp_path / "r"), check=False)
    assert p.returncode == 2 and "unknown key 'train.bach_size'; did you mean 'batch_size'" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize(
    "command",
    [["train"], ["generate"], ["data", "shards"], ["info"], ["import", "stylegan2-ada"], ["import", "biggan-pytorch"]],
)
def test_help_explains_every_option(command):
    text = cli(*command, "--help").stdout
    for option in {
        "train": ["--set", "--run-dir", "--resume"],
        "generate": ["--num", "--out", "--seed", "--truncation", "--class"],
        "data shards": ["--resolution", "--holdout", "--shard-size", "--strict"],
        "info": ["--json", "--set"],
        "import stylegan2-ada": ["--shards"],
        "import biggan-pytorch": ["--shards", "--bn-eps", "--sn-eps"],
    }[" ".join(command)]:
        assert option in text
