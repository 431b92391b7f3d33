"""Evaluation beside training: dev mode evaluates at the start, on its interval and at the end; the
actor form never makes the caller wait, drops stale requests, and runs niced with its own torch threads;
each result says how far behind training it arrived; the best-FID checkpoint is kept."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from architectures import ImageSpec, get
from orchestrator.checkpoint import list_checkpoints
from orchestrator.config import validate_config
from orchestrator.eval.evaluator import evaluate, resolve_holdout
from orchestrator.eval.extractors import train_feature_extractor
from orchestrator.eval.service import EvalClient, EvaluatorActor
from orchestrator.train.monitor import evaluation_job
from orchestrator.train.run import train


@pytest.fixture(scope="module")
def extractor(digits16, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extractor") / "dataset-cnn.pt"
    train_feature_extractor(str(digits16 / "train-*.tar"), out, epochs=2)
    return out


def eval_config(digits16: Path, extractor: Path, cache: Path, **extra) -> dict:
    return tiny_config(
        digits16,
        train={"total_kimg": 0.48, "batch_size": 32},
        checkpoint={"every_kimg": 10, "keep_last": 1},
        tracking={"log_every": 5},
        eval={
            "enabled": True,
            "every_kimg": 0.16,
            "feature_extractor": "dataset-cnn",
            "weights_path": str(extractor),
            "num_samples": 64,
            "metrics": ["fid", "kid"],
            "cache_dir": str(cache),
            **extra,
        },
    )


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_dev_mode_evaluates_at_start_interval_and_end(digits16, extractor, tmp_path):
    cfg = validate_config(eval_config(digits16, extractor, tmp_path / "cache"), "test")
    result = train(cfg, tmp_path / "run")
    assert result.step == 15
    evals = rows(tmp_path / "run" / "eval.jsonl")
    assert [r["step"] for r in evals] == [0, 5, 10, 15]  # start, every 0.16 kimg (5 steps of 32), end
    assert evals[0]["eval/cache_hit"] is False and all(r["eval/cache_hit"] for r in evals[1:])
    assert all(r["eval/fid"] > 0 and "eval/kid" in r for r in evals)
    logged = [r for r in rows(tmp_path / "run" / "metrics.jsonl") if "eval/fid" in r]
    assert [(r["step"], r["eval/fid"]) for r in logged] == [(r["step"], r["eval/fid"]) for r in evals]
    # dev mode: training waited for each result, so it is 0 kimg behind, late by the seconds it blocked
    assert all(r["eval/lag_kimg"] == 0 for r in logged)
    assert [r["eval/lag_s"] for r in logged] == pytest.approx([r["finished"] - r["requested"] for r in evals])
    assert all(r["eval/lag_s"] >= r["eval/seconds"] > 0 for r in logged)
    # the best-FID checkpoint survives pruning (keep_last: 1); the others are gone
    kept = list_checkpoints(tmp_path / "run")
    best = min((r for r in evals if r["checkpoint"]), key=lambda r: r["eval/fid"])
    assert Path(best["checkpoint"]) in kept and (Path(best["checkpoint"]) / "BEST").exists()
    assert kept[-1].name == "ckpt-000000015"
    # the row names the checkpoint whose G_ema it evaluated: those weights, evaluated again, give its number (the
    # metric itself is checked against an independent computation in tests/test_evaluator.py)
    from orchestrator.checkpoint import load_generator

    loaded = load_generator(best["checkpoint"])
    again = evaluate(loaded.G, loaded.spec, cfg.eval, resolve_holdout(cfg.eval, cfg.data))
    assert again.metrics["fid"] == pytest.approx(best["eval/fid"], rel=1e-6)
    other = min(
        (r for r in evals if r["checkpoint"] and r["checkpoint"] != best["checkpoint"]), key=lambda r: r["step"]
    )
    assert other["eval/fid"] != pytest.approx(best["eval/fid"], rel=1e-6)  # so the match above is not a coincidence


def test_actor_never_waits_and_drops_stale_requests(digits16, extractor, tmp_path):
    cfg = validate_config(eval_config(digits16, extractor, tmp_path / "cache", num_samples=512), "test")
    from architectures import get

    G = get("dcgan").build_generator(cfg.model, ImageSpec(16, 1, 10))
    state = G.state_dict()
    actor = EvaluatorActor(evaluation_job(cfg, ImageSpec(16, 1, 10)), str(tmp_path / "run"))
    actor.submit(1, 0.1, state, None)
    deadline = time.time() + 120
    while not actor.status()["busy"]:
        assert time.time() < deadline
        time.sleep(0.01)
    t0 = time.perf_counter()
    for step in (2, 3, 4):  # while step 1 is being evaluated
        actor.submit(step, step / 10, state, None)
    assert time.perf_counter() - t0 < 0.5  # submitting never waits for an evaluation
    while not actor.idle():
        assert time.time() < deadline
        time.sleep(0.1)
    assert [r["step"] for r in actor.results()] == [1, 4]  # 2 and 3 went stale and were dropped
    assert actor.status() == {"pending": False, "busy": False, "dropped": 2, "failures": []}


def test_a_failed_evaluation_is_recorded_not_fatal(digits16, extractor, tmp_path):
    cfg = validate_config(eval_config(digits16, extractor, tmp_path / "cache"), "test")
    actor = EvaluatorActor(evaluation_job(cfg, ImageSpec(16, 1, 10)), str(tmp_path / "run"))
    actor.submit(7, 0.7, {"not": torch.zeros(1)}, None)  # weights of another network
    deadline = time.time() + 60
    while not actor.idle():
        assert time.time() < deadline
        time.sleep(0.05)
    assert actor.results() == [] and "step 7" in actor.status()["failures"][0]


def test_missing_extractor_weights_fail_before_training(digits16, tmp_path):
    from orchestrator.eval.evaluator import EvalError

    raw = eval_config(digits16, tmp_path / "nope.pt", tmp_path / "cache")
    t0 = time.perf_counter()
    with pytest.raises(EvalError, match=r"nope.pt, which does not exist"):
        train(validate_config(raw, "test"), tmp_path / "run")
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "run" / "checkpoints").exists()


def nice_of(pid: int, tid: int) -> int:
    """A thread's niceness as the kernel reports it (/proc/PID/task/TID/stat, field 19)."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def threads_of(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def wait_idle(actor, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not actor.idle():
        assert time.time() < deadline
        time.sleep(0.05)


def test_the_evaluation_thread_runs_niced_with_its_own_threads(digits16, extractor, tmp_path):
    cfg = validate_config(eval_config(digits16, extractor, tmp_path / "cache", nice=17, threads=3), "test")
    caller_nice, caller_threads = os.getpriority(os.PRIO_PROCESS, 0), torch.get_num_threads()
    actor = EvaluatorActor(evaluation_job(cfg, ImageSpec(16, 1, 10)), str(tmp_path / "run"))
    iso = actor.isolation()
    assert (iso["nice"], iso["threads"], nice_of(os.getpid(), iso["tid"]), iso["sched_idle"]) == (17, 3, 17, True)
    before = threads_of(os.getpid())
    actor.submit(1, 0.1, get("dcgan").build_generator(cfg.model, ImageSpec(16, 1, 10)).state_dict())
    wait_idle(actor)
    assert actor.status()["failures"] == [] and len(actor.results()) == 1
    started = threads_of(os.getpid()) - before  # torch's OpenMP workers, started by the evaluating thread
    assert started and {nice_of(os.getpid(), t) for t in started} == {17}
    assert {os.sched_getscheduler(t) for t in started} == {os.SCHED_IDLE}
    # a thread of its own: the caller (here the test, in dev mode training) keeps its priority and threads
    assert (os.getpriority(os.PRIO_PROCESS, 0), torch.get_num_threads()) == (caller_nice, caller_threads)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


@pytest.fixture
def ray_head(monkeypatch, tmp_path):
    """A Ray head in this process (a free GCS port, no dashboard), with a short temp dir and a HOME of its own
    (Ray writes its auth token there)."""
    import ray

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    temp = tempfile.mkdtemp(prefix="gf-ray-")  # short: Ray's socket paths must fit in 107 bytes
    environ = dict(os.environ)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        # ray.init leaves RAY_AUTH_MODE=token (and more) in os.environ: a later `ray start` would then want a token
        os.environ.clear()
        os.environ.update(environ)


@pytest.mark.ray
def test_the_ray_actor_yields_to_training_and_reports_its_lag(ray_head, digits16, extractor, tmp_path):
    from launch.ray_worker import start_evaluator

    # 17: not the default 19, and above the niceness 15 Ray starts its workers' Python threads at
    cfg = validate_config(eval_config(digits16, extractor, tmp_path / "cache", nice=17, threads=3), "test")
    spec = ImageSpec(16, 1, 10)
    _, actor = start_evaluator(cfg, spec, tmp_path / "run")
    client = EvalClient(actor=actor)
    G = get("dcgan").build_generator(cfg.model, spec)
    t0 = time.time()
    client.submit(3, 96, G, None)  # requested at 0.096 kimg
    t1 = time.time()
    deadline = t1 + 120
    while True:  # not client.finish(): a threaded actor may answer idle() before it has run submit()
        t2 = time.time()
        rows = client.poll(640)  # received at 0.64 kimg
        t3 = time.time()
        if rows:
            break
        assert t3 < deadline
        time.sleep(0.1)
    (row,) = rows
    assert row["eval/lag_kimg"] == pytest.approx(0.64 - 0.096)
    assert t0 <= row["requested"] <= t1 and t2 - t1 <= row["eval/lag_s"] <= t3 - t0
    iso = ray_head.get(actor.isolation.remote())
    assert (iso["nice"], iso["threads"], iso["process_nice"], iso["process_sched_idle"]) == (17, 3, 17, True)
    # every thread of the actor's process, Ray's own and those the evaluation started, as the kernel sees them
    assert {nice_of(iso["pid"], t) for t in threads_of(iso["pid"])} == {17}
    ray_head.kill(actor)


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a thread's priority needs CAP_SYS_NICE (root here)")
def test_training_workers_take_back_the_priority_ray_lowered():
    """Ray starts its workers' threads at niceness 15; ``ray.worker_nice: 0`` brings every thread back to 0."""
    from launch.ray_worker import set_worker_priority

    ready, done, tid = threading.Event(), threading.Event(), []

    def ray_thread():  # as Ray leaves a worker's threads
        os.setpriority(os.PRIO_PROCESS, 0, 15)
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(30)

    t = threading.Thread(target=ray_thread)
    t.start()
    try:
        ready.wait(30)
        assert nice_of(os.getpid(), tid[0]) == 15
        set_worker_priority(0)
        assert nice_of(os.getpid(), tid[0]) == 0
    finally:
        done.set()
        t.join()
