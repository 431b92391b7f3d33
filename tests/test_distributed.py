"""Multi-process training without Ray: torchrun workers (gloo on CPU), DDP through Accelerate and
DeepSpeed ZeRO. The global batch, not the worker count, decides what a step computes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config

from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import validate_config
from orchestrator.data.shards import write_shards
from orchestrator.train.run import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.fixture(scope="module")
def same_image_shards(tmp_path_factory) -> Path:
    """64 copies of one digit with one label, in 8 shards: every split of a batch sees the same data."""
    from sklearn.datasets import load_digits

    out = tmp_path_factory.mktemp("same")
    d = load_digits()
    img = np.round(d.images[5] * 255 / 16).astype(np.uint8)
    np.savez(
        out / "same.npz",
        images=np.stack([img] * 64),
        labels=np.full(64, 3),
        class_names=np.array([str(i) for i in range(10)]),
    )
    write_shards(str(out / "same.npz"), out / "shards", resolution=8, holdout=0.0, shard_size=8)
    return out / "shards"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(shards: Path, tmp: Path, **sections) -> Path:
    sections.setdefault("loss", {"r1_gamma": 1.0})
    raw = tiny_config(
        shards,
        "mlp",
        train={"batch_size": 8, "total_kimg": 1, "stop_at_step": 2, "threads": 1},
        data={"workers": 0, "shuffle_buffer": 1},
        **sections,
    )
    raw["model"].update(hidden=16, layers=1)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def torchrun(config: Path, run_dir: Path, nproc: int, *overrides: str) -> None:
    cmd = [
        TORCHRUN,
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "launch.worker",
        str(config),
        "--run-dir",
        str(run_dir),
        *[x for o in overrides for x in ("--set", o)],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1])
    return {f"{net}.{k}": v for net in ("G", "D") for k, v in state[net].items()}


@pytest.mark.parametrize("strategy, r1_interval", [("ddp", 1), ("deepspeed", 2)])
def test_two_workers_match_one(same_image_shards, tmp_path, strategy, r1_interval):
    """With the same seed and global batch, two workers reach the weights one worker reaches."""
    config = run_config(same_image_shards, tmp_path, loss={"r1_gamma": 1.0, "r1_interval": r1_interval})
    reference = train(validate_config(yaml.safe_load(config.read_text()), "ref"), tmp_path / "single")
    assert reference.step == 2
    ds = (
        ["distributed.deepspeed_config=" + str(ROOT / "configs/deepspeed/zero2.yaml")]
        if strategy == "deepspeed"
        else []
    )
    torchrun(config, tmp_path / "two", 2, f"distributed.strategy={strategy}", *ds)
    one, two = weights(tmp_path / "single"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{strategy} {k}: {m}")


def test_micro_batches_accumulate_to_the_global_batch(same_image_shards, tmp_path):
    """One worker with 4 micro-batches of 2 reaches what one batch of 8 reaches (no BatchNorm here)."""
    config = run_config(same_image_shards, tmp_path)
    raw = yaml.safe_load(config.read_text())
    whole = train(validate_config(raw, "whole"), tmp_path / "whole")
    raw["train"]["micro_batch"] = 2
    micro = train(validate_config(raw, "micro"), tmp_path / "micro")
    assert whole.step == micro.step == 2
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "micro")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_progan_growing_on_two_ddp_workers_matches_one(same_image_shards, tmp_path):
    """Through a fade-in (new level, per-level batch and learning rate, Adam resets), two DDP workers
    reach the weights one worker reaches, and checkpoint the same growth state."""
    raw = tiny_config(
        same_image_shards,
        train={"batch_size": 8, "total_kimg": 1, "stop_at_step": 5, "threads": 1},
        data={"workers": 0, "shuffle_buffer": 1},
        growth={"training_kimg": 0.008, "transition_kimg": 0.016, "batch_size": {8: 4}, "lr": {8: 0.002}},
        loss={"kind": "wgan", "gp_weight": 10, "drift": 0.001, "ac_weight": 1.0},
        distributed={"find_unused_parameters": True},
    )
    raw["model"] = {"arch": "progan", "z_dim": 8, "fmap_base": 32, "fmap_max": 8, "mbstd_group_size": 0}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    reference = train(validate_config(raw, "ref"), tmp_path / "single")
    assert reference.step == 5
    torchrun(config, tmp_path / "two", 2, "distributed.strategy=ddp")
    one, two = weights(tmp_path / "single"), weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    growth = [
        load_checkpoint(sorted((d / "checkpoints").glob("ckpt-*"))[-1])["growth"]
        for d in (tmp_path / "single", tmp_path / "two")
    ]
    assert growth[0] == growth[1] == {"resolution": 8, "alpha": 1.0, "level_img": 16}
