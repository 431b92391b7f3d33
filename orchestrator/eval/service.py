"""Evaluation beside training: the :class:`Evaluator`, its Ray actor form, and the client rank 0 uses.

Training hands G_ema's weights to the evaluator and never waits. In dev mode the evaluator runs in
the training process (at the start, every ``eval.every_kimg`` and at the end, blocking for the
seconds it takes). On a Ray cluster it is :class:`EvaluatorActor`, a separate actor with its own
CPUs or GPU: ``submit`` returns at once and replaces any request still waiting (stale ones are
dropped, at most one is pending), a background thread evaluates, and each result is appended to
``RUN_DIR/eval.jsonl`` with the training step it belongs to. Rank 0 polls for new results at its
logging steps, logs them (W&B, ``metrics.jsonl``) against that step, and marks the best-FID
checkpoint so that retention never deletes it. Ray restarts a crashed actor (``max_restarts=-1``);
while it is away, submissions and polls fail quietly and training goes on.

Why not Ray Train's ``ValidationConfig`` (alpha in Ray 2.60): it runs each validation as a fresh Ray
task, so the feature extractor and the held-out statistics would be reloaded every time (a disk
cache helps only partly), it offers no "drop stale requests" policy, and its API is alpha. A named
actor keeps everything warm and gives exactly the semantics above.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import architectures
from architectures.registry import ArchConfig
from core.spec import ImageSpec
from orchestrator.eval.evaluator import EvalConfig, check_feature_extractor, evaluate

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
    """Evaluates G_ema weights against the held-out shards and records the results in ``eval.jsonl``."""

    def __init__(self, job: EvalJob, run_dir: str):
        self.cfg, self.run_dir, self.spec = job.eval, Path(run_dir), job.spec
        self.extractor = check_feature_extractor(job.eval)  # fails at once when the weights are missing
        self.manifest, self.holdout = job.manifest, job.holdout
        arch = architectures.get(job.arch)
        self.capabilities = arch.capabilities
        self.G = arch.build_generator(job.model, job.spec).eval().requires_grad_(False)

    def evaluate(self, step: int, kimg: float, g_ema_state: dict, checkpoint: str | None = None) -> dict:
        """Evaluate one set of G_ema weights now; append and return the result row."""
        started = time.time()
        self.G.load_state_dict(g_ema_state)
        result = evaluate(
            self.G,
            self.spec,
            self.cfg,
            self.holdout,
            extractor=self.extractor,
            manifest=self.manifest,
            capabilities=self.capabilities,
        )
        row = {
            "step": step,
            "kimg": kimg,
            "checkpoint": checkpoint,
            "started": started,
            "finished": time.time(),
            **{f"eval/{k}": v for k, v in result.metrics.items()},
            "eval/seconds": result.seconds,
            "eval/cache_hit": result.cache_hit,
            "feature_extractor": result.feature_extractor,
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / EVAL_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def results(self, since: int = 0) -> list[dict]:
        """Result rows from number ``since`` on (rows survive actor restarts: they are read from the file)."""
        path = self.run_dir / EVAL_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()[since:]]


class EvaluatorActor(Evaluator):
    """The evaluator as a Ray actor: ``submit`` never waits; one background thread evaluates the newest
    request. Create it with ``ray.remote(EvaluatorActor).options(max_concurrency=4, max_restarts=-1, ...)``."""

    def __init__(self, job: EvalJob, run_dir: str):
        super().__init__(job, run_dir)
        self._pending: tuple | None = None
        self._busy = False
        self._wake = threading.Condition()
        self.dropped = 0
        self.failures: list[str] = []
        threading.Thread(target=self._loop, daemon=True, name="evaluator").start()

    def submit(self, step: int, kimg: float, g_ema_state: dict, checkpoint: str | None = None) -> None:
        with self._wake:
            if self._pending is not None:
                self.dropped += 1  # a newer checkpoint makes the waiting one stale
            self._pending = (step, kimg, g_ema_state, checkpoint)
            self._wake.notify()

    def idle(self) -> bool:
        """True when nothing is pending or running."""
        with self._wake:
            return self._pending is None and not self._busy

    def status(self) -> dict:
        with self._wake:
            return {
                "pending": self._pending is not None,
                "busy": self._busy,
                "dropped": self.dropped,
                "failures": list(self.failures),
            }

    def _loop(self) -> None:
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
        self.last_step = step
        state = {k: v.detach().cpu().clone() for k, v in G_ema.state_dict().items()}
        args = (step, nimg / 1000, state, str(checkpoint) if checkpoint else None)
        if self.local is not None:
            self.local.evaluate(*args)
        else:
            self.actor.submit.remote(*args)  # fire and forget: not even the hand-over is waited for

    def poll(self) -> list[dict]:
        """Result rows that arrived since the last poll."""
        rows = self.local.results(self.seen) if self.local else (self._remote("results", self.seen, timeout=5.0) or [])
        self.seen += len(rows)
        self.history += rows
        return rows

    def finish(self, timeout: float = 600.0) -> None:
        """Wait until the evaluator has nothing pending (the end of training)."""
        if self.actor is None:
            return
        deadline = time.time() + timeout
        while time.time() < deadline and self._remote("idle", timeout=30.0) is False:
            time.sleep(0.5)
