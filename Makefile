# Two commands do all the set-up on a fresh machine:  make demo  and  make test.
# Both create .venv if absent and install what they need.
#
# Reusing a CUDA torch that is already installed system-wide:
#     make test VENV_FLAGS=--system-site-packages
# (the venv then sees the system torch, and torch==2.13.0 is only installed when
# `import torch` fails inside the venv).

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_PIN ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.cdm-installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
# tests/ and the pytest-benchmark suite in one process (one inductor warm-up); benchmarks as correctness only.
PYTEST_PATHS ?= tests benchmarks

# The GPU machines run triton 3.6 (torch 2.11's pin); CI has the venv's newer triton. Every kernel is
# compiled for sm_80/89/90 against both (python -m cdm_kernels.compile_check), 3.6 installed on the side.
TRITON_SIDE_VERSION ?= 3.6.0
TRITON_SIDE_DIR ?= $(HOME)/.cache/cdm-kernels/triton-$(TRITON_SIDE_VERSION)
COMPILE_CHECK_ARCHS ?= --arch 80 --arch 89 --arch 90

.PHONY: all setup demo test lint compile-check bench clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp)
	$(PIP) install -q --upgrade "setuptools>=64" wheel
	@$(PY) -c "import torch" 2>/dev/null && echo "reusing torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| $(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cdm-train demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(PY) -m ruff check cdm_kernels cdm_train benchmarks tests setup.py conftest.py

$(TRITON_SIDE_DIR)/.installed:
	$(PIP) install -q --no-deps --target $(TRITON_SIDE_DIR) "triton==$(TRITON_SIDE_VERSION)"
	touch $@

compile-check: $(STAMP) $(TRITON_SIDE_DIR)/.installed
	env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 $(PY) -m cdm_kernels.compile_check --quick --report $(COMPILE_CHECK_ARCHS)
	env -u TRITON_INTERPRET PYTHONPATH=$(TRITON_SIDE_DIR) $(PY) -m cdm_kernels.compile_check --quick --report $(COMPILE_CHECK_ARCHS)

test: $(STAMP) lint compile-check
	$(PY) -m pytest -q -p no:cacheprovider --benchmark-disable $(PYTEST_ARGS) $(PYTEST_PATHS)

bench: $(STAMP)
	$(PY) benchmarks/bench_step.py --device cpu --preset tiny

clean:
	rm -rf build *.egg-info cdm_kernels/_C*.so
