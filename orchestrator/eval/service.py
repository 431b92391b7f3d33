"""Evaluation beside training: the :class:`Evaluator`, its Ray actor form, and the client rank 0 uses.

Training hands G_ema's weights to the evaluator and never waits. In dev mode the evaluator runs in
the training process (at the start, every ``eval.every_kimg`` and at the end, blocking for the
seconds it takes). On a Ray cluster it is :class:`EvaluatorActor`, a separate actor with its own
CPUs or GPU: ``submit`` returns at once and replaces any request still waiting (stale ones are
dropped, at most one is pending), a background thread evaluates, and each result is appended to
``RUN_DIR/eval.jsonl`` with the training step it belongs to. Rank 0 polls for new results at its
logging steps, logs them (W&B, ``metrics.jsonl``) against that step with how far behind training they
arrived (``eval/lag_kimg``, ``eval/lag_s``), and marks the best-FID checkpoint so that retention never
deletes it. Ray restarts a crashed actor (``max_restarts=-1``); while it is away, submissions and polls
fail quietly and training goes on.

On CPUs the actor must not take training's cores: every thread of its process runs at niceness
``eval.nice`` or higher (Linux keeps niceness per thread, so each existing one is raised, and threads
started later inherit it from the thread that starts them), and its evaluating thread uses
``eval.threads`` torch threads. Ray starts its workers' Python threads, training's included, at
niceness 15 (``RAY_worker_niceness``), so niceness 19 alone still leaves the evaluator ~30% of a core that
training wants (CFS weights 15 vs 36); the threads also enter the SCHED_IDLE class (``eval.sched_idle``,
weight 3, no privileges needed), where they run on what training leaves idle. A GPU actor has its device
to itself; the same settings only lower its CPU side.

Why not Ray Train's ``ValidationConfig`` (alpha in Ray 2.60): it runs each validation as a fresh Ray
task, so the feature extractor and the held-out statistics would be reloaded every time (a disk
cache helps only partly), it offers no "drop stale requests" policy, and its API is alpha. A named
actor keeps everything warm and gives exactly the semantics above.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import architectures
from architectures.registry import ArchConfig
from core.spec import ImageSpec
from orchestrator.eval.evaluator import (
    EvalConfig,
    EvalResult,
    check_feature_extractor,
    evaluate,
    needs_extractor,
    resolve_metrics,
)

EVAL_FILE = "eval.jsonl"
NAMESPACE = "ganforge"  # named actors are per namespace; the driver's and Ray Train workers' differ


@dataclass(frozen=True)
class EvalJob:
    """What an evaluator needs, resolved once by whoever starts it: its settings, the generator to rebuild
    (family, model config, image spec), the held-out shard URLs and the training data's manifest (sha256
    of held-out shards that are not local files; None when unknown)."""

    eval: EvalConfig
    arch: str
    model: ArchConfig
    spec: ImageSpec
    holdout: list[str]
    manifest: dict | None = None


class Evaluator:
    """Evaluates G_ema weights against the held-out shards and records the results in ``eval.jsonl``.

    Image-to-image data (``spec.translates``) is evaluated by
    :func:`~orchestrator.eval.translation.evaluate_translation` on held-out images read once, at the first
    evaluation, and kept in memory."""

    def __init__(self, job: EvalJob, run_dir: str):
        self.cfg, self.run_dir, self.spec = job.eval, Path(run_dir), job.spec
        self.manifest, self.holdout = job.manifest, job.holdout
        arch = architectures.get(job.arch)
        self.capabilities = arch.capabilities
        # each of these fails at once: metrics that do not fit the data, missing weights or classifiers
        self.metrics = resolve_metrics(job.eval, job.spec, self.capabilities)
        self.extractor = check_feature_extractor(job.eval) if needs_extractor(self.metrics) else None
        if job.spec.translates:
            from orchestrator.eval.translation import load_classifiers

            load_classifiers(job.eval, self.metrics)
        self._heldout = None
        self.G = arch.build_generator(job.model, job.spec).eval().requires_grad_(False)

    def evaluate(
        self,
        step: int,
        kimg: float,
        g_ema_state: dict,
        checkpoint: str | None = None,
        requested: float | None = None,
    ) -> dict:
        """Evaluate one set of G_ema weights now; append and return the result row. ``requested``: when rank 0
        handed the weights over, on its clock (default: now)."""
        started = time.time()
        self.G.load_state_dict(g_ema_state)
        result = self._evaluate()
        row = {
            "step": step,
            "kimg": kimg,
            "checkpoint": checkpoint,
            "requested": started if requested is None else requested,
            "started": started,
            "finished": time.time(),
            **{f"eval/{k}": v for k, v in result.metrics.items()},
            "eval/seconds": result.seconds,
            "eval/cache_hit": result.cache_hit,
            "feature_extractor": result.feature_extractor,
            **({"notes": result.notes} if result.notes else {}),
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / EVAL_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def _evaluate(self) -> EvalResult:
        if not self.spec.translates:
            return evaluate(
                self.G,
                self.spec,
                self.cfg,
                self.holdout,
                extractor=self.extractor,
                manifest=self.manifest,
                capabilities=self.capabilities,
            )
        from orchestrator.eval.translation import evaluate_translation

        return evaluate_translation(
            self.G,
            self.spec,
            self.cfg,
            self.heldout(),
            capabilities=self.capabilities,
            extractor=self.extractor,
            holdout_urls=self.holdout,
            manifest=self.manifest,
        )

    def heldout(self):
        """The held-out images of image-to-image data (``orchestrator.data.heldout.read_heldout``), read at the
        first call and kept in memory."""
        if self._heldout is None:
            from orchestrator.data.heldout import read_heldout

            self._heldout = read_heldout(self.holdout, self.spec, self.cfg.holdout_num)
        return self._heldout

    def results(self, since: int = 0) -> list[dict]:
        """Result rows from number ``since`` on (rows survive actor restarts: they are read from the file)."""
        path = self.run_dir / EVAL_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()[since:]]


def thread_ids() -> list[int]:
    """The native ids of this process's threads (Linux); elsewhere ``[0]``, the whole process."""
    tasks = Path("/proc/self/task")
    return [int(t) for t in os.listdir(tasks)] if tasks.is_dir() else [0]


def niceness(tid: int = 0) -> int:
    """The niceness of thread ``tid`` of this process (0: the calling thread)."""
    return os.getpriority(os.PRIO_PROCESS, tid)


def lower_priority(nice: int, tids: list[int], idle: bool = False) -> None:
    """Raise the niceness of threads ``tids`` (0: the calling thread) to at least ``nice`` (0: leave it) and,
    with ``idle``, move them to the SCHED_IDLE class. Never raises a priority: that needs privileges an
    evaluator does not have (entering SCHED_IDLE does not)."""
    for tid in tids:
        try:
            if nice:
                os.setpriority(os.PRIO_PROCESS, tid, max(nice, niceness(tid)))
            if idle and hasattr(os, "SCHED_IDLE"):
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def sched_idle(tid: int = 0) -> bool:
    """Whether thread ``tid`` (0: the calling thread) runs in the SCHED_IDLE class."""
    return hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(tid) == os.SCHED_IDLE


def eval_threads(cfg: EvalConfig) -> int:
    """Torch threads of the evaluating thread: ``eval.threads``, else the reserved CPUs rounded up."""
    return cfg.threads or max(1, math.ceil(cfg.cpus))


class EvaluatorActor(Evaluator):
    """The evaluator as a Ray actor: ``submit`` never waits; one background thread evaluates the newest
    request at niceness ``eval.nice`` with ``eval.threads`` torch threads. Create it with
    ``ray.remote(EvaluatorActor).options(max_concurrency=4, max_restarts=-1, ...).remote(job, run_dir, True)``."""

    def __init__(self, job: EvalJob, run_dir: str, own_process: bool = False):
        """``own_process``: the process is the evaluator's alone (a Ray actor), so all its threads are lowered,
        not only the evaluating one."""
        super().__init__(job, run_dir)
        self._pending: tuple | None = None
        self._busy = False
        self._wake = threading.Condition()
        self.dropped = 0
        self.failures: list[str] = []
        self._ready = threading.Event()
        self._tid, self._threads = 0, 0
        if own_process:
            self._lower_priority(thread_ids())
        threading.Thread(target=self._loop, daemon=True, name="evaluator").start()

    def submit(
        self,
        step: int,
        kimg: float,
        g_ema_state: dict,
        checkpoint: str | None = None,
        requested: float | None = None,
    ) -> None:
        """Queue one set of G_ema weights (replacing any still waiting) and return at once."""
        with self._wake:
            if self._pending is not None:
                self.dropped += 1  # a newer checkpoint makes the waiting one stale
            self._pending = (step, kimg, g_ema_state, checkpoint, requested)
            self._wake.notify()

    def idle(self) -> bool:
        """True when nothing is pending or running."""
        with self._wake:
            return self._pending is None and not self._busy

    def status(self) -> dict:
        """Whether a request waits or runs, how many went stale, and the failed evaluations."""
        with self._wake:
            return {
                "pending": self._pending is not None,
                "busy": self._busy,
                "dropped": self.dropped,
                "failures": list(self.failures),
            }

    def isolation(self, timeout: float = 30.0) -> dict:
        """How the evaluation runs: this process and its evaluating thread (native ids), that thread's niceness
        (read now) and torch threads, and the lowest niceness among all threads of this process."""
        self._ready.wait(timeout)
        return {
            "pid": os.getpid(),
            "tid": self._tid,
            "nice": niceness(self._tid),
            "threads": self._threads,
            "process_nice": min(niceness(t) for t in thread_ids()),
            "sched_idle": sched_idle(self._tid),
            "process_sched_idle": all(sched_idle(t) for t in thread_ids()),
        }

    def _lower_priority(self, tids: list[int]) -> None:
        if not (self.cfg.nice or self.cfg.sched_idle):
            return
        try:
            lower_priority(self.cfg.nice, tids, self.cfg.sched_idle)
        except OSError as e:  # a container that forbids it: evaluate anyway, and say so
            self.failures.append(f"niceness {self.cfg.nice} / SCHED_IDLE {self.cfg.sched_idle} not set: {e}")

    def _isolate(self) -> None:
        """In the evaluating thread, before any torch work: both niceness and torch's thread count are per
        thread, and the OpenMP workers this thread starts inherit its niceness."""
        self._lower_priority([0])
        torch.set_num_threads(eval_threads(self.cfg))
        self._tid, self._threads = threading.get_native_id(), torch.get_num_threads()
        self._ready.set()

    def _loop(self) -> None:
        self._isolate()
        while True:
            with self._wake:
                while self._pending is None:
                    self._wake.wait()
                request, self._pending, self._busy = self._pending, None, True
            try:
                self.evaluate(*request)
            except Exception as e:  # noqa: BLE001 - a failed evaluation is reported, never fatal
                self.failures.append(f"step {request[0]}: {type(e).__name__}: {e}")
            finally:
                with self._wake:
                    self._busy = False


def actor_name(run_dir: Path) -> str:
    return f"ganforge-evaluator-{Path(run_dir).name}"


class EvalClient:
    """What rank 0 calls: ``submit`` (never waits for the evaluation), ``poll`` (new result rows) and
    ``finish`` (wait for the last request). Local in dev mode, a Ray actor handle on a cluster."""

    def __init__(self, evaluator: Evaluator | None = None, actor=None, note=print, resume_step: int | None = None):
        """``resume_step``: the step this run resumed from; results of later steps belong to a branch that
        was abandoned (a corrupt newest checkpoint skipped, a crash) and are neither logged nor counted."""
        self.local, self.actor, self.note = evaluator, actor, note
        self.last_step: int | None = None
        earlier = (self.local.results() if evaluator else self._remote("results", 0)) or []
        self.seen = len(earlier)  # results of an earlier attempt of this run are not logged again
        self.history = [r for r in earlier if resume_step is not None and r["step"] <= resume_step]
        self.best_fid = min((r["eval/fid"] for r in self.history if "eval/fid" in r), default=float("inf"))

    def _remote(self, method: str, *args, timeout: float = 30.0):
        import ray

        try:
            return ray.get(getattr(self.actor, method).remote(*args), timeout=timeout)
        except Exception as e:  # noqa: BLE001 - the evaluator being away never stops training
            self.note(f"warning: evaluator unavailable ({type(e).__name__}); training goes on")
            return None

    def submit(self, step: int, nimg: int, G_ema: torch.nn.Module, checkpoint: Path | None) -> None:
        """Hand a copy of G_ema's weights to the evaluator: evaluated now in dev mode, never waited for on Ray."""
        self.last_step = step
        state = {k: v.detach().cpu().clone() for k, v in G_ema.state_dict().items()}
        args = (step, nimg / 1000, state, str(checkpoint) if checkpoint else None, time.time())
        if self.local is not None:
            self.local.evaluate(*args)
        else:
            self.actor.submit.remote(*args)  # fire and forget: not even the hand-over is waited for

    def poll(self, nimg: int) -> list[dict]:
        """Result rows that arrived since the last poll, each with how far behind training it arrived
        (``nimg``: the images trained so far)."""
        rows = self.local.results(self.seen) if self.local else (self._remote("results", self.seen, timeout=5.0) or [])
        now = time.time()
        rows = [{**row, **self._lag(row, nimg / 1000, now)} for row in rows]
        self.seen += len(rows)
        self.history += rows
        return rows

    def _lag(self, row: dict, kimg: float, now: float) -> dict:
        """``eval/lag_kimg``: thousands of images trained between the request and the result's arrival;
        ``eval/lag_s``: seconds between them, both on rank 0's clock. In dev mode training waits for the
        result, so it is 0 kimg behind and the seconds are the time it blocked."""
        requested = row.get("requested", row["started"])
        if self.local is not None:
            return {"eval/lag_kimg": 0.0, "eval/lag_s": row["finished"] - requested}
        return {"eval/lag_kimg": kimg - row["kimg"], "eval/lag_s": now - requested}

    def finish(self, timeout: float = 600.0) -> None:
        """Wait until the evaluator has nothing pending (the end of training)."""
        if self.actor is None:
            return
        deadline = time.time() + timeout
        while time.time() < deadline and self._remote("idle", timeout=30.0) is False:
            time.sleep(0.5)
