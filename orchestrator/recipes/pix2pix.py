"""Pix2Pix (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks") as a recipe.

The objective is eq. 4: ``G* = arg min_G max_D L_cGAN(G, D) + λ L_L1(G)`` with λ = 100. D (a PatchGAN) judges
the input and the output together, ``D(x, y)``; G gets no noise input, only dropout (section 2.1). As in the
paper and the authors' code, D's loss is halved (section 3.2: "we divide the objective by 2 while optimizing D")
and G maximises log D(x, G(x)) (the non-saturating loss; ``loss.kind``, lsgan also works). A step is one D
update on a fresh pair batch, then one G update on the same batch. G runs a second time in the G phase rather
than reusing the D phase's output (its weights have not changed, only its dropout masks are drawn anew), as
StyleGAN2-ADA's phases do. Learning rates decay linearly to 0 over the second half of training (the authors'
``--n_epochs 100 --n_epochs_decay 100``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from core.config import ConfigError, StrictConfig
from orchestrator.losses import d_loss, g_loss
from orchestrator.recipes.image_to_image import check_setup, linear_decay
from orchestrator.recipes.recipe import Micro, Network, Phase, Recipe, RecipeSetup, StepContext, register_recipe


class Pix2PixOptions(StrictConfig):
    """The ``pix2pix`` section: the weight of the L1 term and the learning-rate schedule."""

    l1_weight: float = Field(100.0, ge=0.0, description="λ of the L1 term (paper: 100)")
    lr_decay_start: float = Field(
        0.5, gt=0.0, le=1.0, description="learning rates fall linearly to 0 from this fraction of train.total_kimg "
        "(authors: half; 1: constant)",
    )  # fmt: skip


def pair(ctx: StepContext, reals: dict, n: int) -> dict:
    """The phase inputs: the worker's input and target images."""
    return {"input": reals["input"], "img": reals["img"]}


def d_phase(kind: str) -> Phase:
    """D on (input, target) as real and (input, G(input)) as fake, its loss halved."""

    def loss(ctx: StepContext, m: Micro):
        x, y = m.data["input"], m.data["img"]
        with torch.no_grad(), ctx.strategy.autocast("G"):
            fake = ctx.raw["G"](x)
        with ctx.strategy.autocast("D"):  # two calls, as the authors' code: a BatchNorm D sees each batch alone
            real_logits = ctx.nets["D"](x, y).float()
            fake_logits = ctx.nets["D"](x, fake.detach()).float()
        total = 0.5 * d_loss(kind, real_logits, fake_logits)
        return total, {
            "loss/D": total,
            "D/real": torch.sigmoid(real_logits).mean(),
            "D/fake": torch.sigmoid(fake_logits).mean(),
            "D/accuracy": 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()),
        }

    return Phase("D", steps=("D",), loss=loss, inputs=pair, reals="new")


def g_phase(kind: str, l1_weight: float) -> Phase:
    """G against the frozen D plus λ·L1 to the target."""

    def loss(ctx: StepContext, m: Micro):
        x, y = m.data["input"], m.data["img"]
        with ctx.strategy.autocast("G"):
            fake = ctx.nets["G"](x)
        with ctx.strategy.autocast("D"):
            logits = ctx.raw["D"](x, fake).float()
        adv, l1 = g_loss(kind, logits), F.l1_loss(fake.float(), y.float())
        total = adv + l1_weight * l1
        return total, {"loss/G": total, "loss/G_adv": adv, "loss/G_L1": l1}

    return Phase("G", steps=("G",), loss=loss, inputs=pair, reals="same", frozen=("D",))


def build(setup: RecipeSetup) -> Recipe:
    """G (U-Net) and D (PatchGAN on input and output) of ``model.arch: pix2pix``, and the two phases."""
    check_setup(setup, "pix2pix", "paired", same_size=True)
    opts = setup.options or Pix2PixOptions()
    try:
        G = setup.arch.build_generator(setup.model, setup.spec).to(setup.device)
        D = setup.arch.build_discriminator(setup.model, setup.spec).to(setup.device)
    except ValueError as e:
        raise ConfigError(f"model ({setup.arch.name}) on data {setup.spec}: {e}") from None
    kind = setup.loss.kind
    return Recipe(
        {"G": Network(G, setup.optim.g), "D": Network(D, setup.optim.d)},
        [d_phase(kind), g_phase(kind, opts.l1_weight)],
        setup.sampler(0),
        generator="G",
        lr_schedule=linear_decay(setup.total_kimg, opts.lr_decay_start),
    )


register_recipe("pix2pix", build)
