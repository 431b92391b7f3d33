"""What is due after a step, decided in one place from the images seen (and the step, for logs)."""

from __future__ import annotations

from dataclasses import dataclass


def crossed(before: int, after: int, every_kimg: float) -> bool:
    """Whether the image count passed a multiple of ``every_kimg`` thousand images in ``(before, after]``."""
    every = max(int(every_kimg * 1000), 1)
    return before // every != after // every


@dataclass(frozen=True)
class Due:
    """The side effects a step calls for."""

    log: bool = False
    grid: bool = False
    checkpoint: bool = False
    evaluate: bool = False


@dataclass(frozen=True)
class Cadence:
    """Intervals of logging (steps), sample grids, checkpoints and evaluation (kimg; None: never)."""

    log_every: int
    grid_kimg: float
    checkpoint_kimg: float
    eval_kimg: float | None = None

    def log_due(self, step: int) -> bool:
        """Whether step number ``step`` (counting from 1) is a logging step (gradient norms are measured then)."""
        return step % self.log_every == 0

    def due(self, step: int, before: int, after: int) -> Due:
        """What step ``step``, which moved the image count from ``before`` to ``after``, calls for. Evaluated
        weights always get a checkpoint, so the best one can be kept."""
        evaluate = self.eval_kimg is not None and crossed(before, after, self.eval_kimg)
        return Due(
            log=self.log_due(step),
            grid=crossed(before, after, self.grid_kimg),
            checkpoint=evaluate or crossed(before, after, self.checkpoint_kimg),
            evaluate=evaluate,
        )
