# ganforge: every target works on a fresh clone; the first one creates .venv and installs into it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch/torchvision: the pair these CPU machines carry from local disk (see constraints.txt); on a GPU box
# override TORCH_PKGS, e.g. make install TORCH_PKGS="torch torchvision".
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
export DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,cpu)
export WANDB_SILENT = true

.PHONY: install demo demo-stylegan2 demo-stylegan demo-progan demo-pix2pix demo-cyclegan demo-srgan test test-fast test-faults lint format mutants bench bench-modes bench-multinode clean

$(BIN)/ganforge: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PKGS)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/ganforge

data/digits32/manifest.json: | $(BIN)/ganforge
	$(BIN)/ganforge data shards builtin:digits data/digits32 --resolution 32 --shard-size 256

data/digits32/dataset-cnn.pt: data/digits32/manifest.json
	$(BIN)/ganforge extractor train --data 'data/digits32/train-*.tar' --holdout 'data/digits32/holdout-*.tar' --out $@

demo: data/digits32/dataset-cnn.pt
	$(BIN)/ganforge train configs/dev/dcgan-digits.yaml --run-dir runs/demo-dcgan-digits --resume auto

data/digits16/manifest.json: | $(BIN)/ganforge
	$(BIN)/ganforge data shards builtin:digits data/digits16 --resolution 16 --shard-size 128

demo-stylegan2: data/digits16/manifest.json
	$(BIN)/ganforge train configs/stylegan2/dev.yaml --run-dir runs/demo-stylegan2 --resume auto

demo-progan: data/digits16/manifest.json
	$(BIN)/ganforge train configs/progan/dev.yaml --run-dir runs/demo-progan --resume auto

demo-stylegan: data/digits16/manifest.json
	$(BIN)/ganforge train configs/stylegan/dev.yaml --run-dir runs/demo-stylegan --resume auto

data/edges2digits/manifest.json: | $(BIN)/ganforge
	$(BIN)/ganforge data pairs builtin:digits-edges builtin:digits data/edges2digits --resolution 32 --shard-size 256

demo-pix2pix: data/edges2digits/manifest.json data/digits32/dataset-cnn.pt
	$(BIN)/ganforge train configs/pix2pix/edges2digits.yaml --run-dir runs/demo-pix2pix --resume auto

data/digits2digitsm/manifest.json: | $(BIN)/ganforge
	$(BIN)/ganforge data unpaired builtin:digits builtin:digits-m data/digits2digitsm --resolution 32 --shard-size 128

data/digitsm32/manifest.json: | $(BIN)/ganforge
	$(BIN)/ganforge data shards builtin:digits-m data/digitsm32 --resolution 32 --shard-size 256

data/digitsm32/dataset-cnn.pt: data/digitsm32/manifest.json
	$(BIN)/ganforge extractor train --data 'data/digitsm32/train-*.tar' --holdout 'data/digitsm32/holdout-*.tar' --epochs 30 --out $@

demo-cyclegan: data/digits2digitsm/manifest.json data/digits32/dataset-cnn.pt data/digitsm32/dataset-cnn.pt
	$(BIN)/ganforge train configs/cyclegan/digits2digitsm.yaml --run-dir runs/demo-cyclegan --resume auto

data/photos-sr/manifest.json: | $(BIN)/ganforge
	$(BIN)/ganforge data superres builtin:photos data/photos-sr --resolution 256 --crop 64 --scale 4 --holdout 0.25

demo-srgan: data/photos-sr/manifest.json
	$(BIN)/ganforge train configs/srgan/photos-x4.yaml --run-dir runs/demo-srgan --resume auto

test: $(BIN)/ganforge
	$(BIN)/python -m pytest

test-fast: $(BIN)/ganforge
	$(BIN)/python -m pytest -m "not slow"

test-faults: $(BIN)/ganforge
	$(BIN)/python -m pytest -m faults tests/faults

# ruff (lint with complexity limits, and formatting) and import-linter (the layer contracts of pyproject.toml)
lint: $(BIN)/ganforge
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(BIN)/ganforge
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Remove each protection in a temporary copy of the tree and check that its tests fail (docs/reliability.md).
mutants: $(BIN)/ganforge
	$(BIN)/python tests/mutants.py

bench: $(BIN)/ganforge
	$(BIN)/python -m benchmarks.run

# Mode coverage on stacked digits (issue 18): writes data/stacked-digits and its digit classifier when missing, then
# trains every variant with seeds 0 1 2, two runs at a time; e.g. BENCH_MODES_ARGS="--variants dcgan --seeds 0".
bench-modes: $(BIN)/ganforge data/digits16/manifest.json
	$(BIN)/python -m benchmarks.modes $(BENCH_MODES_ARGS)

# Cross-host against single-host step time of the same Ray job on three namespace hosts (issue 19; needs root).
bench-multinode: $(BIN)/ganforge
	$(BIN)/python -m benchmarks.multinode $(BENCH_MULTINODE_ARGS)

clean:
	rm -rf runs data/digits32 data/digits16 data/stacked-digits .pytest_cache
