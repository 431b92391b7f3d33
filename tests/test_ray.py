"""Training on a real local Ray cluster (loopback only): the README's `ray job submit` command, a worker
killed with SIGKILL, and DeepSpeed ZeRO-2 StyleGAN2 with R1 through `ganforge submit`, resumed."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from orchestrator.data.write import write_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
FAST = ["--set", "tracking.progress_bar=false", "--set", "train.threads=1", "--set", "tracking.log_every=1"]


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on 127.0.0.1 with its own HOME and temp dir; stopped afterwards, whatever happened."""
    home = Path(tempfile.mkdtemp(prefix="gf-ray-home-"))
    temp = Path(tempfile.mkdtemp(prefix="gf-ray-"))  # short: Ray's socket paths must fit in 107 bytes
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "WANDB_MODE": "disabled",
        "DS_ACCELERATOR": "cpu",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_JOB_STOP_WAIT_TIME_S": "120",
    }  # `ray job stop` leaves the preemption checkpoint time (k8s: 240)
    for port in (6379, 8265):  # the README's command talks to the default job API port
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is taken: a Ray cluster is already running here; stop it with `ray stop`")
    import wandb

    wandb.setup()  # as in CI after in-process W&B tests: the shell that starts Ray carries a WANDB_SERVICE token
    env["WANDB_SERVICE"] = os.environ["WANDB_SERVICE"]
    start = [
        "ray",
        "start",
        "--head",
        "--num-cpus=2",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp}",
    ]
    try:
        p = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, f"ray start failed:\n{p.stdout}\n{p.stderr}"
        yield env
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
        left = subprocess.run(
            ["pgrep", "-f", f"raylet.*{temp}|gcs_server.*{temp}"], capture_output=True, text=True
        ).stdout
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        assert not left.strip(), f"Ray processes left running: {left}"


@pytest.fixture(scope="module")
def digits32() -> Path:
    """The demo's shards where the README's command expects them (data/ is git-ignored)."""
    out = ROOT / "data" / "digits32"
    if not (out / "manifest.json").exists():
        write_shards("builtin:digits", out, resolution=32, shard_size=256)
    if not (out / "dataset-cnn.pt").exists():  # the demo config evaluates with it
        from orchestrator.eval.extractors import train_feature_extractor

        train_feature_extractor(str(out / "train-*.tar"), out / "dataset-cnn.pt", epochs=3)
    return out


def run(cmd: list[str] | str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        shell=isinstance(cmd, str),
        executable="/bin/bash" if isinstance(cmd, str) else None,
    )


def readme_command() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- ray-job-submit")[1].split("```bash\n")[1].split("```")[0]
    return " ".join(line.rstrip("\\").strip() for line in block.strip().splitlines())


def steps(run_dir: Path) -> list[int]:
    """Steps of the training rows of metrics.jsonl (evaluator rows are logged at their own steps)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss/D" in r]


def test_readme_ray_job_submit_succeeds_and_leaves_a_checkpoint(cluster, digits32):
    command = readme_command()
    assert command.startswith(
        "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m launch.ray_job "
    )
    run_dir = ROOT / "runs" / "ray-dcgan-digits"
    shutil.rmtree(run_dir, ignore_errors=True)
    p = run(
        command + " " + shlex.join(FAST + ["--set", "train.stop_at_step=10", "--set", "checkpoint.every_kimg=0.32"]),
        cluster,
    )
    assert p.returncode == 0 and "succeeded" in p.stdout + p.stderr, p.stdout[-4000:] + p.stderr[-4000:]
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt-*"))
    assert [c.name for c in ckpts][-1] == "ckpt-000000010" and (ckpts[-1] / "COMPLETE.json").exists()
    assert list((run_dir / "ray").rglob("checkpoint_*/state.pt"))  # Ray's copy of the reported checkpoints
    assert steps(run_dir) == list(range(1, 11))  # only rank 0 logs
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.parametrize("upload", ["sync", "async"])
def test_a_killed_worker_restarts_from_the_last_checkpoint(cluster, digits32, tmp_path, upload):
    """Either way the checkpoints reach Ray's storage (async: in the background), and a lost worker costs at
    most one checkpoint interval."""
    interval_steps = 20  # checkpoint.every_kimg=1.28 at 64 images per step
    cmd = [
        str(BIN / "ganforge"),
        "submit",
        "configs/dev/dcgan-digits.yaml",
        "--address",
        "http://127.0.0.1:8265",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f"data.shards={digits32}/train-*.tar",
        "--set",
        "train.stop_at_step=100",
        "--set",
        "checkpoint.every_kimg=1.28",
        "--set",
        "ray.max_failures=1",
        "--set",
        f"ray.checkpoint_upload={upload}",
        "--set",
        "eval.enabled=false",
        *FAST,
    ]
    job = subprocess.Popen(cmd, cwd=ROOT, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not list((tmp_path / "run" / "checkpoints").glob("ckpt-*")):
            assert time.time() < deadline and job.poll() is None, "no checkpoint appeared"
            time.sleep(1)
        while max(steps(tmp_path / "run"), default=0) < interval_steps + 3:  # some steps past the checkpoint
            assert time.time() < deadline and job.poll() is None, "training stopped after its first checkpoint"
            time.sleep(0.2)
        workers = run(["pgrep", "-f", "ray::RayTrainWorker"], cluster).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGKILL)
        out, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-5000:]
    assert re.search(r"resumed from .* at step (\d+)", out), out[-3000:]
    seen = steps(tmp_path / "run")
    back = [(a, b) for a, b in zip(seen, seen[1:]) if b <= a]
    assert back, "the step counter never went back: the worker was not lost mid-run"
    assert all(a - b < interval_steps for a, b in back), back  # lost at most one checkpoint interval
    assert seen[-1] == 100
    assert list((tmp_path / "run" / "ray").rglob("checkpoint_*/state.pt"))  # Ray's copies
    assert not list((tmp_path / "run").glob(".ray-upload/*"))  # the twins, deleted once uploaded
    assert (tmp_path / "run" / "checkpoints" / "ckpt-000000100" / "COMPLETE.json").exists()


def test_the_upload_twin_shares_the_checkpoints_files_and_outlives_it(tmp_path):
    """Ray's background upload gets a hard-linked twin: the same bytes (same inodes: nothing copied), and it
    stays whole when retention deletes the checkpoint itself."""
    from launch.ray_worker import staged_for_upload

    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-000000010"
    (ckpt / "shards").mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"weights")
    (ckpt / "shards" / "rank1.pt").write_bytes(b"shard")
    twin = staged_for_upload(ckpt, tmp_path / "run")
    assert twin == tmp_path / "run" / ".ray-upload" / "ckpt-000000010"
    assert (twin / "state.pt").stat().st_ino == (ckpt / "state.pt").stat().st_ino
    shutil.rmtree(ckpt)  # retention
    assert (twin / "state.pt").read_bytes() == b"weights" and (twin / "shards" / "rank1.pt").read_bytes() == b"shard"


def test_async_uploads_outlive_retention(cluster, digits32, tmp_path):
    """Checkpoints every 10 fast steps, two kept, uploaded in the background from hard-linked twins: the job
    succeeds, Ray's storage has them and the twins are gone. (Without twins, retention deleted a checkpoint
    still in Ray's upload queue once, in a 300-step run, FileNotFoundError; not reproducible on demand.)"""
    cmd = [str(BIN / "ganforge"), "submit", "configs/dev/dcgan-digits.yaml", "--address", "http://127.0.0.1:8265",
           "--run-dir", str(tmp_path / "run")]  # fmt: skip
    for o in [f"data.shards={digits32}/train-*.tar", "train.stop_at_step=200", "checkpoint.every_kimg=0.64",
              "checkpoint.keep_last=2", "ray.max_failures=0", "ray.checkpoint_upload=async", "eval.enabled=false",
              "tracking.progress_bar=false", "train.threads=1", "tracking.log_every=50"]:  # fmt: skip
        cmd += ["--set", o]
    p = run(cmd, cluster, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    names = sorted(c.name for c in (tmp_path / "run" / "checkpoints").glob("ckpt-*"))
    assert names == ["ckpt-000000190", "ckpt-000000200"]
    assert list((tmp_path / "run" / "ray").rglob("checkpoint_*/state.pt"))
    assert not list((tmp_path / "run").glob(".ray-upload/*"))


def test_ray_job_stop_makes_the_workers_checkpoint_and_the_driver_exit_0(cluster, digits32, tmp_path):
    """`ray job stop` sends SIGTERM to the driver, which writes RUN_DIR/STOP; both workers finish their
    step and stop together, rank 0 checkpoints there and removes the file, and the driver exits 0."""
    run_dir = tmp_path / "run"
    entry = [
        "python",
        "-m",
        "launch.ray_job",
        "configs/dev/dcgan-digits.yaml",
        "--run-dir",
        str(run_dir),
        "--set",
        f"data.shards={digits32}/train-*.tar",
        "--set",
        "eval.enabled=false",
        "--set",
        "checkpoint.every_kimg=1.28",
        "--set",
        "ray.max_failures=0",
        *FAST,
    ]
    p = run(
        ["ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".", "--no-wait", "--", *entry],
        cluster,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    job_id = re.search(r"(raysubmit_\w+)", p.stdout + p.stderr).group(1)
    deadline = time.time() + 300
    while not list((run_dir / "checkpoints").glob("ckpt-*")):
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(1)
    time.sleep(2)
    stop = run(["ray", "job", "stop", "--address", "http://127.0.0.1:8265", job_id], cluster, timeout=300)
    logs = run(["ray", "job", "logs", "--address", "http://127.0.0.1:8265", job_id], cluster).stdout
    assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
    m = re.search(r"stopped on request at step (\d+) with checkpoint (\S+);", logs)
    assert m, logs[-5000:]
    assert "SIGTERM: asked the workers to stop" in logs
    assert (run_dir / "checkpoints" / f"ckpt-{int(m.group(1)):09d}" / "COMPLETE.json").exists()
    assert not (run_dir / "STOP").exists()
    assert steps(run_dir)[-1] == int(m.group(1))


def test_deepspeed_zero2_stylegan2_with_r1_checkpoints_and_resumes(cluster, digits32, tmp_path):
    """Two Ray workers, ZeRO-2, StyleGAN2 with lazy R1: 4 steps, then a new job resumes to step 8 and ends with
    the weights of an uninterrupted 8-step run (G, D, G_ema bit for bit: the same data positions, RNG states
    and ZeRO optimizer shards are restored, and CPU training here is deterministic)."""
    from orchestrator.checkpoint import load_checkpoint
    from orchestrator.data.write import write_shards as _write  # digits at 16 px for the StyleGAN2 dev preset

    shards = tmp_path / "digits16"
    _write("builtin:digits", shards, resolution=16, shard_size=128)

    def base(run_dir: Path) -> list[str]:
        return [
            str(BIN / "ganforge"),
            "submit",
            "configs/stylegan2/dev.yaml",
            "--address",
            "http://127.0.0.1:8265",
            "--run-dir",
            str(run_dir),
            "--set",
            f"data.shards={shards}/train-*.tar",
            "--set",
            "distributed.strategy=deepspeed",
            "--set",
            "distributed.deepspeed_config=configs/deepspeed/zero2.yaml",
            "--set",
            "loss.r1_interval=2",
            "--set",
            "checkpoint.every_kimg=0.064",
            "--set",
            "ray.max_failures=0",
            *FAST,
        ]

    first = run(base(tmp_path / "run") + ["--set", "train.stop_at_step=4"], cluster)
    assert first.returncode == 0 and "SUCCEEDED" in first.stdout, first.stdout[-5000:]
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-000000004"
    assert (ckpt / "deepspeed_G").is_dir() and (ckpt / "deepspeed_D").is_dir()
    assert any("reg/r1" in json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    second = run(base(tmp_path / "run") + ["--set", "train.stop_at_step=8"], cluster)  # a new driver, same run dir
    assert second.returncode == 0 and "SUCCEEDED" in second.stdout, second.stdout[-5000:]
    assert "at step 4" in second.stdout and (tmp_path / "run" / "checkpoints" / "ckpt-000000008").exists()
    assert steps(tmp_path / "run") == list(range(1, 9))

    straight = run(base(tmp_path / "straight") + ["--set", "train.stop_at_step=8"], cluster)
    assert straight.returncode == 0 and "SUCCEEDED" in straight.stdout, straight.stdout[-5000:]
    a, b = (load_checkpoint(d / "checkpoints" / "ckpt-000000008") for d in (tmp_path / "straight", tmp_path / "run"))
    assert a["progress"] == b["progress"]
    for net in ("G", "D", "G_ema"):
        assert a[net].keys() == b[net].keys(), net
        for k in a[net]:
            torch.testing.assert_close(
                b[net][k], a[net][k], rtol=0, atol=0, msg=lambda m, k=k, net=net: f"{net}.{k}: {m}"
            )


def test_the_evaluator_actor_works_beside_training_and_survives_being_killed(cluster, digits32, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        str(BIN / "ganforge"),
        "submit",
        "configs/dev/dcgan-digits.yaml",
        "--address",
        "http://127.0.0.1:8265",
        "--run-dir",
        str(run_dir),
        "--set",
        f"data.shards={digits32}/train-*.tar",
        "--set",
        "train.stop_at_step=150",
        "--set",
        "checkpoint.every_kimg=0.64",
        "--set",
        "eval.every_kimg=0.64",
        "--set",
        "eval.num_samples=2000",
        "--set",
        f"eval.cache_dir={tmp_path / 'cache'}",
        "--set",
        f"eval.weights_path={digits32}/dataset-cnn.pt",
        "--set",
        "ray.max_failures=0",
        # the actor at normal priority: in the idle class it may get no CPU until training ends on a machine
        # whose two vCPUs are busy (then no evaluation overlaps a step, which this test needs to see)
        "--set",
        "eval.sched_idle=false",
        "--set",
        "eval.nice=0",
        *FAST,
    ]
    job = subprocess.Popen(cmd, cwd=ROOT, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    evals = run_dir / "eval.jsonl"
    try:
        deadline = time.time() + 300
        # killed once it has evaluated the start (on a slow machine the first evaluation during training can come
        # after training has ended): the restarted actor must take over the evaluations during training
        while not (evals.exists() and evals.read_text().strip()):
            if job.poll() is not None:
                pytest.fail(f"the job ended before the first evaluation:\n{job.stdout.read()[-6000:]}")
            assert time.time() < deadline, "no evaluation of the start"
            time.sleep(0.5)
        actors = run(["pgrep", "-f", "ray::EvaluatorActor"], cluster).stdout.split()
        assert len(actors) == 1, actors
        killed_at = time.time()
        os.kill(int(actors[0]), signal.SIGKILL)
        out, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-5000:]  # losing the evaluator never stops training
    rows = [json.loads(x) for x in evals.read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 150  # FID at the start and at the end
    timeline = [(r["step"], r["started"] - killed_at, r["finished"] - killed_at) for r in rows]
    assert any(r["finished"] > killed_at for r in rows), f"the restarted evaluator never evaluated again: {timeline}"
    assert rows[-1]["eval/fid"] < rows[0]["eval/fid"]
    step_times = [
        json.loads(x)["time"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss/D" in json.loads(x)
    ]
    windows = [(r["started"], r["finished"]) for r in rows if r["step"] > 0]
    assert any(a < t < b for a, b in windows for t in step_times), "no training step ran during an evaluation"


def test_a_cyclegan_job_trains_on_two_ray_workers_with_the_evaluator_actor(cluster, digits32, tmp_path):
    """An image → image recipe through `ganforge submit`: 2 Ray Train workers (DDP) on unpaired shards, the
    evaluator actor measuring label preservation and FID on the held-out domains, the pools in the checkpoint."""
    from orchestrator.data.write import write_unpaired

    shards = tmp_path / "cycle"
    write_unpaired("builtin:digits", "builtin:digits-m", shards, 32, holdout=0.05, shard_size=64, max_train=256)
    run_dir = tmp_path / "run"
    settings = {
        "data.shards": f"{shards}/train-*.tar",
        "train.stop_at_step": 6,
        "train.batch_size": 4,
        "model.ngf": 4,
        "model.ndf": 4,
        "model.g_blocks": 1,
        "checkpoint.every_kimg": 0.012,
        "eval.every_kimg": 0.012,
        "eval.metrics": "[label_aba,fid_a]",
        "eval.weights_path": f"{digits32}/dataset-cnn.pt",
        "eval.classifier_a": f"{digits32}/dataset-cnn.pt",
        "eval.classifier_b": "null",
        "eval.cache_dir": str(tmp_path / "cache"),
        "ray.max_failures": 0,
    }
    cmd = [str(BIN / "ganforge"), "submit", "configs/cyclegan/digits2digitsm.yaml", "--address",
           "http://127.0.0.1:8265", "--run-dir", str(run_dir), *FAST]  # fmt: skip
    cmd += [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]
    p = run(cmd, cluster)
    assert p.returncode == 0, p.stdout[-5000:] + p.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 3, 6]
    assert all(0 <= r["eval/label_aba"] <= 1 and r["eval/fid_a"] > 0 for r in rows)
    from orchestrator.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir / "checkpoints" / "ckpt-000000006")
    assert len(state["recipe.pool_a"]["images"]) == 24  # 6 steps × 4 fakes: the pool of 50 is still filling
    assert steps(run_dir) == list(range(1, 7))
