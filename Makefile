# Entry points for a fresh machine: `make test` and `make demo` create .venv, install the pinned
# requirements and build fastabsld._C (C++ always, CUDA when nvcc exists). On a machine with an NVIDIA
# GPU, `make gpu-check` does the same in timed phases after checking the driver, toolkit and Python.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.requirements-installed
BUILT := $(VENV)/.fastabsld-built
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py pyproject.toml

# CUDA_HOME must be the toolkit folder above the real nvcc (nvcc on the PATH may be a wrapper script).
CUDA_HOME ?= $(shell for d in /usr/local/cuda /usr/local/cuda-*; do [ -x $$d/bin/nvcc ] && echo $$d && break; done)
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
# One compile job per core (ninja's parallelism in the extension build), and nvcc compiles a CUDA
# unit's architectures in parallel threads (the longest unit of the build is the CUDA one).
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export NVCC_APPEND_FLAGS ?= --threads 0

.PHONY: install build test test-slurm demo bench gpu-check clean

$(INSTALLED): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(BUILT): $(INSTALLED) $(SOURCES)
	@echo "building fastabsld._C (log: build/install.log)"
	@mkdir -p build
	$(PY) -m pip install --no-build-isolation --no-deps -v -e . > build/install.log 2>&1 || { tail -60 build/install.log; exit 1; }
	@grep -m1 -E "fastabsld: building" build/install.log || true
	@grep -E "^ *\[[0-9]+/[0-9]+\] " build/install.log | sed -E 's/^ *(\[[0-9/]+\]) ([^ ]+) .* -c ([^ ]+) .*/  \1 \2 \3/' || true
	$(PY) -c "import fastabsld, torch; assert fastabsld.HAS_EXTENSION, 'fastabsld._C did not build'; print('fastabsld._C loaded:', torch.ops.fastabsld)"
	touch $@

install: $(INSTALLED)

build: $(BUILT)

test: $(BUILT)
	$(PY) -m pytest -q tests benchmarks --benchmark-disable

# The SLURM tests on a single-node SLURM cluster started here for them (installed through apt when missing,
# as root) and stopped afterwards, also when a test fails.
SLURM_CLUSTER_DIR ?= $(or $(TMPDIR),/tmp)/fastabsld-slurm-test
test-slurm: $(BUILT)
	export FASTABSLD_SLURM_DIR=$(SLURM_CLUSTER_DIR); trap 'scripts/slurm_cluster.sh stop' EXIT; \
	scripts/slurm_cluster.sh start; eval "$$(scripts/slurm_cluster.sh env)"; \
	FASTABSLD_SLURM_REQUIRED=1 $(PY) -m pytest -q tests/study/test_slurm_cluster.py

bench: $(BUILT)
	$(PY) -m pytest -q benchmarks --benchmark-only

demo: $(BUILT)
	$(PY) -m fastabsld demo

# On a machine with an NVIDIA GPU: preflight, install, build, the GPU tests and the GPU report, each
# phase with a time limit (benchmarks/gpu_check.py); prints a summary and writes gpu-check.json.
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check --venv $(VENV) --json gpu-check.json

clean:
	rm -rf build $(BUILT) fastabsld/_C*.so
