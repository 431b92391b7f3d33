"""DistributedDataParallel through Accelerate, which also places the networks on the device and owns
mixed precision (autocast) and fp16 loss scaling."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from orchestrator.dist.strategy import DistributedConfig, nonfinite, set_lr
from orchestrator.precision import Precision


class DDPStrategy:
    """The :class:`~orchestrator.dist.strategy.Strategy` of DDP workers: gradients are averaged across
    workers at the backward of the last micro-batch (``sync``)."""

    wrapped = True
    sharded = False

    def __init__(self, precision: Precision, own_dtype: set[str], skip_nonfinite: bool, cfg: DistributedConfig):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.precision, self.own_dtype, self.skip_nonfinite = precision, set(own_dtype), skip_nonfinite
        self.fp32 = False
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision.name]
        ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters, broadcast_buffers=True)
        self.accelerator = Accelerator(mixed_precision=mp, cpu=precision.device.type == "cpu", kwargs_handlers=[ddp])
        self.nets: dict[str, nn.Module] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}

    def prepare(self, nets, optimizers):
        names = list(nets)
        for name in self.own_dtype & set(names):
            self.precision.adopt(nets[name])
        prepared = self.accelerator.prepare(*(nets[n] for n in names), *(optimizers[n] for n in names))
        self.nets = dict(zip(names, prepared[:len(names)]))
        self.opts = dict(zip(names, prepared[len(names):]))
        return dict(self.nets)

    def unwrap(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(self.nets[name])

    def autocast(self, name: str):
        if self.fp32 or name in self.own_dtype:
            return contextlib.nullcontext()
        return self.accelerator.autocast()

    @property
    def loss_scale(self) -> float:
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def zero_grad(self, name: str) -> None:
        self.opts[name].zero_grad(set_to_none=True)

    def sync(self, names: Sequence[str], last: bool):
        stack = contextlib.ExitStack()
        if not last:
            for name in names:
                stack.enter_context(self.accelerator.no_sync(self.nets[name]))
        return stack

    def backward(self, loss: torch.Tensor, names: Sequence[str], num_micro: int) -> None:
        self.accelerator.backward(loss / num_micro)

    def step(self, name: str) -> bool:
        if self.skip_nonfinite and nonfinite(self.opts[name]):
            self.zero_grad(name)
            return False
        self.opts[name].step()  # an AcceleratedOptimizer: unscales, skips inf steps, updates the scale
        return True

    def lr(self, name: str) -> float:
        return self.opts[name].param_groups[0]["lr"]

    def set_lr(self, name: str, lr: float) -> None:
        set_lr(self.opts[name], lr)

    def reset_optimizer(self, name: str) -> None:
        self.opts[name].optimizer.state.clear()

    def use_fp32(self) -> None:
        self.fp32 = True
        for name in self.own_dtype & set(self.nets):
            self.unwrap(name).reduced_dtype = None

    def state_dict(self) -> dict:
        scaler = self.accelerator.scaler
        return {"scaler": scaler.state_dict() if scaler is not None else {},
                **{name: opt.state_dict() for name, opt in self.opts.items()}}

    def load_state_dict(self, state: dict, directory: Path) -> None:
        if state["scaler"] and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        for name, opt in self.opts.items():
            opt.load_state_dict(state[name])

    def save_sharded(self, directory: Path) -> None:
        pass
