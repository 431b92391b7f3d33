"""Pix2Pix, CycleGAN and SRGAN networks: the authors' parameter counts, shapes and ranges, the U-Net's skips, the
CycleGAN call contract, the PatchGAN's 70 px receptive field, and the VGG19 content-loss loader."""

from __future__ import annotations

import pydantic
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from architectures import cyclegan as cg
from architectures import pix2pix as p2p
from architectures import srgan as sr
from architectures import vgg
from architectures.patchgan import PatchDiscriminator, patch_receptive_field
from architectures.registry import REGISTRY, count_params
from core.spec import ImageSpec

torch.set_num_threads(1)


def paired(
    resolution: int, channels: int = 3, input_channels: int = 3, input_resolution: int | None = None
) -> ImageSpec:
    return ImageSpec(
        resolution,
        channels,
        input_resolution=input_resolution or resolution,
        input_channels=input_channels,
        pairing="paired",
    )


def conv(c_in: int, c_out: int, k: int, bias: bool) -> int:
    """Parameters of a k×k conv (or transposed conv)."""
    return c_in * c_out * k * k + (c_out if bias else 0)


def printed(n: int) -> str:
    """How the authors' ``BaseModel.print_networks`` prints a count: '%.3f M' % (n / 1e6)."""
    return f"{n / 1e6:.3f}"


# ----------------------------------------------------------------------------------------------
# Registry and configs.


def test_registered_with_image_conditioning():
    for name, module, cycle in (("pix2pix", p2p, False), ("cyclegan", cg, True), ("srgan", sr, False)):
        arch = REGISTRY[name]
        assert arch.build_generator is module.build_generator and arch.build_discriminator is module.build_discriminator
        assert arch.capabilities.conditioning == "image" and arch.capabilities.cycle is cycle
    assert (p2p.Pix2PixConfig().norm, p2p.Pix2PixConfig().dropout, p2p.Pix2PixConfig().num_downs) == (
        "batch",
        0.5,
        None,
    )
    c = cg.CycleGANConfig()
    assert (c.norm, c.padding, c.dropout, c.g_blocks, c.d_layers) == ("instance", "reflect", 0.0, 9, 3)
    s = sr.SRGANConfig()
    assert (s.g_blocks, s.g_channels, s.d_channels, s.d_dense) == (16, 64, 64, 1024)
    for cls, bad in ((p2p.Pix2PixConfig, dict(norm="group")), (p2p.Pix2PixConfig, dict(num_downs=4)),
                     (cg.CycleGANConfig, dict(padding="circular")), (sr.SRGANConfig, dict(norm="instance"))):  # fmt: skip
        with pytest.raises(pydantic.ValidationError):
            cls(**bad)


# ----------------------------------------------------------------------------------------------
# Parameter counts. The authors' code prints "[Network G] Total number of parameters : 54.414 M" (their
# models/base_model.py print_networks, '%.3f M'). The printed figures below are from training logs of the
# authors' code found in the public code index: pix2pix facades with --netG unet_256 --norm batch (G 54.414 M,
# D 2.769 M on 3 + 3 channels), and a project that trained both models with the authors' defaults (pix2pix
# G 54.414 M, D 2.769 M; CycleGAN G_A and G_B 11.378 M, D_A and D_B 2.765 M).


def test_pix2pix_counts_equal_the_authors_unet_256_and_basic_d():
    spec = paired(256)
    cfg = p2p.Pix2PixConfig()
    G, D = p2p.build_generator(cfg, spec), p2p.build_discriminator(cfg, spec)
    # U-Net, batch norm: convs before a BN have no bias, BN has 2 per channel; the outermost up-conv has a bias.
    outermost = conv(3, 64, 4, False) + conv(2 * 64, 3, 4, True)

    def level(outer: int, inner: int) -> int:  # down conv + BN(inner), up conv from the stacked 2·inner + BN(outer)
        return conv(outer, inner, 4, False) + 2 * inner + conv(2 * inner, outer, 4, False) + 2 * outer

    innermost = conv(512, 512, 4, False) + conv(512, 512, 4, False) + 2 * 512  # no down norm, input not stacked
    g = outermost + level(64, 128) + level(128, 256) + level(256, 512) + 3 * level(512, 512) + innermost
    assert g == 54_413_955
    # PatchGAN on cat([x, y]): C64 (bias, no norm), C128, C256, C512 (BN), final conv to 1 with bias
    d = (
        conv(6, 64, 4, True)
        + conv(64, 128, 4, False) + 2 * 128
        + conv(128, 256, 4, False) + 2 * 256
        + conv(256, 512, 4, False) + 2 * 512
        + conv(512, 1, 4, True)
    )  # fmt: skip
    assert d == 2_768_705
    assert (count_params(G), count_params(D)) == (g, d)
    assert (printed(g), printed(d)) == ("54.414", "2.769")  # the authors' printout


def test_cyclegan_counts_equal_the_authors_resnet_9blocks_and_basic_d():
    spec = ImageSpec(256, 3, input_resolution=256, input_channels=3, pairing="unpaired")
    cfg = cg.CycleGANConfig()
    G, D = cg.build_generator(cfg, spec), cg.build_discriminator(cfg, spec)
    # instance norm has no parameters, so every conv has a bias
    g = (
        conv(3, 64, 7, True)  # c7s1-64
        + conv(64, 128, 3, True) + conv(128, 256, 3, True)  # d128, d256
        + 9 * 2 * conv(256, 256, 3, True)  # R256 × 9
        + conv(256, 128, 3, True) + conv(128, 64, 3, True)  # u128, u64
        + conv(64, 3, 7, True)  # c7s1-3
    )  # fmt: skip
    d = sum(conv(a, b, 4, True) for a, b in ((3, 64), (64, 128), (128, 256), (256, 512), (512, 1)))
    assert (g, d) == (11_378_179, 2_764_737)
    assert count_params(G.ab) == count_params(G.ba) == g and count_params(G) == 2 * g
    assert count_params(D.a) == count_params(D.b) == d and count_params(D) == 2 * d
    assert (printed(g), printed(d)) == ("11.378", "2.765")  # the authors' printout


def test_srgan_counts_closed_form():
    spec = paired(96, input_resolution=24)
    cfg = sr.SRGANConfig()
    G, D = sr.build_generator(cfg, spec), sr.build_discriminator(cfg, spec)
    prelu = 1  # one slope per PReLU
    block = 2 * conv(64, 64, 3, True) + 2 * 2 * 64 + prelu
    g = (
        conv(3, 64, 9, True) + prelu
        + 16 * block
        + conv(64, 64, 3, True) + 2 * 64  # conv-BN before the long skip
        + 2 * (conv(64, 256, 3, True) + prelu)  # two ×2 sub-pixel blocks for ×4
        + conv(64, 3, 9, True)
    )  # fmt: skip
    widths = [64, 64, 128, 128, 256, 256, 512, 512]
    d = conv(3, 64, 3, True) + sum(conv(a, b, 3, True) + 2 * b for a, b in zip(widths[:-1], widths[1:]))
    d += (512 * 6 * 6 * 1024 + 1024) + (1024 + 1)  # Dense(1024) on the 6×6×512 features, Dense(1)
    assert (g, d) == (1_549_462, 23_565_505)
    assert (count_params(G), count_params(D)) == (g, d)


# ----------------------------------------------------------------------------------------------
# Pix2Pix.


def tiny_unet(dropout: float = 0.0, norm: str = "batch") -> p2p.UnetGenerator:
    torch.manual_seed(0)
    cfg = p2p.Pix2PixConfig(ngf=4, ndf=4, dropout=dropout, norm=norm)
    return p2p.build_generator(cfg, paired(32, channels=2, input_channels=1)).double()


def test_unet_shapes_range_and_depth():
    G = tiny_unet()
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64) * 2 - 1
    y = G(x)
    assert y.shape == (2, 2, 32, 32) and y.abs().max() <= 1 and G.z_dim == 0
    convs = [m for m in G.modules() if type(m) is nn.Conv2d]
    assert len(convs) == 5  # num_downs = log2(32)
    with pytest.raises(ValueError, match="input_resolution"):
        p2p.build_generator(p2p.Pix2PixConfig(), paired(32, input_resolution=16))
    with pytest.raises(ValueError, match="num_downs"):
        p2p.build_generator(p2p.Pix2PixConfig(), paired(48))  # log2(48) is not whole
    G6 = p2p.build_generator(p2p.Pix2PixConfig(ngf=2, num_downs=6), paired(128))
    assert G6(torch.zeros(1, 3, 128, 128)).shape == (1, 3, 128, 128)


def test_unet_bias_rule_follows_the_norm():
    for norm, bias in (("batch", False), ("instance", True)):
        G = tiny_unet(norm=norm)
        convs = [m for m in G.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        outer_up = G.model.model[-2]
        assert isinstance(outer_up, nn.ConvTranspose2d) and outer_up.bias is not None
        assert all((m.bias is not None) == bias for m in convs if m is not outer_up)


def test_unet_skips_carry_the_input_past_a_dead_bottleneck():
    # With the innermost level's convs zeroed, everything below the outermost skip is a constant: the output can
    # still depend on the input only through the concatenations, and at the same pixel through the outermost one.
    G = tiny_unet().eval()
    innermost = G.model
    while any(isinstance(m, p2p.UnetBlock) for m in innermost.model):
        innermost = next(m for m in innermost.model if isinstance(m, p2p.UnetBlock))
    for m in innermost.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.zeros_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    x = (torch.rand(1, 1, 32, 32, dtype=torch.float64) * 2 - 1).requires_grad_()
    G(x)[0, 0, 16, 16].backward()
    assert x.grad[0, 0, 16, 16] != 0
    # and the innermost level really is dead: its output does not depend on its input
    h = torch.randn(2, 32, 2, 2, dtype=torch.float64)
    out = innermost(h)[:, 32:]  # the level's own output, after the stacked input
    assert torch.equal(out[0], out[1])


def test_unet_dropout_in_the_three_levels_next_to_the_innermost():
    cfg = p2p.Pix2PixConfig(ngf=2)
    G = p2p.build_generator(cfg, paired(256))
    drops = [m for m in G.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 8 - 5 and all(m.p == 0.5 for m in drops)
    G = tiny_unet(dropout=0.5)  # 32 px: num_downs 5, no such levels
    assert not any(isinstance(m, nn.Dropout) for m in G.modules())
    G = p2p.build_generator(p2p.Pix2PixConfig(ngf=2, num_downs=6), paired(64, input_channels=1)).double()
    x = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    torch.manual_seed(1)
    assert not torch.equal(G(x), G(x))  # train mode: dropout draws
    G.eval()
    assert torch.equal(G(x), G(x))  # eval mode: nn.Dropout is off (the authors' test script)


def test_authors_init():
    torch.manual_seed(0)
    G = p2p.build_generator(p2p.Pix2PixConfig(), paired(256))
    w = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    gains = torch.cat([m.weight for m in G.modules() if isinstance(m, nn.BatchNorm2d)])
    biases = [m.bias for m in G.modules() if isinstance(m, (nn.BatchNorm2d, nn.ConvTranspose2d)) and m.bias is not None]
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert abs(gains.mean().item() - 1) < 5e-3 and abs(gains.std().item() - 0.02) < 5e-3
    assert all(torch.equal(b, torch.zeros_like(b)) for b in biases)


def test_conditional_patch_discriminator_sees_input_and_output():
    torch.manual_seed(0)
    spec = paired(64, channels=3, input_channels=1)
    D = p2p.build_discriminator(p2p.Pix2PixConfig(ndf=8), spec)
    assert D.patch.model[0].in_channels == 4
    x, y = torch.rand(2, 1, 64, 64), torch.rand(2, 3, 64, 64)
    logits = D(x, y)
    assert logits.shape == (2, 1, 6, 6)  # 64 → 32 → 16 → 8 → 7 → 6
    assert torch.equal(logits, D.patch(torch.cat([x, y], 1)))
    assert not torch.allclose(D(x, y), D(torch.rand(2, 1, 64, 64), y))  # x matters


def test_patchgan_receptive_field_is_70px():
    assert patch_receptive_field(3) == 70 and patch_receptive_field(1) == 16
    torch.manual_seed(0)
    D = PatchDiscriminator(6, ndf=4, layers=3).double().eval()  # eval: BN is per-pixel, train-mode BN mixes pixels
    x = torch.randn(1, 6, 128, 128, dtype=torch.float64, requires_grad=True)
    out = D(x)
    assert out.shape == (1, 1, 14, 14)
    i, j = 7, 7
    out[0, 0, i, j].backward()
    rows = x.grad.abs().sum(dim=(0, 1, 3)).nonzero().flatten()
    cols = x.grad.abs().sum(dim=(0, 1, 2)).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70
    # the window of logit (i, j) starts at 8·i − 23: back through the five convs (stride s, padding 1) the start
    # goes i → i − 1 → i − 2 → 2(i − 2) − 1 → 4i − 11 → 8i − 23
    assert (rows.min().item(), cols.min().item()) == (8 * i - 23, 8 * j - 23)


# ----------------------------------------------------------------------------------------------
# CycleGAN.


def tiny_cycle(input_channels: int = 3, channels: int = 3, resolution: int = 16):
    torch.manual_seed(0)
    cfg = cg.CycleGANConfig(ngf=4, ndf=4, g_blocks=2)
    spec = ImageSpec(
        resolution, channels, input_resolution=resolution, input_channels=input_channels, pairing="unpaired"
    )
    return cg.build_generator(cfg, spec).double(), cg.build_discriminator(cfg, spec).double()


def test_resnet_generator_layout():
    G, _ = tiny_cycle(1, 3)
    pads = [m for m in G.ab.modules() if isinstance(m, nn.ReflectionPad2d)]
    assert len(pads) == 2 + 2 * 2  # the two 7×7 convs and two 3×3 per residual block
    assert sum(isinstance(m, cg.ResnetBlock) for m in G.ab.modules()) == 2
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in G.modules())
    a = torch.rand(2, 1, 16, 16, dtype=torch.float64) * 2 - 1
    fake_b = G.ab(a)
    assert fake_b.shape == (2, 3, 16, 16) and fake_b.abs().max() <= 1 and G.z_dim == 0 and G.ab.z_dim == 0
    assert G.ba(fake_b).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny_cycle(resolution=18)
    zero = cg.build_generator(cg.CycleGANConfig(ngf=2, g_blocks=1, padding="zero", dropout=0.5), paired(8))
    assert not any(isinstance(m, nn.ReflectionPad2d) for m in zero.modules())
    assert sum(isinstance(m, nn.Dropout) for m in zero.ab.modules()) == 1  # one per residual block
    assert zero(torch.zeros(1, 3, 8, 8)).shape == (1, 3, 8, 8)


def test_cycle_generators_contract():
    G, _ = tiny_cycle(1, 3)
    a = torch.rand(2, 1, 16, 16, dtype=torch.float64) * 2 - 1
    b = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    assert torch.equal(G(a), G.ab(a))
    out = G(a, b)
    assert set(out) == {"fake_b", "rec_a", "fake_a", "rec_b"}
    torch.testing.assert_close(out["fake_b"], G.ab(a))
    torch.testing.assert_close(out["rec_a"], G.ba(G.ab(a)))
    torch.testing.assert_close(out["fake_a"], G.ba(b))
    torch.testing.assert_close(out["rec_b"], G.ab(G.ba(b)))
    assert out["fake_b"].shape == out["rec_b"].shape == b.shape and out["fake_a"].shape == out["rec_a"].shape == a.shape
    with pytest.raises(ValueError, match="same number of channels"):
        G(a, b, identity=True)
    # one call uses every parameter of both generators (what a DDP wrapper needs)
    G3, _ = tiny_cycle(3, 3)
    a3 = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    out = G3(a3, b, identity=True)
    assert set(out) == {"fake_b", "rec_a", "fake_a", "rec_b", "idt_b", "idt_a"}
    torch.testing.assert_close(out["idt_b"], G3.ab(b))
    torch.testing.assert_close(out["idt_a"], G3.ba(a3))
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G3.parameters())


def test_cycle_discriminators_judge_their_own_domain():
    _, D = tiny_cycle(1, 3)
    assert D.a.model[0].in_channels == 1 and D.b.model[0].in_channels == 3
    x_a, x_b = torch.rand(2, 1, 32, 32, dtype=torch.float64), torch.rand(2, 3, 32, 32, dtype=torch.float64)
    la, lb = D(x_a, x_b)
    assert la.shape == lb.shape == (2, 1, 2, 2)
    assert torch.equal(la, D.a(x_a)) and torch.equal(lb, D.b(x_b))


# ----------------------------------------------------------------------------------------------
# SRGAN.


def test_srresnet_shapes_range_and_scale():
    torch.manual_seed(0)
    cfg = sr.SRGANConfig(g_blocks=2, g_channels=8, d_channels=4, d_dense=16)
    for scale in (2, 4, 8):
        G = sr.build_generator(cfg, paired(8 * scale, channels=3, input_channels=1, input_resolution=8))
        y = G(torch.rand(2, 1, 8, 8) * 2 - 1)
        assert y.shape == (2, 3, 8 * scale, 8 * scale) and y.abs().max() <= 1 and G.z_dim == 0
        assert sum(isinstance(m, nn.PixelShuffle) for m in G.modules()) == {2: 1, 4: 2, 8: 3}[scale]
        assert all(m.out_channels == 32 for m in G.upsample.modules() if isinstance(m, nn.Conv2d))  # 4 × width
    for res, inp in ((24, 8), (16, 16), (20, 8)):
        with pytest.raises(ValueError, match="power of two"):
            sr.build_generator(cfg, paired(res, input_resolution=inp))


def test_srresnet_long_skip():
    # with the post-block conv-BN's BN zeroed, the blocks' branch adds nothing: G = tail(upsample(head(x)))
    torch.manual_seed(0)
    G = sr.SRResNet(3, 3, scale=2, blocks=2, channels=8).double().eval()
    nn.init.zeros_(G.post[1].weight)
    nn.init.zeros_(G.post[1].bias)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(G(x), G.tail(G.upsample(G.head(x))))


def test_sr_discriminator_shapes_and_paper_layout():
    torch.manual_seed(0)
    D = sr.build_discriminator(sr.SRGANConfig(), paired(96, input_resolution=24))
    strides = [m.stride[0] for m in D.features if isinstance(m, nn.Conv2d)]
    widths = [m.out_channels for m in D.features if isinstance(m, nn.Conv2d)]
    assert strides == [1, 2] * 4 and widths == [64, 64, 128, 128, 256, 256, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.features) == 7
    assert isinstance(D.features[1], nn.LeakyReLU) and D.features[1].negative_slope == 0.2
    x = torch.randn(2, 3, 96, 96)
    assert D.features(x).shape[-2:] == (6, 6)  # at 96 px the pooling is the identity: the paper's network
    assert D(x).shape == (2,)
    D_small = sr.SRDiscriminator(3, width=4, dense=8)
    assert D_small(torch.randn(3, 3, 40, 40)).shape == (3,)


# ----------------------------------------------------------------------------------------------
# VGG19 content loss.


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    torch.manual_seed(0)
    sd = {k: v for k, v in torchvision.models.vgg19(weights=None).state_dict().items() if k.startswith("features.")}
    path = tmp_path_factory.mktemp("vgg") / "vgg19-random.pth"
    torch.save(sd, path)
    return path, sd


def test_vgg_loader_truncates_after_conv5_4(vgg_file):
    path, sd = vgg_file
    phi = vgg.load_vgg19_features(path)
    assert not phi.training and not any(p.requires_grad for p in phi.parameters())
    phi.train()
    assert not phi.training
    assert isinstance(phi.features[-1], nn.ReLU) and len(phi.features) == 36
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        y = phi(x)
    assert y.shape == (2, 512, 4, 3)
    # equals torchvision's VGG19 with the file's weights, on the ImageNet-normalised image
    ref = torchvision.models.vgg19(weights=None).features[:36]
    ref.load_state_dict({k[len("features.") :]: v for k, v in sd.items() if int(k.split(".")[1]) < 36})
    mean = torch.tensor(vgg.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(vgg.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(y, ref(((x + 1) / 2 - mean) / std))
        assert phi(x[:, :1]).shape == (2, 512, 4, 3)  # grayscale is repeated to RGB
    phi22 = vgg.load_vgg19_features(path, layer="2_2")
    assert phi22(x).shape == (2, 128, 32, 24)
    with pytest.raises(ValueError, match="3_4"):
        vgg.load_vgg19_features(path, layer="3_4")


def test_vgg_missing_file_says_what_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        vgg.load_vgg19_features(tmp_path / "nope.pth")
    msg = str(err.value)
    for part in (
        "nope.pth",
        "srgan.vgg_weights",
        "vgg19-dcbb9e9d.pth",
        "IMAGENET1K_V1",
        "~/.cache/torch/hub/checkpoints",
        "srgan.content: mse",
    ):
        assert part in msg, part


def test_vgg_wrong_file_names_the_first_bad_key(tmp_path, vgg_file):
    _, sd = vgg_file
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": sd["features.0.weight"], "features.0.kernel": sd["features.0.bias"]}, bad)
    with pytest.raises(ValueError, match=r"bad\.pth.*unexpected key 'features\.0\.kernel'"):
        vgg.load_vgg19_features(bad)
    torch.save({"features.2.weight": torch.zeros(64, 64, 1, 1)}, bad)
    with pytest.raises(ValueError, match=r"bad\.pth.*'features\.2\.weight' has shape \(64, 64, 1, 1\)"):
        vgg.load_vgg19_features(bad)
    up_to_conv2_2 = {k: v for k, v in sd.items() if int(k.split(".")[1]) < 9}
    torch.save(up_to_conv2_2, bad)
    with pytest.raises(ValueError, match=r"bad\.pth.*missing key 'features\.10\.weight'"):
        vgg.load_vgg19_features(bad)
    assert vgg.load_vgg19_features(bad, layer="2_2")(torch.zeros(1, 3, 8, 8)).shape == (1, 128, 4, 4)
    torch.save([1, 2], bad)
    with pytest.raises(ValueError, match=r"bad\.pth is not a VGG19 state dict"):
        vgg.load_vgg19_features(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth"):
        vgg.load_vgg19_features(junk)


def test_vgg_content_loss_rescales_features_by_1_over_12_75(vgg_file):
    path, _ = vgg_file
    phi = vgg.load_vgg19_features(path, layer="2_2")
    torch.manual_seed(0)
    real = torch.rand(2, 3, 16, 16) * 2 - 1
    fake = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_()
    loss = vgg.vgg_content_loss(phi, fake, real)
    plain = F.mse_loss(phi(fake), phi(real))
    torch.testing.assert_close(loss, plain / 12.75**2)
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
