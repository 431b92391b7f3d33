"""One process: autocast and an fp16 GradScaler from :class:`~orchestrator.precision.Precision`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from orchestrator.dist.strategy import Optimizers
from orchestrator.precision import Precision


class LocalStrategy:
    """The :class:`~orchestrator.dist.strategy.Strategy` of a single process: nothing to synchronise."""

    wrapped = False
    sharded = False

    def __init__(self, precision: Precision, own_dtype: set[str], skip_nonfinite: bool):
        self.precision, self.own_dtype, self.skip_nonfinite = precision, set(own_dtype), skip_nonfinite
        self.fp32 = False
        self.nets: dict[str, nn.Module] = {}
        self.opts = Optimizers({}, skip_nonfinite)

    def prepare(self, nets, optimizers):
        self.nets, self.opts = dict(nets), Optimizers(optimizers, self.skip_nonfinite)
        for name in self.own_dtype & set(self.nets):
            self.precision.adopt(self.nets[name])
        return dict(self.nets)

    def unwrap(self, name: str) -> nn.Module:
        return self.nets[name]

    def autocast(self, name: str):
        return contextlib.nullcontext() if self.fp32 else self.precision.autocast(name in self.own_dtype)

    @property
    def loss_scale(self) -> float:
        return self.precision.loss_scale

    def zero_grad(self, name: str) -> None:
        self.opts.zero_grad(name)

    def sync(self, names: Sequence[str], last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, names: Sequence[str], num_micro: int) -> None:
        self.precision.scaler.scale(loss / num_micro).backward()

    def step(self, name: str) -> bool:
        if self.opts.skip(name):
            return False
        self.precision.scaler.step(self.opts.by_name[name])
        self.precision.scaler.update()
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
        return {"scaler": self.precision.scaler.state_dict(), **self.opts.state_dict()}

    def load_state_dict(self, state: dict, directory: Path) -> None:
        if state["scaler"]:
            self.precision.scaler.load_state_dict(state["scaler"])
        self.opts.load_state_dict(state)

    def save_sharded(self, directory: Path) -> None:
        pass
