# Two commands for users: `make demo` and `make test`. Both create or refresh .venv and install
# everything they need. torch==2.13.0 is installed first: on these CPU machines pip finds a local
# CPU build of it; an unpinned torch would pull a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
TORCH ?= torch==2.13.0

.PHONY: demo test test-slow bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*; touch $@

demo: venv
	$(BIN)/llamaforge demo --out runs/demo

test: venv
	$(BIN)/python -m pytest -q -x

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

bench: venv
	$(BIN)/python -m benchmarks --json runs/benchmarks.jsonl

clean:
	rm -rf runs .pytest_cache
