"""SRGAN (Ledig et al. 2017, "Photo-Realistic Single Image Super-Resolution Using a Generative Adversarial
Network") as a recipe.

Two stages, by the real images shown so far (``srgan.pretrain_kimg``):

1. **SRResNet pre-training** (section 3.2): G alone minimises the pixel MSE to the high-resolution image.
2. **SRGAN**: one D update (``−log D(I_HR) − log(1 − D(G(I_LR)))``) on a fresh batch, then one G update on the
   same batch with the perceptual loss of eq. 3: the content loss plus 10⁻³ × the adversarial loss
   ``−log D(G(I_LR))`` (eq. 6). The content loss is the VGG loss on φ5,4 (eq. 5: the MSE of VGG19's features
   after the 4th convolution's activation before the 5th max-pooling, rescaled by 1/12.75 as the paper says),
   read from a local VGG19 weights file (``srgan.vgg_weights``; nothing is downloaded), or the pixel MSE
   (``srgan.content: mse``, the paper's SRGAN-MSE) where there are no weights.

The VGG network is a fixed loss network: it is loaded from its file at start and never checkpointed.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from core.config import ConfigError, StrictConfig
from orchestrator.losses import d_loss, g_loss
from orchestrator.recipes.image_to_image import check_setup
from orchestrator.recipes.recipe import Micro, Network, Phase, Recipe, RecipeSetup, StepContext, register_recipe


class SRGANOptions(StrictConfig):
    """The ``srgan`` section: the content loss, the adversarial weight and the pre-training length."""

    content: Literal["vgg", "mse"] = Field(
        "vgg", description="vgg: MSE of VGG19 φ5,4 features / 12.75 (SRGAN-VGG54); mse: pixel MSE (SRGAN-MSE)"
    )
    vgg_weights: str | None = Field(
        None, description="torchvision's VGG19 state dict (vgg19-dcbb9e9d.pth), a local file; needed for content: vgg"
    )
    vgg_layer: Literal["5_4", "2_2"] = Field("5_4", description="the VGG feature map φi,j (paper: 5_4; 2_2 also)")
    adv_weight: float = Field(1e-3, ge=0.0, description="weight of the adversarial loss (paper: 10⁻³)")
    pretrain_kimg: float = Field(
        0.0, ge=0.0, description="train G alone on the pixel MSE for this many thousand images first (SRResNet)"
    )
    lr_drop_kimg: float | None = Field(
        None, gt=0.0, description="learning rates × 0.1 from this many thousand images on (paper: after 10⁵ of the "
        "2·10⁵ SRGAN updates; None: constant)",
    )  # fmt: skip


def pair(ctx: StepContext, reals: dict, n: int) -> dict:
    """The phase inputs: low-resolution inputs and their high-resolution images."""
    return {"input": reals["input"], "img": reals["img"]}


def content_loss(opts: SRGANOptions, device: torch.device):
    """``loss(fake, real)``: the VGG feature loss (weights read from the local file) or the pixel MSE."""
    if opts.content == "mse":
        return lambda fake, real: F.mse_loss(fake.float(), real.float())
    from architectures.vgg import load_vgg19_features, vgg_content_loss

    if not opts.vgg_weights:
        raise ConfigError(
            "srgan.content: vgg needs srgan.vgg_weights, a local VGG19 file (torchvision's vgg19-dcbb9e9d.pth); "
            "or set srgan.content: mse to train without it"
        )
    features = load_vgg19_features(opts.vgg_weights, opts.vgg_layer).to(device)
    return lambda fake, real: vgg_content_loss(features, fake.float(), real.float())


def pretrain_phase(until: float) -> Phase:
    """SRResNet: G on the pixel MSE alone, while fewer than ``until`` images were shown."""

    def loss(ctx: StepContext, m: Micro):
        with ctx.strategy.autocast("G"):
            fake = ctx.nets["G"](m.data["input"])
        mse = F.mse_loss(fake.float(), m.data["img"].float())
        return mse, {"loss/G": mse, "loss/G_mse": mse}

    return Phase("Gmse", steps=("G",), loss=loss, inputs=pair, reals="new", active=lambda nimg: nimg < until)


def d_phase(kind: str, after: float) -> Phase:
    """D on high-resolution images and G's upscaled inputs (two calls: BatchNorm sees each batch alone)."""

    def loss(ctx: StepContext, m: Micro):
        x, y = m.data["input"], m.data["img"]
        with torch.no_grad(), ctx.strategy.autocast("G"):
            fake = ctx.raw["G"](x)
        with ctx.strategy.autocast("D"):
            real_logits = ctx.nets["D"](y).float()
            fake_logits = ctx.nets["D"](fake.detach()).float()
        total = d_loss(kind, real_logits, fake_logits)
        return total, {
            "loss/D": total,
            "D/real": torch.sigmoid(real_logits).mean(),
            "D/fake": torch.sigmoid(fake_logits).mean(),
            "D/accuracy": 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()),
        }

    return Phase("D", steps=("D",), loss=loss, inputs=pair, reals="new", active=lambda nimg: nimg >= after)


def g_phase(kind: str, opts: SRGANOptions, content, after: float) -> Phase:
    """G on the perceptual loss: content + adv_weight × adversarial, against the frozen D."""

    def loss(ctx: StepContext, m: Micro):
        x, y = m.data["input"], m.data["img"]
        with ctx.strategy.autocast("G"):
            fake = ctx.nets["G"](x)
        with ctx.strategy.autocast("D"):
            logits = ctx.raw["D"](fake).float()
        adv, cont = g_loss(kind, logits), content(fake, y)
        total = cont + opts.adv_weight * adv
        return total, {"loss/G": total, "loss/G_content": cont, "loss/G_adv": adv}

    return Phase(
        "G", steps=("G",), loss=loss, inputs=pair, reals="same", frozen=("D",), active=lambda nimg: nimg >= after
    )


def build(setup: RecipeSetup) -> Recipe:
    """G (SRResNet) and D of ``model.arch: srgan``: the pre-training phase, then the D and G phases."""
    check_setup(setup, "srgan", "paired", same_size=False)
    opts = setup.options or SRGANOptions()
    content = content_loss(opts, setup.device)
    try:
        G = setup.arch.build_generator(setup.model, setup.spec).to(setup.device)
        D = setup.arch.build_discriminator(setup.model, setup.spec).to(setup.device)
    except ValueError as e:
        raise ConfigError(f"model ({setup.arch.name}) on data {setup.spec}: {e}") from None
    kind, until = setup.loss.kind, opts.pretrain_kimg * 1000
    return Recipe(
        {"G": Network(G, setup.optim.g), "D": Network(D, setup.optim.d)},
        [pretrain_phase(until), d_phase(kind, until), g_phase(kind, opts, content, until)],
        setup.sampler(0),
        generator="G",
        lr_schedule=None if opts.lr_drop_kimg is None else step_drop(opts.lr_drop_kimg * 1000),
    )


def step_drop(at: float):
    """The learning-rate factor 1 before ``at`` images, 0.1 from then on."""
    return lambda nimg: 0.1 if nimg >= at else 1.0


register_recipe("srgan", build)
