"""DistributedDataParallel through Accelerate, which also places the networks on the device and owns
mixed precision (autocast) and fp16 loss scaling."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from orchestrator.dist.strategy import DistributedConfig, Optimizers
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
        ddp = DistributedDataParallelKwargs(
            find_unused_parameters=cfg.find_unused_parameters, broadcast_buffers=cfg.broadcast_buffers
        )
        self.accelerator = Accelerator(mixed_precision=mp, cpu=precision.device.type == "cpu", kwargs_handlers=[ddp])
        self.nets: dict[str, nn.Module] = {}
        self.opts = Optimizers({}, skip_nonfinite)

    def prepare(self, nets, optimizers):
        names = list(nets)
        for name in self.own_dtype & set(names):
            self.precision.adopt(nets[name])
        prepared = self.accelerator.prepare(*(nets[n] for n in names), *(optimizers[n] for n in names))
        self.nets = dict(zip(names, prepared[: len(names)]))
        self.opts = Optimizers(dict(zip(names, prepared[len(names) :])), self.skip_nonfinite)
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
        self.opts.zero_grad(name)

    def sync(self, names: Sequence[str], last: bool):
        stack = contextlib.ExitStack()
        if not last:
            for name in names:
                stack.enter_context(self.accelerator.no_sync(self.nets[name]))
        return stack

    def backward(self, loss: torch.Tensor, names: Sequence[str], num_micro: int) -> None:
        self.accelerator.backward(loss / num_micro)

    def step(self, name: str) -> bool:
        if self.opts.skip(name):
            return False
        self.opts.by_name[name].step()  # an AcceleratedOptimizer: unscales, skips inf steps, updates the scale
        return True

    def optimizer(self, name: str) -> torch.optim.Optimizer:
        return self.opts.by_name[name]

    def lr(self, name: str) -> float:
        return self.opts.lr(name)

    def set_lr(self, name: str, lr: float) -> None:
        self.opts.set_lr(name, lr)

    def reset_optimizer(self, name: str) -> None:
        self.opts.reset(name)

    def use_fp32(self) -> None:
        self.fp32 = True
        for name in self.own_dtype & set(self.nets):
            self.unwrap(name).reduced_dtype = None

    def state_dict(self) -> dict:
        scaler = self.accelerator.scaler
        return {"scaler": scaler.state_dict() if scaler is not None else {}, **self.opts.state_dict()}

    def load_state_dict(self, state: dict, directory: Path) -> None:
        if state["scaler"] and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.opts.load_state_dict(state)

    def save_sharded(self, directory: Path) -> None:
        pass
