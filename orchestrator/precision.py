"""Numeric precision of the training step: fp32, bf16 autocast, or fp16 autocast with loss scaling.

On CUDA, bf16/fp16 are the fast path. On this project's CPUs they run 50-70× slower than fp32, so
fp32 is the CPU default and reduced precision on CPU is for tests with tiny models. Networks that
choose their own per-block precision (StyleGAN2's ``num_fp16_res``) expose ``reduced_dtype``; they
(declared by their family's ``Capabilities.reduced_dtype``) get that attribute set instead of running under
autocast, as the official code does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

PrecisionName = Literal["fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """Autocast and loss scaling for one device; ``scaler`` is a GradScaler (disabled unless fp16)."""

    name: PrecisionName
    device: torch.device
    scaler: torch.amp.GradScaler

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self, own_dtype: bool = False):
        """Autocast for a forward pass; none for fp32 or for a net that picks its own per-block dtype."""
        if self.name == "fp32" or own_dtype:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def adopt(self, net: nn.Module) -> None:
        """Tell a network with per-block precision (``reduced_dtype``) which reduced dtype to use (None for fp32)."""
        net.reduced_dtype = None if self.name == "fp32" else self.dtype

    @property
    def loss_scale(self) -> float:
        """The current fp16 loss scale (1.0 when not scaling)."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0


def make_precision(name: PrecisionName, device: torch.device) -> Precision:
    """A :class:`Precision` for ``device``; loss scaling is on exactly when ``name`` is fp16."""
    return Precision(name, device, torch.amp.GradScaler(device.type, enabled=(name == "fp16")))
