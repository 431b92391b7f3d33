"""Checkpoint writes under fire: SIGKILL at any point of a save, a full disk, an unwritable run directory.
The previous checkpoint always stays intact and is the one ``--resume auto`` picks."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

from orchestrator.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify,
)
from orchestrator.data.write import sha256_file

pytestmark = pytest.mark.faults
ROOT = Path(__file__).parents[2]

SAVER = """
import sys, torch
from pathlib import Path
from orchestrator.checkpoint import save_checkpoint
run, first = Path(sys.argv[1]), int(sys.argv[2])
state = {"w": torch.randn(4_000_000, generator=torch.Generator().manual_seed(first))}  # 16 MB
print("saving", flush=True)
for step in range(first, first + 1000):
    save_checkpoint(run, step, state, "model: {}\\n", keep_last=1)
"""


def fingerprint(path: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}


def test_sigkill_at_any_point_of_a_save_never_leaves_a_pickable_broken_checkpoint(tmp_path):
    """A process saving 16 MB checkpoints in a loop (keep_last 1: every save also prunes) is killed at
    random moments; each time the newest complete checkpoint verifies and loads, the one before the
    interrupted save is untouched, and no half-written directory is ever picked."""
    run = tmp_path / "run"
    save_checkpoint(run, 1, {"w": torch.zeros(3)}, "model: {}\n", keep_last=1)
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first, killed_mid_write = 2, []
    for trial in range(8):
        before = latest_checkpoint(run)
        before_files = fingerprint(before)
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(run), str(first)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline() == "saving\n"
        time.sleep(rng.uniform(0.0, 1.0))  # somewhere inside one of the saves (or between two)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        picked = latest_checkpoint(run)
        assert picked is not None, f"trial {trial}: nothing to resume from"
        verify(picked)
        state = load_checkpoint(picked)
        assert set(state) == {"w"}
        if picked == before:  # killed before the first new save completed: the old one is as it was
            assert fingerprint(before) == before_files
        first = int(picked.name.split("-")[1]) + 1000
        killed_mid_write.append(any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir()))
    assert any(killed_mid_write), "no kill landed inside a write: the test proved nothing"
    save_checkpoint(run, 10**6, {"w": torch.ones(2)}, "model: {}\n", keep_last=1)  # the next save cleans up
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs), so the disk really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail(f"cannot mount a 4 MiB tmpfs for the disk-full tests (needs root / CAP_SYS_ADMIN): {p.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_checkpoint_that_cannot_fit_is_refused_naming_the_space_it_needs(small_disk):
    run = small_disk / "run"
    save_checkpoint(run, 1, {"w": torch.zeros(600_000)}, "model: {}\n", keep_last=5)  # 2.3 MiB
    before = fingerprint(latest_checkpoint(run))
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(run, 2, {"w": torch.ones(600_000)}, "model: {}\n", keep_last=5)
    message = str(err.value)
    assert "ckpt-000000002" in message and "needs about 2.4 MiB" in message and "MiB are free" in message
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-000000001"]
    assert fingerprint(run / "checkpoints" / "ckpt-000000001") == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_a_disk_that_fills_mid_write_loses_nothing(small_disk):
    """The estimate only counts tensors; a state with a large non-tensor payload gets past it and then
    really runs out of space inside torch.save: the partial directory goes, the previous one stays."""
    run = small_disk / "run"
    save_checkpoint(run, 1, {"w": torch.zeros(300_000)}, "model: {}\n", keep_last=5)
    before = fingerprint(latest_checkpoint(run))
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*ckpt-000000002: .* MiB are free there"):
        save_checkpoint(run, 2, {"w": torch.zeros(10), "blob": [b"x" * 4_000_000]}, "model: {}\n", keep_last=5)
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-000000001"]
    assert fingerprint(run / "checkpoints" / "ckpt-000000001") == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_training_on_a_full_disk_stops_with_the_path_and_keeps_the_last_checkpoint(digits16, small_disk, tmp_path):
    """Through ``ganforge train``: checkpoints fit at first, then the disk is filled by something else."""
    run = small_disk / "run"
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(tiny_config(digits16, train={"total_kimg": 1}, checkpoint={"every_kimg": 0.064, "keep_last": 2}))
    )
    ganforge = str(Path(sys.executable).parent / "ganforge")
    proc = subprocess.Popen(
        [ganforge, "train", str(config), "--run-dir", str(run)],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    while not list_checkpoints(run):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # another tenant fills the disk
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-3000:]
    assert "ganforge train: error:" in out and str(run) in out and ("No space left on device" in out or "MiB" in out)
    assert "Traceback" not in out
    good = latest_checkpoint(run)
    assert good is not None
    load_checkpoint(good)


def test_an_unwritable_run_directory_fails_before_any_work(digits16, small_disk, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_config(digits16)))
    ganforge = str(Path(sys.executable).parent / "ganforge")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    p = subprocess.run(
        [ganforge, "train", str(config), "--run-dir", str(small_disk / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert f"run directory {small_disk / 'run'} is not writable (Read-only file system)" in p.stderr
    (tmp_path / "a-file").write_text("")
    p = subprocess.run(
        [ganforge, "train", str(config), "--run-dir", str(tmp_path / "a-file" / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "is not writable (Not a directory)" in p.stderr
