"""Training-health alarms, checked on rank 0 at log steps.

* **D winning** (``health/d_winning``): D's loss below ``d_loss_below`` (or its accuracy above
  ``d_accuracy_above``) for ``d_winning_logs`` consecutive logs: D separates real from fake so well
  that G's gradients vanish. A WGAN critic's loss has no floor (it is negative in healthy runs), so
  for ``loss.kind: wgan`` only the accuracy test applies.
* **Mode collapse** (``health/mode_collapse``): every ``diversity_every`` logs, the mean pairwise L2
  distance between the pixels of a fixed batch of G_ema samples, divided by the same measure on real
  images (taken once at the start), is below ``diversity_fraction`` (logged as ``health/diversity``);
  judged from ``diversity_after_kimg`` on.
* **NaN/Inf** (``health/nonfinite``): a logged loss (``loss/*``) or gradient norm (``grad/*``) is not finite.

Each alarm sets its flag to 1 in the logged row while it holds and raises an alert (a console
warning and a W&B alert) when it starts to hold.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from pydantic import Field

from core.config import StrictConfig


class HealthConfig(StrictConfig):
    """Thresholds of the training-health alarms."""

    enabled: bool = True
    d_loss_below: float | None = Field(0.01, description="D winning: D's loss below this (None: not checked)")
    d_accuracy_above: float | None = Field(
        None,
        description="D winning: D's accuracy above this (None: not "
        "checked; healthy DCGAN runs sit at accuracy 1.0 for a while early on)",
    )
    d_winning_logs: int = Field(10, ge=1, description="D winning: for this many consecutive logs")
    diversity_fraction: float = Field(
        0.05,
        ge=0,
        description="mode collapse: sample diversity below this "
        "fraction of the real data's (a collapsed G is near 0; DCGAN on digits is at "
        "~0.2 after 2 kimg and ~0.9 after 50 kimg)",
    )
    diversity_after_kimg: float = Field(
        2.0,
        ge=0,
        description="mode collapse is judged from this many kimg on "
        "(a freshly initialised G renders near-constant images)",
    )
    diversity_every: int = Field(10, ge=1, description="measure the sample diversity every this many logs")
    diversity_samples: int = Field(64, ge=2, description="samples (and real images) the diversity is measured on")


def diversity(images: torch.Tensor) -> float:
    """Mean pairwise L2 distance between the (flattened) images of a batch."""
    x = images.detach().float().flatten(1)
    return float(torch.pdist(x).mean()) if len(x) > 1 else 0.0


class HealthMonitor:
    """Follows the logged metrics and raises alarms through ``alert(key, title, text)``."""

    def __init__(self, cfg: HealthConfig, alert: Callable[[str, str, str], None], loss_kind: str = "nonsaturating"):
        self.cfg, self.alert = cfg, alert
        self.d_loss_below = None if loss_kind == "wgan" else cfg.d_loss_below
        self.real_diversity: float | None = None
        self._winning_streak = 0
        self._active: dict[str, bool] = {}

    def observe_real(self, images: torch.Tensor) -> None:
        """Take the real data's diversity from a batch of real images (again at each level of a growing run)."""
        if len(images) > 1:
            self.real_diversity = diversity(images[: self.cfg.diversity_samples])

    def diversity_due(self, log_index: int, nimg: int) -> bool:
        """Whether the log number ``log_index`` (step // log_every), after ``nimg`` images, measures sample
        diversity, so the caller renders samples. Counted from the step, so a resumed run checks at the same logs."""
        return (
            self.cfg.enabled
            and self.real_diversity is not None
            and nimg >= self.cfg.diversity_after_kimg * 1000
            and log_index % self.cfg.diversity_every == 0
        )

    def check(self, metrics: dict[str, float], step: int, samples: torch.Tensor | None = None) -> dict[str, float]:
        """The ``health/*`` entries for this log's row; alerts for alarms that start to hold."""
        if not self.cfg.enabled:
            return {}
        cfg, out = self.cfg, {}

        bad = sorted(k for k, v in metrics.items() if k.startswith(("loss/", "grad/")) and not math.isfinite(v))
        out["health/nonfinite"] = self._flag(
            "nonfinite", bool(bad), step, "NaN/Inf in training", f"non-finite {', '.join(bad)} at step {step}"
        )

        loss, acc = metrics.get("loss/D"), metrics.get("D/accuracy")
        winning = (self.d_loss_below is not None and loss is not None and loss < self.d_loss_below) or (
            cfg.d_accuracy_above is not None and acc is not None and acc > cfg.d_accuracy_above
        )
        self._winning_streak = self._winning_streak + 1 if winning else 0
        out["health/d_winning"] = self._flag(
            "d_winning",
            self._winning_streak >= cfg.d_winning_logs,
            step,
            "D is winning",
            f"D loss {loss:.4g}, accuracy {acc if acc is not None else float('nan'):.3f} for {self._winning_streak} "
            f"consecutive logs at step {step}: G's gradients may be vanishing"
            if loss is not None
            else "",
        )

        if samples is not None and self.real_diversity:
            ratio = diversity(samples[: cfg.diversity_samples]) / self.real_diversity
            out["health/diversity"] = ratio
            out["health/mode_collapse"] = self._flag(
                "mode_collapse",
                ratio < cfg.diversity_fraction,
                step,
                "Mode collapse",
                f"G_ema samples are {ratio:.3f}× as diverse as real images at step {step} "
                f"(alarm below {cfg.diversity_fraction})",
            )
        return out

    def _flag(self, key: str, holds: bool, step: int, title: str, text: str) -> float:
        if holds and not self._active.get(key):
            self.alert(key, title, text)
        self._active[key] = holds
        return float(holds)
