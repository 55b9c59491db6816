# The commands the README names. `make up` starts the suite; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: up test test-fast system-deps protos lint train-classifier triton-venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Serving only (no torch): what `make up` needs.
$(VENV)/.installed-serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[serve]'
	touch $@

# Everything: serving, training (torch) and the test tools.
$(VENV)/.installed-all: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[serve,train,dev]'
	touch $@ $(VENV)/.installed-serve

up: $(VENV)/.installed-serve
	$(BIN)/nnserve up

test: system-deps $(VENV)/.installed-all triton-venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Triton's client and perf_analyzer need protobuf<7, so they get a venv of their own.
TRITON_VENV ?= .venv-triton
triton-venv: $(TRITON_VENV)/.installed
$(TRITON_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q "tritonclient[grpc]==2.50.0" "protobuf<7" numpy nvidia-cuda-runtime-cu12
	touch $@

test-fast: $(VENV)/.installed-all
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

system-deps:
	@bash scripts/system-deps.sh

protos: $(VENV)/.installed-all
	$(BIN)/python tools/gen_protos.py

lint: $(VENV)/.installed-all
	$(BIN)/ruff check services training tests tools scripts benchmarks
	$(BIN)/mypy services

train-classifier: system-deps $(VENV)/.installed-all
	$(BIN)/python -m training.train_classifier --epochs 15 --seed 0 --out models/classifier/1

clean:
	rm -rf $(VENV) $(TRITON_VENV) runs .pytest_cache .mypy_cache .ruff_cache
