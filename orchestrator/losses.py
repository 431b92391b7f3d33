"""Adversarial losses and regularizers as plain functions of logits, images and networks.

Conventions: ``D`` returns raw logits; ``softplus(x) = log(1 + e^x)``, so ``-log σ(x) = softplus(-x)``
and ``-log(1 - σ(x)) = softplus(x)``. Every loss is a mean over the batch.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from core.config import StrictConfig

LossKind = Literal["minimax", "nonsaturating", "hinge", "wgan", "lsgan"]


class LossConfig(StrictConfig):
    """The adversarial loss and the regularizers with their weights and intervals."""

    kind: LossKind = Field("nonsaturating", description="minimax | nonsaturating | hinge | wgan | lsgan")
    d_steps: int = Field(1, ge=1, le=100, description="D (critic) steps per G step")
    r1_gamma: float = Field(0.0, ge=0.0, description="R1 weight γ on real images (0: off)")
    r1_interval: int = Field(1, ge=1, description="apply R1 every this many D steps, scaled by the interval (lazy)")
    gp_weight: float = Field(0.0, ge=0.0, description="WGAN-GP weight λ (0: off)")
    drift: float = Field(0.0, ge=0.0, description="ε of the drift term ε·E[D(x)²] (ProGAN uses 0.001)")
    pl_weight: float = Field(0.0, ge=0.0, description="path-length regularization weight (StyleGAN2: 2; 0: off)")
    pl_interval: int = Field(4, ge=1, description="apply path-length regularization every this many G steps (lazy)")
    pl_batch_shrink: int = Field(2, ge=1, description="path-length batch = batch // this")
    pl_decay: float = Field(0.01, gt=0.0, le=1.0, description="decay of the running path-length mean")
    style_mixing_prob: float = Field(0.0, ge=0.0, le=1.0, description="style mixing probability (StyleGAN2: 0.9)")
    ac_weight: float = Field(
        0.0,
        ge=0.0,
        description="weight of AC-GAN's label terms for a D that classifies "
        "(ProGAN, conditional: official 1.0): cross-entropy on reals and fakes for D, fakes for G",
    )
    clip: float | None = Field(
        None,
        gt=0.0,
        description="WGAN weight clipping: every D parameter clamped to [−clip, clip] after each D step "
        "(Arjovsky et al. 2017, Algorithm 1: 0.01; null: off)",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="one-sided label smoothing s: D's real target 1 − s, fakes stay 0 (Salimans et al. 2016, "
        "section 3.4: 0.1 → 0.9); minimax and nonsaturating only; 0: off",
    )
    pack: int = Field(
        1,
        ge=1,
        le=16,
        description="PacGAN packing m: D judges m samples at once, concatenated along channels (Lin et al. "
        "2018: 2-4; 1: off); D's input has m× the channels and each micro-batch must be a multiple of m",
    )
    feature_matching: Literal["off", "alone", "added"] = Field(
        "off",
        description="feature matching (Salimans et al. 2016, section 3.1): G matches the mean of D's last "
        "features on real and fake batches, alone (instead of the adversarial loss) or added to it; off",
    )
    feature_matching_weight: float = Field(1.0, gt=0.0, description="weight of the feature matching term")
    unroll_steps: int = Field(
        0,
        ge=0,
        le=20,
        description="unrolled GAN (Metz et al. 2017): G's loss is taken against D after this many look-ahead "
        "steps of D's optimizer, differentiated through them (paper: 1, 5, 10); D itself is untouched; 0: off",
    )
    ortho_beta: float = Field(
        0.0,
        ge=0.0,
        description="β of BigGAN's orthogonal regularization of G, "
        "β·Σ‖WWᵀ ⊙ (1 − I)‖²_F (paper: 1e-4; the authors' --G_ortho s is β = s/2; 0: off)",
    )

    @model_validator(mode="after")
    def _smoothing_needs_a_cross_entropy(self) -> LossConfig:
        if self.label_smoothing and self.kind not in ("minimax", "nonsaturating"):
            raise ValueError(
                f"label_smoothing {self.label_smoothing} smooths the cross-entropy target of minimax or "
                f"nonsaturating; loss.kind {self.kind} has none: set it to 0"
            )
        return self


def d_loss(
    kind: LossKind, real_logits: torch.Tensor, fake_logits: torch.Tensor, smoothing: float = 0.0
) -> torch.Tensor:
    """The discriminator's loss for one batch of real and one of fake logits. ``smoothing`` s (minimax and
    nonsaturating): one-sided label smoothing, the real term is the cross-entropy against 1 − s,
    ``s·softplus(x) + (1 − s)·softplus(−x)`` (Salimans et al. 2016, section 3.4); the fake term stays."""
    if kind in ("minimax", "nonsaturating"):  # −log D(x) − log(1 − D(G(z))), Goodfellow et al. 2014 eq. 1
        real = F.softplus(-real_logits).mean()
        if smoothing:
            real = (1 - smoothing) * real + smoothing * F.softplus(real_logits).mean()
        return real + F.softplus(fake_logits).mean()
    if kind == "hinge":  # Lim & Ye 2017; Miyato et al. 2018
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    if kind == "wgan":  # Arjovsky et al. 2017: the critic maximises E[D(x)] − E[D(G(z))]
        return fake_logits.mean() - real_logits.mean()
    if kind == "lsgan":  # Mao et al. 2017 with a = 0, b = c = 1 (CycleGAN): E[(D(x) − 1)²] + E[D(G(z))²]
        return (real_logits - 1).square().mean() + fake_logits.square().mean()
    raise ValueError(f"unknown loss kind {kind!r}")


def g_loss(kind: LossKind, fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's loss for a batch of fake logits."""
    if kind == "minimax":  # minimise log(1 − D(G(z))) = −softplus(logit)
        return -F.softplus(fake_logits).mean()
    if kind == "nonsaturating":  # maximise log D(G(z)) instead (Goodfellow et al. 2014, section 3)
        return F.softplus(-fake_logits).mean()
    if kind in ("hinge", "wgan"):
        return -fake_logits.mean()
    if kind == "lsgan":  # E[(D(G(z)) − 1)²]
        return (fake_logits - 1).square().mean()
    raise ValueError(f"unknown loss kind {kind!r}")


def class_loss(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AC-GAN's label term (Odena et al. 2017): cross-entropy of D's class logits against the labels."""
    return F.cross_entropy(class_logits.float(), labels.long())


def r1_penalty(real_img: torch.Tensor, real_logits: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-image ‖∇ₓ D(x)‖² on real images (Mescheder et al. 2018, eq. 9), kept differentiable.

    ``real_img`` must have ``requires_grad`` set before ``real_logits`` was computed. ``scale``
    multiplies the logits before differentiating and divides the gradient after, so that an fp16
    loss scale can keep the gradient from underflowing.
    """
    (grad,) = torch.autograd.grad((real_logits.sum() * scale,), (real_img,), create_graph=True)
    grad = grad / scale
    return grad.float().square().flatten(1).sum(1)


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """Per-image (‖∇ D(x̂)‖ − 1)² at x̂ = ε·real + (1 − ε)·fake, ε ~ U[0, 1] of shape [N, 1, 1, 1]
    (Gulrajani et al. 2017, eq. 3)."""
    mix = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad((critic(mix).sum(),), (mix,), create_graph=True)
    return (grad.float().flatten(1).norm(dim=1) - 1).square()


def path_length_penalty(
    img: torch.Tensor, ws: torch.Tensor, pl_mean: torch.Tensor, decay: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image path-length penalty and the updated running mean (Karras et al. 2020, section 3.2, eq. 4).

    With ``y`` random images of unit variance per pixel scaled by 1/√(H·W) (``noise``), the length of
    ``J_wᵀ y`` is estimated as the gradient of ``Σ img·y`` w.r.t. the ws, its squared norm summed over
    w's channels and averaged over the ws (one per layer). The penalty is ``(‖J_wᵀ y‖ − a)²``, where ``a``
    is the running mean, updated as ``a ← a + decay·(mean length − a)``. ``noise`` has ``img``'s shape.
    """
    (grad,) = torch.autograd.grad(((img * noise).sum(),), (ws,), create_graph=True)
    lengths = grad.float().square().sum(2).mean(1).sqrt()
    new_mean = pl_mean.lerp(lengths.mean().detach(), decay)
    return (lengths - new_mean).square(), new_mean


def orthogonal_penalty(params) -> torch.Tensor:
    """BigGAN's off-diagonal orthogonal regularization without its weight (Brock et al. 2019, section 3.1,
    eq. 3): ``Σ_W ‖WᵀW ⊙ (1 − I)‖²_F`` over ``params``, each reshaped to ``[out, fan_in]`` with one filter
    per row (so the paper's column-per-filter ``WᵀW`` is ``W Wᵀ`` here: the filters' pairwise inner
    products, diagonal excluded).

    Its gradient is ``4 (WWᵀ ⊙ (1 − I)) W``; the authors' ``utils.ortho(G, s)`` adds ``s · 2 (WWᵀ ⊙ (1 − I)) W``
    to ``.grad`` directly, so ``β · orthogonal_penalty`` gives their update for ``β = s / 2``."""
    total = None
    for p in params:
        w = p.flatten(1).float()
        gram = w @ w.T
        off = gram - torch.diag_embed(torch.diagonal(gram))
        term = off.square().sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("orthogonal_penalty: no parameters")
    return total


def pack(img: torch.Tensor, m: int) -> torch.Tensor:
    """PacGAN's packing (Lin et al. 2018, section 3): ``[N, C, H, W]`` → ``[N/m, m·C, H, W]``, each group of m
    consecutive images concatenated along channels, so D judges m samples at once."""
    if m == 1:
        return img
    n, c, h, w = img.shape
    if n % m:
        raise ValueError(
            f"loss.pack: {m}: a batch of {n} images does not split into packs of {m}; make train.batch_size "
            f"and train.micro_batch multiples of {m} per worker"
        )
    return img.reshape(n // m, m * c, h, w)


def feature_matching_loss(real_features: torch.Tensor, fake_features: torch.Tensor) -> torch.Tensor:
    """Feature matching (Salimans et al. 2016, section 3.1, ``‖E f(x) − E f(G(z))‖²``): the squared distance
    between the batch means of D's features on real and fake images, averaged over the features as the
    authors' code does (so its size does not grow with D's width). Zero for identical batches."""
    real = real_features.float().flatten(1).mean(0)
    fake = fake_features.float().flatten(1).mean(0)
    return (real - fake).square().mean()
