"""One training worker of a multi-process launcher without Ray (torchrun, accelerate launch).

    torchrun --nproc_per_node 2 -m launch.worker CONFIG [--set k=v]... [--run-dir DIR] [--resume auto|PATH]
    accelerate launch -m launch.worker CONFIG ...

Reads RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT) from the launcher, joins the process group
(NCCL on GPUs, gloo on CPU) and runs the same loop as dev mode and Ray Train workers.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launch.worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--run-dir")
    p.add_argument("--resume", default="auto", metavar="auto|PATH")
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from orchestrator.config import load_config
    from orchestrator.train.run import WorkerContext, train

    cfg = load_config(a.config, a.set)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = WorkerContext(
        rank=int(os.environ.get("RANK", "0")), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.train.device != "cpu" else "gloo")
    try:
        result = train(cfg, Path(a.run_dir or Path("runs") / Path(a.config).stem), resume=a.resume, ctx=ctx)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if ctx.rank == 0:
        print(f"finished at step {result.step}; checkpoint: {result.checkpoint}", flush=True)
    return 0


def exit_now(code: int) -> None:
    """End the process without interpreter finalization, once everything is written and closed.

    A gloo worker thread may still hold the last reference to a tensor of the last collective call when
    Python finalizes; dropping it then needs the GIL, and the thread aborts the whole process (SIGABRT,
    "terminate called without an active exception"; pytorch/pytorch#179291), now and then on a busy machine,
    after a run that succeeded. Unreachable objects are collected first, while the interpreter is alive."""
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
