"""How a worker runs the step: one process, DistributedDataParallel (through Accelerate), or DeepSpeed ZeRO.

Every strategy offers the same few operations to the phases: ``zero_grad``, ``backward`` (one
micro-batch, accumulating), ``step``, ``unwrap`` and ``autocast``, plus the loss scale for R1. The
rule that makes regularizers correct under every strategy: a regularizer's input gradient (R1's
∇ₓD, path length's ∇_w) is taken through the **raw module**, never through the DDP wrapper or the
DeepSpeed engine, and the loss handed to ``backward`` always contains a term computed through the
wrapper (a zero-weighted one in lazy phases, as the official code anchors its R1 pass with
``real_logits * 0``). The wrapper then synchronises the complete gradient, first and second order
terms together, exactly once. (DeepSpeed ≥ 0.18 runs its ZeRO epilogue on any backward through an
engine's outputs, including ``autograd.grad``; DDP would sync nothing for a graph that never went
through its forward.)
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from core.config import StrictConfig
from orchestrator.precision import Precision, make_precision

StrategyName = Literal["single", "ddp", "deepspeed"]


class DistributedConfig(StrictConfig):
    """Which strategy the workers use, and its settings."""

    strategy: StrategyName = Field("single", description="single | ddp (DistributedDataParallel via Accelerate) | deepspeed")
    deepspeed_config: str = Field("configs/deepspeed/zero2.yaml", description="DeepSpeed config (JSON or YAML); "
                                  "batch sizes and precision are filled in from train.*")
    zero_stage: int | None = Field(None, ge=0, le=2, description="override the DeepSpeed config's ZeRO stage")
    sync_batchnorm: bool = Field(False, description="synchronise BatchNorm statistics across workers (BigGAN)")
    find_unused_parameters: bool = Field(False, description="DDP: allow parameters without gradients (ProGAN)")


def _no_scaling(loss: torch.Tensor) -> torch.Tensor:
    return loss


class LocalStrategy:
    """One process: autocast and an fp16 GradScaler from :class:`Precision`; nothing to synchronise.

    With ``skip_nonfinite`` set, ``step`` skips (and counts in ``skipped``) an update whose gradients hold
    a NaN or Inf (see :mod:`orchestrator.faults`)."""

    wrapped = False

    def __init__(self, precision: Precision):
        self.precision = precision
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.skip_nonfinite = False
        self.skipped = 0
        self.fp32 = False

    def use_fp32(self, *nets: nn.Module) -> None:
        """Run everything in fp32 from now on (after a NaN/Inf rollback): no autocast, and networks with
        per-block reduced precision (StyleGAN2's ``num_fp16_res``) keep those blocks in fp32."""
        self.fp32 = True
        for net in (*nets, *(self.unwrap(n) for n in self.nets)):
            if hasattr(net, "reduced_dtype"):
                net.reduced_dtype = None

    def _nonfinite(self, key: str) -> bool:
        """Whether the update of ``key`` is to be skipped: guarding, and a gradient is NaN/Inf (then zeroed)."""
        if not self.skip_nonfinite:
            return False
        grads = [p.grad for g in self.opts[key].param_groups for p in g["params"] if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return False
        self.zero_grad(key)
        self.skipped += 1
        return True

    def prepare(self, G: nn.Module, D: nn.Module, opt_G, opt_D):
        self.opts = {"G": opt_G, "D": opt_D}
        self.nets = (G, D)
        return G, D

    def autocast(self, net: nn.Module | None = None):
        return contextlib.nullcontext() if self.fp32 else self.precision.autocast(net)

    def unwrap(self, net: nn.Module) -> nn.Module:
        return net

    @property
    def loss_scale(self) -> float:
        return self.precision.loss_scale

    def zero_grad(self, key: str) -> None:
        self.opts[key].zero_grad(set_to_none=True)

    def no_sync(self, net: nn.Module):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, key: str, net: nn.Module, num_micro: int) -> None:
        self.precision.scaler.scale(loss / num_micro).backward()

    def step(self, key: str) -> None:
        if self._nonfinite(key):
            return
        self.precision.scaler.step(self.opts[key])
        self.precision.scaler.update()

    def lr(self, key: str) -> float:
        return self.opts[key].param_groups[0]["lr"]

    def set_lr(self, key: str, lr: float) -> None:
        for group in self.opts[key].param_groups:
            group["lr"] = lr

    def reset_optimizer(self, key: str) -> None:
        """Forget Adam's moments and step count (ProGAN's reset at a new level of detail)."""
        self.opts[key].state.clear()

    def state_dict(self) -> dict:
        return {"scaler": self.precision.scaler.state_dict(),
                "opt_G": self.opts["G"].state_dict(), "opt_D": self.opts["D"].state_dict()}

    def load_state_dict(self, state: dict, directory: Path | None = None) -> None:
        if state["scaler"]:
            self.precision.scaler.load_state_dict(state["scaler"])
        self.opts["G"].load_state_dict(state["opt_G"])
        self.opts["D"].load_state_dict(state["opt_D"])

    def save_sharded(self, directory: Path) -> None:
        """Write state that every rank holds a part of (DeepSpeed only); a collective call."""


class DDPStrategy(LocalStrategy):
    """DistributedDataParallel through Accelerate, which also places the nets on the device and owns
    mixed precision (autocast) and fp16 loss scaling."""

    wrapped = True

    def __init__(self, precision: Precision, cfg: DistributedConfig):
        super().__init__(precision)
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision.name]
        ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters, broadcast_buffers=True)
        self.accelerator = Accelerator(mixed_precision=mp, cpu=precision.device.type == "cpu", kwargs_handlers=[ddp])

    def prepare(self, G, D, opt_G, opt_D):
        G, D, opt_G, opt_D = self.accelerator.prepare(G, D, opt_G, opt_D)
        self.opts = {"G": opt_G, "D": opt_D}
        self.nets = (G, D)
        return G, D

    def autocast(self, net: nn.Module | None = None):
        return contextlib.nullcontext() if self.fp32 else self.accelerator.autocast()

    def unwrap(self, net: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(net)

    @property
    def loss_scale(self) -> float:
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def no_sync(self, net: nn.Module):
        return self.accelerator.no_sync(net)

    def backward(self, loss, key, net, num_micro):
        self.accelerator.backward(loss / num_micro)

    def step(self, key):
        if self._nonfinite(key):
            return
        self.opts[key].step()  # an AcceleratedOptimizer: unscales, skips inf steps, updates the scale

    def state_dict(self) -> dict:
        scaler = self.accelerator.scaler
        return {"scaler": scaler.state_dict() if scaler is not None else {},
                "opt_G": self.opts["G"].state_dict(), "opt_D": self.opts["D"].state_dict()}

    def load_state_dict(self, state, directory=None):
        if state["scaler"] and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.opts["G"].load_state_dict(state["opt_G"])
        self.opts["D"].load_state_dict(state["opt_D"])


class DeepSpeedStrategy(LocalStrategy):
    """One DeepSpeed engine each for G and D (ZeRO stage 0-2). Engines own the optimizer step and
    gradient accumulation (``engine.step()`` after every micro-batch updates at the boundary)."""

    wrapped = True

    def __init__(self, precision: Precision, cfg: DistributedConfig, micro_batch: int, num_micro: int, world_size: int):
        super().__init__(precision)
        self.ds_config = deepspeed_config(cfg, precision.name, micro_batch, num_micro, world_size)
        self.engines: dict[str, nn.Module] = {}

    def prepare(self, G, D, opt_G, opt_D):
        import deepspeed

        for key, net, opt in (("G", G, opt_G), ("D", D, opt_D)):
            scalars = [n for n, p in net.named_parameters() if p.dim() == 0]
            if scalars:
                raise ValueError(f"{key} has 0-dim parameters {scalars[:5]}: DeepSpeed cannot broadcast them; "
                                 f"give them shape [1] in the architecture")
            engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=dict(self.ds_config),
                                                   dist_init_required=False)
            self.engines[key] = engine
        self.nets = (self.engines["G"], self.engines["D"])
        return self.nets

    def unwrap(self, net):
        return net.module if hasattr(net, "module") else net

    @property
    def loss_scale(self) -> float:
        return 1.0  # fp16 under DeepSpeed scales inside the engine; R1's inner gradient is fp32-safe here

    def zero_grad(self, key):
        pass  # the engine zeroes after each optimizer step

    def backward(self, loss, key, net, num_micro):
        engine = self.engines[key]
        engine.backward(loss)  # divides by gradient_accumulation_steps itself
        engine.step()  # a no-op except at the accumulation boundary

    def step(self, key):
        pass

    def lr(self, key):
        return self.engines[key].optimizer.param_groups[0]["lr"]

    def set_lr(self, key, lr):
        for group in self.engines[key].optimizer.param_groups:
            group["lr"] = lr

    def reset_optimizer(self, key):
        raise NotImplementedError("DeepSpeed shards the optimizer state; resetting it is not supported "
                                  "(progressive growing runs with distributed.strategy single or ddp)")

    def state_dict(self) -> dict:
        return {}  # optimizer states are sharded across ranks: see save_sharded

    def save_sharded(self, directory: Path) -> None:
        for key, engine in self.engines.items():
            engine.save_checkpoint(str(directory / f"deepspeed_{key}"), tag="state", save_latest=False)

    def load_state_dict(self, state, directory=None):
        if directory is None:
            raise ValueError("a DeepSpeed strategy restores from a checkpoint directory")
        for key, engine in self.engines.items():
            path, _ = engine.load_checkpoint(str(directory / f"deepspeed_{key}"), tag="state")
            if path is None:
                raise FileNotFoundError(f"{directory / f'deepspeed_{key}'} holds no DeepSpeed state (tag 'state'): "
                                        f"was this checkpoint written with distributed.strategy: deepspeed?")


def deepspeed_config(cfg: DistributedConfig, precision: str, micro_batch: int, num_micro: int, world_size: int) -> dict:
    """The DeepSpeed config file with batch sizes, accumulation and precision filled in from the job."""
    import json

    import yaml

    path = Path(cfg.deepspeed_config)
    if not path.exists():
        raise FileNotFoundError(f"distributed.deepspeed_config: {path} does not exist (see configs/deepspeed/)")
    text = path.read_text()
    ds = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    ds.update({"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": num_micro,
               "train_batch_size": micro_batch * num_micro * world_size})
    if cfg.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.zero_stage
    # Weights stay fp32 (master copies); forward passes run under torch autocast, as in the other strategies.
    ds["torch_autocast"] = {"enabled": precision != "fp32",
                            "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]}
    ds.setdefault("steps_per_print", 10**9)
    return ds


def make_strategy(cfg: DistributedConfig, precision_name: str, device: torch.device, micro_batch: int,
                  num_micro: int, world_size: int):
    """The strategy object for ``cfg.strategy``."""
    precision = make_precision(precision_name, device)
    if cfg.strategy == "single":
        return LocalStrategy(precision)
    if cfg.strategy == "ddp":
        return DDPStrategy(precision, cfg)
    return DeepSpeedStrategy(precision, cfg, micro_batch, num_micro, world_size)
