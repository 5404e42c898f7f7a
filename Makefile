# Two entry points on a fresh machine: `make demo` (the main job, offline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIP_ARGS ?=

.PHONY: install lint demo test test-all bench-quality bench-speed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, so nothing below pulls another build; from stock PyPI on Linux, the CPU build needs
	# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
	$(BIN)/python -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e ".[test,demo]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m hf_attn_distill.recipes.sst2_demo

lint: install
	$(BIN)/ruff check hf_attn_distill tests benchmarks docs
	$(BIN)/ruff format --check hf_attn_distill tests benchmarks docs

test: install lint
	$(BIN)/python -m pytest -m "not very_slow"

test-all: install
	$(BIN)/python -m pytest

bench-quality: install
	$(BIN)/python -m benchmarks.quality.sst2

bench-speed: install
	$(BIN)/python -m benchmarks.speed.step
