# Each target creates .venv when missing and installs the package (with dev extras) under the CPU torch pin.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test bench gpu-check install clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints-cpu.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/hubunlearn quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/hubunlearn bench run --data ../shared/data/tofu --readme README.md

# On a GPU machine, offline: every method full and LoRA with and without gradient checkpointing, ECO, an eval and the
# Space's generation on a bf16 TOFU-mini; writes benchmarks/results/gpu_check.json. It needs a CUDA build of torch, so it
# runs with GPU_PYTHON (default: the python on PATH), not the CPU-pinned .venv; TOFU_DATA is the folder of TOFU's files.
GPU_PYTHON ?= python3
TOFU_DATA ?= ../shared/data/tofu
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --data $(TOFU_DATA)

clean:
	rm -rf $(VENV) quickstart-output
