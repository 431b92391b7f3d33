"""What one training step does, as phases in the manner of StyleGAN2-ADA's training loop.

A step runs ``loss.d_steps`` D phases, each on a fresh real batch, then one G phase. R1 is either
part of the D phase (``r1_interval: 1``) or a lazy phase of its own every ``r1_interval`` D steps with
its weight scaled by the interval (Karras et al. 2020, section 3.1). Each phase ends with its own
optimizer step. Phases return their statistics as detached tensors, so the step itself never
waits for the device; the loop reads them only on logging steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from orchestrator.data import Batch
from orchestrator.losses import LossConfig, d_loss, g_loss, gradient_penalty, r1_penalty
from orchestrator.precision import Precision


@dataclass
class Nets:
    """The networks and optimizers a step updates."""

    G: nn.Module
    D: nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer


@dataclass
class Sampler:
    """Draws latents and fake labels from one seeded generator (its state is checkpointed)."""

    z_dim: int
    num_classes: int
    device: torch.device
    rng: torch.Generator

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(n, self.z_dim, generator=self.rng, device=self.device)
        c = torch.randint(0, self.num_classes, (n,), generator=self.rng, device=self.device) if self.num_classes else None
        return z, c


def _optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, precision: Precision) -> None:
    precision.scaler.scale(loss).backward()
    precision.scaler.step(opt)
    precision.scaler.update()


def d_phase(nets: Nets, real: torch.Tensor, c_real: torch.Tensor | None, sampler: Sampler, cfg: LossConfig,
            precision: Precision, with_r1: bool) -> dict[str, torch.Tensor]:
    """One D update on a real batch and a fresh fake batch (plus R1 when ``with_r1``)."""
    G, D = nets.G, nets.D
    nets.opt_D.zero_grad(set_to_none=True)
    z, c_fake = sampler.latents(real.shape[0])
    with torch.no_grad(), precision.autocast(G):
        fake = G(z, c_fake)
    real = real.detach().requires_grad_(with_r1)
    with precision.autocast(D):
        real_logits = D(real, c_real).float()
        fake_logits = D(fake, c_fake).float()
    loss = d_loss(cfg.kind, real_logits, fake_logits)
    stats = {"loss/D": loss.detach(), "D/real": torch.sigmoid(real_logits).mean().detach(),
             "D/fake": torch.sigmoid(fake_logits).mean().detach(),
             "D/accuracy": 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()).detach()}
    if cfg.drift:
        loss = loss + cfg.drift * real_logits.square().mean()
    if cfg.gp_weight:
        gp = gradient_penalty(lambda x: D(x, c_real), real, fake, generator=sampler.rng)
        loss = loss + cfg.gp_weight * gp.mean()
        stats["reg/gp"] = gp.mean().detach()
    if with_r1:
        r1 = r1_penalty(real, real_logits, precision.loss_scale)
        loss = loss + r1.mean() * (cfg.r1_gamma / 2)
        stats["reg/r1"] = r1.mean().detach()
    _optimizer_step(loss, nets.opt_D, precision)
    return stats


def d_reg_phase(nets: Nets, real: torch.Tensor, c_real: torch.Tensor | None, cfg: LossConfig,
                precision: Precision) -> dict[str, torch.Tensor]:
    """Lazy R1: ``γ/2 · E‖∇D(x)‖² · interval``, its own optimizer step (StyleGAN2's Dreg phase)."""
    nets.opt_D.zero_grad(set_to_none=True)
    real = real.detach().requires_grad_(True)
    with precision.autocast(nets.D):
        real_logits = nets.D(real, c_real).float()
    r1 = r1_penalty(real, real_logits, precision.loss_scale)
    _optimizer_step(r1.mean() * (cfg.r1_gamma / 2) * cfg.r1_interval, nets.opt_D, precision)
    return {"reg/r1": r1.mean().detach()}


def g_phase(nets: Nets, batch_size: int, sampler: Sampler, cfg: LossConfig, precision: Precision) -> dict[str, torch.Tensor]:
    """One G update against the current D (D's weights get no gradient)."""
    G, D = nets.G, nets.D
    nets.opt_G.zero_grad(set_to_none=True)
    z, c = sampler.latents(batch_size)
    D.requires_grad_(False)
    try:
        with precision.autocast(G):
            fake = G(z, c)
        with precision.autocast(D):
            logits = D(fake, c).float()
        loss = g_loss(cfg.kind, logits)
        _optimizer_step(loss, nets.opt_G, precision)
    finally:
        D.requires_grad_(True)
    return {"loss/G": loss.detach()}


def train_step(nets: Nets, next_batch: Callable[[], Batch], sampler: Sampler, cfg: LossConfig,
               precision: Precision, d_steps_done: int) -> tuple[dict[str, torch.Tensor], int]:
    """D phase(s) then the G phase; returns the statistics and the number of real images used."""
    stats: dict[str, torch.Tensor] = {}
    n_real = 0
    lazy = cfg.r1_gamma > 0 and cfg.r1_interval > 1
    for k in range(cfg.d_steps):
        batch = next_batch()
        real = batch.img.to(sampler.device, non_blocking=True)
        c_real = batch.label.to(sampler.device, non_blocking=True) if sampler.num_classes else None
        n_real += real.shape[0]
        stats.update(d_phase(nets, real, c_real, sampler, cfg, precision, with_r1=cfg.r1_gamma > 0 and not lazy))
        if lazy and (d_steps_done + k) % cfg.r1_interval == 0:
            stats.update(d_reg_phase(nets, real, c_real, cfg, precision))
    stats.update(g_phase(nets, n_real // cfg.d_steps, sampler, cfg, precision))
    return stats, n_real
