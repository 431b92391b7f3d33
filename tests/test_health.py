"""Training health: gradient norms, the D-winning / mode-collapse / NaN alarms, the real-image grid,
and what an offline W&B run file holds (scalars, images, eval metrics, one run id across a resume)."""

from __future__ import annotations

import json
import math
import re
import struct
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from orchestrator.config import validate_config
from orchestrator.data.shards import ShardLoader, image_spec, load_manifest
from orchestrator.health import HealthConfig, HealthMonitor, diversity
from orchestrator.train.run import train


def run(shards: Path, run_dir: Path, resume: str | None = None, **sections):
    return train(validate_config(tiny_config(shards, **sections), source="test"), run_dir, resume=resume)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def collecting_monitor(cfg: HealthConfig) -> tuple[HealthMonitor, list[tuple[str, str, str]]]:
    alerts: list[tuple[str, str, str]] = []
    return HealthMonitor(cfg, lambda *a: alerts.append(a)), alerts


def real_digits(shards: Path, n: int = 64) -> torch.Tensor:
    cfg = validate_config(tiny_config(shards), source="test")
    return ShardLoader(cfg.data, image_spec(cfg.data, load_manifest(cfg.data)), n, seed=0).next().img


def wandb_records(path: Path) -> list:
    """The records of an offline ``run-<id>.wandb`` file: a 7-byte W&B header, then LevelDB's log format
    (32 KiB blocks of chunks with a 7-byte header: CRC, length, type full/first/middle/last), each
    record a ``wandb_internal_pb2.Record``. wandb 0.31 ships no Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a chunk header: the block's padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a run file once its ``exit`` record is on disk: W&B's service may still be
    writing the file for a moment after ``finish()`` returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def history(records) -> list[dict]:
    """The ``run.log`` rows of a run file, as dicts of decoded values (media items are nested dicts,
    stored one field per item under a nested key)."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in r.history.item:
            *parents, leaf = list(item.nested_key) or [item.key]
            node = row
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = json.loads(item.value_json)
        rows.append(row)
    return rows


def test_grad_norms_are_logged_and_finite(digits16, tmp_path):
    run(digits16, tmp_path / "r", train={"total_kimg": 0.064}, tracking={"log_every": 2})
    rows = [r for r in metrics(tmp_path / "r") if "loss/D" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(
        math.isfinite(r["grad/G"]) and r["grad/G"] > 0 and math.isfinite(r["grad/D"]) and r["grad/D"] > 0 for r in rows
    )
    assert all(r["health/d_winning"] == 0 and r["health/nonfinite"] == 0 for r in rows)


def test_d_winning_alarm_when_g_cannot_learn(digits16, tmp_path, capsys):
    run(
        digits16,
        tmp_path / "r",
        train={"total_kimg": 0.48},
        optim={"g": {"lr": 1e-9}, "d": {"lr": 0.01}},
        health={"d_loss_below": 0.3, "d_winning_logs": 3},
        tracking={"wandb": {"mode": "offline"}},
    )  # offline: run.alert must not fail
    rows = [r for r in metrics(tmp_path / "r") if "loss/D" in r]
    fired = [r["step"] for r in rows if r["health/d_winning"] == 1]
    assert fired, [round(r["loss/D"], 3) for r in rows]
    first = rows.index(next(r for r in rows if r["health/d_winning"] == 1))
    assert first >= 2 and all(r["loss/D"] < 0.3 for r in rows[first - 2 : first + 1])  # 3 consecutive logs
    assert capsys.readouterr().out.count("warning: D is winning") >= 1


def test_a_wgan_critics_negative_loss_is_not_d_winning():
    """A WGAN critic's loss is negative in healthy runs: only the accuracy test may call it winning."""
    cfg = HealthConfig(d_loss_below=0.01, d_accuracy_above=0.99, d_winning_logs=2)
    for kind, expected in (("nonsaturating", 1.0), ("wgan", 0.0)):
        alerts: list = []
        monitor = HealthMonitor(cfg, lambda *a: alerts.append(a), loss_kind=kind)
        flags = [monitor.check({"loss/D": -2.0, "D/accuracy": 0.6}, step=s)["health/d_winning"] for s in range(3)]
        assert flags[-1] == expected and len(alerts) == expected, kind
    monitor = HealthMonitor(cfg, lambda *a: None, loss_kind="wgan")
    flags = [monitor.check({"loss/D": -2.0, "D/accuracy": 1.0}, step=s)["health/d_winning"] for s in range(3)]
    assert flags == [0.0, 1.0, 1.0]


def test_mode_collapse_alarm_on_identical_samples(digits16):
    real = real_digits(digits16)
    monitor, alerts = collecting_monitor(HealthConfig())
    monitor.observe_real(real)
    assert monitor.real_diversity == pytest.approx(diversity(real)) and monitor.real_diversity > 1
    assert not monitor.diversity_due(0, 1000) and monitor.diversity_due(0, 2000)  # judged from 2 kimg on
    varied = monitor.check({"loss/D": 1.0}, step=1, samples=real.flip(0))
    assert varied["health/mode_collapse"] == 0 and varied["health/diversity"] == pytest.approx(1.0) and not alerts
    collapsed = monitor.check({"loss/D": 1.0}, step=2, samples=real[:1].repeat(64, 1, 1, 1))
    assert collapsed["health/mode_collapse"] == 1 and collapsed["health/diversity"] == 0
    again = monitor.check({"loss/D": 1.0}, step=3, samples=real[:1].repeat(64, 1, 1, 1) + 0.01 * real)
    assert again["health/mode_collapse"] == 1
    assert [a[0] for a in alerts] == ["mode_collapse"]  # alerts once while it holds
    assert monitor.check({"loss/D": 1.0}, step=4).get("health/mode_collapse") is None  # not measured this log


def test_nan_alarm(digits16):
    monitor, alerts = collecting_monitor(HealthConfig())
    assert monitor.check({"loss/D": 1.0, "grad/G": 2.0}, step=1)["health/nonfinite"] == 0
    assert monitor.check({"loss/D": float("nan"), "grad/G": 2.0}, step=2)["health/nonfinite"] == 1
    assert monitor.check({"loss/D": 1.0, "grad/G": float("inf")}, step=3)["health/nonfinite"] == 1
    assert [(a[0], a[1]) for a in alerts] == [("nonfinite", "NaN/Inf in training")] and "loss/D" in alerts[0][2]
    assert monitor.check({"loss/D": 1.0, "grad/G": 2.0}, step=4)["health/nonfinite"] == 0
    monitor.check({"loss/G": float("-inf")}, step=5)
    assert len(alerts) == 2 and "loss/G" in alerts[1][2]


def test_healthy_dev_run_raises_no_alarm(digits16, tmp_path, capsys):
    """The dev DCGAN-digits recipe (z 64, 32 channels, batch 64, EMA half-life 1 kimg) at 16×16, default
    thresholds, diversity checked at every log: no alarm in 3 kimg."""
    run(
        digits16,
        tmp_path / "r",
        model={"z_dim": 64, "g_channels": 32, "d_channels": 32},
        train={"total_kimg": 3.2, "batch_size": 64},
        ema={"half_life_kimg": 1.0, "rampup": 0.05},
        checkpoint={"every_kimg": 10},
        tracking={"sample_every_kimg": 10},
        health={"diversity_every": 1},
    )
    rows = [r for r in metrics(tmp_path / "r") if "loss/D" in r]
    assert len(rows) == 50
    assert all(r["health/d_winning"] == 0 and r["health/nonfinite"] == 0 for r in rows)
    checked = [r for r in rows if "health/diversity" in r]
    assert len(checked) >= 15 and all(r["health/mode_collapse"] == 0 for r in checked)
    assert "warning:" not in capsys.readouterr().out


def test_real_grid_has_one_row_per_class(digits16, tmp_path):
    from PIL import Image

    run(digits16, tmp_path / "r", train={"total_kimg": 0.016})
    grid = Image.open(tmp_path / "r" / "samples" / "real.png")
    # 10 classes × grid_size 4 images of 16 px with 1 px padding
    assert grid.size == (4 * 17 + 1, 10 * 17 + 1)


def test_wandb_offline_run_files_and_resume(digits16, tmp_path):
    from orchestrator.eval.extractors import train_feature_extractor

    extractor = tmp_path / "dataset-cnn.pt"
    train_feature_extractor(str(digits16 / "train-*.tar"), extractor, epochs=1)
    sections = dict(
        train={"total_kimg": 0.32},
        tracking={"log_every": 2, "wandb": {"mode": "offline"}},
        checkpoint={"every_kimg": 10, "keep_last": 2},
        eval={
            "enabled": True,
            "every_kimg": 0.16,
            "feature_extractor": "dataset-cnn",
            "weights_path": str(extractor),
            "num_samples": 32,
            "metrics": ["fid"],
            "cache_dir": str(tmp_path / "cache"),
        },
    )
    run_dir = tmp_path / "run"
    first = run(digits16, run_dir, **{**sections, "train": {"total_kimg": 0.32, "stop_at_step": 10}})
    assert first.step == 10
    second = run(digits16, run_dir, resume="auto", **sections)
    assert second.step == 20
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    # one run id, appended to (W&B adds "-1" to the folder of a second start within the same second)
    assert len(dirs) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", d.name) for d in dirs), dirs

    rows = [h for d in dirs for h in history(finished_records(d / f"run-{run_id}.wandb"))]
    train_rows = [h for h in rows if "loss/D" in h]
    assert [h["train/step"] for h in train_rows] == list(range(2, 21, 2))
    assert all(math.isfinite(h["grad/G"]) and math.isfinite(h["grad/D"]) for h in train_rows)
    jsonl = {r["step"]: r for r in metrics(run_dir) if "loss/D" in r}
    assert all(h["loss/D"] == pytest.approx(jsonl[h["train/step"]]["loss/D"]) for h in train_rows)

    images = {
        (h["train/step"], k)
        for h in rows
        for k, v in h.items()
        if isinstance(v, dict) and v.get("_type") == "image-file"
    }
    assert (0, "samples/real") in images
    assert {s for s, k in images if k == "samples/grid"} == {5, 10, 15, 20}  # every 0.08 kimg of 16 images
    evals = [h for h in rows if "eval/fid" in h]
    assert sorted(h["train/step"] for h in evals) == [0, 10, 20]  # start, interval (the stop), interval (the end)
    assert all(h["eval/fid"] > 0 for h in evals)


def test_late_evaluations_do_not_push_w_and_b_past_the_training_step(tmp_path):
    """A Ray run's evaluator results arrive after training logged their step: each is a row of its own at the
    training step it belongs to, and the grid and scalars logged next are kept (W&B drops a row whose own step
    is below its current one: ``wandb.log(..., step=)`` lost them)."""
    from PIL import Image

    from orchestrator.tracking import Tracker, TrackingConfig

    cfg = TrackingConfig(progress_bar=False, wandb={"mode": "offline"})
    tracker = Tracker(cfg, tmp_path / "run", {}, total_img=160)
    grid = tmp_path / "grid.png"
    Image.new("L", (8, 8)).save(grid)
    tracker.log({"loss/D": 1.0}, step=10, nimg=160)
    for step in (0, 10):  # the start's evaluation and the last one, both late
        tracker.log_eval({"step": step, "kimg": step * 0.016, "eval/fid": 50.0 - step})
    tracker.log_image("samples/grid", grid, step=10)
    tracker.log({"loss/D": 0.5}, step=11, nimg=176)
    run_id = tracker.run_id
    tracker.close()
    (run_file,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*/run-{run_id}.wandb")
    rows = history(finished_records(run_file))
    assert [h["train/step"] for h in rows if "loss/D" in h] == [10, 11]
    assert [(h["train/step"], h["eval/fid"]) for h in rows if "eval/fid" in h] == [(0, 50.0), (10, 40.0)]
    assert [h["train/step"] for h in rows if "samples/grid" in h] == [10]
