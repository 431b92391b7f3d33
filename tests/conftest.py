"""Shared fixtures: real shards of scikit-learn's digits, and W&B kept offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _offline_tracking(monkeypatch, tmp_path_factory):
    """W&B never goes online in tests: no API key, offline mode, quiet. ganforge's weights cache is an empty
    folder of the test session, not the user's."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("GANFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "ganforge-cache"))


@pytest.fixture(scope="session")
def digits16(tmp_path_factory) -> Path:
    """Digits at 16×16 in shards of 128 (13 train shards, 2 held-out)."""
    from orchestrator.data.write import write_shards

    out = tmp_path_factory.mktemp("digits16")
    write_shards("builtin:digits", out, resolution=16, holdout=0.1, shard_size=128)
    return out


def tiny_config(shards: Path, arch: str = "dcgan", **sections) -> dict:
    """A raw config dict for a tiny, fast run on the digits shards (override sections by keyword)."""
    model = {
        "dcgan": {"arch": "dcgan", "z_dim": 16, "g_channels": 8, "d_channels": 8},
        "mlp": {"arch": "mlp", "z_dim": 16, "hidden": 32, "layers": 2},
    }[arch]
    cfg = {
        "model": model,
        "data": {"shards": str(shards / "train-*.tar"), "workers": 0, "shuffle_buffer": 64},
        "train": {"batch_size": 16, "total_kimg": 0.16, "seed": 0, "threads": 2},
        "checkpoint": {"every_kimg": 0.08, "keep_last": 2},
        "tracking": {
            "log_every": 1,
            "sample_every_kimg": 0.08,
            "grid_size": 4,
            "progress_bar": False,
            "wandb": {"mode": "disabled"},
        },
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def growing_config(shards: Path, model: dict, loss: dict, **train_section) -> dict:
    """A tiny growing run (progan, stylegan) on 16×16 digits: 4×4 for 4 steps of 16, 8×8 faded in over 8 steps of 8
    and stable for 8, then 16×16 (batch 16) faded in over 4 steps and stable to the end (28 steps); Adam(0, 0.99)."""
    raw = tiny_config(
        shards,
        train={"batch_size": 16, "total_kimg": 0.32, **train_section},
        growth={"training_kimg": 0.064, "transition_kimg": 0.064, "batch_size": {8: 8}, "lr": {16: 0.002}},
        loss=loss,
        optim={"g": {"lr": 0.001, "betas": [0.0, 0.99]}, "d": {"lr": 0.001, "betas": [0.0, 0.99]}},
        checkpoint={"every_kimg": 0.1, "keep_last": 10},
        tracking={"sample_every_kimg": 1.0},
    )
    raw["model"] = dict(model)
    return raw


def preset_config(path: Path, shards: Path, **extra):
    """A shipped preset on test shards: quiet, logging every step, checkpoints and grids every 0.16 kimg."""
    from orchestrator.config import load_config

    overrides = [
        f"data.shards={shards / 'train-*.tar'}",
        "tracking.progress_bar=false",
        "tracking.wandb.mode=disabled",
        "tracking.log_every=1",
        "checkpoint.every_kimg=0.16",
        "tracking.sample_every_kimg=0.16",
    ]
    return load_config(path, overrides + [f"{k}={v}" for k, v in extra.items()])


def assert_same_nets(a: dict, b: dict) -> None:
    """Two loaded checkpoints hold bit-identical G, D and G_ema."""
    for net in ("G", "D", "G_ema"):
        assert a[net].keys() == b[net].keys(), net
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net


TINY_STYLEGAN2 = {
    "arch": "stylegan2", "z_dim": 8, "w_dim": 8, "mapping_layers": 1, "channel_base": 64, "channel_max": 8,
    "num_fp16_res": 0, "mbstd_group_size": 2,
}  # fmt: skip
"""The model section of a tiny StyleGAN2 (8 channels everywhere) for tests of the whole recipe."""


def tiny_stylegan2(num_classes: int = 0, **overrides):
    """G and D of :data:`TINY_STYLEGAN2` (with ``overrides``) for 8×8 grey images, seeded."""
    import architectures
    from core.spec import ImageSpec

    arch = architectures.get("stylegan2")
    cfg = arch.config(**{**TINY_STYLEGAN2, **overrides})
    spec = ImageSpec(8, 1, num_classes)
    torch.manual_seed(0)
    return arch.build_generator(cfg, spec), arch.build_discriminator(cfg, spec)


def local_context(G, D, arch: str, num_classes: int = 0, precision: str = "fp32", opt=None, sampler_seed: int = 1):
    """G and D with Adam under the single-process strategy, as the phases see them (a StepContext), and the
    family's capabilities: for tests of single phases without a Run."""
    import architectures
    from orchestrator.dist.local import LocalStrategy
    from orchestrator.optim import AdamConfig, make_adam
    from orchestrator.precision import make_precision
    from orchestrator.recipes.recipe import Sampler, StepContext

    caps = architectures.get(arch).capabilities
    cpu = torch.device("cpu")
    strategy = LocalStrategy(make_precision(precision, cpu), {"G", "D"} if caps.reduced_dtype else set(), False)
    opt = opt or AdamConfig()
    nets = strategy.prepare(
        {"G": G, "D": D}, {"G": make_adam(G.parameters(), opt), "D": make_adam(D.parameters(), opt)}
    )
    sampler = Sampler(G.z_dim, num_classes, cpu, torch.Generator().manual_seed(sampler_seed))
    return StepContext(nets, dict(nets), strategy, sampler), caps


def no_augment():
    """The augmentation of ``augment.kind: none`` (the identity)."""
    from orchestrator.augment.control import Augment, AugmentConfig

    return Augment(AugmentConfig(), torch.device("cpu"))


def run_d_phase(ctx, caps, cfg, real, labels=None, sizes=None, with_r1=False, aug=None) -> dict:
    """One D phase (noise → image recipe) on ``real`` cut into micro-batches of ``sizes``; its statistics."""
    from orchestrator.recipes.noise_to_image import d_phase
    from orchestrator.recipes.recipe import run_phase

    phase = d_phase(cfg, caps, with_r1, aug or no_augment())
    data = phase.inputs(ctx, {"img": real, "label": labels}, len(real))
    return run_phase(phase, ctx, data, sizes or [len(real)]).stats


def run_g_phase(ctx, caps, cfg, sizes, aug=None) -> dict:
    """One G phase (noise → image recipe) on micro-batches of ``sizes`` latents; its statistics."""
    from orchestrator.recipes.noise_to_image import g_phase
    from orchestrator.recipes.recipe import run_phase

    phase = g_phase(cfg, caps, aug or no_augment())
    return run_phase(phase, ctx, phase.inputs(ctx, {}, sum(sizes)), sizes).stats


@pytest.fixture(scope="module")
def ray_hosts(tmp_path_factory):
    """A Ray cluster of three hosts in network namespaces (tests/hosts.py): the head ``head`` and the worker
    nodes ``w1`` and ``w2``, each on its own 10.77.X.N address with a ``host_<name>`` resource. Torn down
    afterwards, whatever happened; skipped only where namespaces cannot be made."""
    import hosts

    reason = hosts.unavailable()
    if reason:
        pytest.skip(reason)
    with hosts.ray_cluster(["head", "w1", "w2"], tmp_path_factory.mktemp("ray-home")) as cluster:
        yield cluster
