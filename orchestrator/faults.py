"""Faults a long run survives: preemption (SIGTERM or a STOP file) and non-finite steps.

**Preemption.** :class:`StopRequest` turns SIGTERM (Kubernetes eviction, a spot reclaim, ``ray job stop``
reaching a torchrun or dev-mode process) or a file named ``STOP`` in the run directory (written by the
Ray driver on SIGTERM, by the Kubernetes ``preStop`` hook, or by hand) into a request the loop reads
between steps: every worker finishes its step, the workers agree (one all-reduce), rank 0 writes a
checkpoint and the Run's ``train()`` returns, so the process exits 0. A watchdog ends the
process (exit code 75, EX_TEMPFAIL) if that has not happened ``faults.grace_s`` seconds after the
request; the previous checkpoint is intact either way (checkpoints are written atomically).

**Non-finite steps.** A phase whose gradients hold a NaN or Inf skips its optimizer step (the official
StyleGAN2 code zeroes such gradients silently; here they are counted and reported as
``fault/skipped_steps``). After ``faults.nonfinite_patience`` bad steps in a row the run rolls back to
the last good checkpoint and lowers the learning rate by ``faults.lr_factor`` (and, with
``faults.fp32_fallback``, runs the reduced-precision blocks in fp32 from then on); it says so in the
log and as a W&B alert. :class:`FaultState` (counts, the lr scale, the fallback) is checkpointed.
fp16 with loss scaling skips overflowing steps itself (the scaler's job, not a fault), and DeepSpeed
steps inside its engines, so the guard covers fp32 and bf16 under the single and DDP strategies.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from core.config import StrictConfig

STOP_FILE = "STOP"
GRACE_EXIT_CODE = 75


class FaultConfig(StrictConfig):
    """How the run reacts to preemption and to NaN/Inf."""

    grace_s: float = Field(
        120.0,
        gt=0,
        description="after SIGTERM or a STOP file: finish the step and checkpoint "
        "within this many seconds, else exit with code 75 (the previous checkpoint stays)",
    )
    skip_nonfinite: bool = Field(True, description="skip (and count) optimizer steps whose gradients hold NaN/Inf")
    nonfinite_patience: int = Field(5, ge=1, description="this many bad steps in a row trigger on_nonfinite")
    on_nonfinite: Literal["rollback", "stop"] = Field(
        "rollback",
        description="rollback: reload the last good checkpoint and lower the lr; stop: end the run with an error",
    )
    lr_factor: float = Field(0.5, gt=0, le=1, description="multiply G's and D's lr by this at each rollback")
    fp32_fallback: bool = Field(False, description="at a rollback, also run reduced-precision blocks in fp32")
    max_rollbacks: int = Field(3, ge=0, description="stop with an error after this many rollbacks")


class NonfiniteError(RuntimeError):
    """NaN/Inf persisted past what the config allows."""


@dataclass
class FaultState:
    """What the fault handling has done so far (checkpointed)."""

    skipped_steps: int = 0
    consecutive: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0
    fp32: bool = False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class FaultGuard:
    """The policy for non-finite steps, and its state: count skipped updates, and say when the run must
    roll back (``faults.nonfinite_patience`` bad steps in a row) or stop."""

    def __init__(self, cfg: FaultConfig):
        self.cfg, self.state = cfg, FaultState()

    def record(self, skipped: int) -> bool:
        """Count a step's skipped updates; True when a rollback is due."""
        self.state.consecutive = self.state.consecutive + 1 if skipped else 0
        self.state.skipped_steps += bool(skipped)
        return self.state.consecutive >= self.cfg.nonfinite_patience

    def check_rollback(self, step: int, target: Path | None) -> str:
        """Why the run rolls back (a sentence), or :class:`NonfiniteError` when it must stop instead."""
        why = f"{self.state.consecutive} consecutive steps with NaN/Inf gradients at step {step}"
        reason = (
            "faults.on_nonfinite is stop"
            if self.cfg.on_nonfinite == "stop"
            else "no checkpoint to roll back to"
            if target is None
            else f"faults.max_rollbacks ({self.cfg.max_rollbacks}) reached"
            if self.state.rollbacks >= self.cfg.max_rollbacks
            else None
        )
        if reason:
            raise NonfiniteError(
                f"{why}; {reason}. Lower optim.*.lr, use train.precision fp32, or raise faults.nonfinite_patience"
            )
        return why

    def rolled_back(self) -> None:
        """After the restore (which keeps this guard's own state): lower the learning rates, maybe fall back to
        fp32, count the rollback."""
        self.state.rollbacks += 1
        self.state.consecutive = 0
        self.state.lr_scale *= self.cfg.lr_factor
        self.state.fp32 = self.state.fp32 or self.cfg.fp32_fallback

    def metrics(self) -> dict[str, float]:
        return {"fault/skipped_steps": self.state.skipped_steps, "fault/rollbacks": self.state.rollbacks}

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)


class StopRequest:
    """A request to stop after the current step: SIGTERM (main thread only) or ``RUN_DIR/STOP``."""

    def __init__(self, run_dir: Path, grace_s: float, lead: bool):
        self.stop_file = Path(run_dir) / STOP_FILE
        self.grace_s = grace_s
        self.signalled_at: float | None = None
        self._previous = None
        self._done = threading.Event()
        if lead:
            self.stop_file.unlink(missing_ok=True)  # a request from before this start has been served

    def install(self) -> None:
        """Catch SIGTERM, when this is the main thread (Ray Train workers run the loop in another one)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def uninstall(self) -> None:
        self._done.set()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
            print(
                f"ganforge: SIGTERM: stopping after this step with a checkpoint (grace {self.grace_s:.0f} s)",
                flush=True,
            )
            self._start_watchdog()

    def _start_watchdog(self) -> None:
        def watch() -> None:
            if not self._done.wait(self.grace_s):
                print(
                    f"ganforge: no checkpoint within the grace period ({self.grace_s:.0f} s): exiting; the "
                    f"previous checkpoint is intact",
                    flush=True,
                )
                os._exit(GRACE_EXIT_CODE)

        threading.Thread(target=watch, name="ganforge-grace", daemon=True).start()

    def requested(self) -> bool:
        """Whether this worker was asked to stop (signal, or the STOP file appeared)."""
        if self.signalled_at is None and self.stop_file.exists():
            self.signalled_at = time.monotonic()
            print(f"ganforge: {self.stop_file} found: stopping after this step with a checkpoint", flush=True)
            self._start_watchdog()
        return self.signalled_at is not None

    def served(self) -> None:
        """The checkpoint is written: remove the STOP file (a preStop hook waits for that) and the watchdog."""
        self._done.set()
        self.stop_file.unlink(missing_ok=True)
