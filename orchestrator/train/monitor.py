"""What rank 0 shows and records while a Run trains: scalars, sample grids, health alarms, evaluations.

The Run hands the :class:`Monitor` its statistics and the images seen; the Monitor owns the tracker
(console, ``metrics.jsonl``, W&B), the fixed latents of the grids, the health monitor and the evaluator
client. On other ranks a Monitor is inactive: every call returns at once.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

import architectures
from core.spec import ImageSpec
from orchestrator.checkpoint import mark_best
from orchestrator.config import JobConfig
from orchestrator.data.errors import DataError
from orchestrator.data.shards import ShardLoader, load_manifest
from orchestrator.eval.evaluator import resolve_holdout
from orchestrator.eval.service import NAMESPACE, EvalClient, EvalJob, Evaluator
from orchestrator.health import HealthMonitor
from orchestrator.recipes.image_to_image import panels
from orchestrator.tracking import Tracker, peak_memory_mb


def evaluation_job(cfg: JobConfig, spec: ImageSpec) -> EvalJob:
    """The evaluator's settings and inputs for a job: its ``eval`` section, the generator, the held-out shards."""
    try:
        manifest = load_manifest(cfg.data)
    except DataError:
        manifest = None
    return EvalJob(cfg.eval, cfg.model.arch, cfg.model, spec, resolve_holdout(cfg.eval, cfg.data), manifest)


def grid_latents(z_dim: int, num_classes: int, grid_size: int, device: torch.device):
    """Fixed latents for sample grids (same every time, so progress is visible); one row per class."""
    rows = num_classes if 0 < num_classes <= 32 else grid_size
    z = torch.randn(rows * grid_size, z_dim, generator=torch.Generator().manual_seed(0)).to(device)
    c = torch.arange(rows).repeat_interleave(grid_size).to(device) if num_classes else None
    return z, c


@torch.no_grad()
def save_grid(G: nn.Module, z: torch.Tensor, c: torch.Tensor | None, ncol: int, path: Path) -> Path:
    """Render ``G`` on fixed latents to a PNG grid."""
    import torchvision  # imported here: it costs ~1.5 s of start-up (torch._dynamo)

    path.parent.mkdir(parents=True, exist_ok=True)
    img = torch.cat([G(z[i : i + 256], None if c is None else c[i : i + 256]).float() for i in range(0, len(z), 256)])
    torchvision.utils.save_image(img.clamp(-1, 1), path, nrow=ncol, normalize=True, value_range=(-1, 1), padding=1)
    return path


def grid_examples(cfg: JobConfig, spec: ImageSpec, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed examples for the grids of an image → image model: ``n`` held-out inputs and targets (domain A and B
    images when unpaired) in [-1, 1], spread over the first ``4n`` held-out samples (tiles of more than one image),
    or training ones where there are no held-out shards."""
    from orchestrator.data.heldout import read_heldout

    try:
        held = read_heldout(resolve_holdout(cfg.eval, cfg.data), spec, limit=4 * n)
        a, b = held.a[:: max(1, len(held.a) // n)][:n], held.b[:: max(1, len(held.b) // n)][:n]  # spread out
        return a.float() / 127.5 - 1, b.float() / 127.5 - 1
    except DataError:
        data = cfg.data.model_copy(update={"workers": 0, "shuffle_buffer": 1})
        batch = ShardLoader(data, spec, n, seed=cfg.train.seed).next()
        return batch.input, batch.img


@torch.no_grad()
def save_panels(G: nn.Module, a: torch.Tensor, b: torch.Tensor, cycle: bool, path: Path) -> Path:
    """An image → image grid (see :func:`~orchestrator.recipes.image_to_image.panels`): two examples per row."""
    import torchvision

    path.parent.mkdir(parents=True, exist_ok=True)
    images = panels(G, a, None if cycle and len(b) != len(a) else b, cycle)
    torchvision.utils.save_image(torch.stack(images).clamp(-1, 1), path, nrow=6, normalize=True,
                                 value_range=(-1, 1), padding=1)  # fmt: skip
    return path


def grid_path(samples_dir: Path, nimg: int) -> Path:
    """``grid-<kimg with 3 decimals, zero-padded>kimg.png``: sorts by time, readable, unique per step."""
    return samples_dir / f"grid-{nimg / 1000:010.3f}kimg.png"


def real_images(
    cfg: JobConfig, spec: ImageSpec, grid_size: int, max_batches: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images for the real grid (``(rows × grid_size, C, H, W)``, one row per class when conditional,
    black where a class ran out) and, in reading order, a batch for the real data's diversity. Read by
    a loader of their own, so training's data order is untouched."""
    rows = spec.num_classes if 0 < spec.num_classes <= 32 else grid_size
    per_class_rows = bool(spec.num_classes) and rows == spec.num_classes
    data = cfg.data.model_copy(update={"workers": 0, "shuffle_buffer": min(cfg.data.shuffle_buffer, 256)})
    loader = ShardLoader(data, spec, 64, seed=cfg.train.seed + 104729)
    seen: list[torch.Tensor] = []
    per_class: dict[int, list[torch.Tensor]] = {}
    need = max(grid_size * rows, cfg.health.diversity_samples)
    for _ in range(max_batches):
        batch = loader.next()
        seen.append(batch.img)
        for img, label in zip(batch.img, batch.label.tolist() if spec.num_classes else [0] * len(batch.img)):
            per_class.setdefault(int(label), []).append(img)
        if per_class_rows and all(len(per_class.get(k, [])) >= grid_size for k in range(rows)):
            break
        if not per_class_rows and sum(len(b) for b in seen) >= need:
            break
    every = torch.cat(seen)
    if not per_class_rows:
        return every[: grid_size * rows], every[: cfg.health.diversity_samples]
    blank = torch.full_like(every[0], -1.0)
    grid = [(per_class.get(k, []) + [blank] * grid_size)[:grid_size] for k in range(rows)]
    return torch.stack([img for row in grid for img in row]), every[: cfg.health.diversity_samples]


class Monitor:
    """Rank 0's logging, grids, health checks and evaluation requests for one Run."""

    def __init__(
        self,
        cfg: JobConfig,
        spec: ImageSpec,
        run_dir: Path,
        device: torch.device,
        z_dim: int,
        tracker: Tracker,
        evaluator: EvalClient | None,
        active: bool,
    ):
        self.cfg, self.spec, self.device, self.active = cfg, spec, device, active
        self.tracker, self.evaluator = tracker, evaluator
        self.samples_dir = Path(run_dir) / "samples"
        self.grid_z, self.grid_c = grid_latents(z_dim, spec.num_classes, cfg.tracking.grid_size, device)
        self.cycle = architectures.get(cfg.model.arch).capabilities.cycle
        self.examples: tuple[torch.Tensor, torch.Tensor] | None = None  # image → image: fixed grid inputs
        self.last_grid: Path | None = None
        self.health: HealthMonitor | None = None
        self.real_batch: torch.Tensor | None = None
        self._t, self._img, self.data_wait = time.perf_counter(), 0, 0.0

    def start(self, step: int, nimg: int) -> None:
        """The real-image grid (once per run directory) and the health monitor's reference (rank 0)."""
        self._img = nimg
        if not self.active:
            return
        cfg = self.cfg
        if self.spec.translates:
            with torch.random.fork_rng(devices=[]):
                a, b = grid_examples(cfg, self.spec, cfg.tracking.grid_size)
            self.examples = (a.to(self.device), b.to(self.device))
        self.health = HealthMonitor(cfg.health, lambda key, title, text: self.tracker.alert(title, text), cfg.loss.kind)
        n = cfg.health.diversity_samples
        self.health_z = torch.randn(n, self.grid_z.shape[1], generator=torch.Generator().manual_seed(1)).to(self.device)
        self.health_c = (torch.arange(n) % self.spec.num_classes).to(self.device) if self.spec.num_classes else None
        with torch.random.fork_rng(devices=[]):  # reading and rendering here must not move training's RNG
            real_grid, self.real_batch = real_images(cfg, self.spec, cfg.tracking.grid_size)
        self.health.observe_real(self.real_batch)
        if not (self.samples_dir / "real.png").exists():
            import torchvision

            self.samples_dir.mkdir(parents=True, exist_ok=True)
            torchvision.utils.save_image(
                real_grid,
                self.samples_dir / "real.png",
                nrow=cfg.tracking.grid_size,
                normalize=True,
                value_range=(-1, 1),
                padding=1,
            )
            self.tracker.log_image("samples/real", self.samples_dir / "real.png", step, "real images")

    def observe_real(self, prepare) -> None:
        """Compare generated diversity with real images as ``prepare`` shows them (a growth level)."""
        if self.health is not None and self.real_batch is not None:
            self.health.observe_real(prepare(self.real_batch))

    def log(self, stats: dict[str, float], extra: dict[str, float], G_ema: nn.Module, step: int, nimg: int) -> dict:
        """Log a step's statistics (already averaged across ranks) with throughput, memory and health."""
        if not self.active:
            return stats
        now = time.perf_counter()
        img_per_s = (nimg - self._img) / max(now - self._t, 1e-9)
        metrics = {
            **stats,
            "perf/img_per_s": img_per_s,
            "perf/kimg_per_h": img_per_s * 3.6,
            "perf/data_wait": self.data_wait / max(now - self._t, 1e-9),
            "perf/peak_mem_mb": peak_memory_mb(self.device),
            **extra,
        }
        if self.health is not None:
            samples = None
            if self.health.diversity_due(step // self.cfg.tracking.log_every, nimg) and not self.spec.translates:
                with (
                    torch.no_grad(),
                    torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []),
                ):
                    samples = G_ema(self.health_z, self.health_c).float()
            metrics.update(self.health.check(metrics, step, samples))
        self.tracker.log(metrics, step, nimg)
        self._t, self._img, self.data_wait = now, nimg, 0.0
        self.poll_evaluations(nimg)
        return metrics

    def grid(self, G_ema: nn.Module, step: int, nimg: int, path: Path | None = None, caption: str = "") -> Path | None:
        """A fixed-seed grid of ``G_ema`` (by default the time-stamped one of ``nimg``), logged to W&B."""
        if not self.active:
            return None
        is_level = path is not None
        path = path or grid_path(self.samples_dir, nimg)
        if self.examples is not None:
            save_panels(G_ema, *self.examples, self.cycle, path)
        else:
            save_grid(G_ema, self.grid_z, self.grid_c, self.cfg.tracking.grid_size, path)
        self.tracker.log_image(
            "samples/level" if is_level else "samples/grid", path, step, caption or f"G_ema at {nimg / 1000:.1f} kimg"
        )
        if not is_level:
            self.last_grid = path
        return path

    def final_grid(self, G_ema: nn.Module, step: int, nimg: int) -> None:
        if self.active and self.last_grid != grid_path(self.samples_dir, nimg):
            self.grid(G_ema, step, nimg)

    def evaluate(self, G_ema: nn.Module, step: int, nimg: int, checkpoint: Path | None) -> None:
        """Hand G_ema's weights to the evaluator (which never blocks a Ray run)."""
        if self.evaluator is not None:
            self.evaluator.submit(step, nimg, G_ema, checkpoint)

    def poll_evaluations(self, nimg: int) -> None:
        """Log new evaluator results at the steps they belong to, with how far behind training (``nimg``
        images now) they arrived; protect the best-FID checkpoint from pruning."""
        if self.evaluator is None:
            return
        for row in self.evaluator.poll(nimg):
            self.tracker.log_eval(row)
            fid = row.get("eval/fid")
            if fid is not None and fid < self.evaluator.best_fid:
                self.evaluator.best_fid = fid
                if row.get("checkpoint") and Path(row["checkpoint"]).exists():
                    mark_best(Path(row["checkpoint"]), {"fid": fid, "step": row["step"]})

    def finish_evaluations(self, G_ema: nn.Module, step: int, nimg: int, checkpoint: Path, full_size: bool) -> None:
        """The evaluation at the end (unless this step was just evaluated), then wait for the evaluator."""
        if self.evaluator is None:
            return
        if self.evaluator.last_step != step and full_size:
            self.evaluate(G_ema, step, nimg, checkpoint)
        self.evaluator.finish()
        self.poll_evaluations(nimg)


def make_eval_client(
    cfg: JobConfig, spec: ImageSpec, actor_name: str | None, run_dir: Path, note, resume_step: int | None
) -> EvalClient:
    """Rank 0's evaluator: the named Ray actor when the launcher made one, else one in this process."""
    if actor_name:
        import ray

        return EvalClient(actor=ray.get_actor(actor_name, namespace=NAMESPACE), note=note, resume_step=resume_step)
    return EvalClient(Evaluator(evaluation_job(cfg, spec), str(run_dir)), note=note, resume_step=resume_step)
