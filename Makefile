# Two entry points for a fresh machine: `make chat` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build is what a laptop needs; on a CUDA machine pass TORCH=torch to take PyPI's default build.
TORCH ?= torch==2.13.0
EXTRAS ?= test

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed-$(EXTRAS)

chat: setup
	$(VENV)/bin/turboinfer chat

generate: setup
	$(VENV)/bin/turboinfer generate "$(or $(PROMPT),The capital of France is)" --temperature 0 --max-tokens 64

test: setup
	$(PY) -m pytest -q

bench: EXTRAS = test,bench
bench: setup
	$(PY) benchmarks/cpu_bench.py
	$(PY) benchmarks/long_context_cpu.py
	$(PY) benchmarks/mixed_batch_cpu.py
	$(PY) benchmarks/report.py

.PHONY: setup chat generate test bench
