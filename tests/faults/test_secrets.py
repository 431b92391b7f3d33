"""Fault injection: secrets in the environment never land on disk or in job metadata.

A real (tiny) training run with a W&B API key and cloud credentials in its environment, W&B offline
so nothing goes online: every file of the run directory (W&B's own run files included, searched as
bytes) and everything printed are searched for the secrets. The Ray job that ``ganforge submit``
builds (entrypoint, runtime_env, metadata) is checked the same way without starting Ray.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config

from orchestrator.config import validate_config
from orchestrator.train.run import train

pytestmark = pytest.mark.faults

SECRETS = {
    "WANDB_API_KEY": "wandbsentinel" + "0123456789abcdef0123456789",  # 40 characters, like a real key
    "AWS_SECRET_ACCESS_KEY": "awssentinel/Kz9+Qw7Lp3Rt5Xy1Vb8Nm2Cd4Fg6Hj0",
    "AWS_ACCESS_KEY_ID": "AKIASENTINEL0000TEST",
    "AWS_SESSION_TOKEN": "sessionsentinel-FwoGZXIvYXdzEJr",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON": "gcpsentinel-private-key-material",
    "AZURE_STORAGE_KEY": "azuresentinel+base64keymaterial==",
}


def set_secrets(monkeypatch) -> None:
    # after conftest's autouse fixture removed WANDB_API_KEY: these are the test's own
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def leaks_in(data: bytes) -> list[str]:
    """Names of the secrets found in ``data``: as bytes, in UTF-16 too, and each half alone (a secret split
    across a line break or escaped in JSON would still leave one half whole)."""
    found = []
    for name, value in SECRETS.items():
        raw = value.encode()
        half = len(raw) // 2
        needles = (raw, value.encode("utf-16-le"), raw[:half], raw[half:])
        if any(n in data for n in needles):
            found.append(name)
    return found


def scan_tree(root: Path) -> dict[str, list[str]]:
    hits = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            found = leaks_in(p.read_bytes())
            if found:
                hits[str(p.relative_to(root))] = found
    return hits


def test_self_check_the_scanner_finds_a_planted_secret(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01" + SECRETS["AWS_SECRET_ACCESS_KEY"].encode() + b"\xff")
    (tmp_path / "b.json").write_text(
        '{"k": "' + SECRETS["WANDB_API_KEY"][:20] + "\\n" + SECRETS["WANDB_API_KEY"][20:] + '"}'
    )
    assert scan_tree(tmp_path) == {"a.bin": ["AWS_SECRET_ACCESS_KEY"], "b.json": ["WANDB_API_KEY"]}


@pytest.fixture(scope="module")
def secret_run(digits16, tmp_path_factory):
    """A run (with a resume, so resumed-run paths are covered too) under an environment full of secrets."""
    mp = pytest.MonkeyPatch()
    set_secrets(mp)
    mp.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path_factory.mktemp("secrets") / "run"
    raw = tiny_config(
        digits16,
        train={"total_kimg": 0.032, "stop_at_step": 1},
        checkpoint={"every_kimg": 0.016},
        tracking={"sample_every_kimg": 0.016, "wandb": {"mode": "offline", "tags": ["faults"]}},
    )
    log = run_dir.parent / "printed.log"  # a file, not a pipe: W&B's service process inherits the descriptors
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        # capture at the file-descriptor level: W&B's service process and tqdm write there too
        with (
            open(log, "wb", buffering=0) as w,
            open(log.with_suffix(".py.log"), "w") as text,
            contextlib.redirect_stdout(text),
            contextlib.redirect_stderr(text),
        ):  # pytest's own capture too
            sys.stdout.flush(), sys.stderr.flush()
            for fd in (1, 2):
                os.dup2(w.fileno(), fd)
            try:
                first = train(validate_config(raw, source="test"), run_dir)
                raw["train"].pop("stop_at_step")
                second = train(validate_config(raw, source="test"), run_dir, resume="auto")
                sys.stdout.flush(), sys.stderr.flush()
            finally:
                for fd, orig in saved.items():
                    os.dup2(orig, fd)
        printed = log.read_bytes() + log.with_suffix(".py.log").read_bytes()
    finally:
        for orig in saved.values():
            os.close(orig)
        mp.undo()
    return run_dir, first, second, printed


def test_secrets_never_reach_the_run_directory(secret_run):
    run_dir, first, second, _ = secret_run
    assert first.step == 1 and second.step == 2 and second.wandb_dir  # a real run, W&B (offline) included
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    kinds = {p.name for p in files}
    # the places a secret could end up are all there: config, checkpoints, metrics, W&B's run files
    assert {"config.yaml", "state.pt", "COMPLETE.json", "metrics.jsonl", "wandb_run_id"} <= kinds
    assert any(p.suffix == ".wandb" for p in files) and "debug.log" in kinds  # W&B's run records and its log
    assert scan_tree(run_dir) == {}


def test_secrets_are_not_printed(secret_run):
    *_, printed = secret_run
    assert b"step       1" in printed and b"resumed from" in printed  # the capture did see the run's output
    assert leaks_in(printed) == []


def test_secrets_not_in_checkpoint_contents(secret_run):
    """Inside state.pt the strings are pickled (and zip-stored): search the loaded objects too."""
    from orchestrator.checkpoint import list_checkpoints, load_checkpoint

    run_dir, *_ = secret_run

    def strings(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from strings(k)
                yield from strings(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from strings(v)
        elif isinstance(obj, (str, bytes)):
            yield obj if isinstance(obj, bytes) else obj.encode()

    for ckpt in list_checkpoints(run_dir):
        state = load_checkpoint(ckpt)
        assert all(leaks_in(s) == [] for s in strings(state)), ckpt


# --- job metadata: `ganforge submit` ----------------------------------------------------------------------


class FakeJobClient:
    """Stands in for ray.job_submission.JobSubmissionClient: records what would be sent to the cluster."""

    submitted: list[dict] = []

    def __init__(self, address, *a, **k):
        self.address = address

    def submit_job(self, **kwargs):
        FakeJobClient.submitted.append(kwargs)
        return "raysubmit_test"


def test_submitted_job_carries_no_secrets(monkeypatch, tmp_path, digits16, capsys):
    import ray.job_submission

    from launch import submit

    set_secrets(monkeypatch)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(digits16)))
    FakeJobClient.submitted = []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobClient)
    assert (
        submit.submit(
            str(cfg),
            "http://127.0.0.1:8265",
            ["train.seed=3"],
            str(tmp_path / "run"),
            working_dir=str(tmp_path),
            follow=False,
        )
        == 0
    )
    (job,) = FakeJobClient.submitted
    assert job["entrypoint"].startswith("python -m launch.ray_job")
    assert leaks_in(repr(job).encode()) == []
    env_vars = (job.get("runtime_env") or {}).get("env_vars", {})
    assert not set(env_vars) & set(SECRETS)
    assert leaks_in(capsys.readouterr().out.encode()) == []


def test_entrypoint_carries_no_secrets(monkeypatch):
    from launch.submit import entrypoint

    set_secrets(monkeypatch)
    cmd = entrypoint("configs/x.yaml", ["tracking.wandb.mode=online", "train.seed=1"], "/runs/x")
    assert leaks_in(cmd.encode()) == []
