"""Where training tells its story: the console, a JSON-lines log in the run directory, and W&B.

Only rank 0 creates a :class:`Tracker`; the other ranks log nothing. W&B runs offline unless an API
key is set (``mode: auto``), writing real run files under ``<run_dir>/wandb/``. The run id is kept
in the run directory and in checkpoints, so a resumed job appends to the same W&B run.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from core.config import StrictConfig

RUN_ID_FILE = "wandb_run_id"
METRICS_FILE = "metrics.jsonl"
STEP_KEY = "train/step"  # the x-axis of every W&B chart: the training step a row belongs to


class WandbConfig(StrictConfig):
    """The W&B run: ``mode: auto`` is online when WANDB_API_KEY is set, offline otherwise."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "ganforge"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = []
    name: str | None = Field(None, description="run name (default: the run directory's name)")


class TrackingConfig(StrictConfig):
    """How often to log and sample, and the W&B run."""

    log_every: int = Field(50, ge=1, description="log scalars every this many steps")
    sample_every_kimg: float = Field(50.0, gt=0, description="write a fixed-seed sample grid every this many kimg")
    grid_size: int = Field(8, ge=1, le=32, description="samples per grid side (conditional grids: one row per class)")
    progress_bar: bool = Field(True, description="tqdm progress bar (else one summary line per log)")
    profile_steps: int = Field(
        0, ge=0, description="profile this many steps with torch.profiler after profile_after steps (every rank "
        "writes profile/rank<r>.txt, the top operators and phases, and a Chrome trace profile/rank<r>.json)",
    )  # fmt: skip
    profile_after: int = Field(5, ge=1, description="steps before profiling starts (compilation, warm-up)")
    wandb: WandbConfig = WandbConfig()


def wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """Logs scalars and images to the console, ``metrics.jsonl`` and W&B, keyed by step and kimg."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: Path,
        config: dict[str, Any],
        total_img: int,
        run_id: str | None = None,
        start_img: int = 0,
        active: bool = True,
    ):
        """``active=False`` (ranks other than 0): every method does nothing."""
        self.active = active
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_id, self.wandb, self._bar = run_id, None, None
        if not active:
            return
        import wandb

        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.run_dir / RUN_ID_FILE
        self.run_id = run_id or (id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12])
        id_file.write_text(self.run_id)
        self.mode = wandb_mode(cfg.wandb)
        if self.mode != "disabled":
            w = cfg.wandb
            self.wandb = wandb.init(
                project=w.project,
                entity=w.entity,
                group=w.group,
                tags=w.tags,
                name=w.name or self.run_dir.name,
                id=self.run_id,
                resume="allow",
                dir=str(self.run_dir),
                mode=self.mode,
                config=config,
                settings=wandb.Settings(console="off", silent=True),
            )
            # Every row carries the training step it belongs to, and every chart is drawn against it: W&B's
            # own step only goes forward, and a Ray run's evaluations arrive after training moved on.
            self.wandb.define_metric(STEP_KEY)
            self.wandb.define_metric("*", step_metric=STEP_KEY)
        self._jsonl = open(self.run_dir / METRICS_FILE, "a")
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_img / 1000,
                initial=start_img / 1000,
                unit="kimg",
                dynamic_ncols=True,
                mininterval=1.0,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}{postfix}]",
            )

    @property
    def wandb_dir(self) -> str | None:
        return self.wandb.dir.removesuffix("/files") if self.wandb is not None else None

    def advance(self, nimg: int) -> None:
        """Move the progress bar to ``nimg`` images."""
        if self._bar is not None:
            self._bar.update(min(nimg / 1000, self._bar.total) - self._bar.n)  # redraws at most every mininterval

    def log(self, metrics: dict[str, float], step: int, nimg: int) -> None:
        """Scalars at a step; NaN/Inf are logged as they are (JSON gets strings for them)."""
        if not self.active:
            return
        row = {"step": step, "kimg": nimg / 1000, "time": time.time(), **metrics}
        self._jsonl.write(
            json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()})
            + "\n"
        )
        self._jsonl.flush()
        if self.wandb is not None:
            self.wandb.log({**metrics, "kimg": nimg / 1000, STEP_KEY: step})
        short = "  ".join(
            f"{k.split('/')[-1]} {v:.3g}" for k, v in metrics.items() if k.startswith(("loss/", "perf/img_per_s"))
        )
        if self._bar is not None:
            self._bar.set_postfix_str(short, refresh=False)
        else:
            print(f"step {step:7d}  kimg {nimg / 1000:9.2f}  {short}", flush=True)

    def log_eval(self, row: dict) -> None:
        """An evaluator result, at the training step it belongs to (in ``metrics.jsonl`` and as ``train/step``
        in W&B, a row of its own: results arrive after training moved on)."""
        if not self.active:
            return
        scalars = {k: v for k, v in row.items() if k.startswith("eval/") and isinstance(v, (int, float))}
        self._jsonl.write(json.dumps({"step": row["step"], "kimg": row["kimg"], "time": time.time(), **scalars}) + "\n")
        self._jsonl.flush()
        if self.wandb is not None:
            self.wandb.log({**scalars, STEP_KEY: row["step"], "eval/step": row["step"], "eval/kimg": row["kimg"]})
        fid = f"  FID {row['eval/fid']:.2f}" if "eval/fid" in row else ""
        self.note(
            f"eval at step {row['step']} ({row['kimg']:.1f} kimg):{fid}  "
            + "  ".join(f"{k[5:]} {v:.4g}" for k, v in scalars.items() if k not in ("eval/fid", "eval/cache_hit"))
        )

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        """An image file (a sample grid) at a step."""
        if not self.active:
            return
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path), caption=caption), STEP_KEY: step})

    def alert(self, title: str, text: str) -> None:
        """A training-health warning: on the console and as a W&B alert (offline runs record it in
        their run file; a failing alert never stops training)."""
        if not self.active:
            return
        self.note(f"warning: {title}: {text}")
        if self.wandb is not None:
            import wandb

            try:
                self.wandb.alert(title=title, text=text, level=wandb.AlertLevel.WARN)
            except Exception as e:  # noqa: BLE001
                self.note(f"warning: W&B alert failed: {e}")

    def note(self, message: str) -> None:
        """A line for the console that does not break the progress bar."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA's allocator peak on GPU, the resident-set peak on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
