"""Recipes as data: the networks a GAN kind trains and the phases of one training step, run by one
generic phase runner.

A :class:`Recipe` declares its named networks (``G``, ``D``; or ``G_AB``, ``G_BA``, ``D_A``, ``D_B``),
each with its optimizer settings, the EMA copies it keeps (``G_ema`` of ``G``), the state it carries
between steps (running means, its latent generator) and its :class:`Phase` list: what one step does,
in order. A phase names the networks it steps, how often it runs (``interval``, counted on its own
counter, so a lazy regularizer repeated after each of two D steps alternates correctly), where its
real images come from, and its loss. :func:`run_phase` owns the skeleton every phase shares, in the
manner of StyleGAN2-ADA's ``accumulate_gradients`` and nanoGPT's micro-steps: zero the gradients,
split the inputs into this worker's micro-batches, run the loss and backward of each with gradient
synchronisation only on the last one, then step each optimizer once.

Adding a GAN kind means writing a builder ``(RecipeSetup) -> Recipe`` and registering it under a name
(``train.recipe``); the Run's loop does not change.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Literal, Protocol

import torch
import torch.nn as nn

from architectures.registry import ArchConfig, Architecture
from core.config import ConfigError
from core.spec import ImageSpec
from orchestrator.augment.control import AugmentConfig
from orchestrator.dist.strategy import Strategy
from orchestrator.finetune import FinetuneConfig
from orchestrator.losses import LossConfig
from orchestrator.optim import AdamConfig, OptimConfig


class Stateful(Protocol):
    """Anything that survives a restart."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Sampler:
    """Latents, labels and noise from one seeded generator, identical on every rank (checkpointed).

    Each draw is made for all ``world_size`` workers and this rank keeps its slice, so a step does not
    depend on how many workers share it."""

    z_dim: int
    num_classes: int
    device: torch.device
    rng: torch.Generator
    rank: int = 0
    world_size: int = 1

    def _mine(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x[self.rank * n : (self.rank + 1) * n].to(self.device)

    def latents(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` latents of this rank and their random labels (None when unconditional)."""
        z = torch.randn(n * self.world_size, self.z_dim, generator=self.rng, device=self.rng.device)
        c = None
        if self.num_classes:
            c = self._mine(
                torch.randint(0, self.num_classes, (n * self.world_size,), generator=self.rng, device=self.rng.device),
                n,
            )
        return self._mine(z, n), c

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` numbers in [0, 1) of this rank."""
        return self._mine(torch.rand(n * self.world_size, generator=self.rng, device=self.rng.device), n)

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])


@dataclass(frozen=True)
class Network:
    """One network of a recipe: the module, its optimizer (None: not trained by one, e.g. an EMA copy) and
    the interval of the lazy regularizer that shares that optimizer (Adam's lr and β correction)."""

    module: nn.Module
    optimizer: AdamConfig | None = None
    reg_interval: int = 1


@dataclass(frozen=True)
class Micro:
    """One micro-batch of a phase: its tensors, and its place among the phase's micro-batches."""

    data: dict[str, torch.Tensor | None]
    index: int
    count: int

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


@dataclass
class StepContext:
    """What a phase's functions see: the networks as the phases call them (``nets``: wrapped by the strategy
    when trained) and unwrapped (``raw``: for state, input gradients and passes that must not synchronise),
    the strategy and the sampler. ``compiled``: the trained networks are compiled in place (``nets`` and
    ``raw`` both run the compiled code), so a pass that needs a second backward runs under :meth:`eager`."""

    nets: dict[str, nn.Module]
    raw: dict[str, nn.Module]
    strategy: Strategy
    sampler: Sampler
    compiled: bool = False

    def eager(self) -> ContextManager:
        """The context of a pass that takes a second backward (R1, path length, gradient penalty): compiled
        graphs have no double backward, so the same modules run eagerly inside it."""
        return torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext()


Reals = Literal["new", "same", "none"]
LossFn = Callable[[StepContext, Micro], tuple[torch.Tensor, dict[str, torch.Tensor]]]
InputsFn = Callable[[StepContext, dict[str, torch.Tensor], int], dict[str, torch.Tensor | None]]


@dataclass(frozen=True)
class Phase:
    """One optimizer update of some networks.

    ``reals``: ``"new"`` takes a fresh real batch, ``"same"`` the previous phase's, ``"none"`` no images
    (its inputs are as many as the last real batch). ``inputs(ctx, reals, n)`` turns the worker's real
    batch (``{"img", "label"}``, or empty) and its size ``n`` into this phase's tensors (latents drawn
    here); the runner cuts each into micro-batches. ``frozen``: networks that get no gradient while
    the phase runs (D in the G phase). ``active(nimg)``: whether the phase runs at this point of training
    (real images shown so far; None: always), e.g. SRGAN's MSE pre-training before its GAN phases; an inactive
    phase is not counted for its interval. ``after(ctx)``: runs right after the optimizer steps, on every
    strategy that steps the module's own parameters (WGAN's weight clipping, Arjovsky et al. 2017, Algorithm 1)."""

    name: str
    steps: tuple[str, ...]
    loss: LossFn
    inputs: InputsFn
    reals: Reals = "none"
    interval: int = 1
    frozen: tuple[str, ...] = ()
    shrink: int = 1  # the phase uses 1/shrink of the batch (StyleGAN2's pl_batch_shrink)
    active: Callable[[int], bool] | None = None
    after: Callable[[StepContext], None] | None = None


StepHook = Callable[[int, int, int], dict[str, torch.Tensor]]


@dataclass
class Recipe:
    """A GAN kind as data: networks, EMA copies (``{copy: source}``), recipe state, and the phases of a step.
    ``generator`` is the network samples, grids and evaluation use. ``after_step`` hooks run after the phases
    of each step as ``hook(step, global_batch, nimg)`` (step counted from 0, nimg including this step) and
    return statistics to log (ADA's p adjustment). ``lr_schedule(nimg)`` multiplies every trained network's
    learning rate (None: constant), e.g. CycleGAN's linear decay to 0; it is a function of the image count,
    which the checkpoint holds, so a resumed run continues on the same schedule."""

    networks: dict[str, Network]
    phases: list[Phase]
    sampler: Sampler
    ema: dict[str, str] = field(default_factory=dict)
    state: dict[str, Stateful] = field(default_factory=dict)
    generator: str = "G_ema"
    after_step: list[StepHook] = field(default_factory=list)
    lr_schedule: Callable[[int], float] | None = None

    @property
    def trained(self) -> dict[str, Network]:
        """The networks with an optimizer."""
        return {k: n for k, n in self.networks.items() if n.optimizer is not None}


@dataclass(frozen=True)
class RecipeSetup:
    """What a recipe builder gets: its sections of the job config (``options``: the recipe's own section, e.g.
    ``cyclegan``; None for noise_to_image), the data, the run's length and where it runs."""

    model: ArchConfig
    arch: Architecture
    spec: ImageSpec
    loss: LossConfig
    optim: OptimConfig
    device: torch.device
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    options: Any = None
    total_kimg: float = 0.0

    def sampler(self, z_dim: int) -> Sampler:
        """The recipe's latent sampler: seeded from ``train.seed``, the same stream on every rank."""
        return Sampler(
            z_dim,
            self.spec.num_classes,
            self.device,
            torch.Generator().manual_seed(self.seed + 1),
            self.rank,
            self.world_size,
        )


RecipeBuilder = Callable[[RecipeSetup], Recipe]
RECIPES: dict[str, RecipeBuilder] = {}


def register_recipe(name: str, builder: RecipeBuilder) -> RecipeBuilder:
    """Make ``builder`` available as ``train.recipe: <name>``."""
    if name in RECIPES:
        raise ValueError(f"recipe {name!r} is registered twice")
    RECIPES[name] = builder
    return builder


def get_recipe(name: str) -> RecipeBuilder:
    """The builder registered as ``name``; the error lists the known ones."""
    if name not in RECIPES:
        raise ConfigError(f"train.recipe: unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def split(data: dict[str, torch.Tensor | None], sizes: list[int]) -> list[dict[str, torch.Tensor | None]]:
    """Cut every tensor of ``data`` (rows) into micro-batches of ``sizes``; None stays None."""
    parts = {k: (v.split(sizes) if v is not None else [None] * len(sizes)) for k, v in data.items()}
    return [{k: parts[k][j] for k in data} for j in range(len(sizes))]


def grad_norm(net: nn.Module, loss_scale: float = 1.0) -> torch.Tensor:
    """The L2 norm of all of ``net``'s gradients together, divided by ``loss_scale`` (a tensor: no host sync).
    Parameters without a gradient (e.g. sharded away by DeepSpeed) do not count."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in net.parameters() if p.grad is not None]
    if not norms:
        return torch.zeros([])
    return torch.linalg.vector_norm(torch.stack(norms)) / loss_scale


@dataclass
class PhaseResult:
    """A phase's statistics (means over its micro-batches, detached tensors) and its skipped updates."""

    stats: dict[str, torch.Tensor]
    skipped: int = 0


def run_phase(
    phase: Phase, ctx: StepContext, data: dict[str, torch.Tensor | None], sizes: list[int], grad_norms: bool = False
) -> PhaseResult:
    """zero_grad → per micro-batch: loss, backward (synchronised on the last) → one step per network.
    With ``grad_norms`` the statistics include ``grad/<network>`` just before the step."""
    with torch.profiler.record_function(f"phase:{phase.name}"):
        return _run_phase(phase, ctx, data, sizes, grad_norms)


def _run_phase(
    phase: Phase, ctx: StepContext, data: dict[str, torch.Tensor | None], sizes: list[int], grad_norms: bool
) -> PhaseResult:
    st = ctx.strategy
    for name in phase.steps:
        st.zero_grad(name)
    # only what trains is thawed afterwards: parameters frozen for good (Freeze-D) stay frozen
    thaw = [p for name in phase.frozen for p in ctx.raw[name].parameters() if p.requires_grad]
    for name in phase.frozen:
        ctx.raw[name].requires_grad_(False)
    stats: dict[str, torch.Tensor] = {}
    try:
        parts = split(data, sizes)
        for j, part in enumerate(parts):
            micro = Micro(part, j, len(parts))
            with st.sync(phase.steps, last=micro.last):
                loss, new = phase.loss(ctx, micro)
                st.backward(loss, phase.steps, len(parts))
            for k, v in new.items():
                stats[k] = stats.get(k, 0) + v.detach().float() / len(parts)
        if grad_norms:
            for name in phase.steps:
                stats[f"grad/{name}"] = grad_norm(ctx.raw[name], st.loss_scale)
        skipped = sum(not st.step(name) for name in phase.steps)
        if phase.after is not None:
            phase.after(ctx)
    finally:
        for p in thaw:
            p.requires_grad_(True)
    return PhaseResult(stats, skipped)
