"""A probe for tests of data-parallel training: what each optimizer step applies, and how often DDP syncs.

Adam ignores a uniform scale of its gradients, so weights alone cannot tell an average across workers
from a sum, or a gradient divided by the number of micro-batches from one that is not. The probe records
the gradient every optimizer step applies (a global ``torch.optim`` step pre-hook, so the gradient is taken
after DDP's all-reduce and DeepSpeed's reduce-scatter, just before the update), the network it belongs to,
the real images each batch held (their sample keys), and how many gradient synchronisations each DDP
network ran (a counting all-reduce comm hook: one count per backward pass that synchronised).

In-process: ``with probe() as record: ...``. As a torchrun worker::

    torchrun --nproc_per_node 2 tests/gradient_probe.py OUT_DIR CONFIG [launch.worker arguments]

runs ``launch.worker`` and writes ``OUT_DIR/probe-rank<R>.pt``. Under DeepSpeed ZeRO each rank's gradient
is its partition of the flattened parameters; :func:`zero_gradients` puts the ranks' parts together.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def probe() -> Iterator[dict]:
    """Record, while inside, ``{"grads": [(network, flat gradient), ...], "keys": [[sample keys], ...],
    "syncs": Counter(network: synchronised backward passes)}`` (one gradient per optimizer step, in order)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from orchestrator.data.shards import ShardLoader
    from orchestrator.dist.ddp import DDPStrategy
    from orchestrator.dist.deepspeed import DeepSpeedStrategy
    from orchestrator.dist.local import LocalStrategy
    from orchestrator.train.run import Run

    record: dict = {"grads": [], "keys": [], "syncs": Counter()}
    names: dict[int, str] = {}  # id of a torch optimizer → the network it trains

    def pre_step(opt, args, kwargs):
        grads = [
            p.grad.detach().float().flatten() if p.grad is not None else torch.zeros(p.numel())
            for group in opt.param_groups
            for p in group["params"]
        ]
        record["grads"].append((names.get(id(opt), "?"), torch.cat(grads).cpu().clone()))

    def counting_hook(name: str):
        def hook(state, bucket):
            if bucket.index() == 0:  # one count per synchronised backward pass, however many buckets
                record["syncs"][name] += 1
            return allreduce_hook(None, bucket)  # DDP's own averaging all-reduce

        return hook

    def naming(cls):
        original = cls.prepare

        def prepare(self, nets, optimizers):
            names.update({id(opt): name for name, opt in optimizers.items()})
            wrapped = original(self, nets, optimizers)
            if cls is DDPStrategy:
                for name, module in wrapped.items():
                    module.register_comm_hook(None, counting_hook(name))
            return wrapped

        return original, prepare

    next_batch, build_recipe = ShardLoader.next, Run._build_recipe

    def recording_next(self):
        batch = next_batch(self)
        if getattr(self, "probed", False):  # the training data, not the real images of grids and evaluation
            record["keys"].append(list(batch.keys))
        return batch

    def marking_build(self, *args, **kwargs):
        build_recipe(self, *args, **kwargs)
        self.loader.probed = True

    patched = {cls: naming(cls) for cls in (LocalStrategy, DDPStrategy, DeepSpeedStrategy)}
    for cls, (_, prepare) in patched.items():
        cls.prepare = prepare
    ShardLoader.next, Run._build_recipe = recording_next, marking_build
    handle = register_optimizer_step_pre_hook(pre_step)
    try:
        yield record
    finally:
        handle.remove()
        ShardLoader.next, Run._build_recipe = next_batch, build_recipe
        for cls, (original, _) in patched.items():
            cls.prepare = original


def zero_gradients(parts: list[list[tuple[str, torch.Tensor]]], numel: list[int]) -> list[tuple[str, torch.Tensor]]:
    """The whole gradient of each step from the ranks' ZeRO partitions (``parts[rank]``, rank order), cut to
    the ``numel`` of each step's network; the padding beyond must be zero."""
    out = []
    for step, n in zip(zip(*parts), numel):
        names = {name for name, _ in step}
        assert len(names) == 1, f"the ranks stepped different networks at once: {names}"
        flat = torch.cat([g for _, g in step])
        assert flat.numel() >= n and not flat[n:].any(), "ZeRO partitions hold more than padding beyond the params"
        out.append((step[0][0], flat[:n]))
    return out


def main(argv: list[str]) -> int:
    """Run ``launch.worker`` with ``argv[1:]`` under the probe; write the record to ``argv[0]``."""
    sys.path.insert(0, str(ROOT))
    from launch.worker import main as worker

    out = Path(argv[0])
    with probe() as record:
        code = worker(argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    torch.save({**record, "syncs": dict(record["syncs"])}, out / f"probe-rank{os.environ.get('RANK', '0')}.pt")
    return code


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from launch.worker import exit_now

    exit_now(main(sys.argv[1:]))
