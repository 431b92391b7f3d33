"""Training on a Ray cluster: the checks the driver makes, the evaluator actor it starts, and the function
each Ray Train worker runs.

The driver (``launch/ray_job.py``) builds a ``TorchTrainer`` from the ``ray`` config section; every worker
runs :func:`ray_worker`, which is the dev-mode loop with a :class:`WorkerContext` whose ``report``
hands each new checkpoint to ``ray.train.report`` and whose ``restore_from`` is the newest of Ray's
checkpoint (after a worker-group restart) and the run directory's (after a driver restart).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def staged_for_upload(checkpoint: Path, run_dir: Path) -> Path:
    """A hard-linked twin of ``checkpoint`` under ``RUN_DIR/.ray-upload/`` for Ray's background upload (no
    bytes copied): the run's retention (``checkpoint.keep_last``) may delete the checkpoint before Ray's
    queue reaches it, the links keep its files, and Ray deletes the twin once uploaded. Checkpoint files
    are never rewritten in place, so sharing them is safe."""
    stage = run_dir / ".ray-upload" / checkpoint.name
    shutil.rmtree(stage, ignore_errors=True)
    try:
        shutil.copytree(checkpoint, stage, copy_function=os.link)
    except OSError:  # a filesystem without hard links: a real copy, still uploaded in the background
        shutil.rmtree(stage, ignore_errors=True)
        shutil.copytree(checkpoint, stage)
    return stage


def prepare_for_workers(cfg) -> None:
    """Check, on the driver, what would otherwise fail on every worker and every restart, and make file
    paths absolute: Ray Train workers do not run in the job's working directory."""
    from orchestrator.data.shards import expand_shards
    from orchestrator.dist.deepspeed import deepspeed_config

    local = lambda p: not (p.startswith("pipe:") or "://" in p)
    if local(cfg.data.shards) and not os.path.isabs(cfg.data.shards):
        cfg.data.shards = "::".join(str(Path(u).resolve()) for u in cfg.data.shards.split("::"))
    for key in ("manifest", "holdout"):
        value = getattr(cfg.data, key)
        if value and local(value) and not os.path.isabs(value):
            setattr(cfg.data, key, str(Path(value).resolve()))
    expand_shards(cfg.data.shards)
    if cfg.distributed.strategy == "deepspeed":
        cfg.distributed.deepspeed_config = str(Path(cfg.distributed.deepspeed_config).resolve())
        deepspeed_config(cfg.distributed, cfg.train.precision, 1, 1, 1)  # readable?
    if cfg.eval.enabled:
        from orchestrator.eval.evaluator import check_feature_extractor

        for key in ("weights_path", "holdout"):
            value = getattr(cfg.eval, key)
            if value and local(value) and not os.path.isabs(value):
                setattr(cfg.eval, key, str(Path(value).resolve()))
        check_feature_extractor(cfg.eval)  # missing weights fail here, in seconds, not in the actor


def start_evaluator(cfg, spec, run_dir: Path):
    """Start the evaluator actor with its own resources (restarted by Ray if it dies); returns its name
    and handle. The caller must hold the handle while training runs: Ray ends an actor with its last handle."""
    import ray

    from orchestrator.eval.service import NAMESPACE, EvaluatorActor, actor_name
    from orchestrator.train.monitor import evaluation_job

    name = actor_name(run_dir)
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))  # one left over from an earlier driver of this run
    except ValueError:
        pass
    actor = (
        ray.remote(EvaluatorActor)
        .options(
            name=name,
            namespace=NAMESPACE,
            num_cpus=cfg.eval.cpus,
            num_gpus=cfg.eval.gpus,
            resources=cfg.eval.resources,
            max_restarts=-1,
            max_concurrency=4,
        )
        .remote(evaluation_job(cfg, spec), str(run_dir), True)  # its own process: all of it yields to training
    )
    ray.get(actor.status.remote())  # fails now if the actor cannot start
    return name, actor


def set_worker_priority(nice: int) -> None:
    """Every thread of this training worker at niceness ``nice`` (Linux keeps it per thread; threads started
    later inherit it). Raising a priority needs CAP_SYS_NICE: where refused, say so and train anyway."""
    from orchestrator.eval.service import thread_ids

    try:
        for tid in thread_ids():
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except ProcessLookupError:  # the thread ended meanwhile
                pass
    except PermissionError as e:
        print(f"ganforge: ray.worker_nice: {nice} not set ({e}); the worker keeps Ray's priority", flush=True)


def ray_worker(loop_config: dict) -> None:
    """The Ray Train worker function: restore if there is something to restore, then train."""
    import ray.train

    from orchestrator.checkpoint import checkpoint_step, latest_checkpoint
    from orchestrator.train.run import WorkerContext, train

    cfg = loop_config["config"]
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    if cfg.ray.worker_nice is not None:
        set_worker_priority(cfg.ray.worker_nice)

    upload = cfg.ray.checkpoint_upload

    def report(metrics: dict, path: Path | None) -> None:
        if path is not None and upload == "async":  # Ray deletes the twin, never the run directory's checkpoint
            path = staged_for_upload(path, run_dir)
        ray.train.report(  # every rank in the same mode: a rank reporting sync waits for rank 0's upload
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(path)) if path else None,
            checkpoint_upload_mode=getattr(ray.train.CheckpointUploadMode, upload.upper()),
            delete_local_checkpoint_after_upload=upload == "async",
        )

    ctx = WorkerContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        report=report,
        evaluator=loop_config.get("evaluator"),
    )
    # A W&B service token inherited through the raylet belongs to whatever process started Ray. Sharing that
    # service keeps a lost worker's unfinished run open, and the restarted rank 0 is refused ("run ID in use").
    os.environ.pop("WANDB_SERVICE", None)
    if cfg.train.threads:
        os.environ["OMP_NUM_THREADS"] = str(cfg.train.threads)
    ray_ckpt = ray.train.get_checkpoint()
    local = latest_checkpoint(run_dir)
    if ray_ckpt is None:
        ctx.restore_from = local
        train(cfg, run_dir, resume="auto", ctx=ctx)
        return
    with ray_ckpt.as_directory() as directory:  # the newer of Ray's and the run directory's
        ctx.restore_from = Path(directory) if checkpoint_step(Path(directory)) >= checkpoint_step(local) else local
        train(cfg, run_dir, resume="auto", ctx=ctx)
