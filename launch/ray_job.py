"""The Ray driver: ``ray job submit ... -- python -m launch.ray_job CONFIG [--set k=v]... [--run-dir DIR]``.

Loads and validates the config, then runs the training loop on ``ray.num_workers`` Ray Train workers
(DDP or DeepSpeed from ``distributed.strategy``) with ``TorchTrainer``, restarting the worker group
from the last reported checkpoint after a failure. Re-running it with the same run directory
continues the run. Exits non-zero when training fails. On SIGTERM (``ray job stop``) it writes
``RUN_DIR/STOP``: the workers finish their step, checkpoint and return, and the driver exits 0 (give
``ray job stop`` the time with ``RAY_JOB_STOP_WAIT_TIME_S`` on the cluster; see docs/reliability.md).
A stop that is a preemption (the Kubernetes head's ``preStop`` hook writes ``RUN_DIR/PREEMPTED`` before
``RUN_DIR/STOP``) ends with exit code 75 instead when training had not reached its end, so that the job
fails and a RayJob's ``backoffLimit`` runs it again on a new cluster, resuming from the run directory
(:func:`exit_status`).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

PREEMPTED_FILE = "PREEMPTED"  # RUN_DIR/PREEMPTED: the stop that follows is a preemption, not a decision
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL, as orchestrator.faults.GRACE_EXIT_CODE: try again later


def exit_status(train, metrics: dict, preempted: bool) -> tuple[int, str]:
    """The driver's exit code and last line once ``trainer.fit()`` returned without an error.

    ``train`` is the config's ``train`` section; ``metrics`` the last ``ray.train.report`` (every checkpoint
    reports ``step`` and ``kimg``, and the loop checkpoints when it ends); ``preempted`` whether
    ``RUN_DIR/PREEMPTED`` was written. Training that reached ``train.total_kimg`` or ``train.stop_at_step``
    exits 0, stopped or not; a deliberate stop (``ray job stop``, a STOP file written by hand) before the end
    exits 0 too; a preemption before the end exits 75, so the job fails and is retried."""
    step, kimg = metrics.get("step"), metrics.get("kimg")
    stop_at = train.stop_at_step
    reached = (kimg is not None and round(kimg * 1000) >= train.total_kimg * 1000) or bool(
        stop_at and step is not None and step >= stop_at
    )
    if reached:
        return 0, f"finished at step {step} ({kimg} kimg)"
    if preempted:
        return PREEMPTED_EXIT_CODE, (
            f"stopped at step {step} before the end (preempted): resubmit or let the RayJob's backoffLimit "
            f"retry; it resumes from RUN_DIR (exit code {PREEMPTED_EXIT_CODE})"
        )
    return 0, f"stopped on request at step {step} before the end; the same --run-dir continues the run"


def take_marker(path: Path) -> bool:
    """Whether the marker file was there; it is gone afterwards (a later stop must write its own)."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def default_run_dir(config: str) -> Path:
    """An absolute default: a job's working directory is a temporary copy, gone after the job."""
    return Path.home() / "ganforge" / "runs" / Path(config).stem


def build_trainer(cfg, run_dir: Path, evaluator: str | None):
    """Ray Train's ``TorchTrainer`` for the ``ray`` section: the worker group (fixed or elastic, placed by
    ``ray.placement_strategy``), gloo or NCCL with ``ray.collective_timeout_s``, and the failure budget."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from launch.ray_worker import ray_worker

    r = cfg.ray
    use_gpu = r.gpus_per_worker > 0
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {}), **r.resources_per_worker}
    return TorchTrainer(
        ray_worker,
        train_loop_config={"config": cfg, "run_dir": str(run_dir), "evaluator": evaluator},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(r.collective_timeout_s)),
        scaling_config=ScalingConfig(
            num_workers=(r.min_workers, r.num_workers) if r.elastic else r.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=r.placement_strategy,
            elastic_resize_monitor_interval_s=r.resize_interval_s,
        ),
        run_config=RunConfig(
            name=r.name or run_dir.name,
            storage_path=r.storage_path or str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=r.num_to_keep),
        ),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launch.ray_job", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="YAML config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument(
        "--run-dir", help="absolute run directory on storage every worker sees (default: ~/ganforge/runs/<config name>)"
    )
    a = p.parse_args(argv)

    import ray

    from launch.ray_worker import prepare_for_workers, start_evaluator
    from orchestrator.config import ConfigError, load_config
    from orchestrator.data.errors import DataError
    from orchestrator.data.shards import image_spec, load_manifest
    from orchestrator.eval.evaluator import EvalError
    from orchestrator.faults import STOP_FILE
    from orchestrator.train.preflight import check_worker_counts

    try:
        cfg = load_config(a.config, a.set)
        prepare_for_workers(cfg)
        check_worker_counts(cfg)
        spec = image_spec(cfg.data, load_manifest(cfg.data))
    except (ConfigError, DataError, EvalError, FileNotFoundError) as e:
        print(f"launch.ray_job: error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(a.run_dir).resolve() if a.run_dir else default_run_dir(a.config)
    r = cfg.ray
    if cfg.distributed.strategy == "single" and r.num_workers > 1:
        print(
            f"ganforge: distributed.strategy is single but ray.num_workers is {r.num_workers}: the workers train "
            f"with ddp (set distributed.strategy: ddp or deepspeed to choose)",
            flush=True,
        )
        cfg.distributed.strategy = "ddp"
    ray.init()  # inside `ray job submit`: the cluster that runs the job
    evaluator, evaluator_handle = start_evaluator(cfg, spec, run_dir) if cfg.eval.enabled else (None, None)
    trainer = build_trainer(cfg, run_dir, evaluator)
    workers = f"{r.min_workers} to {r.num_workers}" if r.elastic else str(r.num_workers)
    print(
        f"ganforge: training {cfg.model.arch} on {workers} Ray worker(s) ({cfg.distributed.strategy}, "
        f"placement {r.placement_strategy}); "
        f"run directory {run_dir}",
        flush=True,
    )

    def request_stop(signum, frame) -> None:  # `ray job stop`: the workers checkpoint and return
        (run_dir / STOP_FILE).touch()
        print(f"ganforge: SIGTERM: asked the workers to stop with a checkpoint ({run_dir / STOP_FILE})", flush=True)

    signal.signal(signal.SIGTERM, request_stop)
    take_marker(run_dir / PREEMPTED_FILE)  # left by an earlier driver of this run that did not get to read it
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray Train raises once the failure budget is spent
        print(f"ganforge: training failed: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if evaluator_handle is not None:
            ray.kill(evaluator_handle)  # rank 0 waited for its last evaluation before finishing
    if result.error:
        print(f"ganforge: training failed: {result.error}", file=sys.stderr, flush=True)
        return 1
    code, outcome = exit_status(cfg.train, result.metrics or {}, take_marker(run_dir / PREEMPTED_FILE))
    print(
        f"ganforge: {outcome}; last checkpoint {result.checkpoint.path if result.checkpoint else None}; "
        f"metrics {result.metrics}",
        file=sys.stderr if code else sys.stdout,
        flush=True,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
