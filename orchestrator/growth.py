"""Progressive growing (ProGAN, Karras et al. 2018, sec. 2): the level-of-detail schedule as training state.

Training starts at ``model.start_resolution``. Every level after the first is first **faded in** over
``transition_kimg`` (α rising linearly from 0 to 1 with the images shown, sec. 2 and fig. 2), then
**stabilised** for ``training_kimg``; the first level is only stabilised, and the last one trains until
the end. This is the official ``TrainingSchedule`` (``train.py``) read level by level: both put level
boundaries at the same image counts (a test compares them).

:class:`Growth` holds where the schedule stands (the resolution, α and the images shown at this level)
and is checkpointed with the networks, so a run resumed in the middle of a fade-in continues exactly.
Per level it also gives the global batch size and the learning rate (the official ``minibatch_dict``
and ``G_lrate_dict``/``D_lrate_dict``). When a fade-in starts or ends, :meth:`Growth.advance` says so;
the loop then resets Adam's moments, as the official code does (``reset_opt_for_new_lod``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import Field, field_validator

from architectures.progan import blend_reals
from core.config import StrictConfig


def _is_pow2(n: int) -> bool:
    return n >= 4 and n & (n - 1) == 0


class GrowthConfig(StrictConfig):
    """The progressive-growing schedule (official ``config.py``/``train.py`` defaults)."""

    training_kimg: float = Field(600.0, ge=0, description="stabilise each level for this many kimg")
    transition_kimg: float = Field(600.0, ge=0, description="fade each new level in over this many kimg")
    batch_size: dict[int, int] = Field(
        default_factory=dict,
        description="global batch per resolution, e.g. {4: 512, 8: 256}; other resolutions use train.batch_size",
    )
    lr: dict[int, float] = Field(
        default_factory=dict,
        description="learning rate of G and D per resolution, e.g. "
        "{128: 0.0015}; other resolutions use optim.g.lr / optim.d.lr",
    )
    reset_optimizer: bool = Field(True, description="reset Adam's moments when a fade-in starts or ends (official)")

    @field_validator("batch_size", "lr")
    @classmethod
    def _resolutions(cls, v: dict) -> dict:
        bad = [r for r in v if not _is_pow2(r)]
        if bad:
            raise ValueError(f"keys must be resolutions (powers of two >= 4), got {bad}")
        if any(x <= 0 for x in v.values()):
            raise ValueError(f"values must be positive, got {v}")
        return v


@dataclass
class Growth:
    """Where progressive growing stands (checkpointed): the level being trained (``resolution``), how far
    its new block is faded in (``alpha``, 1 when stable) and the images shown since the level began."""

    cfg: GrowthConfig
    start_resolution: int
    max_resolution: int
    resolution: int = 0
    level_img: int = 0
    _fade_img: int = field(init=False)
    _stable_img: int = field(init=False)

    def __post_init__(self) -> None:
        self.resolution = self.resolution or self.start_resolution
        self._fade_img = int(self.cfg.transition_kimg * 1000)
        self._stable_img = int(self.cfg.training_kimg * 1000)

    @property
    def alpha(self) -> float:
        """Fade-in of the current level: ``level_img / transition`` capped at 1 (always 1 at the first level)."""
        if self.resolution == self.start_resolution or self._fade_img == 0:
            return 1.0
        return min(1.0, self.level_img / self._fade_img)

    @property
    def fading(self) -> bool:
        return self.alpha < 1.0

    @property
    def complete(self) -> bool:
        """Whether the networks have reached their full size (the last level, faded in)."""
        return self.resolution == self.max_resolution and not self.fading

    def level_length(self, resolution: int) -> int:
        """Images shown at a level before the next one starts (fade-in, if any, plus stabilisation)."""
        return (0 if resolution == self.start_resolution else self._fade_img) + self._stable_img

    def advance(self, images: int) -> bool:
        """Count ``images`` more real images; move to the next level(s) when due. True if a fade-in
        started or ended (the moments when the official code resets the optimizers)."""
        before = (self.resolution, self.fading)
        self.level_img += images
        while self.resolution < self.max_resolution and self.level_img >= self.level_length(self.resolution):
            self.level_img -= self.level_length(self.resolution)
            self.resolution *= 2
        return (self.resolution, self.fading) != before

    def batch_size(self, default: int) -> int:
        """The global batch of the current level."""
        return self.cfg.batch_size.get(self.resolution, default)

    def lr(self, default: float) -> float:
        """The learning rate of the current level."""
        return self.cfg.lr.get(self.resolution, default)

    def set_lod(self, *nets) -> None:
        """Put networks with ``set_lod`` (G, D, G_ema) at the current level."""
        for net in nets:
            net.set_lod(self.resolution, self.alpha)

    def reals(self, img: torch.Tensor) -> torch.Tensor:
        """Real images at the current level, blended during a fade-in as G's output is."""
        return blend_reals(img, self.resolution, self.alpha)

    def metrics(self) -> dict[str, float]:
        return {
            "growth/resolution": float(self.resolution),
            "growth/alpha": self.alpha,
            "growth/level_kimg": self.level_img / 1000,
        }

    def state_dict(self) -> dict:
        return {"resolution": self.resolution, "alpha": self.alpha, "level_img": self.level_img}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved level. ``alpha`` is recomputed from the images (it is saved to be read)."""
        if not _is_pow2(state["resolution"]) or not self.start_resolution <= state["resolution"] <= self.max_resolution:
            raise ValueError(
                f"checkpointed growth resolution {state['resolution']} is outside this run's "
                f"{self.start_resolution}..{self.max_resolution}"
            )
        self.resolution, self.level_img = int(state["resolution"]), int(state["level_img"])
