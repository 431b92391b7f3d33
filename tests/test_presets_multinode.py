"""The 2-node × 8-GPU StyleGAN2 config F preset (configs/stylegan2/config-f-1024-2x8.yaml; docs/distributed.md,
"Worked example: StyleGAN2 config F on 2 nodes × 8 GPUs"): it loads, splits over 16 workers, and trains the
official recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from architectures.layers import minibatch_stddev
from orchestrator.config import ConfigError, load_config
from orchestrator.train.preflight import batch_split, check_batches

CONFIGS = Path(__file__).parents[1] / "configs" / "stylegan2"
PRESET = CONFIGS / "config-f-1024-2x8.yaml"

# NVlabs/stylegan2-ada-pytorch train.py (commit 0e4e93e), cfg_specs['stylegan2'], "Reproduce results for StyleGAN2
# config F at 1024x1024": dict(ref_gpus=8, kimg=25000, mb=32, mbstd=4, fmaps=1, lrate=0.002, gamma=10, ema=10,
# ramp=None, map=8); the same file sets channel_max 512, num_fp16_res 4, conv_clamp 256 and Adam betas [0, 0.99],
# eps 1e-8 for G and D, and applies --batch without rescaling lrate, gamma or ema. training/loss.py StyleGAN2Loss:
# style_mixing_prob 0.9, pl_batch_shrink 2, pl_weight 2; training/training_loop.py: G_reg_interval 4,
# D_reg_interval 16. ('paper1024', the MetFaces config, is the same but for gamma=2.)
OFFICIAL_STYLEGAN2 = dict(
    total_kimg=25000,
    batch_size=32,
    mbstd_group_size=4,
    channel_base=int(1 * 32768),
    channel_max=512,
    mapping_layers=8,
    num_fp16_res=4,
    conv_clamp=256,
    lr=0.002,
    betas=(0.0, 0.99),
    eps=1e-8,
    r1_gamma=10,
    r1_interval=16,
    pl_weight=2,
    pl_interval=4,
    pl_batch_shrink=2,
    style_mixing_prob=0.9,
    ema_kimg=10,
    ema_rampup=None,
)


def hyper_parameters(cfg) -> dict:
    m, loss, g, d = cfg.model, cfg.loss, cfg.optim.g, cfg.optim.d
    assert (g.lr, g.betas, g.eps) == (d.lr, d.betas, d.eps)  # one Adam setting for both, as the official
    return dict(
        total_kimg=cfg.train.total_kimg,
        batch_size=cfg.train.batch_size,
        mbstd_group_size=m.mbstd_group_size,
        channel_base=m.channel_base,
        channel_max=m.channel_max,
        mapping_layers=m.mapping_layers,
        num_fp16_res=m.num_fp16_res,
        conv_clamp=m.conv_clamp,
        lr=g.lr,
        betas=tuple(g.betas),
        eps=g.eps,
        r1_gamma=loss.r1_gamma,
        r1_interval=loss.r1_interval,
        pl_weight=loss.pl_weight,
        pl_interval=loss.pl_interval,
        pl_batch_shrink=loss.pl_batch_shrink,
        style_mixing_prob=loss.style_mixing_prob,
        ema_kimg=cfg.ema.half_life_kimg,
        ema_rampup=cfg.ema.rampup,
    )


def test_preset_is_the_official_config_f():
    cfg = load_config(PRESET)
    assert cfg.model.arch == "stylegan2" and cfg.data.resolution == 1024 and cfg.train.precision == "fp16"
    assert hyper_parameters(cfg) == OFFICIAL_STYLEGAN2


def test_preset_is_the_single_node_preset_plus_the_cluster():
    """Only paths, loader workers and the distributed and ray sections differ from config-f-1024.yaml."""
    multi, single = load_config(PRESET).model_dump(), load_config(CONFIGS / "config-f-1024.yaml").model_dump()
    for section in ("model", "train", "loss", "optim", "ema", "checkpoint", "augment", "growth"):
        assert multi[section] == single[section], section
    assert {k for k in multi["data"] if multi["data"][k] != single["data"][k]} == {"shards", "workers"}


def test_preset_runs_16_one_gpu_ddp_workers_on_shared_storage():
    cfg = load_config(PRESET)
    r = cfg.ray
    assert (r.num_workers, r.gpus_per_worker, r.cpus_per_worker, r.resources_per_worker) == (16, 1, 8, {})
    assert cfg.distributed.strategy == "ddp"
    # every node must see the shards and Ray's checkpoint copies: absolute paths on the shared volume
    assert r.storage_path.startswith("/mnt/ganforge/") and cfg.data.shards.startswith("/mnt/ganforge/")
    assert r.num_workers * cfg.data.workers == 64  # data streams: the shard count must be at least this


def test_batch_of_32_splits_into_16_micro_batches_of_2():
    cfg = load_config(PRESET)
    check_batches(cfg, cfg.ray.num_workers)
    assert batch_split(cfg.train.batch_size, cfg.train.micro_batch, 16) == (2, 1)  # no accumulation
    assert batch_split(64, None, 16) == (4, 1)  # the batch-64 alternative of the docs
    assert batch_split(32, None, 8) == (4, 1)  # the official 8-GPU run: 4 per GPU
    with pytest.raises(ConfigError, match="must be divisible by workers"):
        check_batches(cfg, 12)


def test_minibatch_stddev_group_of_4_takes_pairs_of_a_micro_batch_of_2():
    """D sees 2 images per forward pass: group min(4, 2) = 2, one statistic per pair, as the official layer."""
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    y = minibatch_stddev(x, 4)
    pair = ((x - x.mean(0)).square().mean(0) + 1e-8).sqrt().mean()
    assert torch.allclose(y[:, -1], pair.expand(2, 4, 4))
