"""The image → image recipes phase by phase: each phase's gradients against the paper's loss written out by hand
(checked on the gradients themselves, which Adam would hide), CycleGAN's history pool and the linear learning-rate
decay against the authors' rules, SRGAN's stages, and config errors for data that does not fit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import local_context

import architectures
from core.config import ConfigError
from core.spec import ImageSpec
from orchestrator.losses import d_loss, g_loss
from orchestrator.recipes import cyclegan, pix2pix, srgan
from orchestrator.recipes.image_to_image import ImagePool, linear_decay
from orchestrator.recipes.recipe import run_phase

PAIRED = ImageSpec(32, 1, input_resolution=32, input_channels=1, pairing="paired")
UNPAIRED = ImageSpec(32, 3, input_resolution=32, input_channels=1, pairing="unpaired")
UNPAIRED_SAME = ImageSpec(32, 1, input_resolution=32, input_channels=1, pairing="unpaired")
SR = ImageSpec(16, 3, input_resolution=4, input_channels=3, pairing="paired")


def nets(arch: str, spec: ImageSpec, **model):
    family = architectures.get(arch)
    cfg = family.config(**model)
    torch.manual_seed(0)
    return family.build_generator(cfg, spec), family.build_discriminator(cfg, spec)


def images(n: int, c: int, r: int, seed: int) -> torch.Tensor:
    return torch.rand(n, c, r, r, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def hand_grads(module: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    named = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
    gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {k: g for (k, _), g in zip(named, gs) if g is not None}


def assert_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    assert any(w.abs().max() > 0 for w in want.values()), f"{what}: zero gradient"
    scale = max(float(w.abs().max()) for w in want.values())
    for k in want:  # float32 sums in another order (micro-batches): relative 1e-4 of the largest entry
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5 * scale, msg=lambda m, k=k: f"{what} {k}: {m}")


# ---------------------------------------------------------------------------------------------------
# Pix2Pix: eq. 4, D's objective halved.

P2P = dict(ngf=4, ndf=4, d_layers=2, norm="instance", dropout=0.0)


def test_pix2pix_phases_take_the_gradients_of_the_papers_objective():
    G, D = nets("pix2pix", PAIRED, **P2P)
    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    ctx, _ = local_context(G, D, "pix2pix")
    x, y = images(4, 1, 32, 1), images(4, 1, 32, 2)
    reals = {"input": x, "img": y}

    d = pix2pix.d_phase("nonsaturating")
    run_phase(d, ctx, d.inputs(ctx, reals, 4), [2, 2])  # two micro-batches accumulate to the batch's mean
    fake = G0(x).detach()
    want = 0.5 * (F.softplus(-D0(x, y)).mean() + F.softplus(D0(x, fake)).mean())
    assert_same(grads(D), hand_grads(D0, want), "pix2pix D")

    D0 = copy.deepcopy(D)  # D has stepped: G trains against the new D
    g = pix2pix.g_phase("nonsaturating", 100.0)
    run_phase(g, ctx, g.inputs(ctx, reals, 4), [4])
    out = G0(x)
    want = F.softplus(-D0(x, out)).mean() + 100 * (out - y).abs().mean()
    assert_same(grads(G), hand_grads(G0, want), "pix2pix G")


# ---------------------------------------------------------------------------------------------------
# CycleGAN: eq. 3 with least squares, identity 0.5·λ, D's objective halved on pooled fakes.

CYC = dict(ngf=4, ndf=4, g_blocks=1, d_layers=2)


@pytest.mark.parametrize("spec, identity", [(UNPAIRED_SAME, 0.5), (UNPAIRED, 0.0)])
def test_cyclegan_phases_take_the_gradients_of_the_papers_objective(spec, identity):
    G, D = nets("cyclegan", spec, **CYC)
    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    ctx, _ = local_context(G, D, "cyclegan")
    a, b = images(4, spec.input_channels, 32, 1), images(4, spec.channels, 32, 2)
    opts = cyclegan.CycleGANOptions(identity_weight=identity, pool_size=50)
    fakes, pools = cyclegan.Fakes(), (ImagePool(50), ImagePool(50))
    reals = {"input": a, "img": b}

    g = cyclegan.g_phase("lsgan", opts, fakes)
    run_phase(g, ctx, g.inputs(ctx, reals, 4), [2, 2])
    fb, fa = G0.ab(a), G0.ba(b)
    want = (
        (D0.b(fb) - 1).square().mean()
        + (D0.a(fa) - 1).square().mean()
        + 10 * ((G0.ba(fb) - a).abs().mean() + (G0.ab(fa) - b).abs().mean())
    )
    if identity:
        want = want + 10 * 0.5 * ((G0.ab(b) - b).abs().mean() + (G0.ba(a) - a).abs().mean())
    assert_same(grads(G), hand_grads(G0, want), "cyclegan G")

    d = cyclegan.d_phase("lsgan", fakes, *pools)
    run_phase(d, ctx, d.inputs(ctx, reals, 4), [4])
    fb, fa = fb.detach(), fa.detach()  # the pool is filling: the step's own fakes come back
    want = 0.5 * ((D0.a(a) - 1).square().mean() + D0.a(fa).square().mean()) + 0.5 * (
        (D0.b(b) - 1).square().mean() + D0.b(fb).square().mean()
    )
    assert_same(grads(D), hand_grads(D0, want), "cyclegan D")
    assert len(pools[0].images) == len(pools[1].images) == 4


def test_the_image_pool_follows_the_authors_rule():
    """Until full, every fake is kept and used; then each fake is used with probability ½ and otherwise swapped
    for a random kept one, which it replaces (pytorch-CycleGAN-and-pix2pix util/image_pool.py)."""
    pool, rng = ImagePool(3), torch.Generator().manual_seed(5)
    first = torch.arange(3.0).view(3, 1)
    assert torch.equal(pool.query(first, rng), first)
    new = torch.arange(10.0, 16.0).view(6, 1)
    mirror = torch.Generator().manual_seed(5)
    torch.rand(3, generator=mirror), torch.randint(3, (3,), generator=mirror)  # the first query's draws
    swap, slot = torch.rand(6, generator=mirror) > 0.5, torch.randint(3, (6,), generator=mirror)
    kept, want = [0.0, 1.0, 2.0], []
    for i, v in enumerate(new[:, 0].tolist()):
        if swap[i]:
            want.append(kept[slot[i]])
            kept[slot[i]] = v
        else:
            want.append(v)
    assert pool.query(new, rng)[:, 0].tolist() == want
    assert [float(t) for t in pool.images] == kept
    assert 0 < int(swap.sum()) < 6, "the draws exercise both branches"
    again = ImagePool(3)
    again.load_state_dict(pool.state_dict())
    assert [float(t) for t in again.images] == kept


def test_linear_decay_is_constant_then_falls_to_zero():
    """The authors' linear policy over the second half (continuous in images): 1 until half, ½ at three
    quarters, 0 at the end."""
    f = linear_decay(10.0, 0.5)
    assert [f(n) for n in (0, 4000, 5000, 7500, 10000, 12000)] == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert linear_decay(10.0, 1.0) is None


def test_lsgan_losses():
    r, f = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert float(d_loss("lsgan", r, f)) == pytest.approx(0.5 + 2.0)  # mean((r−1)²) + mean(f²)
    assert float(g_loss("lsgan", f)) == pytest.approx(1.0)  # mean((f−1)²)


# ---------------------------------------------------------------------------------------------------
# SRGAN: eq. 3 with content + 10⁻³ · adversarial; MSE pre-training first.

SRM = dict(g_blocks=1, g_channels=4, d_channels=4, d_dense=8)


def test_srgan_phases_take_the_gradients_of_the_perceptual_loss(tmp_path):
    import torchvision

    from architectures.vgg import load_vgg19_features

    torch.manual_seed(3)
    features = torchvision.models.vgg19(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in features.items()}, tmp_path / "vgg.pth")  # no classifier: 80 MB
    G, D = nets("srgan", SR, **SRM)
    G0 = copy.deepcopy(G)
    ctx, _ = local_context(G, D, "srgan")
    x, y = images(2, 3, 4, 1), images(2, 3, 16, 2)
    opts = srgan.SRGANOptions(vgg_weights=str(tmp_path / "vgg.pth"))
    content = srgan.content_loss(opts, torch.device("cpu"))
    D.eval(), G.eval(), G0.eval()  # BatchNorm with running statistics: the same function in both passes
    D0 = copy.deepcopy(D)
    g = srgan.g_phase("nonsaturating", opts, content, 0)
    run_phase(g, ctx, g.inputs(ctx, {"input": x, "img": y}, 2), [2])
    phi = load_vgg19_features(tmp_path / "vgg.pth")
    out = G0(x)
    want = F.mse_loss(phi(out) / 12.75, phi(y) / 12.75) + 1e-3 * F.softplus(-D0(out)).mean()
    assert_same(grads(G), hand_grads(G0, want), "srgan G")

    G0 = copy.deepcopy(G)
    pre = srgan.pretrain_phase(until=1000)
    run_phase(pre, ctx, pre.inputs(ctx, {"input": x, "img": y}, 2), [2])
    assert_same(grads(G), hand_grads(G0, F.mse_loss(G0(x), y)), "srresnet pre-training")
    assert pre.active(999) and not pre.active(1000)
    assert not srgan.d_phase("nonsaturating", 1000).active(999) and srgan.d_phase("nonsaturating", 1000).active(1000)


def test_srgan_vgg_content_without_weights_says_what_to_do():
    with pytest.raises(ConfigError, match="srgan.vgg_weights.*srgan.content: mse"):
        srgan.content_loss(srgan.SRGANOptions(), torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="vgg19"):
        srgan.content_loss(srgan.SRGANOptions(vgg_weights="/nonexistent/vgg19.pth"), torch.device("cpu"))
