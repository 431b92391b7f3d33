"""``ganforge generate`` (seed lists, interpolation, images labelled as synthetic) and ``ganforge report``
(plots and a self-contained HTML page, opened in headless Chromium), on a tiny run trained through the CLI."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config
from PIL import Image

from launch.cli import main
from orchestrator.tools.generate import format_seeds, generate, interpolate, parse_seeds, slerp
from orchestrator.tools.report import (
    GROUPS,
    ReportError,
    data_uri,
    group_figure,
    group_keys,
    load_metrics,
    pick_evenly,
    write_report,
)

GANFORGE = [str(Path(sys.executable).parent / "ganforge")]


def cli(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run(GANFORGE + list(args), capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"ganforge {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits16) -> Path:
    """A tiny conditional DCGAN run through the CLI: 8 steps of 256 images, every step logged, grids at 1 and 2 kimg.

    One thread: on a shared 2-core machine two threads per process oversubscribe and run slower."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(
        yaml.safe_dump(
            tiny_config(
                digits16,
                train={"batch_size": 256, "total_kimg": 2.0, "threads": 1},
                tracking={"log_every": 1, "sample_every_kimg": 1.0},
                checkpoint={"every_kimg": 1.0},
            )
        )
    )
    cli("train", str(cfg), "--run-dir", str(tmp / "run"))
    return tmp / "run"


@pytest.fixture(scope="module")
def ckpt(run) -> Path:
    return sorted((run / "checkpoints").glob("ckpt-*"))[-1]


@pytest.fixture(scope="module")
def seeds_out(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "seeds"
    cli("generate", str(ckpt), "--seeds", "0-3,7", "--class", "3", "--out", str(out))
    return out


# ---------------------------------------------------------------------------------------------------
# generate


def test_seed_lists_parse_and_print_back():
    assert parse_seeds("0-3,7,10-12") == [0, 1, 2, 3, 7, 10, 11, 12]
    assert parse_seeds("5") == [5] and parse_seeds("0-63") == list(range(64)) and parse_seeds("3,1,3") == [3, 1]
    assert format_seeds([0, 1, 2, 3, 7, 10, 11, 12]) == "0-3,7,10-12"
    for bad, message in [
        ("5-3", "from low to high"),
        ("a", "not a seed"),
        ("-1", "not a seed"),
        ("1,,2", "not a seed"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_seeds(bad)


def test_slerp_keeps_the_ends_and_the_sphere():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 512, generator=g), torch.randn(1, 512, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert abs(mid.norm() - (a.norm() + b.norm()) / 2) < 0.02 * a.norm()  # a straight line would shrink it by ~√2
    assert torch.allclose(slerp(a, a, 0.3), a)


def test_generate_writes_exactly_the_seeds_labelled_as_synthetic(seeds_out, ckpt):
    assert sorted(p.name for p in seeds_out.iterdir()) == [
        "grid.png",
        "seed0000.png",
        "seed0001.png",
        "seed0002.png",
        "seed0003.png",
        "seed0007.png",
    ]
    step = str(int(ckpt.name.split("-")[1]))
    for p in seeds_out.iterdir():
        text = Image.open(p).text
        assert text["ganforge:synthetic"] == "true", p
        assert "synthetic" in text["Description"].lower() and "synthetic" in text["Comment"].lower()
        assert "trainedAlgorithmicMedia" in text["XML:com.adobe.xmp"]
        assert text["ganforge:checkpoint"] == str(ckpt.resolve()) and text["ganforge:step"] == step
        assert text["ganforge:arch"] == "dcgan" and text["ganforge:truncation_psi"] == "none"
    seven = Image.open(seeds_out / "seed0007.png").text
    assert seven["ganforge:seed"] == "7" and seven["ganforge:class"] == "3"
    grid = Image.open(seeds_out / "grid.png")
    assert grid.text["ganforge:seeds"] == "0-3,7" and grid.text["ganforge:classes"] == "3,3,3,3,3"
    assert grid.size == (2 * 17 + 1, 3 * 17 + 1)  # 5 images of 16 px, 2 per row, 1 px apart


def test_the_same_seed_gives_the_same_pixels(seeds_out, ckpt, tmp_path):
    cli("generate", str(ckpt), "--seed", "7", "--num", "1", "--class", "3", "--out", str(tmp_path))
    assert np.array_equal(pixels(tmp_path / "seed0007.png"), pixels(seeds_out / "seed0007.png"))
    assert not np.array_equal(pixels(seeds_out / "seed0003.png"), pixels(seeds_out / "seed0007.png"))
    # in-process, with the class drawn from the seed: still one image per seed, whatever else is generated
    a = generate(ckpt, tmp_path / "a", seeds=[7, 8])
    b = generate(ckpt, tmp_path / "b", num=1, seed=8)
    assert np.array_equal(pixels(a[1]), pixels(b[0])) and Image.open(a[1]).text == Image.open(b[0]).text


def test_interpolation_writes_frames_strip_and_gif_whose_ends_are_the_seeds(seeds_out, ckpt, tmp_path):
    cli("generate", str(ckpt), "--interpolate", "3,7", "--steps", "5", "--class", "3", "--out", str(tmp_path))
    frames = [tmp_path / f"interp-0003-0007-{i:02d}.png" for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in frames] + ["interp-0003-0007.gif", "interp-0003-0007.png"]
    )
    assert np.array_equal(pixels(frames[0]), pixels(seeds_out / "seed0003.png"))
    assert np.array_equal(pixels(frames[-1]), pixels(seeds_out / "seed0007.png"))
    gif = Image.open(tmp_path / "interp-0003-0007.gif")
    assert gif.n_frames == 5 and b"synthetic" in gif.info["comment"]
    gif.seek(4)
    assert np.array_equal(np.asarray(gif.convert("L")), pixels(frames[-1]))
    text = Image.open(frames[2]).text
    assert text["ganforge:synthetic"] == "true" and text["ganforge:space"] == "z" and text["ganforge:t"] == "0.5"
    assert text["ganforge:interpolate"] == "3,7" and text["ganforge:class"] == "3"
    strip = Image.open(tmp_path / "interp-0003-0007.png")
    assert strip.size == (5 * 17 + 1, 18) and strip.text["ganforge:synthetic"] == "true"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "5-3"], "from low to high"),
        (["--seeds", "0-3", "--num", "4"], "either --seeds or --seed/--num"),
        (["--interpolate", "3"], "expected two seeds"),
        (["--interpolate", "3,7", "--seeds", "1"], "leave out --seeds"),
        (["--steps", "4"], "go with --interpolate"),
    ],
)
def test_generate_usage_errors(ckpt, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(ckpt), "--out", str(tmp_path), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--interpolate", "3,7"], "pass --class to choose the class both ends share"),
        (["--interpolate", "3,7", "--class", "1", "--space", "w"], "has no mapping network; use --space z"),
        (["--interpolate", "3,7", "--class", "1", "--steps", "1"], "at least 2 frames"),
    ],
)
def test_interpolation_errors_say_what_to_do(ckpt, tmp_path, capsys, args, message):
    assert main(["generate", str(ckpt), "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_stylegan2_interpolates_in_w_with_truncation(digits16, tmp_path):
    from orchestrator.config import load_config
    from orchestrator.train.run import train

    overrides = [
        f"data.shards={digits16 / 'train-*.tar'}",
        "tracking.progress_bar=false",
        "tracking.wandb.mode=disabled",
        "train.total_kimg=0.032",
        "train.threads=1",
        "model.channel_max=8",
        "tracking.grid_size=2",
    ]
    threads = torch.get_num_threads()
    try:
        result = train(
            load_config(Path(__file__).parents[1] / "configs" / "stylegan2" / "dev.yaml", overrides), tmp_path / "sg2"
        )
    finally:
        torch.set_num_threads(threads)  # train.threads is process-wide: leave the next tests as they were
    plain = generate(result.checkpoint, tmp_path / "plain", seeds=[3, 7], truncation=0.7, class_index=2)
    again = generate(result.checkpoint, tmp_path / "again", seeds=[7], truncation=0.7, class_index=2)
    assert np.array_equal(pixels(plain[1]), pixels(again[0]))  # StyleGAN2's noise is fixed: a seed is one image
    paths = interpolate(result.checkpoint, tmp_path / "interp", 3, 7, steps=3, truncation=0.7, class_index=2)
    text = Image.open(paths[1]).text
    assert (
        text["ganforge:space"] == "w"
        and text["ganforge:truncation_psi"] == "0.7"
        and text["ganforge:arch"] == "stylegan2"
    )
    assert np.array_equal(pixels(paths[0]), pixels(plain[0])) and np.array_equal(pixels(paths[2]), pixels(plain[1]))
    z_paths = interpolate(result.checkpoint, tmp_path / "z", 3, 7, steps=3, truncation=0.7, class_index=2, space="z")
    assert Image.open(z_paths[1]).text["ganforge:space"] == "z"
    assert np.array_equal(pixels(z_paths[0]), pixels(plain[0]))


# ---------------------------------------------------------------------------------------------------
# report


@pytest.fixture(scope="module")
def report(run) -> Path:
    out = cli("report", str(run)).stdout
    assert "wrote 4 plots (8 logged steps), 2 sample grids, the real-image grid and" in out
    return run / "report"


def _img_sources(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def test_report_embeds_every_plot_and_grid(report, run):
    page = (report / "index.html").read_text()
    plots = sorted(p.name for p in report.glob("*.png"))
    assert plots == ["discriminator.png", "losses.png", "other.png", "throughput.png"]  # no reg/ or eval/ keys
    grids = sorted((run / "samples").glob("grid-*.png"))
    assert [g.name for g in grids] == ["grid-000001.024kimg.png", "grid-000002.048kimg.png"]  # kimg of the step
    sources = _img_sources(page)
    assert len(sources) == len(plots) + 1 + len(grids) and all(s.startswith("data:image/png;base64,") for s in sources)
    for p in [report / n for n in plots] + [run / "samples" / "real.png"] + grids:
        assert data_uri(p.read_bytes()) in sources, p.name
    # the real-image grid (written by training) opens the row of sample grids, in its own frame
    samples = page[page.index('<div class="grids">') :]
    real = _img_sources(samples)
    assert real[0] == data_uri((run / "samples" / "real.png").read_bytes()) and len(real) == 1 + len(grids)
    assert samples.startswith('<div class="grids"><figure class="real"><img ')
    assert "<figcaption>real images</figcaption>" in samples and "No <code>samples/real.png</code>" not in page
    assert "1.02 kimg</figcaption>" in page and "2.05 kimg</figcaption>" in page
    assert "batch_size: 256" in page and "8 steps, up to step 8" in page
    assert not re.search(r'(src|href)="(https?:|file:|//)', page) and "<link" not in page  # nothing outside the file


def test_report_survives_nan_strings_resumes_and_bad_lines(tmp_path):
    rows = [
        {"step": 1, "kimg": 0.1, "time": 1e9, "loss/D": 1.0, "loss/G": 2.0, "D/accuracy": 0.5},
        {"step": 2, "kimg": 0.2, "time": 1e9 + 1, "loss/D": "inf", "loss/G": "nan", "reg/r1": 0.1},
        {"step": 3, "kimg": 0.3, "time": 1e9 + 2, "loss/D": "nan", "loss/G": 3.0, "perf/img_per_s": 100},
        # resumed from the checkpoint at step 1: steps 2 and 3 logged again, then the evaluator at step 3
        {"step": 2, "kimg": 0.2, "time": 1e9 + 9, "loss/D": 0.9, "loss/G": 1.9},
        {"step": 3, "kimg": 0.3, "time": 1e9 + 10, "loss/D": "NaN", "loss/G": 2.5},
        {"step": 3, "kimg": 0.3, "time": 1e9 + 11, "eval/fid": 123.4, "eval/kid": "-inf"},
    ]
    lines = [json.dumps(r) for r in rows] + [
        '{"step": 4, "kimg": 0.4, "loss/D"',
        "",
        '{"kimg": 1}',
        '["x"]',
        json.dumps({"step": "nan", "loss/D": 1}),
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    m = load_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in m.rows] == [1, 2, 3] and m.skipped_lines == 4
    assert m.rows[1]["loss/D"] == 0.9 and m.rows[1]["loss/G"] == 1.9 and m.rows[1]["reg/r1"] == 0.1
    assert math.isnan(m.rows[2]["loss/D"]) and m.rows[2]["loss/G"] == 2.5 and m.rows[2]["eval/fid"] == 123.4
    assert m.overwritten == 3  # loss/D and loss/G at step 2, loss/G at step 3 (NaN → NaN is no change)
    assert m.non_finite() == {"loss/D": (1, 3), "eval/kid": (1, 3)}

    r = write_report(tmp_path)
    assert sorted(p.name for p in r.plots) == [
        "discriminator.png",
        "eval.png",
        "losses.png",
        "regularizers.png",
        "throughput.png",
    ]
    page = r.index.read_text()
    assert "<code>loss/D</code> is NaN/Inf in 1 logged step(s), first at step 3" in page
    assert "4 line(s)" in page and "resume" in page and "No sample grids" in page
    assert "<td>123.4</td><td>-inf</td>" in page  # the evaluator's table
    assert len(_img_sources(page)) == 5


def test_report_of_one_row_and_of_grids_only(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "metrics.jsonl").write_text(json.dumps({"step": 1, "kimg": 0.03, "loss/D": 1.2, "loss/G": 0.7}) + "\n")
    assert [p.name for p in write_report(one).plots] == ["losses.png"]

    grids_only = tmp_path / "grids"
    (grids_only / "samples").mkdir(parents=True)
    for kimg in range(30):
        Image.new("L", (8, 8), kimg).save(grids_only / "samples" / f"grid-{kimg:06d}kimg.png")
    r = write_report(grids_only, max_grids=4)
    assert r.plots == [] and [g.kimg for g in r.grids] == [0, 10, 19, 29] and r.grids_total == 30
    assert "4 of 30, evenly spaced" in r.index.read_text() and r.real_grid is None
    assert "No <code>samples/real.png</code>: no real images to set beside the samples" in r.index.read_text()
    assert 'class="real"' not in r.index.read_text()
    assert pick_evenly(list(range(5)), 1) == [4] and pick_evenly(list(range(3)), 8) == [0, 1, 2]

    Image.new("RGB", (1500, 1200), "white").save(grids_only / "samples" / "grid-000030kimg.png")
    page = write_report(grids_only, max_grids=1).index.read_text()
    embedded = Image.open(io.BytesIO(base64.b64decode(_img_sources(page)[0].split(",", 1)[1])))
    assert embedded.size == (1024, 819)  # a 1024² run's grids are shrunk for the page


def test_fid_and_kid_are_drawn_on_a_log_axis(tmp_path):
    rows = [
        {
            "step": s,
            "kimg": s / 10,
            "loss/D": 1.0 / s,
            "eval/fid": 300.0 / s**2,
            "eval/kid": 0.3 / s**3,
            "eval/isc": 1.0 + s,
            "eval/precision": 0.1 * s,
        }
        for s in range(1, 6)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = load_metrics(tmp_path / "metrics.jsonl")

    def scales(metrics):
        figures = [group_figure(metrics, g, keys) for g, keys in group_keys(metrics.keys).items()]
        return {ax.get_title(): ax.get_yscale() for fig in figures for ax in fig.axes if ax.get_visible()}

    assert scales(m) == {
        "eval/fid": "log",
        "eval/kid": "log",
        "eval/isc": "linear",
        "eval/precision": "linear",
        "loss/D": "linear",
    }
    # KID's unbiased estimate goes to 0 or below near the end: symlog keeps those points in view
    m.rows[-1]["eval/kid"], m.rows[-2]["eval/kid"] = -2e-5, 0.0
    fig = group_figure(m, next(g for g in GROUPS if g.stem == "eval"), ["eval/kid"])
    (ax,) = fig.axes
    assert ax.get_yscale() == "symlog" and ax.yaxis.get_transform().linthresh == pytest.approx(2e-5)
    assert write_report(tmp_path).plots[0].name == "eval.png"


def test_report_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--out" in out and "--max-grids" in out and "RUN_DIR" in out


def test_report_of_no_run_is_an_error(tmp_path, capsys):
    with pytest.raises(ReportError, match="is it a run directory"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The page in a real browser


@pytest.fixture(scope="session")
def chromium() -> str:
    """Headless Chromium: $CHROMIUM, or ``chromium`` on PATH, installed with apt-get when running as root."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not found and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
            if p.returncode != 0:
                pytest.fail(f"installing Chromium for the report test failed: {' '.join(cmd)}:\n{p.stderr[-3000:]}")
        found = shutil.which("chromium")
    if not found:
        pytest.fail(
            "the report test opens the page in headless Chromium, which is not installed: "
            "install it with `apt-get install -y chromium` (Debian/Ubuntu; as root) or set CHROMIUM=/path/to/it"
        )
    return found


def browse(chromium: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *args,
        page.resolve().as_uri(),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"chromium failed ({p.returncode}):\n{p.stderr[-3000:]}"
    return p


def test_the_page_renders_in_headless_chromium(report, chromium, tmp_path):
    page = report / "index.html"
    n = len(_img_sources(page.read_text()))
    dom = browse(chromium, page, tmp_path / "profile", "--dump-dom").stdout
    assert f'data-images-rendered="{n}/{n}"' in dom, dom[-2000:]  # the page's own check: naturalWidth > 0
    assert dom.count('data-rendered="yes"') == n and 'data-rendered="no"' not in dom

    shot = tmp_path / "shot.png"
    browse(chromium, page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2400")
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (2400, 1200)
    top = img[:1800]  # header, the plots and the grids: far from blank
    assert top.std() > 20 and len(np.unique(top.reshape(-1, 3), axis=0)) > 200

    # and the check does catch a picture the browser cannot decode
    broken = tmp_path / "broken.html"
    src = _img_sources(page.read_text())[0]
    broken.write_text(page.read_text().replace(src, "data:image/png;base64,iVBORw0KGgoAAAA", 1))
    dom = browse(chromium, broken, tmp_path / "profile", "--dump-dom").stdout
    assert f'data-images-rendered="{n - 1}/{n}"' in dom and dom.count('data-rendered="no"') == 1
    assert "This image failed to load." in dom


def test_ada_p_and_rt_have_their_own_figure(tmp_path):
    rows = [{"step": s, "kimg": s / 10, "loss/D": 1.0, "aug/p": 0.01 * s, "aug/rt": 0.6} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    groups = group_keys(load_metrics(tmp_path / "metrics.jsonl").keys)
    (augment,) = [g for g in groups if g.stem == "augment"]
    assert groups[augment] == ["aug/p", "aug/rt"] and augment.shared
    assert "augment.png" in [p.name for p in write_report(tmp_path).plots]
