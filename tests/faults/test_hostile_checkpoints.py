"""Fault injection: hostile and damaged checkpoints.

A checkpoint is a directory a user may have downloaded from anywhere. Loading it never runs pickled
code (``torch.load(weights_only=True)``), even when the attacker rewrote ``COMPLETE.json`` so the
checksums match; a file cut short or altered after writing is refused with an error naming it; a
checkpoint of another architecture or config is refused with the mismatched keys and shapes, and
nothing of the run being resumed is overwritten.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

import architectures
from core.spec import ImageSpec
from orchestrator.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_generator, load_into
from orchestrator.config import validate_config
from orchestrator.train.run import train

pytestmark = pytest.mark.faults


def cfg_of(shards: Path, arch: str = "dcgan", channels: int | None = None, **sections):
    raw = tiny_config(shards, arch, train={"total_kimg": 0.032}, tracking={"sample_every_kimg": 1.0}, **sections)
    if channels:
        raw["model"].update(g_channels=channels, d_channels=channels)
    return validate_config(raw, source="test")


@pytest.fixture(scope="module")
def runs(digits16, tmp_path_factory) -> dict[str, Path]:
    """Real 2-step runs: dcgan (8 channels) and mlp; name -> its checkpoint directory."""
    root = tmp_path_factory.mktemp("hostile")
    return {arch: train(cfg_of(digits16, arch), root / arch).checkpoint for arch in ("dcgan", "mlp")}


@pytest.fixture
def ckpt(runs, tmp_path) -> Path:
    """A private copy of the dcgan checkpoint, in a run directory of its own, to tamper with."""
    dst = tmp_path / "victim" / "checkpoints" / runs["dcgan"].name
    shutil.copytree(runs["dcgan"], dst)
    return dst


def rewrite_checksums(path: Path) -> None:
    """What an attacker (or a careless copy tool) does: make COMPLETE.json agree with the files."""
    marker = json.loads((path / "COMPLETE.json").read_text())
    marker["sha256"] = {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in marker["sha256"]}
    (path / "COMPLETE.json").write_text(json.dumps(marker))


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class Payload:
    """Unpickling this calls ``open(marker, 'w')``: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path, where: str) -> None:
    """Replace state.pt by the real state with a payload inside (or by the payload alone), checksums fixed."""
    state = torch.load(path / "state.pt", weights_only=True)
    if where == "nested":
        state["tracking"]["wandb_run_id"] = Payload(marker)  # deep inside an otherwise valid checkpoint
    elif where == "tensor-slot":
        state["G_ema"]["net.0.weight"] = Payload(marker)
    else:
        state = Payload(marker)
    torch.save(state, path / "state.pt")
    rewrite_checksums(path)


# --- pickled code never runs -----------------------------------------------------------------------------


def test_the_payload_is_live(ckpt, tmp_path):
    """Control: an unrestricted torch.load of the planted file does run the payload (so the tests below
    prove something)."""
    marker = tmp_path / "control-marker"
    plant(ckpt, marker, "nested")
    torch.load(ckpt / "state.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("where", ["nested", "tensor-slot", "whole"])
@pytest.mark.parametrize("entry", ["load_checkpoint", "load_generator", "resume"])
def test_pickled_code_never_runs(ckpt, digits16, tmp_path, where, entry):
    marker = tmp_path / "PWNED"
    plant(ckpt, marker, where)
    with pytest.raises(CheckpointError) as err:
        if entry == "load_checkpoint":
            load_checkpoint(ckpt)
        elif entry == "load_generator":
            load_generator(ckpt)
        else:
            train(cfg_of(digits16), tmp_path / "resumed", resume=str(ckpt))
    assert not marker.exists(), "unpickling ran the payload"
    msg = str(err.value)
    assert f"cannot read {ckpt / 'state.pt'}" in msg and "Weights only load failed" in msg
    if entry == "resume":
        assert not list_checkpoints(tmp_path / "resumed")


def test_pickled_code_never_runs_through_ganforge_generate(ckpt, tmp_path, capsys):
    from launch.cli import main

    marker = tmp_path / "PWNED"
    plant(ckpt, marker, "nested")
    assert main(["generate", str(ckpt), "--out", str(tmp_path / "out"), "--num", "2"]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert f"ganforge generate: error: cannot read {ckpt / 'state.pt'}" in err
    assert not list(tmp_path.glob("out/*.png"))  # no image was written


# --- damaged files are named ----------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0])
def test_truncated_state_with_matching_checksums_names_the_file(ckpt, keep):
    data = (ckpt / "state.pt").read_bytes()
    (ckpt / "state.pt").write_bytes(data[: int(len(data) * keep)])
    rewrite_checksums(ckpt)  # so the cut reaches torch.load
    for load in (load_checkpoint, load_generator):
        with pytest.raises(CheckpointError, match=rf"cannot read {re.escape(str(ckpt / 'state.pt'))}: "):
            load(ckpt)


@pytest.mark.parametrize("name", ["state.pt", "config.yaml"])
@pytest.mark.parametrize("how", ["flipped-byte", "truncated", "deleted"])
def test_files_changed_after_writing_are_refused_naming_them(ckpt, name, how):
    f = ckpt / name
    data = bytearray(f.read_bytes())
    if how == "flipped-byte":
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    elif how == "truncated":
        f.write_bytes(bytes(data[:-1]))
    else:
        f.unlink()
    for load in (load_checkpoint, load_generator):
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(f))} is missing or does not match its checksum"):
            load(ckpt)


@pytest.mark.parametrize("how", ["missing", "garbage", "not-a-mapping", "no-state-entry"])
def test_a_broken_completion_marker_is_refused_naming_it(ckpt, how):
    marker = ckpt / "COMPLETE.json"
    if how == "missing":
        marker.unlink()
    elif how == "garbage":
        marker.write_text("{not json")
    elif how == "not-a-mapping":
        marker.write_text(json.dumps({"step": 2, "sha256": ["state.pt"]}))
    else:  # a marker that does not cover state.pt would let any state.pt through unverified
        m = json.loads(marker.read_text())
        del m["sha256"]["state.pt"]
        marker.write_text(json.dumps(m))
        (ckpt / "state.pt").write_bytes((ckpt / "state.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt))) as err:
        load_checkpoint(ckpt)
    assert "COMPLETE.json" in str(err.value)


# --- another architecture or config -------------------------------------------------------------------


def expected_mismatches(a_model, b_model) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, 'key: checkpoint S vs model T') of loading a's G into b's G."""
    spec = ImageSpec(16, 1, 10)
    a = architectures.get(a_model.arch).build_generator(a_model, spec).state_dict()
    b = architectures.get(b_model.arch).build_generator(b_model, spec).state_dict()
    shapes = [
        f"{k}: checkpoint {tuple(a[k].shape)} vs model {tuple(b[k].shape)}"
        for k in sorted(set(a) & set(b))
        if a[k].shape != b[k].shape
    ]
    return sorted(set(b) - set(a)), sorted(set(a) - set(b)), shapes


@pytest.mark.parametrize("other", ["dcgan-16-channels", "mlp"])
def test_resuming_from_another_config_lists_keys_and_shapes_and_overwrites_nothing(runs, digits16, tmp_path, other):
    src = runs["dcgan"] if other == "dcgan-16-channels" else runs["mlp"]
    run_dir = tmp_path / "run"
    shutil.copytree(src.parent.parent, run_dir)  # the run being resumed, checkpoints and all
    before = digest(run_dir / "checkpoints")
    metrics_before = (run_dir / "metrics.jsonl").read_bytes()
    config_before = (run_dir / "config.yaml").read_bytes()
    new_cfg = cfg_of(digits16, "dcgan", channels=16) if other == "dcgan-16-channels" else cfg_of(digits16, "dcgan")
    saved = load_checkpoint(src)
    old_model = validate_config(yaml.safe_load(saved["meta"]["config"]), source="saved").model
    missing, unexpected, shapes = expected_mismatches(old_model, new_cfg.model)
    assert missing or unexpected or shapes

    with pytest.raises(CheckpointError) as err:
        train(new_cfg, run_dir, resume="auto")
    msg = str(err.value)
    assert msg.startswith("G in the checkpoint does not fit this config's network") and "another architecture" in msg
    for key in missing[:10]:
        assert repr(key) in msg.split("missing", 1)[1]
    for key in unexpected[:10]:
        assert repr(key) in msg.split("unexpected", 1)[1]
    for line in shapes[:10]:
        assert repr(line) in msg, line
    if len(shapes) > 10:
        assert f"and {len(shapes) - 10} more" in msg
    # nothing of the run was overwritten: the same checkpoints, byte for byte, and the same metrics
    assert digest(run_dir / "checkpoints") == before
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before
    assert (run_dir / "config.yaml").read_bytes() == config_before


def test_a_checkpoint_whose_weights_do_not_match_its_own_config(runs, ckpt):
    """G_ema weights of the mlp run under the dcgan run's saved config: `generate` lists the keys."""
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["G_ema"] = torch.load(runs["mlp"] / "state.pt", weights_only=True)["G_ema"]
    torch.save(state, ckpt / "state.pt")
    rewrite_checksums(ckpt)
    with pytest.raises(
        CheckpointError,
        match=r"^G_ema in the checkpoint does not fit this config's network: "
        r"missing \[.*\]; unexpected \[.*\]; shape mismatch \[",
    ) as err:
        load_generator(ckpt)
    model = lambda path: validate_config(yaml.safe_load((path / "config.yaml").read_text()), source="saved").model
    missing, unexpected, shapes = expected_mismatches(model(runs["mlp"]), model(ckpt))
    assert all(repr(x) in str(err.value) for x in missing[:10] + unexpected[:10] + shapes[:10])


def test_load_into_leaves_the_module_untouched_on_mismatch():
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(3, 5)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    state = {**a.state_dict(), "bias": torch.zeros(5)}  # one key fits, one does not
    with pytest.raises(CheckpointError, match=r"shape mismatch \['weight: checkpoint \(4, 3\) vs model \(5, 3\)'\]"):
        load_into(b, state, "D")
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
