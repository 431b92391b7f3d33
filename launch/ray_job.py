"""The Ray driver: ``ray job submit ... -- python -m launch.ray_job CONFIG [--set k=v]... [--run-dir DIR]``.

Loads and validates the config, then runs the training loop on ``ray.num_workers`` Ray Train workers
(DDP or DeepSpeed from ``distributed.strategy``) with ``TorchTrainer``, restarting the worker group
from the last reported checkpoint after a failure. Re-running it with the same run directory
continues the run. Exits non-zero when training fails. On SIGTERM (``ray job stop``) it writes
``RUN_DIR/STOP``: the workers finish their step, checkpoint and return, and the driver exits 0 (give
``ray job stop`` the time with ``RAY_JOB_STOP_WAIT_TIME_S`` on the cluster; see docs/reliability.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def default_run_dir(config: str) -> Path:
    """An absolute default: a job's working directory is a temporary copy, gone after the job."""
    return Path.home() / "ganforge" / "runs" / Path(config).stem


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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from launch.ray_worker import prepare_for_workers, ray_worker, start_evaluator
    from orchestrator.config import ConfigError, load_config
    from orchestrator.data.errors import DataError
    from orchestrator.data.shards import image_spec, load_manifest
    from orchestrator.eval.evaluator import EvalError
    from orchestrator.faults import STOP_FILE
    from orchestrator.train.preflight import check_batches

    try:
        cfg = load_config(a.config, a.set)
        prepare_for_workers(cfg)
        check_batches(cfg, cfg.ray.num_workers)
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
    use_gpu = r.gpus_per_worker > 0
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {}), **r.resources_per_worker}
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={"config": cfg, "run_dir": str(run_dir), "evaluator": evaluator},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=r.name or run_dir.name,
            storage_path=r.storage_path or str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=r.num_to_keep),
        ),
    )
    print(
        f"ganforge: training {cfg.model.arch} on {r.num_workers} Ray worker(s) ({cfg.distributed.strategy}); "
        f"run directory {run_dir}",
        flush=True,
    )

    def request_stop(signum, frame) -> None:  # `ray job stop`: the workers checkpoint and return
        (run_dir / STOP_FILE).touch()
        print(f"ganforge: SIGTERM: asked the workers to stop with a checkpoint ({run_dir / STOP_FILE})", flush=True)

    signal.signal(signal.SIGTERM, request_stop)
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
    print(
        f"ganforge: finished; last checkpoint {result.checkpoint.path if result.checkpoint else None}; "
        f"metrics {result.metrics}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
