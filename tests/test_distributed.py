"""Multi-process training without Ray: torchrun workers (gloo on CPU), DDP through Accelerate and
DeepSpeed ZeRO. The global batch, not the worker count, decides what a step computes: checked on the
gradients each optimizer step applies (Adam would hide a gradient scaled by the worker or micro-batch
count), on different real images per worker, and on the number of gradient synchronisations."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from collections import Counter
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_STYLEGAN2, assert_same_nets, tiny_config
from gradient_probe import probe, zero_gradients

from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import validate_config
from orchestrator.data.write import write_shards
from orchestrator.train.run import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
PROBE = str(Path(__file__).parent / "gradient_probe.py")


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


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    """64 different real digits (10 classes) in 16 shards of 4. Every rank reads every world_size-th shard
    of one seeded shard order, so with a shuffle buffer of 1 a step of 8 images takes one shard on each of
    2 workers, and the two shards one worker takes for its whole batch, in the same order."""
    from sklearn.datasets import load_digits

    out = tmp_path_factory.mktemp("digits")
    d = load_digits()
    images = np.round(d.images[:64] * 255 / 16).astype(np.uint8)
    assert len({x.tobytes() for x in images}) == 64
    np.savez(out / "digits.npz", images=images, labels=d.target[:64], class_names=np.array([str(i) for i in range(10)]))
    write_shards(str(out / "digits.npz"), out / "shards", resolution=8, holdout=0.0, shard_size=4)
    return out / "shards"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(shards: Path, tmp: Path, train: dict | None = None, **sections) -> Path:
    sections.setdefault("loss", {"r1_gamma": 1.0})
    sections.setdefault("data", {"workers": 0, "shuffle_buffer": 1})
    raw = tiny_config(
        shards,
        "mlp",
        train={"batch_size": 8, "total_kimg": 1, "stop_at_step": 2, "threads": 1, **(train or {})},
        **sections,
    )
    raw["model"].update(hidden=16, layers=1)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def torchrun(config: Path, run_dir: Path, nproc: int, *overrides: str, probe_dir: Path | None = None) -> None:
    """``nproc`` workers of ``launch.worker``; with ``probe_dir``, under the gradient probe writing there."""
    entry = ["-m", "launch.worker"] if probe_dir is None else [PROBE, str(probe_dir)]
    cmd = [
        TORCHRUN,
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        *entry,
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


def assert_same_gradients(got: list, want: list, what: str) -> None:
    """The same networks stepped in the same order, each with the same gradient (float32 sums in another
    order: relative 1e-4; a gradient scaled by 2 or by the micro-batch count is far outside)."""
    assert [n for n, _ in got] == [n for n, _ in want], what
    for i, ((name, g), (_, w)) in enumerate(zip(got, want)):
        assert w.abs().max() > 0, f"{what}: optimizer step {i} ({name}) applied a zero gradient"
        torch.testing.assert_close(
            g,
            w,
            rtol=1e-4,
            atol=1e-6 * w.abs().max().item(),
            msg=lambda m, i=i, name=name: f"{what}, optimizer step {i} ({name}): {m}",
        )


@pytest.mark.parametrize("strategy, r1_interval", [("ddp", 1), ("deepspeed", 2)])
def test_two_workers_apply_the_gradient_of_one(digit_shards, tmp_path, strategy, r1_interval):
    """Two workers, each accumulating 2 micro-batches of 2 real digits (different on each worker), apply at
    every optimizer step the gradient one worker computes on the whole batch of 8 in one pass: averaged over
    the workers, not summed, and divided by the micro-batch count. DDP synchronises once per optimizer step
    (``no_sync`` before the last micro-batch; a sync per micro-batch gives the same sum, so it is counted).
    Both end with the same weights."""
    config = run_config(
        digit_shards, tmp_path, train={"micro_batch": 2}, loss={"r1_gamma": 1.0, "r1_interval": r1_interval}
    )
    raw = yaml.safe_load(config.read_text())
    raw["train"]["micro_batch"] = 8
    with probe() as one:
        reference = train(validate_config(raw, "ref"), tmp_path / "single")
    assert reference.step == 2
    ds = [f"distributed.deepspeed_config={ROOT / 'configs/deepspeed/zero2.yaml'}"] if strategy == "deepspeed" else []
    torchrun(config, tmp_path / "two", 2, f"distributed.strategy={strategy}", *ds, probe_dir=tmp_path / "probe")
    ranks = [torch.load(tmp_path / "probe" / f"probe-rank{r}.pt") for r in (0, 1)]

    for step, batch in enumerate(one["keys"]):  # the data: different digits per rank, together the same batch
        mine = [list(chain(*r["keys"][2 * step : 2 * step + 2])) for r in ranks]
        assert len(set(batch)) == 8 and not set(mine[0]) & set(mine[1]), (batch, mine)
        assert mine[0] + mine[1] == batch, (batch, mine)
    assert Counter(n for n, _ in one["grads"]) == {"D": 2 + (r1_interval > 1), "G": 2}
    if strategy == "ddp":
        for r, got in enumerate(ranks):
            assert_same_gradients(got["grads"], one["grads"], f"ddp rank {r}")
            assert got["syncs"] == Counter(n for n, _ in got["grads"]), f"rank {r}: syncs per network vs steps"
    else:
        whole = zero_gradients([r["grads"] for r in ranks], [g.numel() for _, g in one["grads"]])
        assert_same_gradients(whole, one["grads"], "deepspeed")

    a, b = weights(tmp_path / "single"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{strategy} {k}: {m}")


def test_micro_batches_accumulate_to_the_global_batch(digit_shards, tmp_path):
    """One worker with 4 micro-batches of 2 real digits applies the gradient of one batch of 8 at every
    optimizer step (each micro-batch's loss divided by 4) and reaches its weights (no BatchNorm here)."""
    config = run_config(digit_shards, tmp_path)
    raw = yaml.safe_load(config.read_text())
    with probe() as whole_grads:
        whole = train(validate_config(raw, "whole"), tmp_path / "whole")
    raw["train"]["micro_batch"] = 2
    with probe() as micro_grads:
        micro = train(validate_config(raw, "micro"), tmp_path / "micro")
    assert whole.step == micro.step == 2
    assert [list(chain(*micro_grads["keys"][4 * s : 4 * s + 4])) for s in range(2)] == whole_grads["keys"]
    assert_same_gradients(micro_grads["grads"], whole_grads["grads"], "4 micro-batches")
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "micro")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_two_stylegan2_workers_resume_exactly(digit_shards, tmp_path):
    """Two DDP workers, StyleGAN2 with noise inputs, style mixing, lazy R1, path length and ADA: stopped after step 3
    and resumed by new processes, the run ends at step 6 bit-identical to an uninterrupted one. Each rank gets
    its own RNG state, data position, path-length mean and ADA signs back (each rank keeps its own, as the
    official code), and ADA's p, agreed across ranks, comes back."""
    raw = tiny_config(
        digit_shards,
        train={"batch_size": 8, "total_kimg": 1, "stop_at_step": 6, "threads": 1},
        data={"workers": 0, "shuffle_buffer": 4},
        checkpoint={"every_kimg": 0.008, "keep_last": 10},
        loss={"r1_gamma": 1.0, "r1_interval": 2, "pl_weight": 2.0, "pl_interval": 2, "style_mixing_prob": 0.9},
        augment={"kind": "ada", "p": 0.5, "interval": 2, "speed_kimg": 0.1},  # p moves by ±0.16 at steps 0, 2, 4
    )
    raw["model"] = dict(TINY_STYLEGAN2)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    torchrun(config, tmp_path / "straight", 2, "distributed.strategy=ddp")
    torchrun(config, tmp_path / "resumed", 2, "distributed.strategy=ddp", "train.stop_at_step=3")
    torchrun(config, tmp_path / "resumed", 2, "distributed.strategy=ddp")
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "ckpt-000000006") for d in ("straight", "resumed"))
    assert a["progress"] == b["progress"] and b["progress"]["step"] == 6
    assert_same_nets(a, b)
    assert torch.equal(a["recipe.reg"]["pl_mean_per_rank"][1], b["recipe.reg"]["pl_mean_per_rank"][1])
    assert a["recipe.augment"]["p"] != 0.5 and torch.equal(a["recipe.augment"]["p"], b["recipe.augment"]["p"])
    assert torch.equal(a["recipe.augment"]["signs_per_rank"][1], b["recipe.augment"]["signs_per_rank"][1])


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


TOOLKIT = {
    "pack": {"loss": {"pack": 2}},
    "minibatch_discrimination": {"model": {"mbdisc_kernels": 4, "mbdisc_dim": 3}},
    "feature_matching": {"loss": {"feature_matching": "added"}},
    "unrolled": {"loss": {"unroll_steps": 2}},
    "wgan_clip_rmsprop": {
        "loss": {"kind": "wgan", "clip": 0.05, "d_steps": 2},
        "optim": {"g": {"kind": "rmsprop", "lr": 5e-5}, "d": {"kind": "rmsprop", "lr": 5e-5}},
    },
    "label_smoothing": {"loss": {"label_smoothing": 0.1}},
}


@pytest.mark.parametrize("option", sorted(TOOLKIT))
def test_each_stability_option_on_two_ddp_workers_applies_the_gradient_of_one(digit_shards, tmp_path, option):
    """Two DDP workers with 4 images each apply, at every optimizer step, the gradient one worker computes in
    two micro-batches of 4, and both end with the same weights. The same images per forward pass matter:
    minibatch discrimination, feature means and the unrolled look-ahead are taken over one forward pass's batch,
    as BatchNorm is (with one pass of 8, those three fail this test)."""
    sections = {"loss": {}, **copy.deepcopy(TOOLKIT[option])}
    sections["loss"] = {"r1_gamma": 0.0 if sections["loss"].get("kind") == "wgan" else 1.0, **sections["loss"]}
    model = sections.pop("model", {})
    config = run_config(digit_shards, tmp_path, data={"workers": 0, "shuffle_buffer": 1, "num_classes": 0}, **sections)
    raw = yaml.safe_load(config.read_text())
    raw["model"].update(model)
    config.write_text(yaml.safe_dump(raw))
    raw["train"]["micro_batch"] = 4
    with probe() as one:
        assert train(validate_config(raw, "ref"), tmp_path / "single").step == 2
    torchrun(config, tmp_path / "two", 2, "distributed.strategy=ddp", probe_dir=tmp_path / "probe")
    for r in (0, 1):
        got = torch.load(tmp_path / "probe" / f"probe-rank{r}.pt")
        assert_same_gradients(got["grads"], one["grads"], f"{option}, ddp rank {r}")
    a, b = weights(tmp_path / "single"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{option} {k}: {m}")


def test_two_stylegan_v1_workers_grow_and_resume_exactly_mid_fade_in(digit_shards, tmp_path):
    """StyleGAN (v1) on two DDP workers through a fade-in (8×8 over 4 steps), with style mixing, noise inputs and
    R1: stopped at step 4 (α = 0.5) and resumed by new processes, it ends at step 7 bit-identical to an
    uninterrupted run, with the same growth state. (Noise and style mixing draw from each rank's own RNG, as the
    official code's per-GPU draws, so 2 workers are compared with 2, not with 1.)"""
    raw = tiny_config(
        digit_shards,
        train={"batch_size": 8, "total_kimg": 1, "stop_at_step": 7, "threads": 1},
        data={"workers": 0, "shuffle_buffer": 4},
        checkpoint={"every_kimg": 0.008, "keep_last": 10},
        growth={"training_kimg": 0.016, "transition_kimg": 0.032},
        loss={"r1_gamma": 1.0, "style_mixing_prob": 0.9},
        distributed={"find_unused_parameters": True},
    )
    raw["model"] = {"arch": "stylegan", "z_dim": 8, "w_dim": 8, "mapping_layers": 1, "fmap_base": 32, "fmap_max": 8,
                    "mbstd_group_size": 2, "start_resolution": 4}  # fmt: skip
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    torchrun(config, tmp_path / "straight", 2, "distributed.strategy=ddp")
    torchrun(config, tmp_path / "resumed", 2, "distributed.strategy=ddp", "train.stop_at_step=4")
    middle = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "ckpt-000000004")
    assert middle["growth"]["resolution"] == 8 and 0 < middle["growth"]["alpha"] < 1
    torchrun(config, tmp_path / "resumed", 2, "distributed.strategy=ddp")
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "ckpt-000000007") for d in ("straight", "resumed"))
    assert a["progress"] == b["progress"] and a["growth"] == b["growth"]
    assert_same_nets(a, b)
