# Two entry points on a fresh machine: `make demo` (the main job, offline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-all bench-quality bench-speed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU wheel first, so nothing below pulls the CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,demo]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python recipes/sst2_demo.py

test: install
	$(BIN)/python -m pytest -m "not very_slow"

test-all: install
	$(BIN)/python -m pytest

bench-quality: install
	$(BIN)/python benchmarks/quality_sst2.py

bench-speed: install
	$(BIN)/python benchmarks/speed.py
