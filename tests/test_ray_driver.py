"""The Ray driver's decisions, without a Ray cluster: the exit code once training returned (launch/ray_job.py's
``exit_status``: a preemption before the end fails the job with 75 so that a RayJob's ``backoffLimit`` runs it
again; the end reached, or a deliberate stop, exits 0), and the worker group it asks Ray Train for (fixed or
elastic, its placement, the collective timeout) with the checks an elastic run needs first."""

from __future__ import annotations

import pytest

from launch.ray_job import PREEMPTED_EXIT_CODE, exit_status
from orchestrator.config import load_config
from orchestrator.faults import GRACE_EXIT_CODE

CONFIG = "configs/dev/dcgan-digits.yaml"


def train_section(*sets: str):
    return load_config(CONFIG, list(sets)).train


@pytest.mark.parametrize(
    ("sets", "metrics", "preempted", "code"),
    [
        # total_kimg reached: 0 whether or not a preemption came at the last step
        (["train.total_kimg=1.28"], {"step": 20, "kimg": 1.28}, False, 0),
        (["train.total_kimg=1.28"], {"step": 20, "kimg": 1.28}, True, 0),
        (["train.total_kimg=0.3"], {"step": 5, "kimg": 0.32}, True, 0),  # overshoot by a last batch
        # stop_at_step reached
        (["train.stop_at_step=10"], {"step": 10, "kimg": 0.64}, True, 0),
        # before the end: a preemption is a failure to retry, a deliberate stop is not
        (["train.total_kimg=1.28"], {"step": 7, "kimg": 0.448}, True, PREEMPTED_EXIT_CODE),
        (["train.stop_at_step=10"], {"step": 9, "kimg": 0.576}, True, PREEMPTED_EXIT_CODE),
        (["train.total_kimg=1.28"], {"step": 7, "kimg": 0.448}, False, 0),
        (["train.stop_at_step=10"], {"step": 9, "kimg": 0.576}, False, 0),
        # nothing reported: not known to be finished; a preemption retries (a finished run resumes and ends at once)
        ([], {}, True, PREEMPTED_EXIT_CODE),
        ([], {}, False, 0),
    ],
)
def test_exit_status(sets, metrics, preempted, code):
    got, message = exit_status(train_section(*sets), metrics, preempted)
    assert got == code, message
    if code:
        assert f"stopped at step {metrics.get('step')} before the end (preempted)" in message
        assert "backoffLimit" in message and "resumes from RUN_DIR" in message
    else:
        assert "preempted" not in message


@pytest.mark.parametrize("total_kimg", [0.3, 1.001, 1.28, 2.007, 2.5])
def test_the_end_is_the_training_loops_end(total_kimg):
    """The driver sees the end exactly where the loop does (``nimg >= total_kimg * 1000``, orchestrator/train/
    run.py, the integer nimg), although it only gets ``kimg = nimg / 1000``: 2.007 * 1000 is 2007.0000000000002
    in floating point, so 2007 images are not the end, but 2007 / 1000 * 1000 is 2007.0000000000002 too."""
    train = train_section(f"train.total_kimg={total_kimg}")
    for nimg in range(0, 3001):
        code, _ = exit_status(train, {"step": nimg // 32, "kimg": nimg / 1000}, True)
        assert (code == 0) == (nimg >= total_kimg * 1000), (nimg, code)


def test_the_code_is_ex_tempfail_like_the_grace_watchdog():
    assert PREEMPTED_EXIT_CODE == GRACE_EXIT_CODE == 75


def ray_config(*sets: str):
    return load_config(CONFIG, ["distributed.strategy=ddp", *sets])


def test_the_worker_group_ray_train_gets():
    from pathlib import Path

    from launch.ray_job import build_trainer

    fixed = build_trainer(ray_config("ray.num_workers=2"), Path("/tmp/run"), None)
    assert fixed.scaling_config.num_workers == 2 and fixed.scaling_config.placement_strategy == "PACK"
    sets = ["ray.num_workers=4", "ray.min_workers=2", "ray.placement_strategy=SPREAD", "ray.resize_interval_s=5",
            "ray.collective_timeout_s=90"]  # fmt: skip
    elastic = build_trainer(ray_config(*sets), Path("/tmp/run"), None)
    assert elastic.scaling_config.num_workers == (2, 4)  # Ray Train's elastic form
    assert elastic.scaling_config.placement_strategy == "SPREAD"
    assert elastic.scaling_config.elastic_resize_monitor_interval_s == 5
    assert elastic.backend_config.timeout_s == 90 and elastic.backend_config.backend == "gloo"


def test_an_elastic_run_must_split_its_global_batch_at_every_worker_count():
    from orchestrator.config import ConfigError
    from orchestrator.train.preflight import check_worker_counts

    check_worker_counts(
        ray_config("train.batch_size=12", "ray.num_workers=4", "ray.min_workers=2")
    )  # 12 = 2·6 = 3·4 = 4·3
    with pytest.raises(
        ConfigError, match=r"ray\.min_workers: 2: an elastic run may train on 3 worker\(s\).*global batch 16"
    ):
        check_worker_counts(ray_config("train.batch_size=16", "ray.num_workers=4", "ray.min_workers=2"))
    check_worker_counts(ray_config("train.batch_size=16", "ray.num_workers=4"))  # fixed: only 4 matters


def test_an_elastic_run_refuses_deepspeed_and_a_minimum_above_the_maximum():
    from orchestrator.config import ConfigError
    from orchestrator.train.preflight import check_worker_counts

    with pytest.raises(ConfigError, match="ZeRO checkpoint holds one optimizer shard per worker"):
        check_worker_counts(ray_config("distributed.strategy=deepspeed", "ray.min_workers=1"))
    with pytest.raises(ConfigError, match=r"ray.min_workers \(3\) must not exceed ray.num_workers \(2\)"):
        ray_config("ray.num_workers=2", "ray.min_workers=3")
