"""StyleGAN2 networks: the official parameter counts, and the math of each component on tiny nets."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
import torch.nn.functional as F

from architectures import layers as L
from architectures import stylegan2 as sg
from architectures.registry import REGISTRY, count_params
from core.spec import ImageSpec

torch.set_num_threads(1)

TINY = dict(z_dim=16, w_dim=16, channel_base=256, channel_max=32, num_fp16_res=2, mbstd_group_size=2)
TINY_RES = 16


def tiny(num_classes: int = 0, **overrides):
    cfg = sg.StyleGAN2Config(**{**TINY, **overrides})
    spec = ImageSpec(TINY_RES, 3, num_classes)
    return sg.build_generator(cfg, spec), sg.build_discriminator(cfg, spec)


# ----------------------------------------------------------------------------------------------
# Registry, config, parameter counts of the official presets.


def test_registered_and_config_validates():
    arch = REGISTRY["stylegan2"]
    assert arch.config is sg.StyleGAN2Config
    assert arch.build_generator is sg.build_generator and arch.build_discriminator is sg.build_discriminator
    cfg = sg.StyleGAN2Config()
    defaults = (cfg.channel_base, cfg.channel_max, cfg.mapping_layers, cfg.num_fp16_res, cfg.conv_clamp)
    assert defaults == (32768, 512, 8, 4, 256)
    with pytest.raises(pydantic.ValidationError):
        sg.StyleGAN2Config(not_a_field=1)
    with pytest.raises(pydantic.ValidationError):
        sg.StyleGAN2Config(d_architecture="dense")
    assert sg.preset("cifar").d_architecture == "orig" and sg.preset("paper256").channel_base == 16384


# Source of every count below: the official networks, NVlabs/stylegan2-ada-pytorch (commit d72cc7d0)
# training/networks.py Generator / Discriminator built with the kwargs train.py derives from cfg_specs
# (lines 154-160: fmaps -> channel_base = fmaps * 32768, map -> mapping layers, mbstd -> group size; lines
# 176-198: channel_max 512, num_fp16_res 4, conv_clamp 256, D architecture 'orig' for cifar, else 'resnet'),
# c_dim from the labels; counted by summing their trainable parameters (the totals misc.print_module_summary
# prints at the start of training).
OFFICIAL_COUNTS = [
    pytest.param("stylegan2", ImageSpec(1024, 3, 0), 30_370_060, 29_012_513, 18, id="official-cfg-stylegan2-1024"),
    pytest.param("paper256", ImageSpec(256, 3, 0), 24_767_458, 24_001_089, 14, id="official-cfg-paper256"),
    pytest.param("cifar", ImageSpec(32, 3, 10), 20_215_315, 23_089_664, 8, id="official-cfg-cifar-cond"),
    pytest.param("cifar", ImageSpec(32, 3, 0), 19_947_539, 20_720_641, 8, id="official-cfg-cifar-uncond"),
]


@pytest.mark.parametrize("preset, spec, g_params, d_params, num_ws", OFFICIAL_COUNTS)
def test_official_parameter_counts(preset, spec, g_params, d_params, num_ws):
    cfg = sg.preset(preset)
    with torch.device("meta"):  # shapes only: no memory, no random init
        G = sg.build_generator(cfg, spec)
        D = sg.build_discriminator(cfg, spec)
    assert count_params(G) == g_params
    assert count_params(D) == d_params
    assert G.num_ws == G.synthesis.num_ws == G.mapping.num_ws == num_ws


# ----------------------------------------------------------------------------------------------
# FIR filtering and resampling.


def naive_upfirdn(x, f, up, down, pad):
    """Definition of upfirdn2d with explicit loops (one channel, non-negative padding)."""
    h, w = x.shape
    u = torch.zeros(h * up, w * up, dtype=x.dtype)
    u[::up, ::up] = x
    px0, px1, py0, py1 = pad
    p = F.pad(u, [px0, px1, py0, py1])
    fh, fw = f.shape
    out = torch.zeros(p.shape[0] - fh + 1, p.shape[1] - fw + 1, dtype=x.dtype)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = sum(p[i + a, j + b] * f[fh - 1 - a, fw - 1 - b] for a in range(fh) for b in range(fw))
    return out[::down, ::down]


@pytest.mark.parametrize(
    "up, down, pad", [(1, 1, (1, 2, 0, 1)), (2, 1, (2, 1, 2, 1)), (1, 2, (1, 1, 1, 1)), (3, 2, (0, 2, 1, 0))]
)
def test_upfirdn2d_matches_definition(up, down, pad):
    torch.manual_seed(0)
    f = L.setup_filter([[1.0, 2.0, 0.5], [3.0, 4.0, 1.0]]).double()  # asymmetric: catches a flipped filter
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    y = L.upfirdn2d(x, f, up=up, down=down, padding=pad)
    for ch in range(2):
        torch.testing.assert_close(y[0, ch], naive_upfirdn(x[0, ch], f, up, down, pad))
    # Negative padding crops.
    full = L.upfirdn2d(x, f, padding=0)
    torch.testing.assert_close(L.upfirdn2d(x, f, padding=[-1, -2, -1, 0]), full[:, :, 1:, 1:-2])


def test_setup_filter():
    f = L.setup_filter([1, 3, 3, 1])
    assert f.shape == (4, 4) and f.dtype == torch.float32
    torch.testing.assert_close(f, torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64)


def test_fir_resampling_is_aligned():
    """A linear ramp is reproduced exactly away from the borders, at the right pixel centres."""
    f = L.setup_filter([1, 3, 3, 1]).double()
    ramp = torch.arange(12, dtype=torch.float64).expand(1, 1, 12, 12)
    up = L.upsample2d(ramp, f)
    assert up.shape == (1, 1, 24, 24)
    j = torch.arange(24, dtype=torch.float64)
    torch.testing.assert_close(up[0, 0, 3:-3, 2:-2], ((j - 0.5) / 2)[2:-2].expand(18, 20))
    down = L.downsample2d(ramp, f)
    assert down.shape == (1, 1, 6, 6)
    i = torch.arange(6, dtype=torch.float64)
    torch.testing.assert_close(down[0, 0, 1:-1, 1:-1], (2 * i + 0.5)[1:-1].expand(4, 4))


def test_fir_upsample_then_downsample_is_near_identity():
    f = L.setup_filter([1, 3, 3, 1])
    i = torch.arange(32, dtype=torch.float32)
    x = (torch.sin(2 * math.pi * i / 32)[:, None] * torch.cos(2 * math.pi * i / 32)[None, :]).expand(2, 3, 32, 32)
    y = L.downsample2d(L.upsample2d(x, f), f)
    assert y.shape == x.shape
    assert (y - x)[..., 4:-4, 4:-4].abs().max() < 0.03


def reference_conv2d_resample(x, w, f, up, down, padding, groups, flip_weight):
    """Upsample (zero insertion + FIR, gain up^2), conv, then FIR + subsample: the slow definition."""
    fh, fw = f.shape
    p = [padding] * 4
    if up > 1:
        p = [padding + (fw + up - 1) // 2, padding + (fw - up) // 2] * 2
    if down > 1:
        p = [padding + (fw - down + 1) // 2, padding + (fw - down) // 2] * 2
    x = L.upfirdn2d(x, f if up > 1 else None, up=up, padding=p, gain=up**2)
    x = F.conv2d(x, w if flip_weight else w.flip([2, 3]), groups=groups)
    return L.upfirdn2d(x, f, down=down) if down > 1 else x


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("up, down", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("flip_weight", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_resample_matches_reference(k, up, down, flip_weight, groups):
    torch.manual_seed(0)
    f = L.setup_filter([1, 3, 3, 1]).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, k, k, dtype=torch.float64)
    y = L.conv2d_resample(x, w, f, up=up, down=down, padding=k // 2, groups=groups, flip_weight=flip_weight)
    assert y.shape[-1] == 8 * up // down
    torch.testing.assert_close(y, reference_conv2d_resample(x, w, f, up, down, k // 2, groups, flip_weight))


# ----------------------------------------------------------------------------------------------
# Equalized-lr layers, bias_act, minibatch stddev.


def test_bias_act_gains_and_clamp():
    x = torch.tensor([[-2.0, 1.0]])
    b = torch.tensor([1.0, 0.5])
    torch.testing.assert_close(L.bias_act(x, b, "lrelu"), torch.tensor([[-0.2, 1.5]]) * math.sqrt(2))
    torch.testing.assert_close(L.bias_act(x, b, "relu", gain=1.0), torch.tensor([[0.0, 1.5]]))
    torch.testing.assert_close(L.bias_act(x * 100, None, "linear", clamp=3.0), torch.tensor([[-3.0, 3.0]]))


def test_equalized_linear_runtime_scaling():
    torch.manual_seed(0)
    fc = L.EqualizedLinear(8, 4, activation="lrelu", lr_multiplier=0.01, bias_init=0.3)
    x = torch.randn(5, 8)
    w_eff = fc.weight * 0.01 / math.sqrt(8)
    b_eff = fc.bias * 0.01
    torch.testing.assert_close(b_eff, torch.full([4], 0.003))  # stored bias_init, scaled at run time
    torch.testing.assert_close(fc(x), F.leaky_relu(x @ w_eff.t() + b_eff, 0.2) * math.sqrt(2))
    assert 50 < fc.weight.std() < 200  # stored as N(0, 1) / lr_multiplier


def test_equalized_conv2d_scaling_and_clamp():
    torch.manual_seed(0)
    conv = L.EqualizedConv2d(4, 5, 3, activation="lrelu", conv_clamp=2.0)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 4, 6, 6)
    pre = F.conv2d(x, conv.weight / math.sqrt(4 * 9), conv.bias, padding=1)
    torch.testing.assert_close(conv(x, gain=0.5), (F.leaky_relu(pre, 0.2) * math.sqrt(2) * 0.5).clamp(-1.0, 1.0))
    down = L.EqualizedConv2d(4, 5, 3, down=2)
    up = L.EqualizedConv2d(4, 5, 1, up=2, bias=False)
    assert down(x).shape == (2, 5, 3, 3) and up(x).shape == (2, 5, 12, 12)


def test_minibatch_stddev_matches_hand_computation():
    torch.manual_seed(0)
    n, c, h, w, group, nf = 8, 4, 2, 3, 4, 2
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    y = L.minibatch_stddev(x, group, nf)
    assert y.shape == (n, c + nf, h, w)
    torch.testing.assert_close(y[:, :c], x)
    groups = n // group  # sample i is in group i % groups (the official reshape)
    for i in range(n):
        members = [j for j in range(n) if j % groups == i % groups]
        assert len(members) == group
        for f in range(nf):
            chans = range(f * c // nf, (f + 1) * c // nf)
            stds = []
            for ch in chans:
                for p in range(h):
                    for q in range(w):
                        vals = [x[m, ch, p, q].item() for m in members]
                        mean = sum(vals) / group
                        stds.append(math.sqrt(sum((v - mean) ** 2 for v in vals) / group + 1e-8))
            expected = sum(stds) / len(stds)
            torch.testing.assert_close(y[i, c + f], torch.full((h, w), expected, dtype=torch.float64))
    with pytest.raises(ValueError):
        L.minibatch_stddev(x[:6], 4, 1)
    assert L.minibatch_stddev(x[:2], 4, 1).shape == (2, c + 1, h, w)  # group = min(group_size, N)


# ----------------------------------------------------------------------------------------------
# Modulated convolution.


def test_demodulated_filters_have_unit_norm():
    torch.manual_seed(0)
    weight = torch.randn(6, 5, 3, 3)
    styles = torch.randn(4, 5) * 3 + 1
    w = sg.modulate_weights(weight, styles, demodulate=True)
    assert w.shape == (4, 6, 5, 3, 3)
    torch.testing.assert_close(w.square().sum(dim=[2, 3, 4]).sqrt(), torch.ones(4, 6))
    torch.testing.assert_close(
        sg.modulate_weights(weight, styles, demodulate=False)[2, :, 1], weight[:, 1] * styles[2, 1]
    )


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv2d_fused_unfused_and_per_sample_agree(up, demodulate):
    torch.manual_seed(0)
    f = L.setup_filter([1, 3, 3, 1]).double()
    x = torch.randn(3, 5, 6, 6, dtype=torch.float64)
    weight = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    styles = torch.randn(3, 5, dtype=torch.float64)
    noise = torch.randn(3, 1, 6 * up, 6 * up, dtype=torch.float64)
    kw = dict(noise=noise, up=up, padding=1, resample_filter=f, demodulate=demodulate, flip_weight=(up == 1))
    fused = sg.modulated_conv2d(x, weight, styles, fused_modconv=True, **kw)
    unfused = sg.modulated_conv2d(x, weight, styles, fused_modconv=False, **kw)
    torch.testing.assert_close(fused, unfused)
    w = sg.modulate_weights(weight, styles, demodulate)
    for i in range(3):
        ref = L.conv2d_resample(x[i : i + 1], w[i], f, up=up, padding=1, flip_weight=(up == 1)) + noise[i]
        torch.testing.assert_close(fused[i : i + 1], ref)


def test_demodulation_keeps_unit_variance():
    """Eq. 2: with unit-variance i.i.d. inputs the demodulated conv output has unit variance."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 16, 16)
    y = sg.modulated_conv2d(x, torch.randn(32, 64, 3, 3), torch.randn(2, 64) * 5, padding=1)
    assert abs(y[:, :, 1:-1, 1:-1].std().item() - 1) < 0.1


# ----------------------------------------------------------------------------------------------
# Mapping network, truncation, style mixing.


def test_mapping_normalizes_z_and_embeds_labels():
    torch.manual_seed(0)
    G, _ = tiny(num_classes=3)
    z = torch.randn(4, 16)
    c = torch.tensor([0, 2, 1, 2])
    ws = G.mapping(z, c)
    assert ws.shape == (4, G.num_ws, G.w_dim) and torch.equal(ws[:, 0], ws[:, -1])
    torch.testing.assert_close(G.mapping(z * 7.0, c), ws)  # z is normalised to unit 2nd moment
    torch.testing.assert_close(G.mapping(z, F.one_hot(c, 3).float()), ws)
    assert not torch.allclose(G.mapping(z, (c + 1) % 3), ws)
    with pytest.raises(ValueError):
        G.mapping(z, None)


def test_truncation():
    torch.manual_seed(0)
    G, _ = tiny()
    G.mapping.w_avg.normal_()
    z = torch.randn(3, 16)
    w_avg = G.mapping.w_avg
    torch.testing.assert_close(G.mapping(z, truncation_psi=0), w_avg.expand(3, G.num_ws, G.w_dim))
    ws = G.mapping(z)
    half = G.mapping(z, truncation_psi=0.5, truncation_cutoff=2)
    torch.testing.assert_close(half[:, :2], w_avg + 0.5 * (ws[:, :2] - w_avg))
    torch.testing.assert_close(half[:, 2:], ws[:, 2:])


def test_w_avg_tracking():
    torch.manual_seed(0)
    G, _ = tiny()
    z = torch.randn(6, 16)
    G.mapping(z)
    assert torch.count_nonzero(G.mapping.w_avg) == 0  # update_emas=False: untouched
    before = torch.randn(G.w_dim)
    G.mapping.w_avg.copy_(before)
    w = G.mapping(z, update_emas=True)[:, 0]
    torch.testing.assert_close(G.mapping.w_avg, 0.995 * before + 0.005 * w.mean(dim=0))


def test_style_mixing():
    torch.manual_seed(0)
    G, _ = tiny()
    z = torch.randn(4, 16)
    torch.testing.assert_close(G.mapping_with_style_mixing(z, mixing_prob=0.0), G.mapping(z))
    base = G.mapping(z)
    for _ in range(5):
        ws = G.mapping_with_style_mixing(z, mixing_prob=1.0)
        same = [torch.allclose(ws[:, k], base[:, k]) for k in range(G.num_ws)]
        cutoff = same.index(False)
        assert cutoff >= 1 and all(same[:cutoff]) and not any(same[cutoff:])
        assert torch.allclose(ws[:, cutoff:], ws[:, cutoff : cutoff + 1].expand_as(ws[:, cutoff:]))


# ----------------------------------------------------------------------------------------------
# Whole networks (tiny).


@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("d_arch", ["resnet", "skip", "orig"])
def test_tiny_forward_fp32(num_classes, d_arch):
    torch.manual_seed(0)
    G, D = tiny(num_classes, d_architecture=d_arch, g_architecture="resnet" if d_arch == "orig" else "skip")
    z = torch.randn(4, 16)
    c = torch.randint(0, 3, (4,)) if num_classes else None
    img = G(z, c)
    assert img.shape == (4, 3, TINY_RES, TINY_RES) and img.dtype == torch.float32
    logits = D(img, c)
    assert logits.shape == (4,) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    if num_classes:
        assert not torch.allclose(D(img, (c + 1) % 3), logits)  # projection on the label embedding


@pytest.mark.parametrize("num_classes", [0, 3])
def test_tiny_forward_bfloat16_blocks(num_classes):
    torch.manual_seed(0)
    G, D = tiny(num_classes)
    z = torch.randn(4, 16)
    c = torch.randint(0, 3, (4,)) if num_classes else None
    img32 = G(z, c, noise_mode="const")
    logits32 = D(img32, c)

    seen = {}
    hooks = [
        b.register_forward_hook(lambda m, i, o, r=b.resolution: seen.__setitem__(("G", r), o[0].dtype))
        for b in G.synthesis.blocks
    ]
    hooks += [
        b.register_forward_hook(lambda m, i, o, r=b.resolution: seen.__setitem__(("D", r), o[0].dtype))
        for b in D.blocks
    ]
    G.reduced_dtype = D.reduced_dtype = torch.bfloat16
    assert G.synthesis.reduced_dtype is torch.bfloat16
    img16 = G(z, c, noise_mode="const")
    logits16 = D(img32, c)
    for h in hooks:
        h.remove()
    # num_fp16_res=2 at 16 px: the 16 and 8 px blocks are reduced, 4 px never.
    assert seen == {
        ("G", 4): torch.float32,
        ("G", 8): torch.bfloat16,
        ("G", 16): torch.bfloat16,
        ("D", 16): torch.bfloat16,
        ("D", 8): torch.bfloat16,
    }
    assert img16.dtype == torch.float32 and logits16.dtype == torch.float32
    assert (img16 - img32).abs().max() < 0.05 * img32.abs().max()
    assert (logits16 - logits32).abs().max() < 0.05 * logits32.abs().max() + 1e-2


def test_noise_modes():
    torch.manual_seed(0)
    G, _ = tiny()
    for layer in G.synthesis.modules():
        if isinstance(layer, sg.SynthesisLayer):
            layer.noise_strength.data.fill_(0.5)
    ws = G.mapping(torch.randn(2, 16))
    const = G.synthesis(ws, noise_mode="const")
    torch.testing.assert_close(G.synthesis(ws, noise_mode="const"), const, rtol=0, atol=0)
    assert not torch.allclose(G.synthesis(ws, noise_mode="random"), G.synthesis(ws, noise_mode="random"))
    assert not torch.allclose(G.synthesis(ws, noise_mode="none"), const)
    with torch.no_grad():
        for layer in G.synthesis.modules():
            if isinstance(layer, sg.SynthesisLayer):
                layer.noise_strength.zero_()
    torch.testing.assert_close(G.synthesis(ws, noise_mode="none"), G.synthesis(ws, noise_mode="random"))


def test_fused_and_unfused_synthesis_agree():
    torch.manual_seed(0)
    G, _ = tiny(g_architecture="resnet")
    ws = G.mapping(torch.randn(3, 16))
    fused = G.synthesis(ws, noise_mode="const", fused_modconv=True)
    torch.testing.assert_close(G.synthesis(ws, noise_mode="const", fused_modconv=False), fused, rtol=1e-4, atol=1e-5)


def test_path_length_and_r1_double_backward():
    torch.manual_seed(0)
    G, D = tiny()
    z = torch.randn(2, 16)
    ws = G.mapping_with_style_mixing(z, mixing_prob=1.0)
    img = G.synthesis(ws)
    pl_noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
    (grad,) = torch.autograd.grad((img * pl_noise).sum(), ws, create_graph=True)
    pl_lengths = grad.square().sum(2).mean(1).sqrt()
    pl_lengths.mean().backward()
    assert G.synthesis.blocks[-1].conv1.weight.grad.abs().sum() > 0

    real = img.detach().requires_grad_(True)
    (r1,) = torch.autograd.grad(D(real).sum(), real, create_graph=True)
    r1.square().sum().backward()
    assert D.b4.out.weight.grad.abs().sum() > 0
