"""BigGAN's training recipe in the loop: orthogonal regularization, the D:G step ratio, the EMA start,
accumulation, the shipped presets, and the CPU dev preset (train, exact resume, truncated sampling)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_same_nets, local_context, preset_config, run_d_phase, run_g_phase, tiny_config

import architectures
from architectures import ImageSpec, count_params
from architectures.biggan import BigGANConfig, BigGANDiscriminator, BigGANGenerator
from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import ConfigError, load_config, validate_config
from orchestrator.ema import ema_beta
from orchestrator.losses import LossConfig, orthogonal_penalty
from orchestrator.optim import AdamConfig
from orchestrator.train.run import Run, train

CONFIGS = Path(__file__).parents[1] / "configs" / "biggan"
TINY = dict(g_ch=4, d_ch=4, z_dim=8, shared_dim=4, attention=[16])
SPEC = ImageSpec(resolution=32, channels=1, num_classes=3)


@pytest.fixture(scope="session")
def digits32(tmp_path_factory) -> Path:
    """Digits at 32×32 in shards of 256, for the dev preset."""
    from orchestrator.data.write import write_shards

    out = tmp_path_factory.mktemp("digits32")
    write_shards("builtin:digits", out, resolution=32, shard_size=256)
    return out


def _tiny(seed: int = 0) -> tuple[BigGANGenerator, BigGANDiscriminator]:
    torch.manual_seed(seed)
    cfg = BigGANConfig(**TINY)
    return BigGANGenerator(cfg, SPEC), BigGANDiscriminator(cfg, SPEC)


def _ctx(G, D):
    return local_context(G, D, "biggan", SPEC.num_classes, opt=AdamConfig(lr=1e-4, betas=(0.0, 0.999), eps=1e-6))


def _authors_ortho_grad(w: torch.Tensor, strength: float) -> torch.Tensor:
    """ajbrock/BigGAN-PyTorch utils.ortho: the gradient it adds to .grad."""
    w2 = w.view(w.shape[0], -1)
    return (strength * 2 * ((w2 @ w2.t()) * (1.0 - torch.eye(w2.shape[0]))) @ w2).view(w.shape)


# ---------------------------------------------------------------------------------------------------
# Orthogonal regularization.


def test_orthogonal_penalty_matches_a_hand_computation():
    a = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 1.0]])  # 3 filters of 2 weights
    # Paper: ‖WᵀW ⊙ (1 − I)‖²_F with one filter per column; the filters' inner products:
    # <a0,a1> = 3 − 2 = 1, <a0,a2> = 2, <a1,a2> = −1; each appears twice off the diagonal.
    assert float(orthogonal_penalty([a])) == pytest.approx(2 * (1 + 4 + 1))
    conv = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]], [[[2.0, -1.0]], [[0.0, 3.0]]]])  # [out 2, in 2, 1, 2]
    # filters (1, 0, 1, 1) and (2, −1, 0, 3): inner product 5, twice
    assert float(orthogonal_penalty([a, conv])) == pytest.approx(12 + 2 * 25)
    # An orthogonal matrix has no penalty, whatever its scale.
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0)))
    assert float(orthogonal_penalty([3 * q])) == pytest.approx(0.0, abs=1e-8)
    # Its gradient is twice the authors' direct gradient for the same number (their β ≡ ours / 2).
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    (grad,) = torch.autograd.grad(1e-4 * orthogonal_penalty([w]), (w,))
    torch.testing.assert_close(grad, 2 * _authors_ortho_grad(w.detach(), 1e-4))
    torch.testing.assert_close(grad, _authors_ortho_grad(w.detach(), 2e-4))


def _g_grads(beta: float, sizes: list[int], eval_mode: bool = False) -> tuple[dict, dict, dict]:
    G, D = _tiny()
    if eval_mode:
        G.eval(), D.eval()
    before = {k: v.detach().clone() for k, v in G.named_parameters()}
    ctx, caps = _ctx(G, D)
    stats = run_g_phase(ctx, caps, LossConfig(kind="hinge", ortho_beta=beta), sizes)
    return {k: p.grad.clone() for k, p in G.named_parameters() if p.grad is not None}, before, stats


@pytest.mark.parametrize("sizes", [[4], [2, 2]])
def test_g_phase_adds_beta_times_the_penalty_once_per_step(sizes):
    beta = 1e-2
    with_reg, weights, stats = _g_grads(beta, sizes)
    without, _, plain = _g_grads(0.0, sizes)
    assert "reg/ortho" in stats and "reg/ortho" not in plain
    G, _ = _tiny()
    G.load_state_dict({**G.state_dict(), **{k: v for k, v in weights.items()}})
    ortho_names = {id(p) for p in G.ortho_parameters()}
    names = [k for k, p in G.named_parameters() if id(p) in ortho_names]
    assert "shared.weight" not in names and any("parametrizations.weight.original" in k for k in names)
    penalty = orthogonal_penalty(G.ortho_parameters())
    assert float(stats["reg/ortho"]) == pytest.approx(float(penalty.detach()), rel=1e-5)
    expected = dict(zip(names, torch.autograd.grad(beta * penalty, G.ortho_parameters())))
    for k in without:
        torch.testing.assert_close(
            with_reg[k] - without[k], expected.get(k, torch.zeros_like(without[k])), rtol=1e-4, atol=1e-7, msg=k
        )


def test_ortho_beta_needs_a_generator_with_ortho_parameters(digits16, tmp_path):
    cfg = validate_config(tiny_config(digits16, loss={"ortho_beta": 1e-4}), "test")
    with pytest.raises(ConfigError, match="loss.ortho_beta: 0.0001 needs a generator"):
        train(cfg, tmp_path)


# ---------------------------------------------------------------------------------------------------
# D:G step ratio, EMA start, accumulation.


def test_a_step_makes_d_steps_d_updates_and_one_g_update(digits32, tmp_path):
    cfg = dev_config(digits32, **{"loss.d_steps": 2, "loss.ortho_beta": 1e-4, "train.micro_batch": 8})
    run = Run.build(cfg, tmp_path)
    counts = {"D": 0, "G": 0}
    step = run.strategy.step

    def counting_step(name):
        counts[name] += 1
        return step(name)

    run.strategy.step = counting_step
    assert run.num_micro == cfg.train.batch_size // 8 > 1
    run.step()
    assert counts == {"D": 2, "G": 1}
    assert run.progress.nimg == 2 * cfg.train.batch_size  # each D step takes a fresh global batch


def test_imagenet_ema_start_is_20000_iterations():
    cfg = load_config(CONFIGS / "imagenet128.yaml")
    per_step = cfg.loss.d_steps * cfg.train.batch_size  # real images D sees in one iteration
    beta = lambda itr: ema_beta(cfg.ema, cfg.train.batch_size, itr * per_step)  # noqa: E731 (after itr steps)
    assert beta(19_999) == 0.0  # the authors' ema.update(itr): copy while itr < ema_start
    assert beta(20_000) == pytest.approx(0.9999, abs=1e-9)
    c = load_config(CONFIGS / "cifar.yaml")
    per_step = c.loss.d_steps * c.train.batch_size
    assert ema_beta(c.ema, 50, 999 * per_step) == 0.0
    assert ema_beta(c.ema, 50, 1000 * per_step) == pytest.approx(0.9999, abs=1e-8)


@pytest.mark.parametrize("phase", ["D", "G"])
def test_micro_batches_accumulate_to_one_batch_in_eval_mode(phase):
    """k micro-batches give the gradient of one k-times larger batch for the hinge loss (and the ortho
    term). With G and D in eval mode: in training mode BatchNorm normalises each micro-batch by its own
    statistics (as the authors' accumulation does), so the two differ by design."""
    grads = []
    for sizes in ([8], [2, 2, 2, 2]):
        G, D = _tiny()
        G.eval(), D.eval()
        ctx, caps = _ctx(G, D)
        cfg = LossConfig(kind="hinge", ortho_beta=1e-2)
        if phase == "D":
            gen = torch.Generator().manual_seed(2)
            real = torch.rand(8, 1, 32, 32, generator=gen) * 2 - 1
            labels = torch.randint(0, 3, (8,), generator=gen)
            run_d_phase(ctx, caps, cfg, real, labels, sizes)
            net = D
        else:
            run_g_phase(ctx, caps, cfg, sizes)
            net = G
        grads.append({k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None})
    whole, micro = grads
    assert whole.keys() == micro.keys() and len(whole) > 10
    for k in whole:  # atol scales with the tensor: summation order differs between AVX2 and AVX-512 kernels
        atol = 1e-6 * max(1.0, float(whole[k].abs().max()))
        torch.testing.assert_close(micro[k], whole[k], rtol=1e-4, atol=atol, msg=k)


# ---------------------------------------------------------------------------------------------------
# Presets.


# imagenet128: the authors' counts (sources in tests/test_biggan_networks.py). cifar: D 4,207,361 is the
# authors' (BigGAN-PyTorch BigGAN.py Discriminator, D_ch 64, 32x32, 10 classes, counted); G 4,668,163 is the
# authors' Generator *with* G_shared (shared_dim = dim_z = 128), counted the same way. Their
# scripts/launch_cifar_ema.sh does not pass --G_shared, which gives 4,304,387: ganforge always shares the
# embedding (configs/biggan/cifar.yaml), so this G count is not the one the authors trained.
@pytest.mark.parametrize(
    "name, g, d",
    [
        pytest.param("imagenet128", 70_433_988, 87_982_370, id="authors-launch_BigGAN_bs256x8"),
        pytest.param("cifar", 4_668_163, 4_207_361, id="authors-code-with-G_shared-not-launch_cifar_ema"),
    ],
)
def test_presets_validate_and_have_the_expected_parameter_counts(name, g, d):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    spec = ImageSpec(cfg.data.resolution, cfg.data.channels, cfg.data.num_classes)
    arch = architectures.get(cfg.model.arch)
    with torch.device("meta"):
        assert count_params(arch.build_generator(cfg.model, spec)) == g
        assert count_params(arch.build_discriminator(cfg.model, spec)) == d


def test_presets_follow_the_authors_recipes():
    i = load_config(CONFIGS / "imagenet128.yaml")
    assert (i.model.g_ch, i.model.d_ch, i.model.z_dim, i.model.shared_dim, i.model.attention) == (
        96,
        96,
        120,
        128,
        [64],
    )
    assert (i.model.hier, i.model.sn_eps, i.model.init, i.data.num_classes) == (True, 1e-6, "ortho", 1000)
    assert (i.train.batch_size, i.loss.kind, i.loss.d_steps, i.loss.ortho_beta) == (2048, "hinge", 2, 1e-4)
    assert (i.optim.g.lr, i.optim.d.lr, i.optim.g.betas, i.optim.d.betas) == (1e-4, 4e-4, (0.0, 0.999), (0.0, 0.999))
    assert i.optim.g.eps == i.optim.d.eps == 1e-6
    assert 2048 // i.train.micro_batch == 64  # 8 workers × 8 accumulations of 32, as 8 GPUs × 8
    c = load_config(CONFIGS / "cifar.yaml")
    assert (c.train.batch_size, c.loss.d_steps, c.optim.g.lr, c.optim.d.lr, c.loss.ortho_beta) == (50, 4, 2e-4, 2e-4, 0)
    assert (c.model.attention, c.model.init, c.data.num_classes, c.data.resolution) == ([], "N02", 10, 32)
    dev = load_config(CONFIGS / "dev.yaml")
    assert (dev.loss.kind, dev.loss.d_steps, dev.loss.ortho_beta, dev.data.shards) == (
        "hinge",
        2,
        1e-4,
        "data/digits32/train-*.tar",
    )


# ---------------------------------------------------------------------------------------------------
# The dev preset on CPU.


def dev_config(shards: Path, **extra):
    return preset_config(CONFIGS / "dev.yaml", shards, **extra)


def test_dev_preset_trains_resumes_exactly_and_samples_with_truncation(digits32, tmp_path):
    # 12 steps of 2 D steps × 16 images: checkpoints at steps 5 and 10 (0.16 kimg), EMA starts at 0.32 kimg
    # (step 10: steps 1-9 copy G).
    straight = train(dev_config(digits32, **{"train.total_kimg": 0.384}), tmp_path / "straight")
    train(dev_config(digits32, **{"train.total_kimg": 0.384, "train.stop_at_step": 6}), tmp_path / "resumed")
    resumed = train(dev_config(digits32, **{"train.total_kimg": 0.384}), tmp_path / "resumed", resume="auto")
    assert straight.step == resumed.step == 12 and straight.nimg == 384
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert_same_nets(a, b)
    # D:G ratio in the optimizers' own counters: 2 Adam steps of D per step of G.
    step_of = lambda opt: {int(s["step"]) for s in opt["state"].values()}  # noqa: E731
    assert step_of(a["optimizers"]["D"]) == {24} and step_of(a["optimizers"]["G"]) == {12}
    assert a["progress"]["phases"] == {"D": 24, "G": 12}
    # EMA start: G_ema is G before 0.32 kimg, an average after.
    ckpts = {int(p.name.split("-")[1]): p for p in (tmp_path / "straight" / "checkpoints").glob("ckpt-*")}
    early, late = load_checkpoint(ckpts[5]), load_checkpoint(ckpts[10])
    assert all(torch.equal(early["G_ema"][k], early["G"][k]) for k in early["G"])
    assert any(not torch.equal(late["G_ema"][k], late["G"][k]) for k in late["G"] if late["G"][k].is_floating_point())

    from launch.cli import main
    from orchestrator.tools.generate import Renderer

    out = tmp_path / "gen"
    assert main(
        ["generate", str(resumed.checkpoint), "--out", str(out), "--num", "4", "--class", "3", "--truncation", "0.5"]
    ) in (0, None)
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 5
    from PIL import Image

    text = Image.open(out / "seed0000.png").text
    assert text["ganforge:truncation_psi"] == "0.5" and text["ganforge:class"] == "3"
    r = Renderer(resumed.checkpoint, truncation=0.5, class_index=3)
    z, c = r.latent(0)
    assert float(z.abs().max()) <= 0.5 and int(c) == 3
    assert torch.equal(r.latent(0)[0], z)  # a seed fixes its truncated latent
    with pytest.raises(ConfigError, match="must be positive"):
        Renderer(resumed.checkpoint, truncation=0.0)
