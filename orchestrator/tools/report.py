"""A run's story without W&B: plots of ``metrics.jsonl`` and one self-contained HTML page.

``write_report(run_dir)`` writes ``<run_dir>/report/``: one PNG figure per group of metrics (losses,
discriminator outputs, regularizers, throughput/data wait/memory, evaluator metrics, schedules) and
``index.html`` with those plots, the real-image grid beside the fixed-seed sample grids over time, the
evaluator's metrics by step, the latest value of every metric and the resolved config. FID and KID are drawn
on a log axis. Images are embedded as base64 ``data:`` URIs, so the
page can be mailed or copied on its own.

Reading the log is forgiving: NaN/Inf written as strings (``"nan"``, ``"inf"``) become floats and are
flagged, unreadable lines (a crash mid-write) are skipped and counted, and rows of a step logged again (a
resume from an earlier checkpoint, or evaluator rows at a training step) are merged key by key, the last
value winning.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

METRICS_FILE = "metrics.jsonl"  # orchestrator.tracking.METRICS_FILE; not imported from there: that imports torch
REPORT_DIR = "report"
REAL_GRID = "real.png"  # samples/real.png: a grid of training images, written once at the start of training
GRID_NAME = re.compile(r"grid-(\d+(?:\.\d+)?)kimg\.png$")
_NOT_METRICS = ("step", "kimg", "time")


class ReportError(RuntimeError):
    """The run directory cannot be reported on (it does not exist, or holds nothing to show)."""


# ---------------------------------------------------------------------------------------------------
# Reading metrics.jsonl


def as_float(value: object) -> float | None:
    """A logged value as a float: numbers, and the strings ``"nan"``, ``"inf"``, ``"-inf"`` the tracker
    writes for non-finite floats; None for anything else (bools, text, lists)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


@dataclass
class Metrics:
    """The rows of ``metrics.jsonl``, one per step in step order, each merged over every line of that step."""

    rows: list[dict[str, float]]
    skipped_lines: int = 0
    overwritten: int = 0  # values replaced by a later line of the same step (a resume went back)
    keys: list[str] = field(default_factory=list)

    def series(self, key: str, x: str = "kimg") -> tuple[list[float], list[float], list[int]]:
        """``(x, y, steps)`` of the rows that have ``key`` (non-finite ``y`` included)."""
        pts = [(r.get(x, r["step"]), r[key], int(r["step"])) for r in self.rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]

    def non_finite(self) -> dict[str, tuple[int, int]]:
        """``{key: (count, first step)}`` of the metrics that have NaN or Inf values."""
        found: dict[str, tuple[int, int]] = {}
        for r in self.rows:
            for k, v in r.items():
                if k not in _NOT_METRICS and not math.isfinite(v):
                    n, first = found.get(k, (0, int(r["step"])))
                    found[k] = (n + 1, first)
        return found


def load_metrics(path: str | Path) -> Metrics:
    """Parse a ``metrics.jsonl`` (see the module docstring for what is tolerated)."""
    by_step: dict[int, dict[str, float]] = {}
    skipped = overwritten = 0
    keys: dict[str, None] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            step = as_float(raw["step"]) if isinstance(raw, dict) else None
        except (json.JSONDecodeError, KeyError):
            step = None
        if step is None or not math.isfinite(step):
            skipped += 1
            continue
        row = by_step.setdefault(int(step), {"step": float(int(step))})
        for k, v in raw.items():
            f = as_float(v)
            if f is None or k == "step":
                continue
            if k in row and k not in _NOT_METRICS and not _same(row[k], f):
                overwritten += 1
            row[k] = f
            if k not in _NOT_METRICS:
                keys.setdefault(k)
    rows = [by_step[s] for s in sorted(by_step)]
    return Metrics(rows, skipped, overwritten, list(keys))


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


# ---------------------------------------------------------------------------------------------------
# Plots


@dataclass(frozen=True)
class Group:
    """One figure: the metrics whose key ``match`` accepts; ``shared``: one axes for all of them."""

    stem: str
    title: str
    match: Callable[[str], bool]
    shared: bool


GROUPS = (  # in page order; "other" last, it takes what the others leave
    Group("eval", "Evaluator metrics", lambda k: k.startswith("eval/"), False),
    Group("losses", "Losses", lambda k: k.startswith("loss/"), True),
    Group("discriminator", "Discriminator outputs and accuracy", lambda k: k.startswith("D/"), True),
    Group("regularizers", "Regularizers", lambda k: k.startswith("reg/"), False),
    Group("throughput", "Throughput, data wait and memory", lambda k: k.startswith("perf/"), False),
    Group("augment", "Augmentation: ADA's p and r_t = E[sign(D(real))]", lambda k: k.startswith("aug/"), True),
    Group("other", "Schedules and data", lambda k: True, False),
)

# Within a group, these first (in this order), then the rest by name.
ORDER = (
    "loss/D",
    "loss/G",
    "D/real",
    "D/fake",
    "D/accuracy",
    "perf/img_per_s",
    "perf/data_wait",
    "perf/peak_mem_mb",
    "eval/fid",
    "eval/kid",
    "eval/psnr",
    "eval/psnr_bicubic",
    "eval/ssim",
    "eval/ssim_bicubic",
    "eval/l1",
    "eval/l1_input",
    "eval/label_aba",
    "eval/label_ab",
    "eval/label_ba",
    "eval/lag_kimg",
    "eval/lag_s",
    "aug/p",
    "aug/rt",
    "lr/G",
    "lr/D",
    "ema/beta",
)

UNITS = {
    "perf/img_per_s": "images / s",
    "perf/data_wait": "fraction of wall time waiting for data",
    "perf/peak_mem_mb": "MiB",
    "eval/lag_kimg": "kimg trained before it arrived",
    "eval/lag_s": "s from request to arrival",
    "aug/p": "probability of each augmentation",
    "aug/rt": "E[sign(D(real))]; ADA holds it at augment.target",
    "eval/psnr": "dB on Y, border cropped (G)",
    "eval/psnr_bicubic": "dB on Y, border cropped (bicubic upsampling: the baseline)",
    "eval/ssim": "on Y, border cropped (G)",
    "eval/ssim_bicubic": "on Y, border cropped (bicubic upsampling)",
    "eval/l1": "mean |G(input) − target| in [-1, 1] units",
    "eval/l1_input": "mean |input − target|: the baseline",
    "eval/label_aba": "labels kept by A → B → A (dataset classifier)",
    "eval/label_ab": "labels kept by A → B (domain-B classifier)",
    "eval/label_ba": "labels kept by B → A (domain-A classifier)",
    "loss/cycle": "‖G.ba(G.ab(a)) − a‖₁ + ‖G.ab(G.ba(b)) − b‖₁",
    "loss/G_L1": "‖G(x) − y‖₁",
}

# Drawn on a log axis: they fall by orders of magnitude over a run. KID's unbiased estimate can be 0 or
# negative once the sets are close; then the axis is symlog, linear within the smallest |value| of 0.
LOG_SCALE = ("eval/fid", "eval/kid")


def group_keys(keys: list[str]) -> dict[Group, list[str]]:
    """Each metric in the first group that matches it; groups without metrics left out."""
    out: dict[Group, list[str]] = {}
    for k in keys:
        g = next(g for g in GROUPS if g.match(k))
        out.setdefault(g, []).append(k)
    rank = {k: i for i, k in enumerate(ORDER)}
    return {g: sorted(out[g], key=lambda k: (rank.get(k, len(rank)), k)) for g in GROUPS if g in out}


def _smooth(y: list[float]) -> list[float]:
    """Debiased exponential moving average over the finite values (non-finite ones stay NaN)."""
    span = max(len(y) / 25, 1.0)
    beta = 1 - 2 / (span + 1)
    out, s, n = [], 0.0, 0
    for v in y:
        if math.isfinite(v):
            s, n = beta * s + (1 - beta) * v, n + 1
            out.append(s / (1 - beta**n))
        else:
            out.append(math.nan)
    return out


def _plot_series(ax, x: list[float], y: list[float], label: str, color) -> None:
    finite = [v if math.isfinite(v) else math.nan for v in y]
    n = sum(math.isfinite(v) for v in y)
    if n > 60:  # noisy: the raw curve faint, a smoothed one on top
        ax.plot(x, finite, color=color, alpha=0.25, lw=0.8)
        ax.plot(x, _smooth(y), color=color, lw=1.6, label=label)
    else:
        ax.plot(x, finite, color=color, lw=1.4, marker="o", ms=3.5, label=label)
    bad = [xi for xi, v in zip(x, y) if not math.isfinite(v)]
    if bad:  # at the bottom edge, whatever the y range, so a divergence cannot hide off-axis
        ax.plot(
            bad,
            [0.02] * len(bad),
            "x",
            color="red",
            ms=7,
            mew=2,
            transform=ax.get_xaxis_transform(),
            label=f"{label}: {len(bad)} NaN/Inf",
            clip_on=False,
        )


def log_scale(ax, y: list[float]) -> None:
    """Put ``ax`` on a log y axis, or symlog when some finite values are 0 or negative (a log axis drops them)."""
    finite = [v for v in y if math.isfinite(v)]
    if not finite:
        return
    if min(finite) > 0:
        ax.set_yscale("log")
        return
    nonzero = [abs(v) for v in finite if v != 0]
    ax.set_yscale("symlog", linthresh=min(nonzero, default=1.0))
    ax.set_ylabel("symlog: linear near 0 (values ≤ 0)", fontsize=8)


def group_figure(metrics: Metrics, group: Group, keys: list[str], x: str = "kimg"):
    """The matplotlib ``Figure`` of ``keys`` against ``x`` (kimg): one axes per key, or one shared; the keys of
    :data:`LOG_SCALE` on a log axis (see :func:`log_scale`)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    per_axes = [keys] if group.shared else [[k] for k in keys]
    ncols = min(len(per_axes), 3)
    nrows = math.ceil(len(per_axes) / ncols)
    width = 9.0 if group.shared else 4.6 * ncols
    fig = Figure(figsize=(width, 3.4 * nrows), dpi=100, layout="constrained")
    fig.suptitle(group.title, fontsize=13, fontweight="bold")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = [f"C{i}" for i in range(10)]
    for ax, ks in zip(axes, per_axes):
        for i, k in enumerate(ks):
            xs, ys, _ = metrics.series(k, x)
            _plot_series(ax, xs, ys, k, colors[i % 10])
        ax.set_xlabel(x)
        ax.grid(True, alpha=0.3)
        if len(ks) == 1:
            ax.set_title(ks[0], fontsize=10)
            if ks[0] in UNITS:
                ax.set_ylabel(UNITS[ks[0]], fontsize=8)
            if ks[0] in LOG_SCALE:
                log_scale(ax, metrics.series(ks[0], x)[1])
        if len(ax.get_legend_handles_labels()[1]) > 1:
            ax.legend(fontsize=8, loc="best")
    for ax in axes[len(per_axes) :]:
        ax.set_visible(False)
    return fig


def plot_group(metrics: Metrics, group: Group, keys: list[str], path: Path, x: str = "kimg") -> Path:
    """:func:`group_figure`, written as a PNG."""
    group_figure(metrics, group, keys, x).savefig(path)
    return path


# ---------------------------------------------------------------------------------------------------
# The page


@dataclass
class Grid:
    """A fixed-seed sample grid of the run."""

    path: Path
    kimg: float


def find_grids(run_dir: Path) -> list[Grid]:
    """``samples/grid-<kimg>kimg.png`` of a run (``grid-000025.600kimg.png``), by kimg."""
    grids = [
        Grid(p, float(m.group(1))) for p in (run_dir / "samples").glob("grid-*.png") if (m := GRID_NAME.search(p.name))
    ]
    return sorted(grids, key=lambda g: g.kimg)


def pick_evenly(items: list, n: int) -> list:
    """At most ``n`` of ``items``, evenly spaced, first and last included."""
    if len(items) <= n:
        return list(items)
    if n == 1:
        return [items[-1]]
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _grid_png(path: Path, max_px: int) -> tuple[bytes, int, int]:
    """A grid's PNG bytes (downscaled to at most ``max_px`` wide/high: a 1024² run's grids are huge), size."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if max(im.size) <= max_px:
            return path.read_bytes(), im.width, im.height
        im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        return buf.getvalue(), im.width, im.height


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if not math.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.4g}"


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    index: Path
    plots: list[Path]
    grids: list[Grid]
    grids_total: int
    rows: int
    real_grid: Path | None = None


STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2329;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{margin:0 0 4px;font-size:26px}h2{margin:32px 0 12px;font-size:19px;border-bottom:1px solid #d8dde3;padding-bottom:4px}
.sub{color:#5b6670;margin:0 0 16px}
.card{background:#fff;border:1px solid #dfe3e8;border-radius:8px;padding:12px;margin:0 0 16px}
.plot img{max-width:100%;height:auto;display:block;margin:0 auto}
.grids{display:flex;flex-wrap:wrap;gap:12px}
.grids figure{margin:0;background:#fff;border:1px solid #dfe3e8;border-radius:8px;padding:8px;text-align:center}
.grids img{image-rendering:pixelated;display:block;max-width:100%;height:auto}
.grids figure.real{border:2px solid #3b7d3b}
figcaption{font-size:13px;color:#5b6670;margin-top:4px}
table{border-collapse:collapse;font-size:13px;background:#fff}
th,td{border:1px solid #dfe3e8;padding:3px 8px;text-align:right}th{background:#eef1f4}
td:first-child,th:first-child{text-align:left}
.facts td{text-align:left}
pre{background:#fff;border:1px solid #dfe3e8;border-radius:8px;padding:12px;overflow:auto;font-size:12.5px}
.warn{background:#fff6e0;border:1px solid #f0c36d;border-radius:8px;padding:8px 14px;margin:0 0 16px}
.broken{outline:3px solid #d33}
.nav a{margin-right:14px}
"""

# Marks each image as decoded (naturalWidth > 0) or broken, visibly: a truncated or corrupt copy of the
# page shows which picture is missing. Headless browsers (the tests) read the same marks.
CHECK_IMAGES = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    var good = imgs[i].complete && imgs[i].naturalWidth > 0;
    imgs[i].setAttribute("data-rendered", good ? "yes" : "no");
    if (good) { ok++; } else {
      imgs[i].classList.add("broken");
      imgs[i].insertAdjacentHTML("afterend", "<p class=warn>This image failed to load.</p>");
    }
  }
  document.body.setAttribute("data-images-rendered", ok + "/" + imgs.length);
});
"""


def write_report(
    run_dir: str | Path, out: str | Path | None = None, max_grids: int = 24, grid_max_px: int = 1024
) -> Report:
    """Write the plots and ``index.html`` of a run to ``out`` (default ``<run_dir>/report``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory (expected a run directory with {METRICS_FILE})")
    out = Path(out) if out is not None else run_dir / REPORT_DIR
    metrics_path = run_dir / METRICS_FILE
    metrics = load_metrics(metrics_path) if metrics_path.exists() else Metrics([])
    all_grids = find_grids(run_dir)
    real = run_dir / "samples" / REAL_GRID
    real = real if real.is_file() else None
    config_path = run_dir / "config.yaml"
    if not metrics.rows and not all_grids and not config_path.exists():
        raise ReportError(f"{run_dir} has no {METRICS_FILE}, sample grids or config.yaml: is it a run directory?")
    out.mkdir(parents=True, exist_ok=True)

    plots = _plots(metrics, out)
    grids = pick_evenly(all_grids, max_grids)

    parts = [_header(run_dir, metrics, all_grids), _warnings(metrics, metrics_path, all_grids, real)]
    nav = [("plots", "Plots")] * bool(plots) + [("samples", "Samples")] * bool(grids or real)
    evals = [k for k in metrics.keys if k.startswith("eval/")]
    nav += [("eval", "Evaluator metrics")] * bool(evals) + [("latest", "Latest values")] * bool(metrics.keys)
    nav += [("config", "Config")]
    parts.append('<p class="nav">' + "".join(f'<a href="#{a}">{t}</a>' for a, t in nav) + "</p>")
    if plots:
        parts.append('<h2 id="plots">Plots</h2>')
        for g, p in plots:
            parts.append(
                f'<div class="card plot"><img src="{data_uri(p.read_bytes())}" '
                f'alt="{html.escape(g.title)}" title="{html.escape(p.name)}"></div>'
            )
    if grids or real:
        parts.append(_samples(grids, len(all_grids), real, grid_max_px))
    if evals:
        parts.append('<h2 id="eval">Evaluator metrics by step</h2>' + _table(metrics, evals))
    if metrics.keys:
        parts.append('<h2 id="latest">Latest values</h2>' + _latest(metrics))
    config = (
        config_path.read_text(errors="replace") if config_path.exists() else "(no config.yaml in the run directory)"
    )
    parts.append(f'<h2 id="config">Resolved config</h2><pre>{html.escape(config)}</pre>')
    parts.append(
        f'<p class="sub">Written by <code>ganforge report</code> on '
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</p>"
    )

    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>ganforge report: {html.escape(run_dir.resolve().name)}</title><style>{STYLE}</style></head>"
        f"<body><main>{''.join(parts)}</main><script>{CHECK_IMAGES}</script></body></html>\n"
    )
    index = out / "index.html"
    tmp = index.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)  # a reader (or a browser refreshing the page) never sees half of it
    return Report(index, [p for _, p in plots], grids, len(all_grids), len(metrics.rows), real)


def _plots(metrics: Metrics, out: Path) -> list[tuple[Group, Path]]:
    """One PNG per group of metrics the run logged (against kimg when every row has it); stale ones removed."""
    x = "kimg" if metrics.rows and all("kimg" in r for r in metrics.rows) else "step"
    groups = group_keys(metrics.keys)
    plots = []
    for g in GROUPS:
        path = out / f"{g.stem}.png"
        if g in groups:
            plots.append((g, plot_group(metrics, g, groups[g], path, x)))
        elif path.exists():  # left by an earlier report of this run
            path.unlink()
    return plots


def _samples(grids: list[Grid], total: int, real: Path | None, grid_max_px: int) -> str:
    """The samples section: the real-image grid first (green frame), then the picked G_ema grids."""
    shown = f"{len(grids)} of {total}, evenly spaced" if len(grids) < total else str(len(grids))
    parts = [
        f'<h2 id="samples">Real images and fixed-seed samples over training ({shown})</h2>'
        f'<p class="sub">First (green frame) real training images, <code>samples/{REAL_GRID}</code>; '
        f'then G_ema on the same latents every time, from <code>samples/</code>.</p><div class="grids">'
    ]
    if real:
        parts.append(_figure(real, grid_max_px, "real training images", "real images", "real"))
    for gr in grids:
        parts.append(_figure(gr.path, grid_max_px, f"sample grid at {gr.kimg} kimg", f"{gr.kimg:,.3g} kimg"))
    return "".join(parts) + "</div>"


def _figure(path: Path, max_px: int, alt: str, caption: str, css_class: str = "") -> str:
    png, w, h = _grid_png(path, max_px)
    scale = max(1, round(320 / max(w, h, 1)))  # tiny grids (16 px digits) are blown up, pixelated
    cls = f' class="{css_class}"' if css_class else ""
    return (
        f'<figure{cls}><img src="{data_uri(png)}" width="{w * scale}" height="{h * scale}" '
        f'alt="{html.escape(alt)}" title="{html.escape(path.name)}"><figcaption>{html.escape(caption)}'
        f"</figcaption></figure>"
    )


def _header(run_dir: Path, m: Metrics, grids: list[Grid]) -> str:
    name = html.escape(run_dir.resolve().name)
    facts = [("Run directory", f"<code>{html.escape(str(run_dir.resolve()))}</code>")]
    if m.rows:
        last = m.rows[-1]
        facts.append(
            (
                "Logged",
                f"{len(m.rows)} steps, up to step {int(last['step']):,}"
                + (f" ({last['kimg']:,.2f} kimg)" if "kimg" in last else ""),
            )
        )
        times = [r["time"] for r in m.rows if "time" in r and math.isfinite(r["time"])]
        if times:
            span = max(times) - min(times)
            facts.append(
                (
                    "Wall clock",
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(min(times)))} → "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(max(times)))} "
                    f"({span / 3600:.2f} h between the first and last log)",
                )
            )
    facts.append(("Sample grids", str(len(grids))))
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    return (
        f"<h1>Training report: {name}</h1><p class=sub>ganforge run summary, from "
        f"<code>{METRICS_FILE}</code>, <code>samples/</code> and <code>config.yaml</code>.</p>"
        f'<table class="facts card">{rows}</table>'
    )


def _warnings(m: Metrics, metrics_path: Path, all_grids: list[Grid], real: Path | None) -> str:
    notes = []
    if not metrics_path.exists():
        notes.append(f"No <code>{METRICS_FILE}</code> in the run directory: no plots.")
    elif not m.rows:
        notes.append(f"<code>{METRICS_FILE}</code> has no readable rows yet: no plots.")
    for k, (n, first) in sorted(m.non_finite().items()):
        notes.append(
            f"<code>{html.escape(k)}</code> is NaN/Inf in {n} logged step(s), first at step {first:,} "
            f"(red × on the plots)."
        )
    if m.skipped_lines:
        notes.append(
            f"{m.skipped_lines} line(s) of <code>{METRICS_FILE}</code> could not be read and were skipped "
            f"(a line cut short by a crash, or being written right now)."
        )
    if m.overwritten:
        notes.append(
            f"{m.overwritten} value(s) were logged again for a step already in the log (a resume from an "
            f"earlier checkpoint): the last one is shown."
        )
    if not all_grids:
        notes.append("No sample grids in <code>samples/</code> yet.")
    elif real is None:
        notes.append(f"No <code>samples/{REAL_GRID}</code>: no real images to set beside the samples.")
    return "".join(f'<div class="warn">{n}</div>' for n in notes)


def _table(m: Metrics, keys: list[str]) -> str:
    head = "<tr><th>step</th><th>kimg</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>"
    body = "".join(
        f"<tr><td>{int(r['step']):,}</td><td>{_fmt(r.get('kimg'))}</td>"
        + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys)
        + "</tr>"
        for r in m.rows
        if any(k in r for k in keys)
    )
    return f'<table class="card">{head}{body}</table>'


def _latest(m: Metrics) -> str:
    latest: dict[str, tuple[float, int]] = {}
    for r in m.rows:
        for k in m.keys:
            if k in r:
                latest[k] = (r[k], int(r["step"]))
    body = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td><td>{s:,}</td></tr>" for k, (v, s) in sorted(latest.items())
    )
    return f'<table class="card"><tr><th>metric</th><th>value</th><th>at step</th></tr>{body}</table>'
