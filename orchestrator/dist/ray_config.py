"""The ``ray`` config section: the Ray Train worker group that ``launch/ray_job.py`` builds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config import StrictConfig


class RayConfig(StrictConfig):
    """The Ray Train worker group and run settings (used by ``python -m launch.ray_job``)."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process each); elastic: the most")
    min_workers: int | None = Field(
        None,
        ge=1,
        description="elastic training (Ray Train's num_workers=(min, max)): train on as few as this many workers "
        "while nodes are missing, and grow back to num_workers when they return. The global batch stays "
        "train.batch_size at every size (micro-batches and accumulation are recomputed), so every size must split "
        "it; DDP only. None: a fixed worker count",
    )
    resize_interval_s: float = Field(
        60.0, ge=0, description="elastic: how often a running worker group checks whether it can grow (seconds)"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="how Ray places the workers on nodes: PACK (fewest nodes: fastest collectives) or SPREAD "
        "(one per node where it can: a lost node costs fewer workers); STRICT_* refuse to start otherwise",
    )
    collective_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="gloo/NCCL timeout of a collective (Ray Train's TorchConfig.timeout_s): a worker whose peer "
        "vanished without Ray noticing fails after this long instead of hanging",
    )
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

    @model_validator(mode="after")
    def _elastic_range(self) -> RayConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(
                f"ray.min_workers ({self.min_workers}) must not exceed ray.num_workers ({self.num_workers})"
            )
        return self

    @property
    def worker_counts(self) -> range:
        """Every worker count the run may have: one, or each from ``min_workers`` to ``num_workers``."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)

    @property
    def elastic(self) -> bool:
        """Whether the worker count may change while training (``min_workers`` below ``num_workers``)."""
        return len(self.worker_counts) > 1
