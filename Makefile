# The commands the README names. `make up` starts the suite; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: up test fuzz test-fast system-deps protos lint train-classifier train-autoencoder train-gan train-diffusion \
	triton-venv bench bench-venvs images e2e-docker e2e-swarm k8s-check clean constraints

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Serving only (no torch): what `make up` needs.
$(VENV)/.installed-serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[serve]'
	touch $@

# Everything: serving, training (torch) and the test tools.
$(VENV)/.installed-all: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[serve,train,dev,tracing]'
	touch $@ $(VENV)/.installed-serve

up: $(VENV)/.installed-serve
	$(BIN)/nnserve up

test: system-deps $(VENV)/.installed-all triton-venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Triton's client and perf_analyzer need protobuf<7, so they get a venv of their own.
TRITON_VENV ?= .venv-triton
triton-venv: $(TRITON_VENV)/.installed-http
$(TRITON_VENV)/.installed-http:
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q "tritonclient[grpc,http]==2.50.0" "protobuf<7" numpy nvidia-cuda-runtime-cu12
	touch $@

# Every fuzz test at 10,000 cases (CI runs it as its own step; `make test` runs 500).
fuzz: $(VENV)/.installed-all
	NNSERVE_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest -q tests/test_fuzz.py

test-fast: $(VENV)/.installed-all
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

system-deps:
	@bash scripts/system-deps.sh

protos: $(VENV)/.installed-all
	$(BIN)/python tools/gen_protos.py

# Re-pin constraints/serve.txt (what the serving image installs) from the package index.
constraints: $(VENV)/.installed-serve
	$(BIN)/python scripts/lock_serve.py

lint: $(VENV)/.installed-all
	$(BIN)/ruff check services training tests tools scripts benchmarks
	$(BIN)/mypy services

train-classifier: system-deps $(VENV)/.installed-all
	$(BIN)/python -m training.train_classifier --epochs 15 --seed 0 --out models/classifier/1

train-autoencoder: system-deps $(VENV)/.installed-all
	$(BIN)/python -m training.train_autoencoder --epochs 6 --threads 1 --seed 0 --widths 24 48 64 --kind-weights 1 3 1 1 1 --out models/autoencoder/1

train-gan: system-deps $(VENV)/.installed-all
	# Version 2: the shipped weights are the state of this run after its 9th epoch (see its card); about 75 minutes on one core.
	$(BIN)/python -m training.train_gan --epochs 9 --threads 1 --seed 0 --mode-seeking 0.25 --bn-recalibrate 50 \
		--compare-with models/gan_generator/1 --out models/gan_generator/2

train-diffusion: system-deps $(VENV)/.installed-all
	$(BIN)/python -m training.train_diffusion --widths 16 32 64 --epochs 60 --max-minutes 80 --seed 0 \
		--out models/diffusion_denoiser/1

# Peer servers for the benchmark suite, each in its own venv.
bench-venvs: .venv-mlserver/.installed .venv-kserve/.installed
.venv-mlserver/.installed:
	$(PYTHON) -m venv .venv-mlserver
	.venv-mlserver/bin/pip install -q mlserver onnxruntime numpy
	touch $@
.venv-kserve/.installed:
	$(PYTHON) -m venv .venv-kserve
	.venv-kserve/bin/pip install -q kserve onnxruntime numpy
	touch $@

# On a quiet machine (nothing else running): about 15 minutes; rewrites BENCHMARKS.md.
bench: $(VENV)/.installed-all bench-venvs
	$(BIN)/python benchmarks/generate_bench.py --out benchmarks/results/generate.json
	$(BIN)/python benchmarks/model_speed.py --seconds 4 --rounds 2 --out benchmarks/results/model_speed.json
	$(BIN)/python benchmarks/servicer_overhead.py $${NNSERVE_BENCH_BEFORE:+--root $$NNSERVE_BENCH_BEFORE} --out benchmarks/results/servicer_overhead.json
	$(BIN)/python benchmarks/run.py --seconds 3
	$(BIN)/python benchmarks/http_bench.py --seconds 3 --write
	bash benchmarks/profile_classify.sh 10

# The compose deployment end to end on a local Docker engine (installs and starts one if needed;
# builds every image offline from a debootstrap base and host-downloaded wheels). Needs root.
e2e-docker: $(VENV)/.installed-all
	PYTHON=$(BIN)/python bash scripts/docker-e2e.sh

# Only the Docker Swarm part of e2e-docker (it builds or reuses the same images first).
e2e-swarm: $(VENV)/.installed-all
	E2E_ONLY=swarm PYTHON=$(BIN)/python bash scripts/docker-e2e.sh

# The Kubernetes manifests offline: render every kustomization, validate against the Kubernetes
# schemas, check the invariants (tests/test_kubernetes.py; make test runs it too).
k8s-check: $(VENV)/.installed-all
	$(BIN)/python -m pytest tests/test_kubernetes.py $(PYTEST_ARGS)

images: $(VENV)/.installed-all
	$(BIN)/python scripts/readme_examples.py

# The web console's README screenshots (docs/images/console_*.png), taken by its browser test
# through the real page on the shipped models (about 30 s).
.PHONY: screenshots
screenshots: system-deps $(VENV)/.installed-all
	NNSERVE_CONSOLE_SCREENSHOTS=docs/images $(BIN)/python -m pytest tests/test_console_browser.py -q

clean:
	rm -rf $(VENV) $(TRITON_VENV) runs .pytest_cache .mypy_cache .ruff_cache
