"""Profiling a few training steps with torch.profiler (``tracking.profile_steps``).

Phases, data loading and the loop's collectives are labelled with ``record_function`` (``phase:D``,
``data:next``, ``loop:stop_check`` …), so the table shows where a step's time goes per phase as well as
per operator; every rank writes its own files, since a slow rank makes the others wait in all-reduce.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from orchestrator.tracking import TrackingConfig


class StepProfiler:
    """Profiles steps ``profile_after + 1 … profile_after + profile_steps`` of this process; inactive when
    ``profile_steps`` is 0. Call :meth:`step` after every training step and :meth:`close` at the end."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, rank: int):
        self.prof = None
        if not cfg.profile_steps:
            return
        self.out = Path(run_dir) / "profile"
        self.rank = rank
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(
            activities=activities,
            schedule=schedule(wait=cfg.profile_after - 1, warmup=1, active=cfg.profile_steps, repeat=1),
            on_trace_ready=self._write,
        )
        self.prof.start()

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def close(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None

    def _write(self, prof) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        ops = prof.key_averages().table(sort_by=sort, row_limit=30)
        phases = [e for e in prof.key_averages() if e.key.split(":")[0] in ("phase", "data", "loop")]
        lines = [f"{e.key:<24} {e.count:>6} calls {e.cpu_time_total / 1e3:>12.1f} ms total" for e in phases]
        text = "labelled regions (inclusive CPU time):\n" + "\n".join(lines) + "\n\noperators:\n" + ops
        (self.out / f"rank{self.rank}.txt").write_text(text)
        prof.export_chrome_trace(str(self.out / f"rank{self.rank}.json"))
