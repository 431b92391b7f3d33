#!/usr/bin/env bash
# StyleGAN2 on one GPU: seconds per kimg and peak GPU memory of configs/stylegan2/paper256.yaml (batch 64) and
# configs/stylegan2/config-f-1024.yaml (batch 32), eager and with train.compile, through the real training Run
# on synthetic shards; under 8 minutes on one H200. A markdown table on stdout, and in $OUT/gpu.md if OUT is set.
# From the repository root, after `make install` (or `pip install -e .`):
#     bash benchmarks/gpu.sh
#     GF_GPU_BENCH_DRY=1 bash benchmarks/gpu.sh     # the same code on CPU at a tiny size (the test's way)
# PYTHON picks the interpreter (default: .venv/bin/python if there, else python3). benchmarks/gpu.py has the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export WANDB_MODE=disabled WANDB_SILENT=true PYTHONUNBUFFERED=1
if [ "${GF_GPU_BENCH_DRY:-0}" != 0 ]; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
# benchmarks/gpu.py keeps its own 430 s budget; this is the backstop that holds the 8 minutes
exec timeout -k 5 470 "$PYTHON" -m benchmarks.gpu "$@"
