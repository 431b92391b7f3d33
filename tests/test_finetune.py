"""Fine-tuning: --init-from starts a new run from a checkpoint's networks (or refuses naming the shapes), and
Freeze-D keeps D's first blocks as they were."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import local_context, run_d_phase, run_g_phase, tiny_config, tiny_stylegan2

import architectures
from launch.cli import main
from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import ConfigError, validate_config
from orchestrator.finetune import freeze_d_blocks
from orchestrator.losses import LossConfig
from orchestrator.train.run import Run, train


@pytest.fixture(scope="module")
def pretrained(digits16, tmp_path_factory):
    """A checkpoint of a tiny dcgan trained for 4 steps."""
    cfg = validate_config(tiny_config(digits16, train={"total_kimg": 0.064}), "test")
    return train(cfg, tmp_path_factory.mktemp("pretrained")).checkpoint


def _build(shards, run_dir, arch="dcgan", **sections):
    return Run.build(validate_config(tiny_config(shards, arch, **sections), "test"), run_dir)


def test_init_from_starts_a_new_run_from_the_checkpoints_networks(digits16, tmp_path, pretrained):
    run = _build(digits16, tmp_path / "ft", finetune={"init_from": str(pretrained)})
    states = load_checkpoint(pretrained)
    assert states["progress"]["step"] == 4 and run.progress.step == 0 and run.progress.nimg == 0
    for name in ("G", "D", "G_ema"):
        mine = run.step_ctx.raw[name].state_dict()
        assert all(torch.equal(mine[k], states[name][k]) for k in mine), name
    fresh = _build(digits16, tmp_path / "fresh")
    assert not torch.equal(fresh.step_ctx.raw["G"].state_dict()["net.0.weight"], states["G"]["net.0.weight"])


def test_init_from_refuses_a_mismatch_naming_the_parameter_and_both_shapes(digits16, tmp_path, pretrained):
    model = {"arch": "dcgan", "z_dim": 16, "g_channels": 8, "d_channels": 16}
    with pytest.raises(ConfigError) as e:
        _build(digits16, tmp_path / "ft", model=model, finetune={"init_from": str(pretrained)})
    text = str(e.value)
    assert "D.features.0.weight: checkpoint (8, 1, 4, 4) vs model (16, 1, 4, 4)" in text
    assert "finetune.init_partial: true" in text and not (tmp_path / "ft" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="holds dcgan networks, this config trains mlp"):
        _build(digits16, tmp_path / "mlp", "mlp", finetune={"init_from": str(pretrained)})
    with pytest.raises(ConfigError, match="finetune.init_from: checkpoint .*nowhere does not exist"):
        _build(digits16, tmp_path / "none", finetune={"init_from": str(tmp_path / "nowhere")})


def test_init_partial_keeps_what_fits_and_initialises_the_rest(digits16, tmp_path, pretrained, capsys):
    """A wider z (a new input layer of G: z and the 32-d label embedding): D and every G layer but the first come
    from the checkpoint."""
    model = {"arch": "dcgan", "z_dim": 24, "g_channels": 8, "d_channels": 8}
    run = _build(digits16, tmp_path / "ft", model=model, finetune={"init_from": str(pretrained), "init_partial": True})
    states = load_checkpoint(pretrained)
    G, D = run.step_ctx.raw["G"].state_dict(), run.step_ctx.raw["D"].state_dict()
    assert all(torch.equal(D[k], states["D"][k]) for k in D)
    assert all(torch.equal(G[k], states["G"][k]) for k in G if k != "net.0.weight")
    assert "G.net.0.weight: checkpoint (48, 16, 4, 4) vs model (56, 16, 4, 4)" in capsys.readouterr().out


def test_cli_init_from(digits16, tmp_path, pretrained):
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump(tiny_config(digits16, train={"total_kimg": 0.032})))
    assert main(["train", str(config), "--run-dir", str(tmp_path / "ft"), "--init-from", str(pretrained)]) == 0
    saved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert saved["finetune"]["init_from"] == str(pretrained)
    assert load_checkpoint(sorted((tmp_path / "ft" / "checkpoints").glob("ckpt-*"))[-1])["progress"]["step"] == 2


def test_freeze_d_keeps_the_first_blocks_through_d_and_g_phases():
    G, D = tiny_stylegan2()
    arch = architectures.get("stylegan2")
    freeze_d_blocks(D, 1, arch)
    ctx, caps = local_context(G, D, "stylegan2", sampler_seed=0)
    before = {k: v.clone() for k, v in D.state_dict().items()}
    for _ in range(2):  # the G phase freezes all of D and thaws only what was trainable
        run_d_phase(ctx, caps, LossConfig(), torch.rand(4, 1, 8, 8) * 2 - 1)
        run_g_phase(ctx, caps, LossConfig(), [4])
    after = D.state_dict()
    frozen = [k for k in before if k.startswith("blocks.0.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("b4."))
    assert not any(p.requires_grad for p in D.blocks[0].parameters())


def test_freeze_d_is_refused_where_it_cannot_apply():
    _, D = tiny_stylegan2()
    arch = architectures.get("stylegan2")
    with pytest.raises(ConfigError, match=f"freeze_d: {len(D.blocks) + 1}, but .* has {len(D.blocks)} blocks"):
        freeze_d_blocks(D, len(D.blocks) + 1, arch)
    dcgan = architectures.get("dcgan")
    with pytest.raises(ConfigError, match="the dcgan discriminator does not list its blocks"):
        freeze_d_blocks(torch.nn.Module(), 1, dcgan)
