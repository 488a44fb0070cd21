# attnseg: `make demo` runs the offline demo, `make serve` the web page, `make test` the test suite.
# `make mutation` runs mutation testing of the core (slow; not part of `make test`).
# All of them create .venv and install torch 2.13.0 (CPU wheel) first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attnseg-installed

.PHONY: demo serve test lint bench mutation clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,app]"
	# the real CLIP BPE vocabulary used by the tests ships inside open_clip_torch (its data file only)
	$(PY) -m pip install -q --no-deps open_clip_torch
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attnseg demo --out out/demo

# the web page on http://127.0.0.1:7860 with the bundled toy model (MODEL=... for another one)
serve: $(STAMP)
	$(VENV)/bin/attnseg serve --model $(or $(MODEL),toyworld)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/capture_overhead.py
	$(PY) benchmarks/diffseg_postprocess.py

# Mutation testing of the numeric core (80 mutants per group, seed 1: about half an hour on 2 shared cores; see benchmarks/mutation.py).
mutation: $(STAMP)
	$(PY) -m pip install -q "mutmut>=3.8,<4"
	$(PY) benchmarks/mutation.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
