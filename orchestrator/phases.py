"""What one training step does, as phases in the manner of StyleGAN2-ADA's training loop.

A step runs ``loss.d_steps`` D phases, each on a fresh real batch, then one G phase. R1 is either
part of the D phase (``r1_interval: 1``) or a lazy phase of its own every ``r1_interval`` D steps with
its weight scaled by the interval (Karras et al. 2020, section 3.1); path-length regularization is a
lazy G phase every ``pl_interval`` G steps. Generators with a mapping network (StyleGAN2) are run as
mapping (with style mixing) then synthesis, and track ``w_avg`` in the D phase's fake pass, as the
official loss does. Each phase ends with its own optimizer step. Phases return their statistics as detached tensors, so the step itself never
waits for the device; the loop reads them only on logging steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from orchestrator.data import Batch
from orchestrator.losses import LossConfig, d_loss, g_loss, gradient_penalty, path_length_penalty, r1_penalty
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


@dataclass
class RegState:
    """Running statistics of the regularizers (checkpointed): the path-length mean ``a``."""

    pl_mean: torch.Tensor

    def state_dict(self) -> dict:
        return {"pl_mean": self.pl_mean}

    def load_state_dict(self, state: dict) -> None:
        self.pl_mean.copy_(state["pl_mean"])


def has_mapping(G: nn.Module) -> bool:
    """Whether G is a mapping + synthesis generator (style mixing and path length apply)."""
    return hasattr(G, "mapping") and hasattr(G, "synthesis")


def run_generator(G: nn.Module, z: torch.Tensor, c: torch.Tensor | None, cfg: LossConfig,
                  update_emas: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fake images and, for mapping-network generators, the ws they came from (after style mixing)."""
    if has_mapping(G):
        ws = G.mapping_with_style_mixing(z, c, cfg.style_mixing_prob, update_emas=update_emas)
        return G.synthesis(ws), ws
    return G(z, c), None


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
        fake, _ = run_generator(G, z, c_fake, cfg, update_emas=True)
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
            fake, _ = run_generator(G, z, c, cfg)
        with precision.autocast(D):
            logits = D(fake, c).float()
        loss = g_loss(cfg.kind, logits)
        _optimizer_step(loss, nets.opt_G, precision)
    finally:
        D.requires_grad_(True)
    return {"loss/G": loss.detach()}


def g_pl_phase(nets: Nets, batch_size: int, sampler: Sampler, cfg: LossConfig, precision: Precision,
               reg: RegState) -> dict[str, torch.Tensor]:
    """Lazy path-length regularization on a reduced batch, weight scaled by the interval (StyleGAN2's Greg)."""
    G = nets.G
    nets.opt_G.zero_grad(set_to_none=True)
    z, c = sampler.latents(max(1, batch_size // cfg.pl_batch_shrink))
    with precision.autocast(G):
        img, ws = run_generator(G, z, c, cfg)
    noise = torch.randn(img.shape, generator=sampler.rng, device=img.device) / (img.shape[2] * img.shape[3]) ** 0.5
    penalty, reg.pl_mean = path_length_penalty(img.float(), ws, reg.pl_mean, cfg.pl_decay, noise)
    _optimizer_step(penalty.mean() * cfg.pl_weight * cfg.pl_interval, nets.opt_G, precision)
    return {"reg/pl_penalty": penalty.mean().detach(), "reg/pl_mean": reg.pl_mean}


def train_step(nets: Nets, next_batch: Callable[[], Batch], sampler: Sampler, cfg: LossConfig,
               precision: Precision, reg: RegState, g_steps_done: int, d_steps_done: int
               ) -> tuple[dict[str, torch.Tensor], int]:
    """D phase(s), lazy R1, the G phase and lazy path length; returns the statistics and real images used."""
    stats: dict[str, torch.Tensor] = {}
    n_real = 0
    lazy_r1 = cfg.r1_gamma > 0 and cfg.r1_interval > 1
    for k in range(cfg.d_steps):
        batch = next_batch()
        real = batch.img.to(sampler.device, non_blocking=True)
        c_real = batch.label.to(sampler.device, non_blocking=True) if sampler.num_classes else None
        n_real += real.shape[0]
        stats.update(d_phase(nets, real, c_real, sampler, cfg, precision, with_r1=cfg.r1_gamma > 0 and not lazy_r1))
        if lazy_r1 and (d_steps_done + k) % cfg.r1_interval == 0:
            stats.update(d_reg_phase(nets, real, c_real, cfg, precision))
    batch_size = n_real // cfg.d_steps
    stats.update(g_phase(nets, batch_size, sampler, cfg, precision))
    if cfg.pl_weight > 0 and g_steps_done % cfg.pl_interval == 0:
        stats.update(g_pl_phase(nets, batch_size, sampler, cfg, precision, reg))
    return stats, n_real
