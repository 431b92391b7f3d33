"""BigGAN networks: the authors' parameter counts, and the math of each component on tiny nets."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from architectures import REGISTRY, ImageSpec, count_params
from architectures.biggan import (
    BigGANConfig,
    BigGANDiscriminator,
    BigGANGenerator,
    ConditionalBatchNorm2d,
    SelfAttention,
    _SNLayers,
    convert_sync_batchnorm,
    sample_truncated_z,
)

torch.set_num_threads(1)

TINY = dict(g_ch=16, d_ch=16, z_dim=20, shared_dim=8, attention=[16])
TINY_SPEC = ImageSpec(resolution=32, channels=3, num_classes=5)


def tiny(**overrides) -> tuple[BigGANGenerator, BigGANDiscriminator]:
    torch.manual_seed(0)
    spec = overrides.pop("spec", TINY_SPEC)
    cfg = BigGANConfig(**{**TINY, **overrides})
    return BigGANGenerator(cfg, spec), BigGANDiscriminator(cfg, spec)


def test_param_counts_match_authors_imagenet128():
    # ajbrock/BigGAN-PyTorch scripts/launch_BigGAN_bs256x8.sh: G_ch 96, D_ch 96, dim_z 120, shared_dim 128,
    # hier, G/D_attn 64, G_shared, 1000 classes. Sources of 70,433,988 / 87,982,370: google/compare_gan
    # compare_gan/architectures/resnet_biggan_test.py (testNumberOfParameters, lines 139 and 154: "matches the
    # original BigGAN architecture", 128x128, 1000 classes), and the authors' BigGAN.py Generator /
    # Discriminator (commit 9845943) built with the script's arguments, trainable parameters summed (the
    # shared 1000 x 128 embedding included). The count does not depend on the init: skip the slow orthogonal one.
    arch = REGISTRY["biggan"]
    cfg = arch.config(init="N02")
    spec = ImageSpec(resolution=128, channels=3, num_classes=1000)
    G, D = arch.build_generator(cfg, spec), arch.build_discriminator(cfg, spec)
    assert count_params(G) == 70_433_988
    assert count_params(D) == 87_982_370
    assert G.z_dim == 120 and G.z_chunk == 20  # 6 chunks: input layer + 5 blocks
    # Attention after the 64×64 G block (4th) and the 64×64 D block (1st) only.
    assert [isinstance(a, SelfAttention) for a in G.attn] == [False, False, False, True, False]
    assert [isinstance(a, SelfAttention) for a in D.attn] == [True] + [False] * 5


def test_config_validation():
    with pytest.raises(pydantic.ValidationError):
        BigGANConfig(attention=[48])
    with pytest.raises(pydantic.ValidationError):
        BigGANConfig(g_chanels=64)
    with pytest.raises(pydantic.ValidationError):
        BigGANConfig(sn_eps=0)
    with pytest.raises(ValueError, match="matches no G or D block"):
        BigGANGenerator(BigGANConfig(), ImageSpec(32, 3, 10))  # the default [64] at 32 px
    with pytest.raises(ValueError, match="resolutions"):
        BigGANGenerator(BigGANConfig(attention=[]), ImageSpec(48, 3, 10))


def test_hierarchical_z_rounds_down_to_whole_chunks():
    G = BigGANGenerator(BigGANConfig(g_ch=2, attention=[], init="N02"), ImageSpec(256, 3, 4))
    assert (G.z_chunk, G.z_dim) == (17, 119)  # 7 chunks of 120 // 7, as the authors do


def test_tiny_forward_backward_with_labels():
    G, D = tiny()
    z, c = torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 4])
    img = G(z, c)
    assert img.shape == (4, 3, 32, 32)
    assert img.min() >= -1 and img.max() <= 1
    logits = D(img, c)
    assert logits.shape == (4,)
    logits.mean().backward()
    assert all(p.grad is not None for p in G.parameters())
    assert all(p.grad is not None for p in D.parameters())


@pytest.mark.parametrize("resolution", [32, 64, 128, 256, 512])
def test_output_shapes_every_resolution(resolution):
    spec = ImageSpec(resolution, 1, 3)
    cfg = BigGANConfig(g_ch=4, d_ch=2, z_dim=16, shared_dim=4, attention=[], init="N02")
    G, D = BigGANGenerator(cfg, spec), BigGANDiscriminator(cfg, spec)
    c = torch.tensor([0, 2])
    with torch.no_grad():
        img = G(torch.randn(2, G.z_dim), c)
        assert img.shape == (2, 1, resolution, resolution)
        assert D(img, c).shape == (2,)


def _sn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]


def test_spectral_norm_everywhere_but_the_shared_embedding():
    G, D = tiny(sn_eps=1e-6, num_sv_itrs=2)
    for net in (G, D):
        layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
        sn = _sn_modules(net)
        expected = [m for m in layers if m is not getattr(net, "shared", None)]
        assert sn == expected
        for m in sn:
            (p,) = m.parametrizations.weight
            assert p.eps == 1e-6 and p.n_power_iterations == 2
    assert not parametrize.is_parametrized(G.shared)
    # u, v are buffers, not trainable parameters
    assert all(not n.endswith(("_u", "_v")) for n, _ in G.named_parameters())


def test_power_iteration_normalises_largest_singular_value_to_one():
    G, D = tiny()
    torch.manual_seed(1)
    for m in _sn_modules(G) + _sn_modules(D):
        orig = m.parametrizations.weight.original
        with torch.no_grad():  # make the raw weights far from orthogonal and from unit norm
            orig.copy_(3 * torch.randn_like(orig))
        raw_sigma = torch.linalg.svdvals(orig.detach().flatten(1))[0]
        assert raw_sigma > 2
        m.train()
        with torch.no_grad():
            for _ in range(300):  # each access in train mode runs one power iteration
                w = m.weight
        sigma = torch.linalg.svdvals(w.flatten(1))[0]
        assert sigma == pytest.approx(1.0, abs=1e-3), m


def test_conditional_bn_uses_each_samples_gain_and_bias():
    torch.manual_seed(0)
    bn = ConditionalBatchNorm2d(3, cond_dim=4, eps=1e-5, layers=_SNLayers(1e-6, 1, "ortho"))
    bn.train()
    bn.gain.eval(), bn.bias.eval()  # freeze the SN weights so the hand computation sees the same ones
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 4)
    out = bn(x, y)

    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    x_hat = (x - mean) / torch.sqrt(var + 1e-5)
    for i in range(2):
        gain = 1 + bn.gain.weight @ y[i]  # [3]
        bias = bn.bias.weight @ y[i]
        expected = x_hat[i] * gain[:, None, None] + bias[:, None, None]
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)


def test_generator_blocks_condition_on_class_embedding_and_their_z_chunk():
    G, _ = tiny()
    z, c = torch.randn(3, G.z_dim), torch.tensor([4, 0, 4])
    seen = []
    for block in G.blocks:
        block.bn1.register_forward_hook(lambda mod, args, out: seen.append(args[1]))
    G(z, c)
    k = G.z_chunk
    for i, y in enumerate(seen):
        z_i = z[:, (i + 1) * k : (i + 2) * k]  # chunk 0 feeds the input linear layer
        torch.testing.assert_close(y, torch.cat([G.shared.weight[c], z_i], dim=1))
    assert torch.equal(seen[0][0, :8], seen[0][2, :8])  # same class, same embedding


def test_class_embedding_kwarg_matches_labels():
    G, _ = tiny()
    G.eval()
    z, c = torch.randn(2, G.z_dim), torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(G(z, c), G(z, class_embedding=G.shared(c)))


def test_projection_term_is_inner_product_with_class_embedding():
    _, D = tiny()
    D.eval()  # fixed SN weights
    img = torch.randn(2, 3, 32, 32)
    c1, c2 = torch.tensor([0, 1]), torch.tensor([3, 1])
    with torch.no_grad():
        h = D.features(img)
        d1, d2 = D(img, c1), D(img, c2)
        E = D.embed.weight
        torch.testing.assert_close(d1 - d2, ((E[c1] - E[c2]) * h).sum(1), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(d1, D.linear(h).squeeze(1) + (E[c1] * h).sum(1), rtol=1e-5, atol=1e-5)
    assert d1[0] != d2[0] and d1[1] == d2[1]


def test_self_attention_starts_as_identity_and_mixes_positions_when_gamma_nonzero():
    torch.manual_seed(0)
    attn = SelfAttention(16, _SNLayers(1e-6, 1, "ortho")).eval()
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(attn(x), x)
    with torch.no_grad():
        attn.gamma.fill_(1.0)
        out = attn(x)
        x2 = x.clone()
        x2[:, :, 0, 0] += 1.0  # one position changes, others must feel it through the attention
        assert not torch.allclose(attn(x2)[:, :, 7, 7], out[:, :, 7, 7])


def test_truncated_z_is_resampled_not_clipped():
    threshold = 0.5
    z = sample_truncated_z(4000, 8, threshold, generator=torch.Generator().manual_seed(0))
    first_draw = torch.randn(4000, 8, generator=torch.Generator().manual_seed(0))
    inside = first_draw.abs() <= threshold
    assert z.shape == (4000, 8)
    assert z.abs().max() <= threshold
    assert torch.equal(z[inside], first_draw[inside])  # in-range values are kept as drawn
    assert not (z[~inside].abs() == threshold).any()  # out-of-range ones are redrawn, not clipped
    # ~62% of N(0,1) lies beyond 0.5, so clipping would pile that mass at the edges; the truncated
    # normal has about 2*0.01*pdf(0.495)/(2*cdf(0.5)-1) ≈ 1.8% within 0.01 of them.
    assert (z.abs() > threshold - 0.01).float().mean() < 0.03
    a = threshold  # variance of N(0,1) truncated to [-a, a]: 1 - 2a·pdf(a) / (2·cdf(a) - 1)
    pdf, mass = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), math.erf(a / math.sqrt(2))
    assert z.var() == pytest.approx(1 - 2 * a * pdf / mass, rel=0.05)
    with pytest.raises(ValueError):
        sample_truncated_z(2, 2, 0.0)


def test_sync_batchnorm_conversion_replaces_every_batchnorm():
    G, _ = tiny()
    before = [(n, m.affine) for n, m in G.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(before) == 2 * len(G.blocks) + 1
    assert sum(not affine for _, affine in before) == 2 * len(G.blocks)  # the non-affine cBN cores
    G = convert_sync_batchnorm(G)
    after = [(n, m.affine) for n, m in G.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    assert after == before
    assert not any(type(m) is nn.BatchNorm2d for m in G.modules())


def test_ortho_parameters_exclude_the_shared_embedding():
    G, _ = tiny()
    chosen = G.ortho_parameters()
    matrices = [p for p in G.parameters() if p.ndim >= 2]
    assert len(chosen) == len(matrices) - 1
    assert all(p is not G.shared.weight for p in chosen)
    raw = {id(m.parametrizations.weight.original) for m in _sn_modules(G)}
    assert {id(p) for p in chosen} == raw  # the raw (un-normalised) weights of the SN layers


@pytest.mark.parametrize("hier", [True, False])
def test_unconditional(hier):
    spec = ImageSpec(32, 3, 0)
    G, D = tiny(hier=hier, spec=spec)
    assert G.shared is None and D.embed is None
    plain_bn = type(G.blocks[0].bn1) is nn.BatchNorm2d
    assert plain_bn == (not hier)  # with hier the z chunk still conditions the BN
    img = G(torch.randn(2, G.z_dim), None)
    assert img.shape == (2, 3, 32, 32)
    assert D(img, None).shape == (2,)
    assert G.ortho_parameters() == [p for p in G.parameters() if p.ndim >= 2]


def test_discriminator_blocks_match_authors_order():
    # The first block sees the image: no pre-activation, and its shortcut pools before the 1×1 conv.
    # Later blocks are pre-activated and their shortcut convolves before pooling.
    _, D = tiny()
    D.eval()
    first, later = D.blocks[0], D.blocks[1]
    x0 = torch.randn(2, 3, 32, 32)
    x1 = torch.randn(2, later.conv1.in_channels, 16, 16)
    with torch.no_grad():
        h0 = F.avg_pool2d(first.conv2(F.relu(first.conv1(x0))), 2)
        torch.testing.assert_close(first(x0), h0 + first.conv_sc(F.avg_pool2d(x0, 2)))
        h1 = F.avg_pool2d(later.conv2(F.relu(later.conv1(F.relu(x1)))), 2)
        torch.testing.assert_close(later(x1), h1 + F.avg_pool2d(later.conv_sc(x1), 2))
