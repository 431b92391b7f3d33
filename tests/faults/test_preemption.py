"""Preemption: SIGTERM (or a STOP file) makes every worker finish its step, rank 0 checkpoint and the
process exit 0 within the grace period; the next start resumes exactly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import assert_same_nets, tiny_config

from orchestrator.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from orchestrator.config import validate_config
from orchestrator.faults import GRACE_EXIT_CODE, STOP_FILE
from orchestrator.train.run import train

pytestmark = pytest.mark.faults
ROOT = Path(__file__).parents[2]
GANFORGE = str(Path(sys.executable).parent / "ganforge")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(shards: Path, tmp: Path, **sections) -> Path:
    """A tiny DCGAN config that would train for a long time, checkpointing every 4 steps."""
    sections["train"] = {"total_kimg": 100, **sections.get("train", {})}
    raw = tiny_config(shards, checkpoint={"every_kimg": 0.064, "keep_last": 3}, **sections)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start(config: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    cmd = [
        GANFORGE,
        "train",
        str(config),
        "--run-dir",
        str(run_dir),
        "--resume",
        "auto",
        *[x for o in overrides for x in ("--set", o)],
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not list_checkpoints(run_dir):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)


def test_sigterm_checkpoints_exits_0_and_resumes_exactly(digits16, tmp_path):
    config = job(digits16, tmp_path)
    run = tmp_path / "run"
    proc = start(config, run)
    wait_for_checkpoint(proc, run)
    time.sleep(0.5)  # somewhere between two periodic checkpoints
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: stopping after this step" in out and "stopped on request at step" in out
    last = latest_checkpoint(run)
    stopped_at = int(last.name.split("-")[1])
    assert f"stopped on request (SIGTERM or STOP file; continue with --resume auto) at step {stopped_at}" in out
    assert not (run / STOP_FILE).exists()

    end = stopped_at + 3
    resumed = start(config, run, f"train.stop_at_step={end}")
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0 and f"resumed from {last}" in out, out[-3000:]
    raw = yaml.safe_load(config.read_text())
    raw["train"]["stop_at_step"] = end
    whole = train(validate_config(raw, "whole"), tmp_path / "whole")
    assert whole.step == end
    assert_same_nets(load_checkpoint(latest_checkpoint(run)), load_checkpoint(whole.checkpoint))


def test_a_stop_file_stops_a_loop_running_outside_the_main_thread(digits16, tmp_path):
    """Ray Train workers run the loop in a thread (no signal handler there): the driver's STOP file reaches them."""
    cfg = validate_config(tiny_config(digits16, train={"total_kimg": 100}), "stop-file")
    run = tmp_path / "run"
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=train(cfg, run)))
    worker.start()
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert worker.is_alive()
        time.sleep(0.1)
    (run / STOP_FILE).touch()
    worker.join(timeout=120)
    r = result["r"]
    assert r.preempted and r.checkpoint.name == f"ckpt-{r.step:09d}" and r.nimg < 100_000
    assert not (run / STOP_FILE).exists()  # served: a Kubernetes preStop hook waits for it to go


def test_a_stale_stop_file_does_not_stop_the_next_start(digits16, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / STOP_FILE).touch()
    r = train(validate_config(tiny_config(digits16, train={"stop_at_step": 3}), "stale"), run)
    assert not r.preempted and r.step == 3


def test_no_checkpoint_within_the_grace_period_exits_75_and_keeps_the_last_one(digits16, tmp_path):
    config = job(digits16, tmp_path)
    run = tmp_path / "run"
    proc = start(config, run, "faults.grace_s=0.001")  # far shorter than a step
    wait_for_checkpoint(proc, run)
    before = latest_checkpoint(run)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == GRACE_EXIT_CODE, out[-3000:]
    assert "no checkpoint within the grace period" in out
    after = latest_checkpoint(run)
    assert after is not None and after.name >= before.name
    load_checkpoint(after)  # complete and verified


@pytest.mark.slow
def test_sigterm_to_one_of_two_ddp_workers_stops_both_with_one_checkpoint(digits16, tmp_path):
    """The workers agree (an all-reduce of the request about once a second, at a step rank 0 names): the
    signalled rank and the other stop at the same step, rank 0 writes the checkpoint, and torchrun exits 0."""
    config = job(digits16, tmp_path, distributed={"strategy": "ddp"}, train={"threads": 1})
    run = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "launch.worker",
        str(config),
        "--run-dir",
        str(run),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_checkpoint(proc, run, timeout=300)
        time.sleep(1.0)
        workers = subprocess.run(
            ["pgrep", "-f", f"launch.worker {config}"], capture_output=True, text=True
        ).stdout.split()
        workers = [w for w in workers if int(w) != proc.pid]
        assert len(workers) == 2, workers
        os.kill(int(max(workers, key=int)), signal.SIGTERM)  # the younger process: rank 1
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    last = latest_checkpoint(run)
    state = load_checkpoint(last)
    assert state["progress"]["step"] == int(last.name.split("-")[1]) and len(state["ranks"]) == 2
    assert f"stopped on request at step {state['progress']['step']} with checkpoint {last}" in out, out[-3000:]
