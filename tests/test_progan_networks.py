"""ProGAN networks: the official parameter counts, progressive growing with fade-in, and the math of
each component on tiny nets."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures import progan as pg
from architectures.layers import EqualizedConv2d, EqualizedLinear
from architectures.registry import REGISTRY, count_params
from core.spec import ImageSpec

torch.set_num_threads(1)

TINY = dict(z_dim=16, fmap_base=128, fmap_max=32, mbstd_group_size=2)  # channels 32, 32, 16 at 4, 8, 16
TINY_RES = 16


def tiny(num_classes: int = 0, channels: int = 3, **overrides):
    torch.manual_seed(0)
    cfg = pg.ProGANConfig(**{**TINY, **overrides})
    spec = ImageSpec(TINY_RES, channels, num_classes)
    return pg.build_generator(cfg, spec).double(), pg.build_discriminator(cfg, spec).double()


# ----------------------------------------------------------------------------------------------
# Registry, config, parameter counts.


def test_registered_and_config_validates():
    arch = REGISTRY["progan"]
    assert arch.config is pg.ProGANConfig
    assert arch.build_generator is pg.build_generator and arch.build_discriminator is pg.build_discriminator
    cfg = pg.ProGANConfig()
    assert (cfg.z_dim, cfg.fmap_base, cfg.fmap_decay, cfg.fmap_max, cfg.mbstd_group_size) == (512, 8192, 1.0, 512, 4)
    assert cfg.use_pixelnorm and cfg.start_resolution == 4
    for bad in (
        dict(not_a_field=1),
        dict(start_resolution=12),
        dict(start_resolution=2),
        dict(fmap_base=0),
        dict(fmap_decay=-1.0),
        dict(mbstd_group_size=-1),
        dict(z_dim=0),
    ):
        with pytest.raises(pydantic.ValidationError):
            pg.ProGANConfig(**bad)
    with pytest.raises(ValueError):
        pg.build_generator(pg.ProGANConfig(start_resolution=32), ImageSpec(16, 3, 0))


def test_feature_maps_per_resolution():
    # official nf(stage) with resolution 2**r using nf(r - 1): 512 up to 64x64, then halving to 16 at 1024
    got = [pg.num_features(r - 1) for r in range(2, 11)]
    assert got == [512, 512, 512, 512, 256, 128, 64, 32, 16]
    assert pg.num_features(0) == 512 and pg.num_features(3, fmap_base=4096, fmap_max=128) == 128


# Trainable parameters per layer of the official 1024x1024 networks (networks.py defaults, 3 channels, no
# labels), under the official layer names. Both official networks hold a ToRGB / FromRGB for every level
# (G_paper's torgb and D_paper's fromrgb are called for res = 2..resolution_log2) and their printout,
# tfutil.Network.print_layers (called in train.py), sums every trainable variable.
#
# D: the official printout of StyleGAN v1's D_basic, which is D_paper layer for layer (NVlabs/stylegan
# training/networks_stylegan.py D_basic; the printout is reproduced in kynk94/torch-firewood
# firewood/models/gan/StyleGAN.py, lines 805-857, total 23,087,249).
OFFICIAL_D_1024 = {
    "FromRGB_lod0": 64,
    "1024x1024/Conv0": 2_320,
    "1024x1024/Conv1_down": 4_640,
    "FromRGB_lod1": 128,
    "512x512/Conv0": 9_248,
    "512x512/Conv1_down": 18_496,
    "FromRGB_lod2": 256,
    "256x256/Conv0": 36_928,
    "256x256/Conv1_down": 73_856,
    "FromRGB_lod3": 512,
    "128x128/Conv0": 147_584,
    "128x128/Conv1_down": 295_168,
    "FromRGB_lod4": 1_024,
    "64x64/Conv0": 590_080,
    "64x64/Conv1_down": 1_180_160,
    "FromRGB_lod5": 2_048,
    "32x32/Conv0": 2_359_808,
    "32x32/Conv1_down": 2_359_808,
    "FromRGB_lod6": 2_048,
    "16x16/Conv0": 2_359_808,
    "16x16/Conv1_down": 2_359_808,
    "FromRGB_lod7": 2_048,
    "8x8/Conv0": 2_359_808,
    "8x8/Conv1_down": 2_359_808,
    "FromRGB_lod8": 2_048,
    "4x4/Conv": 2_364_416,
    "4x4/Dense0": 4_194_816,
    "4x4/Dense1": 513,
}
# G: G_paper's variable shapes (tkarras/progressive_growing_of_gans networks.py, lines 179-203: the 4x4
# dense [512, 512*16] with one bias per feature map, 3x3 convs [3, 3, in, out] + bias, 1x1 ToRGB
# [1, 1, nf, 3] + bias), counted by hand. The ToRGB counts are also in the StyleGAN v1 G printout of the
# file above (lines 740-778): its synthesis network has the same ToRGB_lod8..lod0.
OFFICIAL_G_1024 = {
    "4x4/Dense": 512 * 8192 + 512,
    "4x4/Conv": 2_359_808,
    "8x8/Conv0_up": 2_359_808,
    "8x8/Conv1": 2_359_808,
    "16x16/Conv0_up": 2_359_808,
    "16x16/Conv1": 2_359_808,
    "32x32/Conv0_up": 2_359_808,
    "32x32/Conv1": 2_359_808,
    "64x64/Conv0_up": 9 * 512 * 256 + 256,
    "64x64/Conv1": 9 * 256 * 256 + 256,
    "128x128/Conv0_up": 9 * 256 * 128 + 128,
    "128x128/Conv1": 9 * 128 * 128 + 128,
    "256x256/Conv0_up": 9 * 128 * 64 + 64,
    "256x256/Conv1": 9 * 64 * 64 + 64,
    "512x512/Conv0_up": 9 * 64 * 32 + 32,
    "512x512/Conv1": 9 * 32 * 32 + 32,
    "1024x1024/Conv0_up": 9 * 32 * 16 + 16,
    "1024x1024/Conv1": 9 * 16 * 16 + 16,
    "ToRGB_lod8": 1_539,
    "ToRGB_lod7": 1_539,
    "ToRGB_lod6": 1_539,
    "ToRGB_lod5": 1_539,
    "ToRGB_lod4": 771,
    "ToRGB_lod3": 387,
    "ToRGB_lod2": 195,
    "ToRGB_lod1": 99,
    "ToRGB_lod0": 51,
}


def per_official_layer(net: pg.Generator | pg.Discriminator) -> dict[str, int]:
    """ganforge's trainable parameters grouped under the official layer names."""
    top = int(math.log2(net.img_resolution))
    lod = {res: top - int(math.log2(res)) for res in net.resolutions}
    out = {}
    if isinstance(net, pg.Generator):
        b4 = net.blocks["4"]
        out["4x4/Dense"] = count_params(b4.dense) + b4.bias.numel()
        out["4x4/Conv"] = count_params(b4.conv)
        for res in net.resolutions[1:]:
            out[f"{res}x{res}/Conv0_up"] = count_params(net.blocks[str(res)].conv0)
            out[f"{res}x{res}/Conv1"] = count_params(net.blocks[str(res)].conv1)
        for res in net.resolutions:
            out[f"ToRGB_lod{lod[res]}"] = count_params(net.to_rgb[str(res)])
    else:
        for res in net.resolutions:
            out[f"FromRGB_lod{lod[res]}"] = count_params(net.from_rgb[str(res)])
        for res in net.resolutions[1:]:
            out[f"{res}x{res}/Conv0"] = count_params(net.blocks[str(res)].conv0)
            out[f"{res}x{res}/Conv1_down"] = count_params(net.blocks[str(res)].conv1)
        ep = net.epilogue
        for name, module in [("Conv", ep.conv), ("Dense0", ep.dense0), ("Dense1", ep.dense1)]:
            out[f"4x4/{name}"] = count_params(module)
    assert sum(out.values()) == count_params(net)  # every parameter is under some official name
    return out


def test_official_parameter_counts_1024():
    """The 1024x1024 networks have the official layers and totals: G 23,079,115 and D 23,087,249 trainable
    parameters, every level's ToRGB / FromRGB included (sources: the tables above). The paper's table 2
    gives 23.1M (rounded)."""
    cfg = pg.ProGANConfig()
    spec = ImageSpec(1024, 3, 0)
    with torch.device("meta"):  # shapes only
        G, D = pg.build_generator(cfg, spec), pg.build_discriminator(cfg, spec)
    assert per_official_layer(G) == OFFICIAL_G_1024
    assert per_official_layer(D) == OFFICIAL_D_1024
    assert count_params(G) == sum(OFFICIAL_G_1024.values()) == 23_079_115  # official (all levels)
    assert count_params(D) == sum(OFFICIAL_D_1024.values()) == 23_087_249  # official printout's total
    # AC-GAN (official networks.py): the label joins the latent before the 4x4 dense (line 175: its input
    # grows by K) and D's Dense1 has 1 + K outputs (line 284)
    with torch.device("meta"):
        Gc, Dc = pg.build_generator(cfg, ImageSpec(1024, 3, 10)), pg.build_discriminator(cfg, ImageSpec(1024, 3, 10))
    assert count_params(Gc) == 23_079_115 + 10 * 512 * 16
    assert count_params(Dc) == 23_087_249 + 10 * 512 + 10


def test_final_level_only_counts_are_ganforges_own():
    """``count_params_final_level`` leaves out the ToRGB / FromRGB of 4..512: ganforge's own arithmetic
    (G 23,071,507 / D 23,077,137), not an official figure; the official networks keep those layers."""
    cfg = pg.ProGANConfig()
    with torch.device("meta"):
        G, D = pg.build_generator(cfg, ImageSpec(1024, 3, 0)), pg.build_discriminator(cfg, ImageSpec(1024, 3, 0))
    assert pg.count_params_final_level(G) == 23_079_115 - sum(OFFICIAL_G_1024[f"ToRGB_lod{i}"] for i in range(1, 9))
    assert pg.count_params_final_level(D) == 23_087_249 - sum(OFFICIAL_D_1024[f"FromRGB_lod{i}"] for i in range(1, 9))
    assert (pg.count_params_final_level(G), pg.count_params_final_level(D)) == (23_071_507, 23_077_137)
    extra, note = pg.param_notes(G, D)
    assert extra == {"g_params_final_level": 23_071_507, "d_params_final_level": 23_077_137}
    assert "23,071,507" in note and "not an official one" in note


# ----------------------------------------------------------------------------------------------
# Forward at every level, fade-in of G and D.


@pytest.mark.parametrize("num_classes", [0, 5])
def test_tiny_forward_at_each_resolution(num_classes):
    G, D = tiny(num_classes)
    z = torch.randn(4, 16, dtype=torch.float64)
    c = torch.tensor([0, 1, 2, 3]) if num_classes else None
    for res in (4, 8, 16):
        for alpha in (0.0, 0.5, 1.0):
            G.set_lod(res, alpha)
            D.set_lod(res, alpha)
            img = G(z, c)
            assert img.shape == (4, 3, res, res) and torch.isfinite(img).all()
            score = D(img, c)
            assert score.shape == (4,)
            score, logits = D(img, c, return_class_logits=True)
            assert logits.shape == (4, num_classes)
            (score.sum() + logits.sum()).backward()  # gradients flow at every level
    assert G.current_resolution == 16 and D.alpha == 1.0


def test_fresh_networks_are_at_full_resolution_and_lod_is_validated():
    G, D = tiny()
    assert (G.current_resolution, G.alpha) == (16, 1.0) and (D.current_resolution, D.alpha) == (16, 1.0)
    for bad in [(2, 1.0), (12, 1.0), (32, 1.0), (8, 1.5), (8, -0.1)]:
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
    lower = G(z)
    G.set_lod(res, 0.0)
    assert torch.allclose(G(z), pg.upscale2d(lower))  # alpha = 0: the upsampled lower-resolution path
    G.set_lod(res, 1.0)
    new = G(z)
    with torch.no_grad():  # alpha = 1: the new block alone; the previous ToRGB plays no part
        G.to_rgb[str(res // 2)].weight.add_(1.0)
    assert torch.equal(G(z), new)
    G.set_lod(res // 2, 1.0)
    lower = G(z)
    G.set_lod(res, 0.3)  # in between: the lerp of the two
    assert torch.allclose(G(z), 0.3 * new + 0.7 * pg.upscale2d(lower))


@pytest.mark.parametrize("res", [8, 16])
def test_discriminator_fade_in(res):
    _, D = tiny()
    img = torch.randn(4, 3, res, res, dtype=torch.float64)
    D.set_lod(res // 2, 1.0)
    lower = D(pg.downscale2d(img))
    D.set_lod(res, 0.0)
    assert torch.allclose(D(img), lower)  # alpha = 0: FromRGB_prev(downsample(img)) only
    D.set_lod(res, 1.0)
    new = D(img)
    with torch.no_grad():  # alpha = 1: the new block alone
        D.from_rgb[str(res // 2)].weight.add_(1.0)
    assert torch.equal(D(img), new)

    # In between: the features entering the next (lower-resolution) stage are the lerp
    # alpha * block(fromRGB(img)) + (1 - alpha) * fromRGB_prev(downsample(img)).
    nxt = D.blocks[str(res // 2)] if res // 2 > 4 else D.epilogue
    seen = []
    hook = nxt.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    for alpha in (1.0, 0.0, 0.3):
        D.set_lod(res, alpha)
        D(img)
    hook.remove()
    assert torch.allclose(seen[2], 0.3 * seen[0] + 0.7 * seen[1])
    assert torch.allclose(seen[1], D.from_rgb[str(res // 2)](pg.downscale2d(img)))


class _Const(nn.Module):
    def __init__(self, t: torch.Tensor):
        super().__init__()
        self.t = t

    def forward(self, _x):
        return self.t


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_real_blend_mirrors_fake_blend(alpha):
    """Let G's final ToRGB produce a tensor x and the previous ToRGB produce downscale2d(x): G's
    faded output must then equal ``blend_reals`` of x, for x given at the current and at full size."""
    G, _ = tiny()
    full = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    x = pg.downscale2d(full)  # 8x8
    G.to_rgb["8"], G.to_rgb["4"] = _Const(x), _Const(pg.downscale2d(x))
    G.set_lod(8, alpha)
    fake = G(torch.randn(2, 16, dtype=torch.float64))
    assert torch.allclose(pg.blend_reals(x, 8, alpha), fake)
    assert torch.allclose(pg.blend_reals(full, 8, alpha), fake)
    # endpoints, spelled out
    assert torch.allclose(pg.blend_reals(full, 8, 1.0), F.avg_pool2d(full, 2))
    assert torch.allclose(pg.blend_reals(full, 8, 0.0), F.interpolate(F.avg_pool2d(full, 4), scale_factor=2))
    assert pg.blend_reals(full, 16, 1.0) is full
    G.set_lod(4, 0.5)  # no fading at 4x4, for fakes and reals alike
    fake4 = G(torch.randn(2, 16, dtype=torch.float64))
    assert torch.allclose(pg.blend_reals(full, 4, 0.5), fake4)
    assert torch.allclose(fake4, F.avg_pool2d(full, 4))
    with pytest.raises(ValueError):
        pg.blend_reals(full, 32, 1.0)


def test_schedule_matches_official_training_schedule():
    # official TrainingSchedule: per phase 600 kimg stable, then 600 kimg fading in the next level
    assert pg.training_schedule(0, 1024) == (4, 1.0)
    assert pg.training_schedule(599, 1024) == (4, 1.0)
    assert pg.training_schedule(900, 1024) == (8, 0.5)
    assert pg.training_schedule(1200, 1024) == (8, 1.0)
    res, alpha = pg.training_schedule(1200 + 600 + 150, 1024)
    assert res == 16 and math.isclose(alpha, 0.25)
    assert pg.training_schedule(1e6, 1024) == (1024, 1.0)
    assert pg.training_schedule(0, 1024, start_resolution=32) == (32, 1.0)
    assert pg.level_from_lod(0.0, 1024) == (1024, 1.0) and pg.level_from_lod(8.0, 1024) == (4, 1.0)
    assert pg.level_from_lod(2.25, 256) == (64, 0.75)


# ----------------------------------------------------------------------------------------------
# Components.


def test_pixel_norm_unit_mean_square():
    x = torch.randn(3, 7, 5, 5, dtype=torch.float64) * 10 + 2
    y = pg.pixel_norm(x)
    assert torch.allclose(y.square().mean(dim=1), torch.ones(3, 5, 5, dtype=torch.float64))
    # every block of G ends with it (and the latent input is normalised too)
    G, _ = tiny()
    outs = {}
    for res, block in G.blocks.items():
        block.register_forward_hook(lambda m, a, out, res=res: outs.__setitem__(res, out))
    G(torch.randn(2, 16, dtype=torch.float64) * 5)
    for res, out in outs.items():
        assert torch.allclose(out.square().mean(dim=1), torch.ones_like(out[:, 0]), atol=1e-6), res
    G_nopn, _ = tiny(use_pixelnorm=False)
    out = G_nopn.blocks["4"](torch.randn(2, 16, dtype=torch.float64))
    assert not torch.allclose(out.square().mean(dim=1), torch.ones_like(out[:, 0]))


def test_equalized_layers_use_progan_gains():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    conv = EqualizedConv2d(5, 4, 3, activation="lrelu", he_gain=math.sqrt(2)).double()
    with torch.no_grad():
        conv.bias.normal_()
    ref = F.leaky_relu(F.conv2d(x, conv.weight * math.sqrt(2) / math.sqrt(5 * 9), conv.bias, padding=1), 0.2)
    assert torch.allclose(conv(x), ref)  # He gain before the bias, no gain after the activation
    # G's 4x4 dense layer: gain sqrt(2)/4, one bias per feature map
    G, _ = tiny()
    blk = G.blocks["4"]
    assert isinstance(blk.dense, EqualizedLinear) and blk.bias.shape == (32,)
    assert math.isclose(blk.dense.weight_gain, math.sqrt(2) / 4 / math.sqrt(16))
    assert G.to_rgb["16"].act_gain == 1.0 and math.isclose(G.to_rgb["16"].weight_gain, 1 / math.sqrt(16))


def test_discriminator_downsampling_conv_is_conv_then_avgpool():
    """Official fused ``conv2d_downscale2d``: 3x3 conv, 2x2 average pooling, then bias and lrelu."""
    torch.manual_seed(0)
    layer = EqualizedConv2d(4, 6, 3, activation="lrelu", down=2, resample_filter=(1, 1), he_gain=math.sqrt(2)).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    w = layer.weight * math.sqrt(2) / math.sqrt(4 * 9)
    ref = F.leaky_relu(F.avg_pool2d(F.conv2d(x, w, padding=1), 2) + layer.bias[None, :, None, None], 0.2)
    assert torch.allclose(layer(x), ref)


def test_generator_upsampling_equals_official_fused_transposed_conv():
    """Official fused ``upscale2d_conv2d`` (transposed conv, stride 2, with the 3x3 kernel summed over
    four shifts into 4x4) equals nearest upsampling followed by the 3x3 conv used here."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    wp = F.pad(w, [1, 1, 1, 1])
    w4 = wp[:, :, 1:, 1:] + wp[:, :, :-1, 1:] + wp[:, :, 1:, :-1] + wp[:, :, :-1, :-1]
    fused = F.conv_transpose2d(x, w4.flip([2, 3]).transpose(0, 1), stride=2, padding=1)
    assert torch.allclose(fused, F.conv2d(pg.upscale2d(x), w, padding=1))


def test_minibatch_stddev_in_discriminator():
    _, D = tiny()
    assert D.epilogue.conv.in_channels == 32 + 1
    _, D_off = tiny(mbstd_group_size=0)
    assert D_off.epilogue.conv.in_channels == 32
    # one feature map: per group of 4 (sample i in group i % (N/4)) the stddev over the group,
    # averaged over all channels and pixels
    seen = []
    D.epilogue.conv.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    D.set_lod(4, 1.0)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    D(x)
    feats = D.from_rgb["4"](x)
    y = seen[0][:, -1]
    assert torch.equal(seen[0][:, :-1], feats) and (y == y[:, :1, :1]).all()
    for m in range(4):  # group size min(2, N) = 2 for the tiny config: groups {m, m + 4}
        grp = feats[[m, m + 4]]
        want = grp.std(dim=0, unbiased=False).mean()
        assert torch.allclose(y[m, 0, 0], want, atol=1e-6) and torch.allclose(y[m + 4, 0, 0], want, atol=1e-6)


def test_conditional_generator_concatenates_label_and_discriminator_classifies():
    G, D = tiny(num_classes=3)
    assert G.blocks["4"].dense.in_features == 16 + 3
    assert D.epilogue.dense1.out_features == 1 + 3
    z = torch.randn(2, 16, dtype=torch.float64)
    a, b = G(z, torch.tensor([0, 0])), G(z, torch.tensor([1, 2]))
    assert not torch.allclose(a, b)
    onehot = F.one_hot(torch.tensor([1, 2]), 3).double()
    assert torch.allclose(G(z, onehot), b)
    with pytest.raises(ValueError):
        G(z, None)
