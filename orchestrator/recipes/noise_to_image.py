"""What one training step does, as phases in the manner of StyleGAN2-ADA's training loop.

A step runs ``loss.d_steps`` D phases, each on a fresh real batch, then one G phase. R1 is either
part of the D phase (``r1_interval: 1``) or a lazy phase of its own every ``r1_interval`` D steps with
its weight scaled by the interval (Karras et al. 2020, section 3.1); path-length regularization is a
lazy G phase every ``pl_interval`` G steps. Generators with a mapping network (StyleGAN2) are run as
mapping (with style mixing) then synthesis, and track ``w_avg`` in the D phase's fake pass, as the
official loss does. BigGAN's orthogonal regularization (``loss.ortho_beta``) is part of the G phase,
added once per G step on ``G.ortho_parameters()``.

Each phase accumulates gradients over this worker's micro-batches and ends with one optimizer step
(through the strategy, which synchronises workers). Latents are drawn for the whole global batch
from one seeded generator shared by all ranks, and each rank takes its slice, so a step does not
depend on how many workers share it. Phases return statistics as detached tensors (no host sync).
With ``grad_norms`` (log steps), the D and G phases also return the global norm of their gradients
just before the optimizer step (``grad/D``, ``grad/G``, unscaled by the loss scale).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from orchestrator.data.shards import Batch
from orchestrator.losses import (LossConfig, class_loss, d_loss, g_loss, gradient_penalty, orthogonal_penalty,
                                 path_length_penalty, r1_penalty)


@dataclass
class Nets:
    """G and D as the strategy wrapped them (DDP modules, DeepSpeed engines, or themselves)."""

    G: nn.Module
    D: nn.Module
    strategy: object


@dataclass
class Sampler:
    """Latents and fake labels from one seeded generator, identical on every rank (checkpointed).

    ``latents(n)`` draws ``n × world_size`` and returns this rank's ``n``.
    """

    z_dim: int
    num_classes: int
    device: torch.device
    rng: torch.Generator
    rank: int = 0
    world_size: int = 1

    def _mine(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x[self.rank * n:(self.rank + 1) * n].to(self.device)

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(n * self.world_size, self.z_dim, generator=self.rng, device=self.rng.device)
        c = None
        if self.num_classes:
            c = self._mine(torch.randint(0, self.num_classes, (n * self.world_size,), generator=self.rng,
                                         device=self.rng.device), n)
        return self._mine(z, n), c

    def uniform(self, n: int) -> torch.Tensor:
        return self._mine(torch.rand(n * self.world_size, generator=self.rng, device=self.rng.device), n)


@dataclass
class RegState:
    """Running statistics of the regularizers (checkpointed): the path-length mean ``a``."""

    pl_mean: torch.Tensor

    def state_dict(self) -> dict:
        return {"pl_mean": self.pl_mean}

    def load_state_dict(self, state: dict) -> None:
        self.pl_mean = state["pl_mean"].to(self.pl_mean.device)


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


def scores(D: nn.Module, img: torch.Tensor, c: torch.Tensor | None, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """D's real/fake logits (fp32) and, when the AC-GAN term is on, its class logits (else None)."""
    if cfg.ac_weight:
        logits, class_logits = D(img, c, return_class_logits=True)
        return logits.float(), class_logits
    return D(img, c).float(), None


def _split(tensors: tuple, sizes: list[int]) -> list[tuple]:
    """Cut each of ``tensors`` (or None) into micro-batches of ``sizes`` rows: ``[(t1_j, t2_j, …), …]``."""
    parts = [t.split(sizes) if t is not None else [None] * len(sizes) for t in tensors]
    return list(zip(*parts))


def _add(stats: dict[str, torch.Tensor], new: dict[str, torch.Tensor], n: int) -> None:
    for k, v in new.items():
        stats[k] = stats.get(k, 0) + v.detach().float() / n


def grad_norm(net: nn.Module, loss_scale: float = 1.0) -> torch.Tensor:
    """The L2 norm of all of ``net``'s gradients together, divided by ``loss_scale`` (a tensor: no host sync).
    Parameters without a gradient (e.g. sharded away by DeepSpeed) do not count."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in net.parameters() if p.grad is not None]
    if not norms:
        return torch.zeros([])
    return torch.linalg.vector_norm(torch.stack(norms)) / loss_scale


def d_phase(nets: Nets, micro: list[tuple[torch.Tensor, torch.Tensor | None]], sampler: Sampler, cfg: LossConfig,
            with_r1: bool, grad_norms: bool = False) -> dict[str, torch.Tensor]:
    """One D update on real micro-batches and as many fresh fakes (plus R1 when ``with_r1``; plus
    ``grad/D`` when ``grad_norms``)."""
    st = nets.strategy
    G, D, raw_D = st.unwrap(nets.G), nets.D, st.unwrap(nets.D)
    st.zero_grad("D")
    stats: dict[str, torch.Tensor] = {}
    sizes = [real.shape[0] for real, _ in micro]
    latents = _split(sampler.latents(sum(sizes)), sizes)
    eps_all = _split((sampler.uniform(sum(sizes)),), sizes) if cfg.gp_weight else None
    for j, (real, c_real) in enumerate(micro):
        z, c_fake = latents[j]
        with torch.no_grad(), st.autocast(G):
            fake, _ = run_generator(G, z, c_fake, cfg, update_emas=True)
        own_r1_pass = with_r1 and st.wrapped  # see the strategy module: input gradients via the raw module
        real_in = real.detach().requires_grad_(with_r1 and not own_r1_pass)
        with st.no_sync(D) if j < len(micro) - 1 else contextlib.nullcontext():
            with st.autocast(raw_D):
                real_logits, real_classes = scores(D, real_in, c_real, cfg)
                fake_logits, fake_classes = scores(D, fake.detach(), c_fake, cfg)
            loss = d_loss(cfg.kind, real_logits, fake_logits)
            new = {"loss/D": loss, "D/real": torch.sigmoid(real_logits).mean(),
                   "D/fake": torch.sigmoid(fake_logits).mean(),
                   "D/accuracy": 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())}
            if cfg.ac_weight:
                ac = class_loss(real_classes, c_real) + class_loss(fake_classes, c_fake)
                loss = loss + cfg.ac_weight * ac
                new["loss/D_ac"] = ac
            if cfg.drift:
                loss = loss + cfg.drift * real_logits.square().mean()
            if cfg.gp_weight:
                eps = eps_all[j][0].view(-1, 1, 1, 1).to(real.dtype)
                with st.autocast(raw_D):
                    gp = gradient_penalty(lambda x: raw_D(x, c_real), real, fake, eps)
                loss = loss + cfg.gp_weight * gp.mean()
                new["reg/gp"] = gp.mean()
            if with_r1:
                r1 = _r1(st, raw_D, real, c_real)[0] if own_r1_pass else r1_penalty(real_in, real_logits, st.loss_scale)
                loss = loss + r1.mean() * (cfg.r1_gamma / 2)
                new["reg/r1"] = r1.mean()
            st.backward(loss, "D", D, len(micro))
        _add(stats, new, len(micro))
    if grad_norms:
        stats["grad/D"] = grad_norm(raw_D, st.loss_scale)
    st.step("D")
    return stats


def _anchor(wrapper: nn.Module, st, output: torch.Tensor, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """A term to add with weight 0 to a regularizer's loss, as the official code does (``logits * 0``):
    every parameter then gets a (zero) gradient, so Adam's step is the same whatever the strategy,
    and a wrapped net gets a pass through its wrapper, which synchronises the whole gradient."""
    if not st.wrapped:
        return output.sum()
    with st.autocast(st.unwrap(wrapper)):
        return wrapper(x[:1], None if c is None else c[:1]).float().sum()


def _r1(st, raw_D: nn.Module, real: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image R1 through the raw D, and the logits it came from."""
    real = real.detach().requires_grad_(True)
    with st.autocast(raw_D):
        logits = raw_D(real, c).float()
    return r1_penalty(real, logits, st.loss_scale), logits


def d_reg_phase(nets: Nets, micro: list[tuple[torch.Tensor, torch.Tensor | None]], cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Lazy R1: ``γ/2 · E‖∇D(x)‖² · interval``, its own optimizer step (StyleGAN2's Dreg phase)."""
    st = nets.strategy
    raw_D = st.unwrap(nets.D)
    st.zero_grad("D")
    stats: dict[str, torch.Tensor] = {}
    for j, (real, c_real) in enumerate(micro):
        with st.no_sync(nets.D) if j < len(micro) - 1 else contextlib.nullcontext():
            r1, logits = _r1(st, raw_D, real, c_real)
            loss = r1.mean() * (cfg.r1_gamma / 2) * cfg.r1_interval + 0 * _anchor(nets.D, st, logits, real, c_real)
            st.backward(loss, "D", nets.D, len(micro))
        _add(stats, {"reg/r1": r1.mean()}, len(micro))
    st.step("D")
    return stats


def g_phase(nets: Nets, sizes: list[int], sampler: Sampler, cfg: LossConfig,
            grad_norms: bool = False) -> dict[str, torch.Tensor]:
    """One G update against the current D (D's weights get no gradient; D runs unwrapped); plus
    ``grad/G`` when ``grad_norms``."""
    st = nets.strategy
    raw_D = st.unwrap(nets.D)
    st.zero_grad("G")
    stats: dict[str, torch.Tensor] = {}
    raw_D.requires_grad_(False)
    try:
        for j, (z, c) in enumerate(_split(sampler.latents(sum(sizes)), sizes)):
            with st.no_sync(nets.G) if j < len(sizes) - 1 else contextlib.nullcontext():
                with st.autocast(st.unwrap(nets.G)):
                    fake = nets.G(z, c) if not has_mapping(st.unwrap(nets.G)) else _mapped(nets, z, c, cfg)
                with st.autocast(raw_D):
                    logits, classes = scores(raw_D, fake, c, cfg)
                loss = g_loss(cfg.kind, logits)
                total, new = loss, {"loss/G": loss}
                if cfg.ac_weight:
                    new["loss/G_ac"] = class_loss(classes, c)
                    total = total + cfg.ac_weight * new["loss/G_ac"]
                if cfg.ortho_beta and j == len(sizes) - 1:  # once per step: × num_micro undoes backward's 1/num_micro
                    ortho = orthogonal_penalty(st.unwrap(nets.G).ortho_parameters())
                    total = total + cfg.ortho_beta * ortho * len(sizes)
                    stats["reg/ortho"] = ortho.detach()
                st.backward(total, "G", nets.G, len(sizes))
            _add(stats, new, len(sizes))
        if grad_norms:
            stats["grad/G"] = grad_norm(st.unwrap(nets.G), st.loss_scale)
        st.step("G")
    finally:
        raw_D.requires_grad_(True)
    return stats


def _mapped(nets: Nets, z, c, cfg: LossConfig) -> torch.Tensor:
    """A mapping-network G with style mixing. Through the wrapper when there is one: its forward is the
    one that registers the gradient synchronisation; the raw module otherwise."""
    st = nets.strategy
    raw_G = st.unwrap(nets.G)
    ws = raw_G.mapping_with_style_mixing(z, c, cfg.style_mixing_prob)
    img = raw_G.synthesis(ws)
    return img + 0 * _anchor(nets.G, st, img, z, c) if st.wrapped else img


def g_pl_phase(nets: Nets, sizes: list[int], sampler: Sampler, cfg: LossConfig, reg: RegState) -> dict[str, torch.Tensor]:
    """Lazy path-length regularization on a reduced batch, weight scaled by the interval (StyleGAN2's Greg)."""
    st = nets.strategy
    raw_G = st.unwrap(nets.G)
    st.zero_grad("G")
    stats: dict[str, torch.Tensor] = {}
    sizes = [max(1, n // cfg.pl_batch_shrink) for n in sizes]
    for j, (z, c) in enumerate(_split(sampler.latents(sum(sizes)), sizes)):
        with st.no_sync(nets.G) if j < len(sizes) - 1 else contextlib.nullcontext():
            with st.autocast(raw_G):
                img, ws = run_generator(raw_G, z, c, cfg)
            noise = torch.randn(img.shape, generator=sampler.rng, device=sampler.rng.device).to(img.device)
            noise = noise / (img.shape[2] * img.shape[3]) ** 0.5
            penalty, reg.pl_mean = path_length_penalty(img.float(), ws, reg.pl_mean, cfg.pl_decay, noise)
            loss = penalty.mean() * cfg.pl_weight * cfg.pl_interval + 0 * _anchor(nets.G, st, img, z, c)
            st.backward(loss, "G", nets.G, len(sizes))
        _add(stats, {"reg/pl_penalty": penalty.mean()}, len(sizes))
    st.step("G")
    stats["reg/pl_mean"] = reg.pl_mean.detach()
    return stats


def train_step(nets: Nets, next_batch: Callable[[], Batch], num_micro: int, sampler: Sampler, cfg: LossConfig,
               reg: RegState, g_steps_done: int, d_steps_done: int, grad_norms: bool = False,
               reals: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """D phase(s), lazy R1, the G phase and lazy path length; returns the statistics and the number of
    real images this worker used (and the gradient norms when ``grad_norms``). ``reals`` prepares real
    images for D (progressive growing: the current level of detail)."""
    stats: dict[str, torch.Tensor] = {}
    n_real = 0
    lazy_r1 = cfg.r1_gamma > 0 and cfg.r1_interval > 1
    for k in range(cfg.d_steps):
        micro = []
        for _ in range(num_micro):
            batch = next_batch()
            c = batch.label.to(sampler.device, non_blocking=True) if sampler.num_classes else None
            img = batch.img.to(sampler.device, non_blocking=True)
            micro.append((reals(img) if reals else img, c))
            n_real += batch.img.shape[0]
        stats.update(d_phase(nets, micro, sampler, cfg, with_r1=cfg.r1_gamma > 0 and not lazy_r1,
                                     grad_norms=grad_norms))
        if lazy_r1 and (d_steps_done + k) % cfg.r1_interval == 0:
            stats.update(d_reg_phase(nets, micro, cfg))
    sizes = [real.shape[0] for real, _ in micro]
    stats.update(g_phase(nets, sizes, sampler, cfg, grad_norms=grad_norms))
    if cfg.pl_weight > 0 and g_steps_done % cfg.pl_interval == 0:
        stats.update(g_pl_phase(nets, sizes, sampler, cfg, reg))
    return stats, n_real
