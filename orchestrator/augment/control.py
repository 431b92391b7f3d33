"""Which augmentation D's inputs get, and how strong: the ``augment`` config section and the adaptive p.

ADA (Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data", section 3) runs
every image D sees, real or fake, through one augmentation pipeline applied with probability p, and steers
p by the overfitting heuristic ``r_t = E[sign(D(x_real))]``: every ``interval`` steps, p moves by
``sign(r_t − target) · batch · interval / (speed_kimg · 1000)`` and stays ≥ 0, so that p can go from 0 to 1
in ``speed_kimg`` thousand images (official ``--target 0.6``, ``ada_interval 4``, ``ada_kimg 500``). p can
also be fixed (the official ``--p``) or follow a schedule of ``[kimg, p]`` points (R3GAN). DiffAugment (Zhao
et al. 2020) applies its policy to every image D sees, always.

The state (p, the signs each rank gathered since the last adjustment, the last r_t) lives on the device, is
checkpointed and resumes exactly; gathering signs costs no host sync, and the ranks agree on r_t with one
all-reduce per adjustment.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field, model_validator

from core.config import StrictConfig
from orchestrator.augment.ada import ADA_PRESETS, make_augment_pipe
from orchestrator.augment.diffaugment import diff_augment, parse_policy


class AugmentConfig(StrictConfig):
    """Augmentation of every image D sees (reals, fakes, the reals of R1): ADA or DiffAugment."""

    kind: Literal["none", "ada", "diffaugment"] = Field(
        "none", description="none | ada (Karras et al. 2020) | diffaugment (Zhao et al. 2020)"
    )
    preset: str = Field("bgc", description="ada: the pipeline (official --augpipe): blit, geom, color, …, bgcfnc")
    adjust: Literal["adaptive", "fixed", "schedule"] = Field(
        "adaptive",
        description="ada: how p moves: adaptive (toward target r_t), fixed (stays p), schedule (the [kimg, p] points)",
    )
    p: float = Field(0.0, ge=0.0, le=1.0, description="ada: the initial (adaptive) or fixed probability")
    target: float = Field(0.6, gt=0.0, lt=1.0, description="ada adaptive: the r_t = E[sign(D(real))] to hold")
    interval: int = Field(4, ge=1, description="ada adaptive: adjust p every this many steps")
    speed_kimg: float = Field(
        500.0, gt=0.0, description="ada adaptive: kimg for p to go from 0 to 1 (official ada_kimg)"
    )
    schedule: list[tuple[float, float]] = Field(
        default_factory=list, description="ada schedule: [[kimg, p], …], p linear between points, flat outside"
    )
    policy: str = Field("color,translation,cutout", description="diffaugment: comma-separated operations")

    @model_validator(mode="after")
    def _consistent(self) -> AugmentConfig:
        if self.kind == "ada" and self.preset not in ADA_PRESETS:
            raise ValueError(f"augment.preset: unknown {self.preset!r}; known: {', '.join(ADA_PRESETS)}")
        if self.kind == "diffaugment":
            try:
                parse_policy(self.policy)
            except ValueError as e:
                raise ValueError(f"augment.policy: {e}") from None
        if self.kind == "ada" and self.adjust == "schedule":
            kimgs = [k for k, _ in self.schedule]
            if not kimgs or kimgs != sorted(kimgs) or any(not 0 <= p <= 1 for _, p in self.schedule):
                raise ValueError(
                    f"augment.schedule: {self.schedule} must be [[kimg, p], …] with increasing kimg and p in "
                    f"[0, 1] when augment.adjust is schedule"
                )
        return self


def scheduled_p(schedule: list[tuple[float, float]], kimg: float) -> float:
    """p at ``kimg`` on a piecewise-linear schedule of ``[kimg, p]`` points (flat before the first, after the last)."""
    if kimg <= schedule[0][0]:
        return schedule[0][1]
    for (k0, p0), (k1, p1) in zip(schedule, schedule[1:]):
        if kimg <= k1:
            return p0 + (p1 - p0) * (kimg - k0) / (k1 - k0) if k1 > k0 else p1
    return schedule[-1][1]


class Augment:
    """The augmentation of D's inputs and its state: ``aug(images)``; ``observe(real_logits)`` in D's main pass;
    ``end_step(step, batch, nimg)`` after each step (adjusts p, returns ``aug/p``, ``aug/rt``). Checkpointed."""

    def __init__(self, cfg: AugmentConfig, device: torch.device):
        self.cfg = cfg
        self.pipe = make_augment_pipe(cfg.preset, cfg.p).to(device) if cfg.kind == "ada" else None
        self.signs = torch.zeros([2], device=device)  # Σ sign(D(real)) and their count since the last adjustment
        self.rt = torch.zeros([], device=device)

    @property
    def active(self) -> bool:
        return self.cfg.kind != "none"

    @property
    def p(self) -> torch.Tensor:
        """The current probability (a device tensor; 1 for DiffAugment, 0 when off)."""
        if self.pipe is not None:
            return self.pipe.p
        return torch.ones([], device=self.signs.device) if self.active else torch.zeros([], device=self.signs.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` as D should see them (the identity when off)."""
        if self.pipe is not None:
            return self.pipe(images)
        if self.cfg.kind == "diffaugment":
            return diff_augment(images, self.cfg.policy)
        return images

    def observe(self, real_logits: torch.Tensor) -> None:
        """Gather ``sign(D(real))`` of D's main pass (no host sync): ADA's adaptive p steers by it, and every
        augmentation logs it as ``aug/rt``, the overfitting heuristic."""
        if self.active:
            self.signs[0] += real_logits.detach().float().sign().sum()
            self.signs[1] += real_logits.numel()

    def end_step(self, step: int, batch: int, nimg: int) -> dict[str, torch.Tensor]:
        """After step ``step`` (0-based) of ``batch`` images, ``nimg`` images in all: every ``interval`` steps
        r_t over the signs gathered since (all ranks), and p moved as configured."""
        if not self.active:
            return {}
        cfg = self.cfg
        if step % cfg.interval == 0:  # the official loop's batch_idx % ada_interval
            signs = self.signs.clone()
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(signs)
            self.rt = signs[0] / signs[1].clamp(min=1)
            self.signs.zero_()
            if self.pipe is not None and cfg.adjust == "adaptive":
                adjust = torch.sign(self.rt - cfg.target) * (batch * cfg.interval) / (cfg.speed_kimg * 1000)
                self.pipe.p.copy_((self.pipe.p + adjust).clamp(min=0))
        if self.pipe is not None and cfg.adjust == "schedule":
            self.pipe.p.fill_(scheduled_p(cfg.schedule, nimg / 1000))
        return {"aug/p": self.p.detach().clone(), "aug/rt": self.rt.clone()}

    def state_dict(self) -> dict:
        """p, r_t and the signs each rank gathered since the last adjustment (with several workers: every rank's,
        a collective call made on every rank)."""
        signs = [self.signs.clone()]
        if dist.is_initialized() and dist.get_world_size() > 1:
            signs = [torch.zeros_like(self.signs) for _ in range(dist.get_world_size())]
            dist.all_gather(signs, self.signs)
        return {"p": self.p.detach().clone(), "rt": self.rt.clone(), "signs_per_rank": signs}

    def load_state_dict(self, state: dict) -> None:
        """Each rank takes its own signs back; with another worker count rank 0 takes them all (their sum, which
        is what the next adjustment uses)."""
        if self.pipe is not None:
            self.pipe.p.copy_(state["p"])
        self.rt.copy_(state["rt"])
        ranks = state["signs_per_rank"]
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        if len(ranks) == world:
            self.signs.copy_(ranks[rank])
        else:
            self.signs.copy_(torch.stack(ranks).sum(0) if rank == 0 else torch.zeros_like(self.signs))
