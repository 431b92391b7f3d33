"""CycleGAN (Zhu et al. 2017, "Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial Networks")
as a recipe.

Two generators (``G.ab``: A → B, ``G.ba``: B → A) and two discriminators (``D.a`` judges A images, ``D.b`` B
images), each pair with one Adam, as the authors' code has them. The full objective is eq. 3: least-squares
adversarial losses (section 4, "Training details") plus λ·(‖G.ba(G.ab(a)) − a‖₁ + ‖G.ab(G.ba(b)) − b‖₁) with
λ = 10, plus the identity loss 0.5·λ·(‖G.ab(b) − b‖₁ + ‖G.ba(a) − a‖₁) (section 5.2, used for photo ↔ painting
and in the authors' defaults). A step is the authors' ``optimize_parameters``: one G update with both
discriminators frozen, then one D update in which each D sees its real batch and fakes from a history of 50
(:class:`~orchestrator.recipes.image_to_image.ImagePool`), its loss halved. Learning rates are constant for
the first half and fall linearly to 0 over the second.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field

from core.config import ConfigError, StrictConfig
from orchestrator.losses import d_loss, g_loss
from orchestrator.recipes.image_to_image import ImagePool, check_setup, gather_rows, linear_decay
from orchestrator.recipes.recipe import Micro, Network, Phase, Recipe, RecipeSetup, StepContext, register_recipe


class CycleGANOptions(StrictConfig):
    """The ``cyclegan`` section: loss weights, the history pool and the learning-rate schedule."""

    cycle_weight: float = Field(10.0, ge=0.0, description="λ of the cycle-consistency terms (paper: 10)")
    identity_weight: float = Field(
        0.5, ge=0.0, description="the identity terms' weight as a fraction of λ (authors: 0.5; 0: off)"
    )
    pool_size: int = Field(50, ge=0, description="generated images each D's history keeps (paper: 50; 0: none)")
    lr_decay_start: float = Field(
        0.5, gt=0.0, le=1.0, description="learning rates fall linearly to 0 from this fraction of train.total_kimg "
        "(paper: after 100 of 200 epochs; 1: constant)",
    )  # fmt: skip


class Fakes:
    """The G phase's fakes of this step (per micro-batch, detached), handed to the D phase."""

    def __init__(self) -> None:
        self.a: list[torch.Tensor] = []
        self.b: list[torch.Tensor] = []

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = torch.cat(self.a), torch.cat(self.b)
        self.a, self.b = [], []
        return a, b


def domains(ctx: StepContext, reals: dict, n: int) -> dict:
    """The phase inputs: a batch of domain A (``input``) and one of domain B (``img``), unrelated."""
    return {"a": reals["input"], "b": reals["img"]}


def g_phase(kind: str, opts: CycleGANOptions, fakes: Fakes) -> Phase:
    """Both generators against the frozen discriminators, with the cycle and identity terms."""
    identity = opts.identity_weight > 0

    def loss(ctx: StepContext, m: Micro):
        a, b = m.data["a"], m.data["b"]
        with ctx.strategy.autocast("G"):
            out = ctx.nets["G"](a, b, identity=identity)  # one call through the wrapper: every parameter takes part
        with ctx.strategy.autocast("D"):
            logits_a, logits_b = ctx.raw["D"](out["fake_a"], out["fake_b"])
        adv_ab, adv_ba = g_loss(kind, logits_b.float()), g_loss(kind, logits_a.float())
        lam = opts.cycle_weight
        cycle = F.l1_loss(out["rec_a"].float(), a.float()) + F.l1_loss(out["rec_b"].float(), b.float())
        stats = {"loss/G_ab": adv_ab, "loss/G_ba": adv_ba, "loss/cycle": cycle}
        total = adv_ab + adv_ba + lam * cycle
        if identity:
            stats["loss/identity"] = F.l1_loss(out["idt_b"].float(), b.float()) + F.l1_loss(
                out["idt_a"].float(), a.float()
            )
            total = total + lam * opts.identity_weight * stats["loss/identity"]
        fakes.a.append(out["fake_a"].detach())
        fakes.b.append(out["fake_b"].detach())
        return total, {"loss/G": total, **stats}

    return Phase("G", steps=("G",), loss=loss, inputs=domains, reals="new", frozen=("D",))


def d_phase(kind: str, fakes: Fakes, pool_a: ImagePool, pool_b: ImagePool) -> Phase:
    """Both discriminators on their real batch and pooled fakes of this step's G phase, each loss halved."""

    def inputs(ctx: StepContext, reals: dict, n: int) -> dict:
        fake_a, fake_b = fakes.take()
        # the pool sees the global batch, so that it is the same on every rank and for any worker count
        rank = dist.get_rank() if dist.is_initialized() else 0
        mine = slice(rank * len(fake_a), (rank + 1) * len(fake_a))
        rng = ctx.sampler.rng
        fake_a = pool_a.query(gather_rows(fake_a), rng)[mine]
        fake_b = pool_b.query(gather_rows(fake_b), rng)[mine]
        return {**domains(ctx, reals, n), "fake_a": fake_a, "fake_b": fake_b}

    def loss(ctx: StepContext, m: Micro):
        d = m.data
        with ctx.strategy.autocast("D"):  # reals and fakes in two calls, as the authors' backward_D_basic
            real_a, real_b = (x.float() for x in ctx.nets["D"](d["a"], d["b"]))
            fake_a, fake_b = (x.float() for x in ctx.nets["D"](d["fake_a"], d["fake_b"]))
        loss_a, loss_b = 0.5 * d_loss(kind, real_a, fake_a), 0.5 * d_loss(kind, real_b, fake_b)
        return loss_a + loss_b, {"loss/D": loss_a + loss_b, "loss/D_a": loss_a, "loss/D_b": loss_b}

    return Phase("D", steps=("D",), loss=loss, inputs=inputs, reals="same")


def build(setup: RecipeSetup) -> Recipe:
    """G (``ab``, ``ba``) and D (``a``, ``b``) of ``model.arch: cyclegan`` with the G and D phases and two pools."""
    check_setup(setup, "cyclegan", "unpaired", same_size=True)
    if not setup.arch.capabilities.cycle:
        raise ConfigError(f"train.recipe: cyclegan needs two generators (model.arch: cyclegan), not {setup.arch.name}")
    opts = setup.options or CycleGANOptions()
    if opts.identity_weight and setup.spec.input_channels != setup.spec.channels:
        raise ConfigError(
            f"cyclegan.identity_weight: {opts.identity_weight} feeds B images to G.ab, but domain A has "
            f"{setup.spec.input_channels} channels and B {setup.spec.channels}; set cyclegan.identity_weight: 0"
        )
    G = setup.arch.build_generator(setup.model, setup.spec).to(setup.device)
    D = setup.arch.build_discriminator(setup.model, setup.spec).to(setup.device)
    kind, fakes = setup.loss.kind, Fakes()
    pool_a, pool_b = ImagePool(opts.pool_size), ImagePool(opts.pool_size)
    return Recipe(
        {"G": Network(G, setup.optim.g), "D": Network(D, setup.optim.d)},
        [g_phase(kind, opts, fakes), d_phase(kind, fakes, pool_a, pool_b)],
        setup.sampler(0),
        state={"pool_a": pool_a, "pool_b": pool_b},
        generator="G",
        lr_schedule=linear_decay(setup.total_kimg, opts.lr_decay_start),
    )


register_recipe("cyclegan", build)
