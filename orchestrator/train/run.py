"""The Run: one training job on one worker, built from its config, stepped, saved and restored.

Dev mode calls :func:`train` in-process; Ray Train workers, ``torchrun`` and ``accelerate launch`` workers
call the same function with a :class:`WorkerContext`. :meth:`Run.build` checks everything it can before
any work starts, builds the recipe (networks and phases) and the components from their own config
sections, registers everything that must survive a restart in one :class:`StateRegistry` and restores it
from a checkpoint when resuming. :meth:`Run.step` runs the recipe's phases through the strategy, updates
the EMA copies, hands skipped updates to the fault guard and advances growth. :meth:`Run.train` is the
loop: step, then do what the cadence says is due. Side effects (logs, grids, checkpoint files) happen on
rank 0; every rank takes part in the collective calls (statistics, checkpoint state, Ray's report) the
same number of times.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

import architectures
from orchestrator import recipes  # noqa: F401  (registers the built-in recipes)
from orchestrator.checkpoint import (
    META,
    Checkpoint,
    ModuleState,
    StateRegistry,
    checkpoint_dir,
    latest_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from orchestrator.config import JobConfig, config_diff, config_from_yaml_text
from orchestrator.data.shards import ShardLoader, image_spec, load_manifest
from orchestrator.dist.strategy import make_strategy
from orchestrator.ema import ema_beta, update_ema
from orchestrator.faults import FaultGuard, StopRequest
from orchestrator.finetune import init_networks
from orchestrator.growth import Growth
from orchestrator.optim import lr_ratio, make_optimizer
from orchestrator.precision import make_precision
from orchestrator.recipes.recipe import RecipeSetup, StepContext, get_recipe, run_phase
from orchestrator.tracking import Tracker
from orchestrator.train.cadence import Cadence
from orchestrator.train.monitor import Monitor, make_eval_client
from orchestrator.train.preflight import (
    batch_split,
    check_batches,
    check_distributed,
    compile_wanted,
    ensure_writable,
    resolve_device,
    resolve_resume,
)
from orchestrator.train.profiling import StepProfiler


@dataclass
class WorkerContext:
    """Where this worker stands: its rank among ``world_size`` workers, a hook that reports each new
    checkpoint to the launcher (Ray Train), a checkpoint the launcher wants restored, and the name of the
    Ray evaluator actor (None: evaluate in-process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    report: Callable[[dict, Path | None], None] | None = None
    restore_from: Path | None = None
    evaluator: str | None = None


@dataclass
class Progress:
    """Counters of a run: steps, real images shown to D, and how often each phase came up (lazy intervals)."""

    step: int = 0
    nimg: int = 0
    phases: dict[str, int] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.nimg, self.phases = state["step"], state["nimg"], dict(state["phases"])


@dataclass
class TrainResult:
    """Where a finished (or stopped) run left its outputs (paths are None on ranks other than 0), and the
    evaluations of this run's line of training (results of abandoned branches left out)."""

    run_dir: Path
    checkpoint: Path | None
    grid: Path | None
    config: Path
    wandb_dir: str | None
    step: int
    nimg: int
    preempted: bool = False  # stopped early by SIGTERM or a STOP file, with a checkpoint
    evaluations: list[dict] = field(default_factory=list)


STOP_CHECK_S = 1.0  # how often distributed workers agree on a stop request (SIGTERM, RUN_DIR/STOP)


class RankState:
    """What differs between ranks: the data position and the global RNG (noise inputs, style mixing).
    ``state_dict`` gathers every rank's (a collective call)."""

    def __init__(self, loader: ShardLoader, ctx: WorkerContext):
        self.loader, self.ctx = loader, ctx

    def state_dict(self) -> list[dict]:
        mine = {"data": self.loader.state_dict(), "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            mine["cuda_rng"] = torch.cuda.get_rng_state()
        if self.ctx.world_size == 1:
            return [mine]
        out = [None] * self.ctx.world_size
        dist.all_gather_object(out, mine)
        return out

    def load_state_dict(self, ranks: list[dict]) -> None:
        if len(ranks) != self.ctx.world_size:  # another worker count: its other split restarts the data epoch
            print(
                f"note: the checkpoint was written by {len(ranks)} worker(s), this run has {self.ctx.world_size}; "
                f"data order and noise restart, weights and counters continue",
                flush=True,
            )
            self.loader.load_state_dict(ranks[0]["data"])
            return
        mine = ranks[self.ctx.rank]
        torch.set_rng_state(mine["torch_rng"])
        if "cuda_rng" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda_rng"])
        self.loader.load_state_dict(mine["data"])


class OptimizerState:
    """The strategy's optimizers and loss scaler in the state registry (sharded ones read from ``directory``)."""

    def __init__(self, strategy):
        self.strategy, self.directory = strategy, None

    def state_dict(self) -> dict:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state, self.directory)


@dataclass
class TrackingState:
    """The W&B run id, kept so that a resumed run appends to the same W&B run."""

    run_id: str | None = None

    def state_dict(self) -> dict:
        return {"wandb_run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state["wandb_run_id"]


class RunDescription:
    """The checkpoint's ``meta``: what the run is (image spec, family and model config, recipe, the network
    samples come from and its level of detail, the config), so that a checkpoint stands alone."""

    def __init__(self, run: Run):
        self.run = run

    def state_dict(self) -> dict:
        run, cfg = self.run, self.run.cfg
        return {
            "spec": run.spec.to_dict(),
            "arch": cfg.model.arch,
            "model": cfg.model.model_dump(mode="json"),
            "recipe": cfg.train.recipe,
            "generator": run.recipe.generator,
            "config": run.config_yaml,
            "level": [run.growth.resolution, run.growth.alpha] if run.growth else None,
        }

    def load_state_dict(self, meta: dict) -> None:
        """Say which settings differ from the checkpoint's (its weights are loaded all the same)."""
        if self.run.lead:
            changes = config_diff(config_from_yaml_text(meta["config"], "the checkpoint's config"), self.run.cfg)
            if changes:
                print("note: config differs from the checkpoint's:\n  " + "\n  ".join(changes), flush=True)


class Run:
    """One worker's training job; see the module docstring. Build it with :meth:`build`."""

    @classmethod
    def build(
        cls, cfg: JobConfig, run_dir: str | Path, resume: str | None = None, ctx: WorkerContext | None = None
    ) -> Run:
        """Check, build every component, restore when resuming (``None``, ``"auto"`` or a checkpoint path)."""
        run = cls()
        run.cfg, run.ctx, run.run_dir = cfg, ctx or WorkerContext(), Path(run_dir)
        run.lead = run.ctx.rank == 0
        run.device = resolve_device(cfg.train.device, cfg.train.precision, run.ctx.local_rank)
        check_batches(cfg, run.ctx.world_size)
        run.spec = image_spec(cfg.data, load_manifest(cfg.data))
        run.arch = architectures.get(cfg.model.arch)
        check_distributed(cfg, run.arch.capabilities)
        run.compiled = compile_wanted(cfg, run.device, run.arch.capabilities)
        start_from = run.ctx.restore_from or resolve_resume(run.run_dir, resume)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        run._build_recipe(init=start_from is None)
        ensure_writable(run.run_dir)  # the config holds up: now the run directory
        run._register_state()
        if start_from is not None:
            run.restore(start_from)
        if run.lead:  # only now: a checkpoint this config cannot restore leaves the run's config as it was
            (run.run_dir / "config.yaml").write_text(run.config_yaml)
        run._start_monitoring(start_from)
        if run.growth is not None:
            run._enter_level()
        if run.guard.state.lr_scale != 1.0 or run.guard.state.fp32:
            run._apply_fault_state()
        return run

    def _build_recipe(self, init: bool) -> None:
        """The recipe's networks (the same initial weights on every rank, or a checkpoint's with ``init`` and
        ``finetune.init_from``), synchronised BatchNorm if asked."""
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(cfg.train.seed)
        setup = RecipeSetup(
            cfg.model, self.arch, self.spec, cfg.loss, cfg.optim, self.device, cfg.train.seed, ctx.rank,
            ctx.world_size, cfg.augment, cfg.finetune, getattr(cfg, cfg.train.recipe, None), cfg.train.total_kimg,
        )  # fmt: skip
        self.recipe = get_recipe(cfg.train.recipe)(setup)
        if init and cfg.finetune.init_from:  # before the strategy: DeepSpeed copies the weights it starts from
            nets = {name: net.module for name, net in self.recipe.networks.items()}
            left = init_networks(nets, cfg.finetune.init_from, cfg.finetune.init_partial, cfg.model.arch)
            if self.lead:
                print(f"initialised {', '.join(nets)} from {cfg.finetune.init_from}", flush=True)
                if left:
                    print("  left as initialised (finetune.init_partial):\n    " + "\n    ".join(left), flush=True)
        if cfg.distributed.sync_batchnorm and ctx.world_size > 1:
            for name, net in self.recipe.trained.items():
                module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net.module)
                self.recipe.networks[name] = replace(net, module=module)
        torch.manual_seed(cfg.train.seed + 7919 * (ctx.rank + 1))  # noise inputs and style mixing differ per rank
        self.growth = (
            Growth(cfg.growth, cfg.model.start_resolution, self.spec.resolution)
            if self.arch.capabilities.growth
            else None
        )
        self.global_batch = self.growth.batch_size(cfg.train.batch_size) if self.growth else cfg.train.batch_size
        self.micro_batch, self.num_micro = batch_split(self.global_batch, cfg.train.micro_batch, ctx.world_size)
        self._build_strategy()
        self.loader = ShardLoader(
            cfg.data, self.spec, self.micro_batch, seed=cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size
        )
        self.progress, self.guard = Progress(), FaultGuard(cfg.faults)
        self.config_yaml = cfg.to_yaml()
        eval_kimg = cfg.eval.every_kimg if cfg.eval.enabled and cfg.eval.every_kimg else None
        self.cadence = Cadence(
            cfg.tracking.log_every, cfg.tracking.sample_every_kimg, cfg.checkpoint.every_kimg, eval_kimg
        )

    def _build_strategy(self) -> None:
        """Optimizers for the trained networks, the strategy that wraps them, and the phases' StepContext."""
        cfg, trained = self.cfg, self.recipe.trained
        own_dtype = set(self.recipe.networks) if self.arch.capabilities.reduced_dtype else set()
        precision = make_precision(cfg.train.precision, self.device)
        skip_nonfinite = cfg.faults.skip_nonfinite and cfg.train.precision != "fp16"  # fp16: the scaler's job
        self.strategy = make_strategy(
            cfg.distributed, precision, own_dtype & set(trained), skip_nonfinite, self.micro_batch, self.num_micro,
            self.ctx.world_size,
        )  # fmt: skip
        optimizers = {
            name: make_optimizer(n.module.parameters(), n.optimizer, n.reg_interval) for name, n in trained.items()
        }
        wrapped = self.strategy.prepare({name: net.module for name, net in trained.items()}, optimizers)
        copies = {name: net.module for name, net in self.recipe.networks.items() if name not in trained}
        for name in own_dtype & set(copies):
            precision.adopt(copies[name])
        raw = {**{name: self.strategy.unwrap(name) for name in trained}, **copies}
        if self.compiled:  # in place: wrapper and raw passes run it, state dict keys are unchanged
            for name in trained:
                raw[name].compile()
        self.step_ctx = StepContext({**wrapped, **copies}, raw, self.strategy, self.recipe.sampler, self.compiled)

    @property
    def G_ema(self) -> torch.nn.Module:
        """The network samples, grids and evaluation use."""
        return self.step_ctx.raw[self.recipe.generator]

    def _register_state(self) -> None:
        self.state = StateRegistry()
        for name in self.recipe.networks:
            self.state.register(name, ModuleState(self.step_ctx.raw[name], name))
        self.optimizer_state = OptimizerState(self.strategy)
        self.tracking = TrackingState()
        self.state.register("optimizers", self.optimizer_state)
        self.state.register("progress", self.progress)
        self.state.register("sampler", self.recipe.sampler)
        for name, obj in self.recipe.state.items():
            self.state.register(f"recipe.{name}", obj)
        self.state.register("ranks", RankState(self.loader, self.ctx))
        self.state.register("tracking", self.tracking)
        self.state.register("faults", self.guard)
        if self.growth is not None:
            self.state.register("growth", self.growth)
        self.state.register(META, RunDescription(self))

    def restore(self, path: str | Path) -> Checkpoint:
        """Load every registered state from checkpoint ``path`` (verified first)."""
        ckpt = read_checkpoint(path, map_location=self.device)
        self.optimizer_state.directory = ckpt.path
        self.state.load_state_dict(ckpt.states, ckpt.path)
        return ckpt

    def _start_monitoring(self, start_from: Path | None) -> None:
        cfg, p = self.cfg, self.progress
        self.tracker = Tracker(
            cfg.tracking,
            self.run_dir,
            cfg.model_dump(mode="json"),
            int(cfg.train.total_kimg * 1000),
            self.tracking.run_id,
            p.nimg,
            active=self.lead,
        )
        self.tracking.run_id = self.tracker.run_id
        if start_from is not None:
            self.tracker.note(f"resumed from {start_from} at step {p.step}, {p.nimg / 1000:.1f} kimg")
        evaluator = None
        if self.lead and cfg.eval.enabled:
            evaluator = make_eval_client(
                cfg,
                self.spec,
                self.ctx.evaluator,
                self.run_dir,
                self.tracker.note,
                p.step if start_from is not None else -1,
            )
        self.monitor = Monitor(
            cfg, self.spec, self.run_dir, self.device, self.recipe.sampler.z_dim, self.tracker, evaluator, self.lead
        )
        self.monitor.start(p.step, p.nimg)
        self.last_checkpoint: Path | None = None
        self.last_beta = 0.0
        self._next_stop_check, self._last_stop_check = 0, (time.perf_counter(), self.progress.step)
        self.metrics: dict[str, float] = {}

    # -------------------------------------------------------------------------------------------------
    # One step.

    def step(self) -> dict[str, torch.Tensor] | None:
        """One training step; its statistics (detached tensors, means over repeated phases), or None when
        the fault guard rolled the run back to its last checkpoint instead."""
        p = self.progress
        if self.growth is not None:
            self.growth.set_lod(*self.step_ctx.raw.values())
        stats, n_real, skipped = self._run_phases(grad_norms=self.cadence.log_due(p.step + 1))
        p.nimg += n_real * self.ctx.world_size
        for hook in self.recipe.after_step:
            stats.update(hook(p.step, self.global_batch, p.nimg))
        p.step += 1
        if self.recipe.lr_schedule is not None:
            self._apply_lr()
        self.last_beta = ema_beta(self.cfg.ema, self.global_batch, p.nimg)
        with torch.profiler.record_function("loop:ema"):
            for copy, source in self.recipe.ema.items():
                update_ema(self.step_ctx.raw[copy], self.step_ctx.raw[source], self.last_beta)
        self.tracker.advance(p.nimg)
        if skipped:
            self.tracker.note(
                f"warning: NaN/Inf gradients at step {p.step}: {skipped} update(s) skipped "
                f"({self.guard.state.skipped_steps + 1} bad steps so far)"
            )
        if self.guard.record(skipped):
            self.rollback()
            return None
        if self.growth is not None:
            self._advance_growth(n_real * self.ctx.world_size)
        return stats

    def _run_phases(self, grad_norms: bool) -> tuple[dict[str, torch.Tensor], int, int]:
        collected: dict[str, list[torch.Tensor]] = {}
        reals, sizes, n_real, skipped = {}, [self.micro_batch] * self.num_micro, 0, 0
        for phase in self.recipe.phases:
            if phase.active is not None and not phase.active(self.progress.nimg):
                continue
            count = self.progress.phases.get(phase.name, 0)
            self.progress.phases[phase.name] = count + 1
            if count % phase.interval:
                continue
            if phase.reals == "new":
                reals, sizes = self._next_reals()
                n_real += sum(sizes)
            phase_sizes = [max(1, n // phase.shrink) for n in sizes]
            data = phase.inputs(self.step_ctx, reals if phase.reals != "none" else {}, sum(phase_sizes))
            result = run_phase(phase, self.step_ctx, data, phase_sizes, grad_norms)
            skipped += result.skipped
            for key, value in result.stats.items():
                collected.setdefault(key, []).append(value)
        return {k: torch.stack(v).mean() for k, v in collected.items()}, n_real, skipped

    def _next_reals(self) -> tuple[dict[str, torch.Tensor | None], list[int]]:
        """This worker's real images (and labels) of one global batch, as ``num_micro`` micro-batches."""
        images, labels, inputs = [], [], []
        for _ in range(self.num_micro):
            t0 = time.perf_counter()
            with torch.profiler.record_function("data:next"):
                batch = self.loader.next()
            self.monitor.data_wait += time.perf_counter() - t0
            for shard, key, reason in batch.bad:
                self.tracker.note(f"warning: skipped bad sample {key or '?'} in {shard}: {reason}")
            img = batch.img.to(self.device, non_blocking=True)
            images.append(self.growth.reals(img) if self.growth else img)
            labels.append(batch.label.to(self.device, non_blocking=True))
            if batch.input is not None:
                inputs.append(batch.input.to(self.device, non_blocking=True))
        label = torch.cat(labels) if self.spec.num_classes else None
        reals = {"img": torch.cat(images), "label": label}
        if inputs:
            reals["input"] = torch.cat(inputs)
        return reals, [len(i) for i in images]

    def rollback(self) -> None:
        """Back to the last good checkpoint with lower learning rates (the guard decides and keeps count)."""
        target = latest_checkpoint(self.run_dir)
        why = self.guard.check_rollback(self.progress.step, target)
        kept = self.guard.state_dict()
        self.restore(target)
        self.guard.load_state_dict(kept)
        self.guard.rolled_back()
        if self.growth is not None:
            self._enter_level()
        self._apply_fault_state()
        text = (
            f"{why}: rolled back to {target.name} (step {self.progress.step}); learning rates × "
            f"{self.guard.state.lr_scale:g}"
            + ("; reduced-precision blocks now run in fp32" if self.guard.state.fp32 else "")
        )
        self.tracker.note(f"warning: {text}")
        self.tracker.alert("Rolled back after NaN/Inf", text)

    def _apply_lr(self) -> None:
        """Learning rates of the growth level (or the config), corrected for lazy regularization and lowered
        by any NaN/Inf rollbacks."""
        schedule = self.recipe.lr_schedule(self.progress.nimg) if self.recipe.lr_schedule else 1.0
        for name, net in self.recipe.trained.items():
            lr = self.growth.lr(net.optimizer.lr) if self.growth else net.optimizer.lr
            self.strategy.set_lr(
                name, lr * lr_ratio(net.optimizer, net.reg_interval) * self.guard.state.lr_scale * schedule
            )

    def _apply_fault_state(self) -> None:
        self._apply_lr()
        if self.guard.state.fp32:
            self.strategy.use_fp32()
            if self.arch.capabilities.reduced_dtype:
                for name in self.recipe.ema:
                    self.step_ctx.raw[name].reduced_dtype = None

    def _enter_level(self) -> None:
        """The batch size, learning rates and real-image reference of the growth level the run is at."""
        self.global_batch = self.growth.batch_size(self.cfg.train.batch_size)
        self.micro_batch, self.num_micro = batch_split(
            self.global_batch, self.cfg.train.micro_batch, self.ctx.world_size
        )
        self.loader.set_batch_size(self.micro_batch)
        self._apply_lr()
        self.monitor.observe_real(self.growth.reals)

    def _advance_growth(self, images: int) -> None:
        level = self.growth.resolution
        if not self.growth.advance(images):  # a fade-in started or ended: the official optimizer reset
            return
        if self.cfg.growth.reset_optimizer:
            for name in self.recipe.trained:
                self.strategy.reset_optimizer(name)
        if self.growth.resolution != level:
            self.monitor.grid(
                self.G_ema,
                self.progress.step,
                self.progress.nimg,
                self.monitor.samples_dir / f"level-{level:04d}px.png",
                f"G_ema at {level}×{level}",
            )
            self._enter_level()
            self.tracker.note(
                f"growing to {self.growth.resolution}×{self.growth.resolution} at "
                f"{self.progress.nimg / 1000:.1f} kimg (step {self.progress.step})"
            )

    # -------------------------------------------------------------------------------------------------
    # Saving, the loop, the end.

    def save(self) -> Path:
        """Checkpoint (collective): every rank contributes its state; rank 0 writes; all report."""
        step, shards = self.progress.step, None
        if self.strategy.sharded:  # DeepSpeed: every rank writes its shard files
            shards = checkpoint_dir(self.run_dir) / f".shards-{step:09d}"
            if self.lead:
                shutil.rmtree(shards, ignore_errors=True)
                shards.mkdir(parents=True)
            self._barrier()
            self.strategy.save_sharded(shards)
            self._barrier()
        states = self.state.state_dict()
        if self.lead:
            save_checkpoint(self.run_dir, step, states, self.config_yaml, self.cfg.checkpoint.keep_last, extra=shards)
        self._barrier()
        self.last_checkpoint = checkpoint_dir(self.run_dir) / f"ckpt-{step:09d}"
        if self.ctx.report is not None:
            self.ctx.report(
                {"step": step, "kimg": self.progress.nimg / 1000, **self.metrics},
                self.last_checkpoint if self.lead else None,
            )
        return self.last_checkpoint

    def done(self) -> bool:
        """Whether ``train.total_kimg`` (or ``train.stop_at_step``) is reached."""
        stop_at = self.cfg.train.stop_at_step
        return self.progress.nimg >= self.cfg.train.total_kimg * 1000 or bool(stop_at and self.progress.step >= stop_at)

    @property
    def full_size(self) -> bool:
        """Whether the networks have their final size (evaluation compares full-resolution images)."""
        return self.growth is None or self.growth.complete

    def train(self) -> TrainResult:
        """Step until done or asked to stop, doing what the cadence says is due; then finish."""
        monitor, p = self.monitor, self.progress
        if monitor.evaluator is not None and not self.full_size:
            self.tracker.note("evaluation waits until the networks have grown to full resolution")
        if p.step == 0 and self.full_size:
            monitor.evaluate(self.G_ema, 0, 0, None)  # the FID at the start, for comparison
        stop = StopRequest(self.run_dir, self.cfg.faults.grace_s, self.lead)
        preempted = False
        stop.install()
        profiler = StepProfiler(self.cfg.tracking, self.run_dir, self.ctx.rank)
        try:
            first = True
            while not self.done():
                before, t0 = p.nimg, time.perf_counter()
                stats = self.step()
                if stats is None:
                    continue
                if first and self.compiled:
                    self._compiled_graphs = compiled_graphs()
                    self.tracker.note(f"compiled: the first step took {time.perf_counter() - t0:.1f} s "
                                      f"({self._compiled_graphs} graphs)")  # fmt: skip
                first = False
                due = self.cadence.due(p.step, before, p.nimg)
                if due.log:
                    with torch.profiler.record_function("loop:log"):
                        self.metrics = monitor.log(
                            self._mean_across_ranks(stats), self._extra_metrics(), self.G_ema, p.step, p.nimg
                        )
                if due.grid:
                    monitor.grid(self.G_ema, p.step, p.nimg)
                if due.checkpoint:
                    self.save()
                if due.evaluate and self.full_size:
                    monitor.evaluate(self.G_ema, p.step, p.nimg, self.last_checkpoint)
                profiler.step()
                with torch.profiler.record_function("loop:stop_check"):
                    if self._stop_agreed(stop):
                        preempted = True
                        break
            self._finish(stop, preempted)
            wandb_dir = self.tracker.wandb_dir
        finally:
            profiler.close()
            stop.uninstall()
            self.tracker.close()
        history = monitor.evaluator.history if monitor.evaluator is not None else []
        return TrainResult(
            self.run_dir,
            self.last_checkpoint if self.lead else None,
            monitor.last_grid,
            self.run_dir / "config.yaml",
            wandb_dir,
            p.step,
            p.nimg,
            preempted,
            history,
        )

    def _finish(self, stop: StopRequest, preempted: bool) -> None:
        p = self.progress
        if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{p.step:09d}"):
            self.save()
        if preempted:
            stop.served()
            self.tracker.note(
                f"stopped on request at step {p.step} with checkpoint {self.last_checkpoint}; "
                f"continue with --resume auto"
            )
        else:
            self.monitor.finish_evaluations(self.G_ema, p.step, p.nimg, self.last_checkpoint, self.full_size)
        if self.growth is not None:
            self.growth.set_lod(*self.step_ctx.raw.values())
            self.monitor.grid(
                self.G_ema,
                p.step,
                p.nimg,
                self.monitor.samples_dir / f"level-{self.growth.resolution:04d}px.png",
                f"G_ema at {self.growth.resolution}×{self.growth.resolution}",
            )
        self.monitor.final_grid(self.G_ema, p.step, p.nimg)

    def _extra_metrics(self) -> dict[str, float]:
        lrs = {f"lr/{name}": self.strategy.lr(name) for name in self.recipe.trained}
        if self.compiled:
            lrs["perf/compiled_graphs"] = self._count_recompiles()
        return {
            "dist/workers": self.ctx.world_size,  # with the batch's split: an elastic run shows its resizes
            "dist/micro_batch": self.micro_batch,
            "dist/accumulation": self.num_micro,
            "ema/beta": self.last_beta,
            "data/bad_samples": self.loader.health.bad,
            **lrs,
            **self.guard.metrics(),
            **(self.growth.metrics() if self.growth else {}),
        }

    def _count_recompiles(self) -> int:
        """The compiled graphs so far; a warning when there are more than at the last count (a new shape or
        mode: a growth level, a last partial batch)."""
        graphs = compiled_graphs()
        if graphs > self._compiled_graphs:
            self.tracker.note(f"warning: recompiled at step {self.progress.step}: {graphs} compiled graphs now, "
                              f"{self._compiled_graphs} before")  # fmt: skip
            self._compiled_graphs = graphs
        return graphs

    def _mean_across_ranks(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(stats)
        values = torch.stack([stats[k].detach().float().cpu().reshape(()) for k in keys])
        if self.ctx.world_size > 1:
            dist.all_reduce(values)
            values /= self.ctx.world_size
        return dict(zip(keys, values.tolist()))

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether any rank was asked to stop, agreed by all ranks in one all-reduce made about every
        ``STOP_CHECK_S`` seconds rather than every step (a collective and a host sync each): rank 0 sets the
        next check's step from its own step time, and the same all-reduce hands that step to every rank."""
        if self.ctx.world_size == 1:
            return stop.requested()
        if self.progress.step < self._next_stop_check:
            return False
        now, interval = time.perf_counter(), 0
        if self.lead:
            per_step = (now - self._last_stop_check[0]) / max(self.progress.step - self._last_stop_check[1], 1)
            interval = max(1, min(int(STOP_CHECK_S / max(per_step, 1e-6)), 1000))
        t = torch.tensor([float(stop.requested()), float(interval)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self._last_stop_check = (now, self.progress.step)
        self._next_stop_check = self.progress.step + int(t[1].item())
        return bool(t[0].item())

    def _barrier(self) -> None:
        if self.ctx.world_size > 1:
            dist.barrier()


def train(
    cfg: JobConfig, run_dir: str | Path, resume: str | None = None, ctx: WorkerContext | None = None
) -> TrainResult:
    """Train (or continue training) the GAN described by ``cfg`` in ``run_dir``, as worker ``ctx``."""
    return Run.build(cfg, run_dir, resume, ctx).train()


def compiled_graphs() -> int:
    """How many graphs torch.compile has built in this process (grows with every recompilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
