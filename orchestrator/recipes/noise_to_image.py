"""The noise → image recipe, in the manner of StyleGAN2-ADA's training loop: mlp, dcgan, stylegan2, biggan
and progan all train through it.

A step runs ``loss.d_steps`` D phases, each on a fresh real batch, then one G phase. R1 is either part
of the D phase (``r1_interval: 1``) or a lazy phase of its own (``Dreg``) every ``r1_interval`` D steps
with its weight scaled by the interval (Karras et al. 2020, section 3.1); path-length regularization is
a lazy G phase (``Greg``) every ``pl_interval`` G steps on a batch shrunk by ``pl_batch_shrink``.
Generators with a mapping network (StyleGAN2) run as mapping (with style mixing) then synthesis and track
``w_avg`` in the D phase's fake pass, as the official loss does. BigGAN's orthogonal regularization
(``loss.ortho_beta``) is added once per G step on ``G.ortho_parameters()``. WGAN-GP's gradient penalty and
ProGAN's drift term and AC-GAN term are part of the D phase.

Every image D sees goes through the ``augment`` section's augmentation (ADA or DiffAugment; the identity when
off): reals and fakes of the D phase, the reals of R1 (gradient w.r.t. the image before augmentation), WGAN-GP's
mixes and the G phase's fakes. The signs of D(real) in the D phase feed ADA's adaptive p, which the recipe's
``after_step`` hook adjusts. ``finetune.freeze_d`` freezes D's first blocks for good.

Regularizers take input gradients through the raw modules and anchor their loss through the wrapper
(see :mod:`orchestrator.dist.strategy`); with ``train.compile`` they run eagerly (``ctx.eager()``), since
compiled graphs have no double backward, and every other pass runs the compiled networks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from architectures.registry import Capabilities
from core.config import ConfigError
from orchestrator.augment.control import Augment
from orchestrator.ema import make_ema
from orchestrator.finetune import freeze_d_blocks
from orchestrator.losses import (
    LossConfig,
    class_loss,
    d_loss,
    feature_matching_loss,
    g_loss,
    gradient_penalty,
    orthogonal_penalty,
    pack,
    path_length_penalty,
    r1_penalty,
)
from orchestrator.recipes.recipe import Micro, Network, Phase, Recipe, RecipeSetup, StepContext, register_recipe
from orchestrator.unroll import lookahead


@dataclass
class RegState:
    """Running statistics of the regularizers (checkpointed): the path-length mean ``a``.

    Each rank keeps its own ``a`` (from its own images, as the official code does), so with several workers
    ``state_dict`` gathers every rank's (a collective call, made on every rank) and a resume with as many
    workers gives each rank its own back; otherwise every rank continues from rank 0's."""

    pl_mean: torch.Tensor

    def state_dict(self) -> dict:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return {"pl_mean": self.pl_mean}
        ranks = [torch.zeros_like(self.pl_mean) for _ in range(dist.get_world_size())]
        dist.all_gather(ranks, self.pl_mean.detach().contiguous())
        return {"pl_mean": ranks[0], "pl_mean_per_rank": ranks}

    def load_state_dict(self, state: dict) -> None:
        ranks = state.get("pl_mean_per_rank")
        world = dist.get_world_size() if dist.is_initialized() else 1
        mine = ranks[dist.get_rank()] if ranks is not None and len(ranks) == world else state["pl_mean"]
        self.pl_mean = mine.to(self.pl_mean.device)


def fakes(
    G: nn.Module, z: torch.Tensor, c: torch.Tensor | None, cfg: LossConfig, mapping: bool, update_emas: bool = False
) -> torch.Tensor:
    """Fake images for training: with style mixing (and ``w_avg`` tracking) for mapping-network generators."""
    if mapping:
        return G(z, c, style_mixing_prob=cfg.style_mixing_prob, update_emas=update_emas)
    return G(z, c)


def seen(img: torch.Tensor, cfg: LossConfig, aug: Augment) -> torch.Tensor:
    """``img`` as D sees it: augmented, then packed by ``loss.pack`` (PacGAN)."""
    return pack(aug(img), cfg.pack)


def scores(
    D: Callable[..., torch.Tensor], img: torch.Tensor, c: torch.Tensor | None, cfg: LossConfig, aug: Augment
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """D's real/fake logits (fp32) of ``img`` as D sees it and, when the AC-GAN term is on, its class logits
    (else None)."""
    img = seen(img, cfg, aug)
    if cfg.ac_weight:
        logits, class_logits = D(img, c, return_class_logits=True)
        return logits.float(), class_logits
    return D(img, c).float(), None


def anchor(ctx: StepContext, name: str, output: torch.Tensor, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """A term to add with weight 0 to a regularizer's loss, as the official code does (``logits * 0``):
    every parameter then gets a (zero) gradient, so Adam's step is the same whatever the strategy,
    and a wrapped net gets a pass through its wrapper, which synchronises the whole gradient."""
    if not ctx.strategy.wrapped:
        return output.sum()
    with ctx.strategy.autocast(name):
        return ctx.nets[name](x[:1], None if c is None else c[:1]).float().sum()


def r1_through_raw(
    ctx: StepContext, real: torch.Tensor, c: torch.Tensor | None, cfg: LossConfig, aug: Augment
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image R1 through the raw D (eagerly: it takes a second backward), and the logits it came from.
    The gradient is taken w.r.t. the image before augmentation (and packing), as the official loss does."""
    real = real.detach().requires_grad_(True)
    with ctx.eager(), ctx.strategy.autocast("D"):
        logits = ctx.raw["D"](seen(real, cfg, aug), c).float()
    return r1_penalty(real, logits, ctx.strategy.loss_scale), logits


def check(setup: RecipeSetup, caps: Capabilities) -> None:
    """Loss settings the networks cannot honour are config errors, raised before anything is built."""
    cfg, arch = setup.loss, setup.arch.name
    if caps.conditioning != "latent" or setup.spec.translates:
        what = f"model.arch {arch} maps images to images" if caps.conditioning != "latent" else (
            f"data.shards hold {setup.spec.pairing} image → image data"
        )  # fmt: skip
        raise ConfigError(f"train.recipe: noise_to_image generates from noise, but {what}; "
                          f"use train.recipe: pix2pix, cyclegan or srgan with the model.arch of that name")  # fmt: skip
    classifies = bool(setup.spec.num_classes) and caps.class_logits
    if cfg.ac_weight > 0 and not classifies:
        raise ConfigError(
            f"loss.ac_weight: {cfg.ac_weight} needs a class-conditional D with an auxiliary "
            f"classifier (conditional progan); set it to 0"
        )
    if classifies and cfg.ac_weight == 0:
        raise ConfigError(
            f"loss.ac_weight: 0, but the {arch} D only learns labels through the AC-GAN "
            f"term, so G would ignore them: set loss.ac_weight (official: 1.0)"
        )
    for key in ("pl_weight", "style_mixing_prob"):
        if getattr(cfg, key) > 0 and not caps.mapping:
            raise ConfigError(
                f"loss.{key}: {getattr(cfg, key)} needs a generator with a mapping network "
                f"(stylegan2); the {arch} generator has none: set it to 0"
            )
    if cfg.ortho_beta > 0 and not caps.ortho_parameters:
        raise ConfigError(
            f"loss.ortho_beta: {cfg.ortho_beta} needs a generator that names its orthogonally "
            f"regularized weights (biggan's ortho_parameters); the {arch} generator does not: "
            f"set it to 0"
        )
    check_stability(setup, caps)


def check_stability(setup: RecipeSetup, caps: Capabilities) -> None:
    """Packing, feature matching and unrolling where they cannot work are config errors."""
    cfg, arch = setup.loss, setup.arch.name
    if cfg.pack > 1:
        clash = [k for k, on in (("data.num_classes (labels)", setup.spec.num_classes), ("loss.gp_weight",
                 cfg.gp_weight), ("loss.ac_weight", cfg.ac_weight)) if on]  # fmt: skip
        if clash:
            raise ConfigError(
                f"loss.pack: {cfg.pack} judges packs of images, which have no single label or per-image "
                f"critic gradient: it cannot go with {', '.join(clash)}"
            )
    if cfg.feature_matching != "off" and not caps.features:
        raise ConfigError(
            f"loss.feature_matching: {cfg.feature_matching} needs a D that returns its features (dcgan, mlp); "
            f"the {arch} D does not: set it to off"
        )
    if cfg.unroll_steps and (cfg.clip is not None or setup.finetune.freeze_d):
        what = "loss.clip" if cfg.clip is not None else "finetune.freeze_d"
        raise ConfigError(
            f"loss.unroll_steps: {cfg.unroll_steps}: the look-ahead steps D freely and cannot follow {what}; "
            f"drop one of them"
        )


def d_phase(cfg: LossConfig, caps: Capabilities, with_r1: bool, aug: Augment) -> Phase:
    """D on real images and as many fresh fakes (plus R1 when not lazy, WGAN-GP, drift, AC-GAN), both augmented;
    the signs of D(real) feed ADA's adaptive p."""

    def inputs(ctx: StepContext, reals: dict, n: int) -> dict:
        z, c_fake = ctx.sampler.latents(n)
        return {**reals, "z": z, "c_fake": c_fake, "eps": ctx.sampler.uniform(n) if cfg.gp_weight else None}

    def loss(ctx: StepContext, m: Micro):
        st, raw_D = ctx.strategy, ctx.raw["D"]
        real, c_real, c_fake = m.data["img"], m.data["label"], m.data["c_fake"]
        with torch.no_grad(), st.autocast("G"):
            fake = fakes(ctx.raw["G"], m.data["z"], c_fake, cfg, caps.mapping, update_emas=True)
        # input gradients via the raw module when D runs wrapped (see the strategy module) or compiled
        own_r1_pass = with_r1 and (st.wrapped or ctx.compiled)
        real_in = real.detach().requires_grad_(with_r1 and not own_r1_pass)
        with st.autocast("D"):
            real_logits, real_classes = scores(ctx.nets["D"], real_in, c_real, cfg, aug)
            fake_logits, fake_classes = scores(ctx.nets["D"], fake.detach(), c_fake, cfg, aug)
        aug.observe(real_logits)
        total = d_loss(cfg.kind, real_logits, fake_logits, cfg.label_smoothing)
        stats = {
            "loss/D": total,
            "D/real": torch.sigmoid(real_logits).mean(),
            "D/fake": torch.sigmoid(fake_logits).mean(),
            "D/accuracy": 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()),
        }
        if cfg.ac_weight:
            stats["loss/D_ac"] = class_loss(real_classes, c_real) + class_loss(fake_classes, c_fake)
            total = total + cfg.ac_weight * stats["loss/D_ac"]
        if cfg.drift:
            total = total + cfg.drift * real_logits.square().mean()
        if cfg.gp_weight:
            eps = m.data["eps"].view(-1, 1, 1, 1).to(real.dtype)
            with ctx.eager(), st.autocast("D"):
                stats["reg/gp"] = gradient_penalty(lambda x: raw_D(aug(x), c_real), real, fake, eps).mean()
            total = total + cfg.gp_weight * stats["reg/gp"]
        if with_r1:
            r1 = (
                r1_through_raw(ctx, real, c_real, cfg, aug)[0]
                if own_r1_pass
                else r1_penalty(real_in, real_logits, st.loss_scale)
            )
            stats["reg/r1"] = r1.mean()
            total = total + stats["reg/r1"] * (cfg.r1_gamma / 2)
        return total, stats

    return Phase("D", steps=("D",), loss=loss, inputs=inputs, reals="new", after=clip_d(cfg.clip))


def clip_d(clip: float | None):
    """WGAN's weight clipping (Arjovsky et al. 2017, Algorithm 1, line 7): after each D update, every D parameter
    clamped to [−clip, clip], in place on the module the strategy steps; None when ``clip`` is off."""
    if clip is None:
        return None

    def after(ctx: StepContext) -> None:
        with torch.no_grad():
            for p in ctx.raw["D"].parameters():
                p.clamp_(-clip, clip)

    return after


def d_reg_phase(cfg: LossConfig, aug: Augment) -> Phase:
    """Lazy R1: ``γ/2 · E‖∇D(x)‖² · interval``, its own optimizer step (StyleGAN2's Dreg phase)."""

    def loss(ctx: StepContext, m: Micro):
        real, c = m.data["img"], m.data["label"]
        r1, logits = r1_through_raw(ctx, real, c, cfg, aug)
        with ctx.eager():
            packed = pack(real, cfg.pack)
            total = r1.mean() * (cfg.r1_gamma / 2) * cfg.r1_interval + 0 * anchor(ctx, "D", logits, packed, c)
        return total, {"reg/r1": r1.mean()}

    return Phase(
        "Dreg",
        steps=("D",),
        loss=loss,
        inputs=lambda ctx, reals, n: reals,
        reals="same",
        interval=cfg.r1_interval,
        after=clip_d(cfg.clip),
    )


def g_phase(cfg: LossConfig, caps: Capabilities, aug: Augment, d_optimizer: str = "adam") -> Phase:
    """G against the current D (D gets no gradient and runs unwrapped) on augmented fakes, so that G learns
    through the (differentiable) augmentation; plus BigGAN's orthogonal term.
    G runs through its wrapper (which synchronises its gradient), with style mixing when it has a mapping.
    With ``loss.unroll_steps`` D is replaced by its look-ahead (:func:`orchestrator.unroll.lookahead`, with D's
    optimizer of kind ``d_optimizer``), and with ``loss.feature_matching`` G matches D's mean features; both read
    the real images of the phase before (the D phase's)."""
    reads_reals = cfg.unroll_steps > 0 or cfg.feature_matching != "off"

    def inputs(ctx: StepContext, reals: dict, n: int) -> dict:
        z, c = ctx.sampler.latents(n)
        return {"z": z, "c": c, **({"img": reals["img"], "label": reals["label"]} if reads_reals else {})}

    def loss(ctx: StepContext, m: Micro):
        st, z, c = ctx.strategy, m.data["z"], m.data["c"]
        with st.autocast("G"):
            fake = fakes(ctx.nets["G"], z, c, cfg, caps.mapping)
        real = (m.data["img"], m.data["label"]) if reads_reals else None
        with ctx.eager() if cfg.unroll_steps else contextlib.nullcontext(), st.autocast("D"):
            D = unrolled_d(ctx, cfg, aug, d_optimizer, real, fake, c) if cfg.unroll_steps else ctx.raw["D"]
            total, stats, classes = g_adversarial(D, fake, c, real, cfg, aug)
        if cfg.ac_weight:
            stats["loss/G_ac"] = class_loss(classes, c)
            total = total + cfg.ac_weight * stats["loss/G_ac"]
        if cfg.ortho_beta and m.last:  # once per step: × count undoes backward's 1 / count
            ortho = orthogonal_penalty(ctx.raw["G"].ortho_parameters())
            total = total + cfg.ortho_beta * ortho * m.count
            stats["reg/ortho"] = ortho.detach() * m.count  # the runner averages over the micro-batches
        return total, stats

    return Phase("G", steps=("G",), loss=loss, inputs=inputs, frozen=("D",), reals="same" if reads_reals else "none")


def g_adversarial(
    D: Callable[..., torch.Tensor],
    fake: torch.Tensor,
    c: torch.Tensor | None,
    real: tuple[torch.Tensor, torch.Tensor | None] | None,
    cfg: LossConfig,
    aug: Augment,
) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """G's loss against ``D`` (the adversarial term, feature matching with the ``(images, labels)`` of ``real``,
    or both), its statistics, and D's class logits of the fakes when the AC-GAN term is on (else None)."""
    if cfg.feature_matching == "off":
        logits, classes = scores(D, fake, c, cfg, aug)
        total = g_loss(cfg.kind, logits)
        return total, {"loss/G": total}, classes
    logits, fake_features = D(seen(fake, cfg, aug), c, return_features=True)
    with torch.no_grad():  # the real features are the target (Salimans et al. 2016, section 3.1)
        _, real_features = D(seen(real[0], cfg, aug), real[1], return_features=True)
    matching = feature_matching_loss(real_features, fake_features)
    stats = {"loss/G_fm": matching}
    total = cfg.feature_matching_weight * matching
    if cfg.feature_matching == "added":
        stats["loss/G"] = g_loss(cfg.kind, logits.float())
        total = total + stats["loss/G"]
    return total, stats, None


def unrolled_d(
    ctx: StepContext,
    cfg: LossConfig,
    aug: Augment,
    kind: str,
    real: tuple[torch.Tensor, torch.Tensor | None],
    fake: torch.Tensor,
    c: torch.Tensor | None,
) -> Callable[..., torch.Tensor]:
    """D after ``loss.unroll_steps`` look-ahead steps of its optimizer on the D loss of this micro-batch's
    ``real`` (images, labels) and ``fake`` (labels ``c``; not detached: G's gradient flows through the steps,
    Metz et al. 2017, eq. 8). The look-ahead takes the adversarial loss only, not R1 or drift; D does not change."""
    real_seen, real_c, fake_seen = seen(real[0], cfg, aug), real[1], seen(fake, cfg, aug)

    def d_objective(D_k: Callable[..., torch.Tensor]) -> torch.Tensor:
        return d_loss(cfg.kind, D_k(real_seen, real_c).float(), D_k(fake_seen, c).float(), cfg.label_smoothing)

    return lookahead(ctx.raw["D"], ctx.strategy.optimizer("D"), kind, d_objective, cfg.unroll_steps)


def g_pl_phase(cfg: LossConfig, reg: RegState) -> Phase:
    """Lazy path-length regularization on a reduced batch, weight scaled by the interval (StyleGAN2's Greg)."""

    def inputs(ctx: StepContext, reals: dict, n: int) -> dict:
        z, c = ctx.sampler.latents(n)
        return {"z": z, "c": c}

    def loss(ctx: StepContext, m: Micro):
        z, c, rng, G = m.data["z"], m.data["c"], ctx.sampler.rng, ctx.raw["G"]
        with ctx.eager():  # the penalty's backward is a second one
            with ctx.strategy.autocast("G"):
                ws = G.mapping_with_style_mixing(z, c, cfg.style_mixing_prob)
                img = G.synthesis(ws)
            noise = torch.randn(img.shape, generator=rng, device=rng.device).to(img.device)
            noise = noise / (img.shape[2] * img.shape[3]) ** 0.5
            penalty, reg.pl_mean = path_length_penalty(img.float(), ws, reg.pl_mean, cfg.pl_decay, noise)
            total = penalty.mean() * cfg.pl_weight * cfg.pl_interval + 0 * anchor(ctx, "G", img, z, c)
        stats = {"reg/pl_penalty": penalty.mean()}
        if m.last:  # the running mean after this step (× count: the runner averages over the micro-batches)
            stats["reg/pl_mean"] = reg.pl_mean.detach() * m.count
        return total, stats

    return Phase("Greg", steps=("G",), loss=loss, inputs=inputs, interval=cfg.pl_interval, shrink=cfg.pl_batch_shrink)


def build(setup: RecipeSetup) -> Recipe:
    """G, D and G_ema of ``model.arch`` with the phases ``loss`` asks for."""
    cfg, caps = setup.loss, setup.arch.capabilities
    check(setup, caps)
    d_spec = replace(setup.spec, channels=setup.spec.channels * cfg.pack)  # PacGAN: m images per D input
    try:
        G = setup.arch.build_generator(setup.model, setup.spec).to(setup.device)
        D = setup.arch.build_discriminator(setup.model, d_spec).to(setup.device)
    except ValueError as e:  # e.g. a resolution the architecture cannot take
        raise ConfigError(f"model ({setup.arch.name}) on data {setup.spec}: {e}") from None
    lazy_r1 = cfg.r1_gamma > 0 and cfg.r1_interval > 1
    lazy_pl = cfg.pl_weight > 0 and cfg.pl_interval > 1
    freeze_d_blocks(D, setup.finetune.freeze_d, setup.arch)
    reg = RegState(pl_mean=torch.zeros([], device=setup.device))
    aug = Augment(setup.augment, setup.device)
    phases = []
    for _ in range(cfg.d_steps):
        phases.append(d_phase(cfg, caps, with_r1=cfg.r1_gamma > 0 and not lazy_r1, aug=aug))
        if lazy_r1:
            phases.append(d_reg_phase(cfg, aug))
    phases.append(g_phase(cfg, caps, aug, setup.optim.d.kind))
    if cfg.pl_weight > 0:
        phases.append(g_pl_phase(cfg, reg))
    networks = {
        "G": Network(G, setup.optim.g, cfg.pl_interval if lazy_pl else 1),
        "D": Network(D, setup.optim.d, cfg.r1_interval if lazy_r1 else 1),
        "G_ema": Network(make_ema(G)),
    }
    state = {"reg": reg, **({"augment": aug} if aug.active else {})}
    hooks = [aug.end_step] if aug.active else []
    return Recipe(networks, phases, setup.sampler(G.z_dim), ema={"G_ema": "G"}, state=state, after_step=hooks)


register_recipe("noise_to_image", build)
