"""The ``ray`` config section: the Ray Train worker group that ``launch/ray_job.py`` builds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config import StrictConfig


class RayConfig(StrictConfig):
    """The Ray Train worker group and run settings (used by ``python -m launch.ray_job``)."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process each)")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs each worker reserves (below 1 leaves room for the evaluator on small machines)"
    )
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each worker reserves (0: CPU training with gloo)")
    resources_per_worker: dict[str, float] = Field({}, description="extra custom resources per worker")
    name: str | None = Field(None, description="Ray Train run name (default: the run directory's name)")
    storage_path: str | None = Field(
        None,
        description="where Ray keeps reported checkpoints: a local path or a "
        "cloud URI such as s3://bucket/ganforge (default: RUN_DIR/ray)",
    )
    max_failures: int = Field(3, ge=-1, description="worker-group restarts after a failure (-1: unlimited)")
    num_to_keep: int = Field(2, ge=1, description="checkpoints Ray keeps in its storage")
    checkpoint_upload: Literal["sync", "async"] = Field(
        "sync",
        description="how each checkpoint reaches Ray's storage: sync (ray.train.report waits for the copy, about "
        "1.3 s per report on a 2-core machine) or async (Ray copies a hard-linked twin of it in the background "
        "while training goes on, and deletes the twin; Ray's CheckpointUploadMode.ASYNC, alpha in Ray 2.60; "
        "a copy where the run directory's filesystem has no hard links)",
    )
    worker_nice: int | None = Field(
        0,
        ge=0,
        le=19,
        description="niceness of the training workers' threads: Ray starts its workers at 15, which leaves a "
        "niced evaluator actor more of a shared core than it should get; 0 restores the normal priority (needs "
        "CAP_SYS_NICE, as root in a VM; where refused, a warning and training goes on). None: leave Ray's",
    )
