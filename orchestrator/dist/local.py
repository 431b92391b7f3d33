"""One process: autocast and an fp16 GradScaler from :class:`~orchestrator.precision.Precision`."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from orchestrator.dist.strategy import nonfinite, set_lr
from orchestrator.precision import Precision


class LocalStrategy:
    """The :class:`~orchestrator.dist.strategy.Strategy` of a single process: nothing to synchronise."""

    wrapped = False
    sharded = False

    def __init__(self, precision: Precision, own_dtype: set[str], skip_nonfinite: bool):
        self.precision, self.own_dtype, self.skip_nonfinite = precision, set(own_dtype), skip_nonfinite
        self.fp32 = False
        self.nets: dict[str, nn.Module] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}

    def prepare(self, nets, optimizers):
        self.nets, self.opts = dict(nets), dict(optimizers)
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
        self.opts[name].zero_grad(set_to_none=True)

    def sync(self, names: Sequence[str], last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, names: Sequence[str], num_micro: int) -> None:
        self.precision.scaler.scale(loss / num_micro).backward()

    def step(self, name: str) -> bool:
        if self.skip_nonfinite and nonfinite(self.opts[name]):
            self.zero_grad(name)
            return False
        self.precision.scaler.step(self.opts[name])
        self.precision.scaler.update()
        return True

    def lr(self, name: str) -> float:
        return self.opts[name].param_groups[0]["lr"]

    def set_lr(self, name: str, lr: float) -> None:
        set_lr(self.opts[name], lr)

    def reset_optimizer(self, name: str) -> None:
        self.opts[name].state.clear()

    def use_fp32(self) -> None:
        self.fp32 = True
        for name in self.own_dtype & set(self.nets):
            self.unwrap(name).reduced_dtype = None

    def state_dict(self) -> dict:
        return {"scaler": self.precision.scaler.state_dict(),
                **{name: opt.state_dict() for name, opt in self.opts.items()}}

    def load_state_dict(self, state: dict, directory: Path) -> None:
        if state["scaler"]:
            self.precision.scaler.load_state_dict(state["scaler"])
        for name, opt in self.opts.items():
            opt.load_state_dict(state[name])

    def save_sharded(self, directory: Path) -> None:
        pass
