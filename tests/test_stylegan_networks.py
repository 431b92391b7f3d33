"""StyleGAN (v1) networks: the official parameter counts, the mapping network and truncation, AdaIN and the
noise inputs by hand, style mixing, and progressive growing with fade-in as ProGAN's."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
import torch.nn.functional as F

from architectures import progan as pg
from architectures import stylegan as sg
from architectures.registry import REGISTRY, count_params
from core.spec import ImageSpec

torch.set_num_threads(1)

TINY = dict(z_dim=16, w_dim=16, mapping_layers=2, fmap_base=128, fmap_max=32, mbstd_group_size=2, start_resolution=4)
TINY_RES = 16  # channels 32, 32, 16 at 4, 8, 16; 6 ws


def tiny(num_classes: int = 0, channels: int = 3, **overrides):
    torch.manual_seed(0)
    cfg = sg.StyleGANConfig(**{**TINY, **overrides})
    spec = ImageSpec(TINY_RES, channels, num_classes)
    G = sg.build_generator(cfg, spec).double()
    G.mapping.float()  # the mapping network computes in float32 (as StyleGAN2's); the rest in float64
    return G, sg.build_discriminator(cfg, spec).double()


def depthwise_blur(x: torch.Tensor) -> torch.Tensor:
    """The official ``blur2d`` by hand: a depthwise 3x3 ``[1, 2, 1]^T [1, 2, 1] / 16`` conv, zero "SAME" padding."""
    f = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype)
    f = torch.outer(f, f) / 16
    return F.conv2d(x, f[None, None].repeat(x.shape[1], 1, 1, 1), padding=1, groups=x.shape[1])


# ----------------------------------------------------------------------------------------------
# Registry, config, parameter counts.


def test_registered_with_its_capabilities_and_config_validates():
    arch = REGISTRY["stylegan"]
    assert arch.config is sg.StyleGANConfig and arch.param_notes is sg.param_notes
    caps = arch.capabilities
    assert caps.mapping and caps.growth and caps.noise_inputs and caps.truncation == "psi"
    assert not caps.compiles and not caps.class_logits and not caps.d_blocks
    cfg = sg.StyleGANConfig()
    assert (cfg.z_dim, cfg.w_dim, cfg.mapping_layers, cfg.mapping_lr_multiplier, cfg.w_avg_beta) == (
        512, 512, 8, 0.01, 0.995,
    )  # fmt: skip
    assert (cfg.truncation_cutoff, cfg.fmap_base, cfg.fmap_max, cfg.mbstd_group_size, cfg.start_resolution) == (
        8, 8192, 512, 4, 8,
    )  # fmt: skip
    for bad in (dict(start_resolution=12), dict(truncation_cutoff=0), dict(mapping_lr_multiplier=0), dict(x=1)):
        with pytest.raises(pydantic.ValidationError):
            sg.StyleGANConfig(**bad)
    with pytest.raises(ValueError, match="start_resolution"):
        sg.build_generator(sg.StyleGANConfig(start_resolution=32), ImageSpec(16, 3, 0))


def test_official_parameter_counts_1024():
    """The official FFHQ 1024x1024 networks (NVlabs/stylegan, ``training/networks_stylegan.py`` defaults as
    used by ``train.py``; the ``print_layers`` totals of the training log and of the released
    ``karras2019stylegan-ffhq-1024x1024.pkl``): G_style 26,219,627 of which G_mapping 2,101,248
    (8 x (512 x 512 + 512)), D_basic 23,087,249, every level's ToRGB/FromRGB counted. D_basic is ProGAN's
    D_paper plus blurs, which hold no parameters: the same count as :mod:`architectures.progan`'s D."""
    spec = ImageSpec(1024, 3, 0)
    with torch.device("meta"):
        G = sg.build_generator(sg.StyleGANConfig(), spec)
        D = sg.build_discriminator(sg.StyleGANConfig(), spec)
        D_progan = pg.build_discriminator(pg.ProGANConfig(), spec)
    assert count_params(G.mapping) == 2_101_248 == 8 * (512 * 512 + 512)
    assert count_params(G) == 26_219_627
    assert count_params(D) == count_params(D_progan) == 23_087_249
    assert G.num_ws == 18 and G.synthesis.num_ws == 18
    # per layer of C maps: noise strength C + bias C + style affine 512 x 2C + 2C; 18 layers in all
    maps = [512] * 8 + [256, 256, 128, 128, 64, 64, 32, 32, 16, 16]  # nf per layer, 4x4 ... 1024x1024
    epilogues = sum(1028 * c for c in maps)
    convs = 9 * sum(cin * cout for cin, cout in zip(maps[:-1], maps[1:]))  # a 3x3 conv before every layer but the const
    to_rgb = sum(3 * c + 3 for c in maps[1::2])  # per level: 1x1 to 3 channels + 3 biases
    assert count_params(G.synthesis) == 512 * 16 + epilogues + convs + to_rgb == 24_118_379


def test_param_notes_give_mapping_and_final_level_figures():
    spec = ImageSpec(1024, 3, 0)
    with torch.device("meta"):
        G, D = sg.build_generator(sg.StyleGANConfig(), spec), sg.build_discriminator(sg.StyleGANConfig(), spec)
    extra, text = sg.param_notes(G, D)
    # ganforge's own arithmetic: minus the ToRGB (3c + 3 each) / FromRGB (4c each) of the 8 lower levels
    assert extra == {
        "g_mapping_params": 2_101_248,
        "g_params_final_level": 26_212_019,
        "d_params_final_level": 23_077_137,
    }
    assert "2,101,248" in text and "not an official one" in text


# ----------------------------------------------------------------------------------------------
# Mapping network, w_avg, truncation.


def test_mapping_is_the_official_g_mapping():
    """He gain sqrt(2) inside the weights (``dense(gain=sqrt(2), lrmul=0.01)``), bias x lrmul, lrelu(0.2) without a
    gain after it, on the 2nd-moment-normalised z."""
    G, _ = tiny()
    layer = G.mapping.layers[0]
    assert math.isclose(layer.weight_gain, math.sqrt(2) * 0.01 / math.sqrt(16)) and layer.bias_gain == 0.01
    with torch.no_grad():
        layer.bias.normal_()
    z = torch.randn(5, 16)
    x = z / z.square().mean(1, keepdim=True).add(1e-8).sqrt()
    h = F.leaky_relu(x @ (layer.weight * layer.weight_gain).t() + layer.bias * 0.01, 0.2)
    assert torch.allclose(layer(x), h, atol=1e-6)
    assert torch.allclose(G.mapping(z)[:, 0], G.mapping(3 * z)[:, 0], atol=1e-5)  # z is normalised first (float32)
    assert G.mapping(z).shape == (5, 6, 16)


def test_truncation_psi_one_is_identity_and_zero_gives_w_avg_on_the_cutoff_layers_only():
    G, _ = tiny(truncation_cutoff=4)
    with torch.no_grad():
        G.mapping.w_avg.normal_()
    z = torch.randn(3, 16, dtype=torch.float64)
    ws = G.mapping(z)
    assert torch.equal(G.mapping(z, truncation_psi=1), ws)
    t = G.mapping(z, truncation_psi=0)  # the configured cutoff: the first 4 ws become w_avg, the rest stay
    assert torch.allclose(t[:, :4], G.mapping.w_avg.expand(3, 4, 16).to(t)) and torch.equal(t[:, 4:], ws[:, 4:])
    half = G.mapping(z, truncation_psi=0.7)
    assert torch.allclose(half[:, :4], G.mapping.w_avg + 0.7 * (ws[:, :4] - G.mapping.w_avg))
    two = G.mapping(z, truncation_psi=0, truncation_cutoff=2)  # an explicit cutoff wins
    assert torch.allclose(two[:, :2], G.mapping.w_avg.expand(3, 2, 16).to(t)) and torch.equal(two[:, 2:], ws[:, 2:])
    G_all, _ = tiny(truncation_cutoff=None)  # config None: every layer
    with torch.no_grad():
        G_all.mapping.w_avg.normal_()
    assert torch.allclose(G_all.mapping(z, truncation_psi=0), G_all.mapping.w_avg.expand(3, 6, 16).to(t))
    assert sg.Generator().truncation_cutoff == 8  # the official Gs default


def test_w_avg_tracks_the_mean_w_during_growth_and_style_mixing():
    G, _ = tiny()
    G.set_lod(8, 0.5)
    z = torch.randn(4, 16, dtype=torch.float64)
    before = G.mapping.w_avg.clone()
    w = G.mapping(z)[:, 0]
    G(z, style_mixing_prob=0.9, update_emas=True)  # the training call of the recipe
    assert torch.allclose(G.mapping.w_avg, w.mean(0).lerp(before, 0.995))
    after = G.mapping.w_avg.clone()
    G(z, style_mixing_prob=0.9)  # without update_emas: unchanged
    assert torch.equal(G.mapping.w_avg, after)


# ----------------------------------------------------------------------------------------------
# Synthesis layers.


def test_adain_epilogue_matches_a_hand_computation():
    """noise -> bias -> lrelu -> instance norm -> x * (y_s + 1) + y_b with (y_s, y_b) = A(w), A dense with gain 1."""
    torch.manual_seed(1)
    ep = sg.LayerEpilogue(channels=3, w_dim=5, resolution=4).double()
    with torch.no_grad():
        ep.bias.normal_()
        ep.style.affine.bias.normal_()
        ep.noise.strength.normal_()
    x, w = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    A = ep.style.affine
    style = w @ (A.weight / math.sqrt(5)).t() + A.bias  # [2, 6]: scales for the 3 maps, then biases
    y = x + ep.noise.noise_const * ep.noise.strength.view(1, 3, 1, 1)
    y = F.leaky_relu(y + ep.bias.view(1, 3, 1, 1), 0.2)
    mu = y.mean(dim=(2, 3), keepdim=True)
    sigma = ((y - mu) ** 2).mean(dim=(2, 3), keepdim=True).add(1e-8).sqrt()
    want = (style[:, :3, None, None] + 1) * (y - mu) / sigma + style[:, 3:, None, None]
    assert torch.allclose(ep(x, w, noise_mode="const"), want)
    # a fresh style layer is the identity style: unit scale (the "+ 1"), zero bias
    fresh = sg.StyleMod(5, 3).double()
    assert torch.allclose(fresh(x, torch.zeros(2, 5, dtype=torch.float64)), x)


def test_noise_inputs_are_per_channel_and_const_mode_is_deterministic():
    G, _ = tiny()
    z = torch.randn(2, 16, dtype=torch.float64)
    ws = G.mapping(z)
    noise = G.synthesis.blocks["8"].epilogue0.noise
    assert noise.strength.shape == (32,) and noise.noise_const.shape == (1, 1, 8, 8)
    assert "synthesis.blocks.8.epilogue0.noise.noise_const" in dict(G.named_buffers())  # fixed, not trained
    # zero-initialised strengths: noise changes nothing until trained
    assert torch.equal(G.synthesis(ws, noise_mode="random"), G.synthesis(ws, noise_mode="none"))
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, sg.NoiseInput):
                m.strength.normal_()
    assert torch.equal(G(z, noise_mode="const"), G(z, noise_mode="const"))
    assert not torch.allclose(G(z, noise_mode="random"), G(z, noise_mode="random"))
    assert not torch.allclose(G(z, noise_mode="const"), G(z, noise_mode="none"))
    x = torch.zeros(2, 32, 8, 8, dtype=torch.float64)
    assert torch.allclose(noise(x, "const"), noise.noise_const * noise.strength.view(1, 32, 1, 1))
    with pytest.raises(ValueError, match="noise_mode"):
        noise(x, "sometimes")


def test_const_input_starts_at_ones_and_upsampling_is_nearest_conv_then_blur():
    G, _ = tiny()
    assert torch.equal(G.synthesis.blocks["4"].const, torch.ones(32, 4, 4, dtype=torch.float64))
    block = G.synthesis.blocks["8"]
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    conv = block.conv0
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    want = depthwise_blur(F.conv2d(up, conv.weight * math.sqrt(2) / math.sqrt(32 * 9), padding=1))
    seen = []
    hook = block.epilogue0.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    block(x, torch.zeros(2, 2, 16, dtype=torch.float64), noise_mode="none")
    hook.remove()
    assert torch.allclose(seen[0], want)


def test_upsampling_conv_equals_the_official_fused_one_used_from_64x64():
    """From 64x64 on the official G fuses upsampling and conv (``fused_scale='auto'``: a stride-2 transposed conv
    with the 3x3 kernel summed over four shifts into 4x4, same fan-in, same variables); here it stays nearest
    upsampling + 3x3 conv, the same function with the same parameters, followed by the blur."""
    torch.manual_seed(0)
    block = sg.SynthesisBlock(8, 4, w_dim=5, resolution=64).double()
    x = torch.randn(2, 8, 32, 32, dtype=torch.float64)
    w = block.conv0.weight * math.sqrt(2) / math.sqrt(8 * 9)
    wp = F.pad(w, [1, 1, 1, 1])
    w4 = wp[:, :, 1:, 1:] + wp[:, :, :-1, 1:] + wp[:, :, 1:, :-1] + wp[:, :, :-1, :-1]
    fused = F.conv_transpose2d(x, w4.flip([2, 3]).transpose(0, 1), stride=2, padding=1)
    seen = []
    hook = block.epilogue0.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    block(x, torch.zeros(2, 2, 5, dtype=torch.float64), noise_mode="none")
    hook.remove()
    assert torch.allclose(seen[0], depthwise_blur(fused))
    assert count_params(block.conv0) == 8 * 4 * 9  # no bias: the epilogue adds it


def test_discriminator_blurs_before_the_downscaling_conv_and_progans_does_not():
    _, D = tiny()
    block = D.blocks["16"]
    x = torch.randn(2, 16, 16, 16, dtype=torch.float64)
    assert torch.allclose(block(x), block.conv1(depthwise_blur(block.conv0(x))))
    plain = pg.DBlock(16, 32).double()
    assert plain.blur_filter is None and "blur_filter" not in plain.state_dict()  # ProGAN checkpoints unchanged
    plain.load_state_dict(block.state_dict(), strict=False)
    assert not torch.allclose(plain(x), block(x))


# ----------------------------------------------------------------------------------------------
# Style mixing.


def test_layers_in_use_follow_the_official_cur_layers():
    """``cur_layers = num_layers - 2 * int(lod)``, lod = log2(16 / resolution) + 1 - alpha while fading."""
    G, _ = tiny()
    for (res, alpha), layers in {
        (4, 1.0): 2,
        (8, 0.0): 2,
        (8, 0.5): 4,
        (8, 1.0): 4,
        (16, 0.25): 6,
        (16, 1.0): 6,
    }.items():
        G.set_lod(res, alpha)
        assert G.layers_in_use == layers, (res, alpha)


def test_style_mixing_swaps_the_ws_after_one_crossover_among_the_layers_in_use():
    G, _ = tiny()
    z = torch.randn(3, 16, dtype=torch.float64)
    ws = G.mapping(z)
    for res, in_use in ((8, 4), (16, 6)):
        G.set_lod(res, 1.0)
        crossovers = set()
        for seed in range(40):
            torch.manual_seed(seed)
            mixed = G.mapping_with_style_mixing(z, mixing_prob=1.0)
            k = int((mixed != ws).any(dim=2).any(dim=0).float().argmax())
            assert torch.equal(mixed[:, :k], ws[:, :k])  # before the crossover: z's ws
            assert (mixed[:, k:] != ws[:, k:]).all()  # from it on: the second latent's, for every layer
            assert torch.equal(mixed[:, k:], mixed[:, k : k + 1].expand_as(mixed[:, k:]))
            crossovers.add(k)
        assert crossovers == set(range(1, in_use))  # never in layers the level does not use
    torch.manual_seed(0)
    assert torch.equal(G.mapping_with_style_mixing(z, mixing_prob=0.0), ws)


def test_a_style_changes_only_the_layers_from_its_own_on():
    """Changing the ws from layer k on leaves every activation before layer k alone (the synthesis reads
    w_i only at layer i), so style mixing affects the image only from the crossover's resolution."""
    G, _ = tiny()
    z = torch.randn(2, 16, dtype=torch.float64)
    ws = G.mapping(z)
    other = ws.clone()
    other[:, 3:] = G.mapping(torch.randn(2, 16, dtype=torch.float64))[:, 3:]
    feats = {}

    def keep(name):
        return lambda m, args, out: feats.setdefault(name, []).append(out)

    hooks = [G.synthesis.blocks["4"].register_forward_hook(keep("4")),
             G.synthesis.blocks["8"].epilogue0.register_forward_hook(keep("8.0")),
             G.synthesis.blocks["8"].epilogue1.register_forward_hook(keep("8.1"))]  # fmt: skip
    a, b = G.synthesis(ws, noise_mode="const"), G.synthesis(other, noise_mode="const")
    for h in hooks:
        h.remove()
    assert torch.equal(feats["4"][0], feats["4"][1]) and torch.equal(feats["8.0"][0], feats["8.0"][1])
    assert not torch.allclose(feats["8.1"][0], feats["8.1"][1]) and not torch.allclose(a, b)
    G.set_lod(8, 1.0)  # 8x8 uses layers 0-3 only: w_4, w_5 play no part
    other[:, :4] = ws[:, :4]
    assert torch.equal(G.synthesis(ws, noise_mode="const"), G.synthesis(other, noise_mode="const"))


# ----------------------------------------------------------------------------------------------
# Progressive growing (the contract of architectures.progan).


def test_fresh_networks_are_at_full_resolution_and_set_lod_moves_the_synthesis_too():
    G, D = tiny()
    assert (G.current_resolution, G.alpha, G.synthesis.current_resolution) == (16, 1.0, 16)
    assert G.start_resolution == D.start_resolution == 4
    G.set_lod(8, 0.25)
    assert (G.synthesis.current_resolution, G.synthesis.alpha) == (8, 0.25)
    assert G(torch.randn(2, 16, dtype=torch.float64)).shape == (2, 3, 8, 8)
    for bad in [(2, 1.0), (12, 1.0), (32, 1.0), (8, 1.5)]:
        with pytest.raises(ValueError):
            G.set_lod(*bad)
    D.set_lod(8, 1.0)
    with pytest.raises(ValueError, match="8x8"):
        D(torch.zeros(2, 3, 16, 16, dtype=torch.float64))


@pytest.mark.parametrize("res", [8, 16])
def test_generator_fade_in(res):
    G, _ = tiny()
    z = torch.randn(3, 16, dtype=torch.float64)
    G.set_lod(res // 2, 1.0)
    lower = G(z, noise_mode="const")
    G.set_lod(res, 0.0)
    assert torch.allclose(G(z, noise_mode="const"), pg.upscale2d(lower))  # alpha = 0: the upsampled lower level
    G.set_lod(res, 1.0)
    new = G(z, noise_mode="const")
    with torch.no_grad():  # alpha = 1: the new block alone; the previous ToRGB plays no part
        G.synthesis.to_rgb[str(res // 2)].weight.add_(1.0)
    assert torch.equal(G(z, noise_mode="const"), new)
    G.set_lod(res // 2, 1.0)
    lower = G(z, noise_mode="const")
    G.set_lod(res, 0.3)
    assert torch.allclose(G(z, noise_mode="const"), 0.3 * new + 0.7 * pg.upscale2d(lower))


@pytest.mark.parametrize("res", [8, 16])
def test_discriminator_fade_in(res):
    _, D = tiny()
    img = torch.randn(4, 3, res, res, dtype=torch.float64)
    D.set_lod(res // 2, 1.0)
    lower = D(pg.downscale2d(img))
    D.set_lod(res, 0.0)
    assert torch.allclose(D(img), lower)
    D.set_lod(res, 1.0)
    new = D(img)
    with torch.no_grad():
        D.from_rgb[str(res // 2)].weight.add_(1.0)
    assert torch.equal(D(img), new)


# ----------------------------------------------------------------------------------------------
# Labels (official LabelConcat / LabelSwitch).


def test_labels_are_concatenated_to_z_and_d_switches_to_the_labels_output():
    G, D = tiny(num_classes=3)
    assert G.mapping.label_embed.shape == (3, 16) and G.mapping.layers[0].in_features == 32
    z, c = torch.randn(4, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    x = torch.cat([z, G.mapping.label_embed[c]], dim=1)
    assert torch.allclose(G.mapping(z, c), sg.MappingNetwork.forward(G.mapping, x))
    img = G(z, c)
    out = D.outputs(img)
    assert out.shape == (4, 3) and torch.allclose(D(img, c), out[torch.arange(4), c])
    with pytest.raises(ValueError, match="labels"):
        G(z)
    spec = ImageSpec(1024, 3, 10)
    with torch.device("meta"):  # the label embedding, the wider first mapping layer, one D output per class
        G10, D10 = sg.build_generator(sg.StyleGANConfig(), spec), sg.build_discriminator(sg.StyleGANConfig(), spec)
    assert count_params(G10) == 26_219_627 + 10 * 512 + 512 * 512
    assert count_params(D10) == 23_087_249 + 9 * 513
