"""DeepSpeed ZeRO (stages 0-2): one engine per trained network, each owning its optimizer step and its
gradient accumulation (``engine.step()`` after every micro-batch updates at the accumulation boundary)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import yaml

from orchestrator.dist.strategy import DistributedConfig, set_lr
from orchestrator.precision import Precision


class DeepSpeedStrategy:
    """The :class:`~orchestrator.dist.strategy.Strategy` of DeepSpeed workers. Optimizer states are sharded
    across ranks: every rank writes its part (:meth:`save_sharded`). A phase steps one network (an engine
    owns one optimizer); non-finite updates are the engine's business, not skipped here."""

    wrapped = True
    sharded = True

    def __init__(self, precision: Precision, own_dtype: set[str], ds_config: dict):
        self.precision, self.own_dtype, self.ds_config = precision, set(own_dtype), ds_config
        self.fp32 = False
        self.engines: dict[str, nn.Module] = {}

    def prepare(self, nets, optimizers):
        import deepspeed

        for name, net in nets.items():
            scalars = [n for n, p in net.named_parameters() if p.dim() == 0]
            if scalars:
                raise ValueError(
                    f"{name} has 0-dim parameters {scalars[:5]}: DeepSpeed cannot broadcast them; "
                    f"give them shape [1] in the architecture"
                )
            if name in self.own_dtype:
                self.precision.adopt(net)
            engine, _, _, _ = deepspeed.initialize(
                model=net, optimizer=optimizers[name], config=dict(self.ds_config), dist_init_required=False
            )
            self.engines[name] = engine
        return dict(self.engines)

    def unwrap(self, name: str) -> nn.Module:
        return self.engines[name].module

    def autocast(self, name: str):
        return contextlib.nullcontext() if self.fp32 else self.precision.autocast(name in self.own_dtype)

    @property
    def loss_scale(self) -> float:
        return 1.0  # fp16 under DeepSpeed scales inside the engine; R1's inner gradient is fp32-safe here

    def zero_grad(self, name: str) -> None:
        pass  # the engine zeroes after each optimizer step

    def sync(self, names: Sequence[str], last: bool):
        return contextlib.nullcontext()  # the engine reduces at its accumulation boundary

    def backward(self, loss: torch.Tensor, names: Sequence[str], num_micro: int) -> None:
        if len(names) != 1:
            raise ValueError(f"a DeepSpeed phase steps one network (one engine), this one steps {list(names)}")
        engine = self.engines[names[0]]
        engine.backward(loss)  # divides by gradient_accumulation_steps itself
        engine.step()  # a no-op except at the accumulation boundary

    def step(self, name: str) -> bool:
        return True  # the engine stepped at the last micro-batch's backward

    def optimizer(self, name: str) -> None:
        return None  # ZeRO partitions the optimizer state across ranks

    def lr(self, name: str) -> float:
        return self.engines[name].optimizer.param_groups[0]["lr"]

    def set_lr(self, name: str, lr: float) -> None:
        set_lr(self.engines[name].optimizer, lr)

    def reset_optimizer(self, name: str) -> None:
        raise NotImplementedError(
            "DeepSpeed shards the optimizer state; resetting it is not supported "
            "(progressive growing runs with distributed.strategy single or ddp)"
        )

    def use_fp32(self) -> None:
        self.fp32 = True
        for name in self.own_dtype & set(self.engines):
            self.unwrap(name).reduced_dtype = None

    def state_dict(self) -> dict:
        return {}

    def save_sharded(self, directory: Path) -> None:
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(directory / f"deepspeed_{name}"), tag="state", save_latest=False)

    def load_state_dict(self, state: dict, directory: Path) -> None:
        for name, engine in self.engines.items():
            path, _ = engine.load_checkpoint(str(directory / f"deepspeed_{name}"), tag="state")
            if path is None:
                raise FileNotFoundError(
                    f"{directory / f'deepspeed_{name}'} holds no DeepSpeed state (tag 'state'): "
                    f"was this checkpoint written with distributed.strategy: deepspeed?"
                )


def deepspeed_config(cfg: DistributedConfig, precision: str, micro_batch: int, num_micro: int, world_size: int) -> dict:
    """The DeepSpeed config file with batch sizes, accumulation and precision filled in from the job."""
    path = Path(cfg.deepspeed_config)
    if not path.exists():
        raise FileNotFoundError(f"distributed.deepspeed_config: {path} does not exist (see configs/deepspeed/)")
    text = path.read_text()
    ds = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    ds.update(
        {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": num_micro,
            "train_batch_size": micro_batch * num_micro * world_size,
        }
    )
    if cfg.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.zero_stage
    # Weights stay fp32 (master copies); forward passes run under torch autocast, as in the other strategies.
    ds["torch_autocast"] = {
        "enabled": precision != "fp32",
        "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision],
    }
    ds.setdefault("steps_per_print", 10**9)
    return ds
