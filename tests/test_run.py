"""The Run and the recipe machinery, tested piece by piece: a Run built and stepped by hand, a recipe that
is not in the package (two generators, two discriminators) trained and resumed through the same loop,
statistics of repeated phases, and checkpoints that stand alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import preset_config, tiny_config

from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import validate_config
from orchestrator.losses import d_loss, g_loss
from orchestrator.recipes.recipe import RECIPES, Network, Phase, Recipe, RecipeSetup, register_recipe
from orchestrator.train import run as run_module
from orchestrator.train.run import Run, train

ROOT = Path(__file__).resolve().parents[1]


def dcgan_dev(shards: Path, **extra):
    """The DCGAN dev preset (configs/dev/dcgan-digits.yaml) on the 16-px test digits, without evaluation."""
    return preset_config(
        ROOT / "configs/dev/dcgan-digits.yaml", shards, **{"eval.enabled": "false", "train.batch_size": 16, **extra}
    )


def test_a_run_is_built_and_stepped_by_hand(digits16, tmp_path):
    run = Run.build(dcgan_dev(digits16), tmp_path / "run")
    assert set(run.recipe.networks) == {"G", "D", "G_ema"} and [p.name for p in run.recipe.phases] == ["D", "G"]
    G0 = {k: v.clone() for k, v in run.step_ctx.raw["G"].state_dict().items()}
    stats = run.step()
    assert {"loss/D", "loss/G", "D/real", "D/fake", "D/accuracy"} <= set(stats)
    assert all(torch.isfinite(v) for v in stats.values())
    assert (run.progress.step, run.progress.nimg, run.progress.phases) == (1, 16, {"D": 1, "G": 1})
    assert any(not torch.equal(G0[k], v) for k, v in run.step_ctx.raw["G"].state_dict().items())
    # G_ema moved towards G (β < 1 after the ramp-up's first images)
    assert 0 <= run.last_beta < 1
    path = run.save()
    assert path.name == "ckpt-000000001" and load_checkpoint(path)["progress"]["step"] == 1
    # A second Run resumes from that checkpoint; its next step equals the first Run's next step.
    again = Run.build(dcgan_dev(digits16), tmp_path / "run", resume="auto")
    a, b = run.step(), again.step()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("G", "D", "G_ema"):
        sa, sb = run.step_ctx.raw[name].state_dict(), again.step_ctx.raw[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    run.tracker.close(), again.tracker.close()


def test_train_threads_hold_in_the_trainer_beside_one_thread_loader_workers(digits16, tmp_path):
    """train.threads sets the training process's torch threads; its DataLoader workers decode with one."""
    threads = torch.get_num_threads()
    try:
        run = Run.build(dcgan_dev(digits16, **{"train.threads": 3, "data.workers": 2}), tmp_path / "run")
        run.step()
        assert torch.get_num_threads() == 3 and run.loader.next().threads == 1
        run.tracker.close()
    finally:
        torch.set_num_threads(threads)  # train.threads is process-wide: leave the next tests as they were


def test_repeated_phases_log_their_mean(digits16, tmp_path, monkeypatch):
    """With loss.d_steps = 2 the step's D statistics are the mean of both D phases, not the last one's."""
    seen: list[dict] = []
    real_run_phase = run_module.run_phase

    def recording(phase, ctx, data, sizes, grad_norms=False):
        result = real_run_phase(phase, ctx, data, sizes, grad_norms)
        seen.append((phase.name, {k: v.clone() for k, v in result.stats.items()}))
        return result

    monkeypatch.setattr(run_module, "run_phase", recording)
    run = Run.build(dcgan_dev(digits16, **{"loss.d_steps": 2}), tmp_path / "run")
    stats = run.step()
    d = [s for name, s in seen if name == "D"]
    assert len(d) == 2 and not torch.equal(d[0]["loss/D"], d[1]["loss/D"])
    for key in ("loss/D", "D/real", "D/fake"):
        assert torch.allclose(stats[key], (d[0][key] + d[1][key]) / 2), key
    run.tracker.close()


# ---------------------------------------------------------------------------------------------------
# A recipe from outside the package: two generators, two discriminators (the shape of CycleGAN).


class CallCount:
    """Recipe state that must survive a restart."""

    def __init__(self):
        self.calls = 0

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


def build_twins(setup: RecipeSetup) -> Recipe:
    """G_A/D_A learn the digits, G_B/D_B their mirror images; one G phase steps both generators."""
    nets = {}
    for k in ("A", "B"):
        nets[f"G_{k}"] = Network(setup.arch.build_generator(setup.model, setup.spec), setup.optim.g)
        nets[f"D_{k}"] = Network(setup.arch.build_discriminator(setup.model, setup.spec), setup.optim.d)
    nets["G_A_ema"] = Network(setup.arch.build_generator(setup.model, setup.spec))
    nets["G_A_ema"].module.load_state_dict(nets["G_A"].module.state_dict())
    nets["G_A_ema"].module.requires_grad_(False)
    count = CallCount()

    def latents(ctx, reals, n):
        z, c = ctx.sampler.latents(n)
        return {**reals, "z": z, "c": c}

    def d_step(k):
        def loss(ctx, m):
            count.calls += 1
            real = m.data["img"] if k == "A" else m.data["img"].flip(-1)
            with torch.no_grad():
                fake = ctx.raw[f"G_{k}"](m.data["z"], m.data["c"])
            value = d_loss(
                "nonsaturating", ctx.nets[f"D_{k}"](real, m.data["label"]), ctx.nets[f"D_{k}"](fake, m.data["c"])
            )
            return value, {f"loss/D_{k}": value}

        return loss

    def g_loss_both(ctx, m):
        total = sum(
            g_loss("nonsaturating", ctx.raw[f"D_{k}"](ctx.nets[f"G_{k}"](m.data["z"], m.data["c"]), m.data["c"]))
            for k in ("A", "B")
        )
        return total, {"loss/G": total}

    phases = [
        Phase("D_A", ("D_A",), d_step("A"), latents, reals="new"),
        Phase("D_B", ("D_B",), d_step("B"), latents, reals="same"),
        Phase("G", ("G_A", "G_B"), g_loss_both, latents, frozen=("D_A", "D_B")),
    ]
    return Recipe(
        nets,
        phases,
        setup.sampler(setup.model.z_dim),
        ema={"G_A_ema": "G_A"},
        state={"count": count},
        generator="G_A_ema",
    )


@pytest.fixture
def twins():
    register_recipe("test_twins", build_twins)
    yield "test_twins"
    del RECIPES["test_twins"]


def test_a_new_recipe_trains_and_resumes_exactly_without_loop_changes(twins, digits16, tmp_path):
    cfg = lambda **t: validate_config(
        tiny_config(digits16, "mlp", train={"recipe": twins, "micro_batch": 8, **t}),  # noqa: E731
        "test",
    )
    straight = train(cfg(), tmp_path / "straight")
    train(cfg(stop_at_step=4), tmp_path / "resumed")
    resumed = train(cfg(), tmp_path / "resumed", resume="auto")
    assert straight.step == resumed.step == 10
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    names = ("G_A", "G_B", "D_A", "D_B", "G_A_ema")
    for name in names:
        assert a[name].keys() == b[name].keys() and all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    assert set(a["optimizers"]) == {"scaler", "G_A", "G_B", "D_A", "D_B"}
    assert a["recipe.count"] == b["recipe.count"] == {"calls": 10 * 2 * 2}  # 10 steps × 2 D phases × 2 micro
    assert a["progress"]["phases"] == {"D_A": 10, "D_B": 10, "G": 10}
    assert a["meta"]["recipe"] == "test_twins" and a["meta"]["generator"] == "G_A_ema"
    # G_A and G_B both trained in the one G phase, and G_A_ema follows G_A
    first = load_checkpoint(sorted((tmp_path / "straight" / "checkpoints").glob("ckpt-*"))[0])
    assert all(any(not torch.equal(first[n][k], a[n][k]) for k in a[n]) for n in names)


# ---------------------------------------------------------------------------------------------------
# Checkpoints stand alone.


def ganforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, f"ganforge {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


def test_generate_and_eval_work_from_anywhere_without_the_training_shards(digits16, tmp_path):
    from orchestrator.eval.extractors import train_feature_extractor

    data = tmp_path / "data"
    shutil.copytree(digits16, data)
    cnn = train_feature_extractor(str(data / "train-*.tar"), tmp_path / "cnn.pt", epochs=1)
    result = train(validate_config(tiny_config(data, train={"total_kimg": 0.048}), "test"), tmp_path / "run")
    moved = tmp_path / "moved"
    data.rename(moved)  # the training shards and their manifest are gone from where the config says
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ckpt = str(result.checkpoint.resolve())
    out = ganforge("generate", ckpt, "--num", "3", "--out", "samples", cwd=elsewhere).stdout
    assert "wrote 3 images" in out and len(list((elsewhere / "samples").glob("*.png"))) == 4
    out = ganforge(
        "eval",
        ckpt,
        "--data",
        str(moved / "holdout-*.tar"),
        "--metrics",
        "fid,kid",
        "--num",
        "20",
        "--feature-extractor",
        "dataset-cnn",
        "--weights",
        str(cnn.path),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--kid-subset-size",
        "10",
        cwd=elsewhere,
    ).stdout
    fid = next(line for line in out.splitlines() if line.startswith("fid "))
    assert float(fid.split()[1]) > 0, out


# ---------------------------------------------------------------------------------------------------
# Resuming, as a user meets it.


def ganforge_rc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_resume_from_a_missing_checkpoint_says_so_and_leaves_no_run_directory(digits16, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(__import__("yaml").safe_dump(tiny_config(digits16)))
    run_dir = tmp_path / "runs" / "new"
    p = ganforge_rc("train", str(cfg), "--run-dir", str(run_dir), "--resume", "/no/such/ckpt", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr == (
        "ganforge train: error: --resume /no/such/ckpt: no such checkpoint; pass a ckpt-NNNNNNNNN "
        "directory of a run, or --resume auto\n"
    )
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


def test_the_summary_leaves_out_evaluations_of_an_abandoned_branch(digits16, tmp_path):
    """A corrupt newest checkpoint is skipped and the run continues from an older one: evaluation rows written
    after that older step belong to the abandoned branch, and neither the summary nor the best FID uses them."""
    from orchestrator.eval.extractors import train_feature_extractor

    cnn = train_feature_extractor(str(digits16 / "train-*.tar"), tmp_path / "cnn.pt", epochs=1)
    evaluation = {
        "enabled": True,
        "every_kimg": 0.08,
        "feature_extractor": "dataset-cnn",
        "weights_path": str(cnn.path),
        "metrics": ["fid"],
        "num_samples": 16,
        "holdout_num": 16,
        "cache_dir": str(tmp_path / "cache"),
    }
    cfg = lambda kimg: validate_config(tiny_config(digits16, eval=evaluation, train={"total_kimg": kimg}), "test")  # noqa: E731
    run_dir = tmp_path / "run"
    first = train(cfg(0.16), run_dir)  # evaluations at steps 0, 5 and 10; checkpoints at 5 and 10
    assert [r["step"] for r in first.evaluations] == [0, 5, 10]
    abandoned = first.evaluations[-1]
    (run_dir / "checkpoints" / "ckpt-000000010" / "state.pt").write_bytes(b"cut off")  # corrupt: skipped on resume
    second = train(cfg(0.16), run_dir, resume="auto")  # continues from step 5
    assert [r["step"] for r in second.evaluations] == [0, 5, 10]
    assert second.evaluations[-1]["finished"] > abandoned["finished"]
    rows = [__import__("json").loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 5, 10, 10]  # the file keeps history; the run's line is the last 10


def test_a_checkpoint_missing_a_registered_piece_is_refused_naming_it(tmp_path):
    from orchestrator.checkpoint import CheckpointError, StateRegistry, read_checkpoint, save_checkpoint

    registry = StateRegistry()
    a, b = CallCount(), CallCount()
    registry.register("a", a)
    registry.register("b", b)
    with pytest.raises(ValueError, match="state 'a' is registered twice"):
        registry.register("a", a)
    with pytest.raises(CheckpointError, match=r"ckpt holds no state for \['b'\]"):
        registry.load_state_dict({"a": {"calls": 3}}, Path("ckpt"))
    registry.load_state_dict({"a": {"calls": 3}, "b": {"calls": 4}}, Path("ckpt"))
    assert (a.calls, b.calls) == (3, 4)
    old = save_checkpoint(tmp_path, 1, {"G": {}}, "model: {}\n", keep_last=1)  # the layout before `meta`
    with pytest.raises(CheckpointError, match="carries no run description .* older ganforge"):
        read_checkpoint(old)
