# Newcomer commands (README.md):  make finetune   |   make test
# Both build what they need on first use: .venv (Python 3.12, the library) and, for the tests,
# .venv-oracle (Python 3.11: torch CPU, bitsandbytes, transformers, peft as reference oracles).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv
ORACLE := .venv-oracle
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup oracle lint test test-fast finetune datatypes generate bench-kernels bench-cpu bench-gpu clean

setup: $(VENV)/.installed
oracle: $(ORACLE)/.installed

$(VENV)/.installed: pyproject.toml requirements/ci.txt requirements/assets.txt requirements/thirdparty.txt requirements/lm-eval.txt scripts/setup_venv.sh
	scripts/setup_venv.sh $(VENV)
	touch $@

$(ORACLE)/.installed: requirements/oracle.txt scripts/setup_oracle.sh
	scripts/setup_oracle.sh $(ORACLE)
	touch $@

# ruff with the rules of pyproject.toml (E, F, B, I, UP), as CI runs it.
lint: setup
	$(VENV)/bin/ruff check .

# pytest-xdist workers: one more than CI's 2 cores, because a worker spends much of its time
# waiting (on the oracle's torch process, a launcher subprocess, checkpoint writes), and a third
# keeps both cores busy (CONTRIBUTING.md, "Suite time", has the measured times).
TEST_WORKERS ?= 3

# The whole suite, as CI runs it (.ci/run).
test: setup oracle
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# Everything but the slow end-to-end tests.
test-fast: setup oracle
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

# The main job: a QLoRA finetune of the embedded SmolLM2-135M-Instruct (extra flags: ARGS="...").
finetune: setup
	$(PY) -m experiments.finetune $(ARGS)

datatypes: setup
	$(PY) -m experiments.datatypes $(ARGS)

generate: setup
	$(PY) -m experiments.generate $(ARGS)

bench-kernels: setup
	$(PY) -m experiments.bench_kernels $(ARGS)

# qlora-jax against transformers + PEFT + bitsandbytes on this CPU, steps interleaved, each side at
# float32, bfloat16 and its best (issue 24's setting; BENCHMARKS.md). Needs both environments.
bench-cpu: setup oracle
	$(PY) -m experiments.bench_cpu_vs_torch $(ARGS)

# The GPU evidence run (BENCHMARKS.md), at most 8 minutes on one H100/H200, with the machine's own
# Python (GPU_PY: jax with CUDA, torch, transformers, peft); wheels carried in .whl/ go in first.
GPU_PY ?= python3
bench-gpu:
	scripts/prepare_gpu_run.sh $(GPU_PY)
	$(GPU_PY) -m experiments.bench_gpu $(ARGS)

clean:
	rm -rf $(VENV) $(ORACLE) .pytest_cache
