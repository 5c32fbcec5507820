# Two commands for users: `make demo` and `make test`. Both create or refresh .venv and install
# everything they need from the lock (requirements.lock), so they give the same result next month.
# torch is the one package outside the lock: on these CPU machines pip finds a local CPU build of
# torch==2.13.0, while the lock resolved from PyPI would pull a multi-GB CUDA build with its
# nvidia-* dependencies. Set TORCH=... to choose another build (e.g. on a GPU machine).
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
LOCK = requirements.lock
STAMP = $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha256sum | cut -c1-12)
TORCH ?= torch==2.13.0
LATEST ?= .venv-latest
OLDEST ?= .venv-oldest
TORCH_OLDEST ?= torch==2.9.1

.PHONY: demo test test-slow test-latest test-oldest lock bench gpu-check venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*; touch $@

demo: venv
	$(BIN)/llamaforge demo --out runs/demo

test: venv
	$(BIN)/python -m pytest -q -x --durations=15

test-slow: venv
	$(BIN)/python -m pytest -q -m slow --durations=15

# The drift canary: a new virtual environment with the newest versions pyproject.toml allows
# (torch stays $(TORCH)), running the compatibility subset (tests marked `compat`).
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	echo "$(TORCH)" > $(LATEST)/torch-constraint.txt
	$(LATEST)/bin/python -m pip install -q "$(TORCH)"
	$(LATEST)/bin/python -m pip install -q -c $(LATEST)/torch-constraint.txt -e ".[dev]"
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|lm.eval|datasets|huggingface.hub|safetensors|numpy|accelerate|peft) '
	$(LATEST)/bin/python -m pytest -q -m compat

# The floor check: the oldest torch pyproject.toml allows ($(TORCH_OLDEST), the first with torch.optim.Muon),
# the other packages from the lock, running the compat subset and the tests of the torch APIs we build on
# (Muon, DDP, FSDP2, distributed-checkpoint state dicts, signals). On x86_64 PyPI's torch 2.9.1 is a
# CUDA build: ~3 GB to download; it runs on the CPU.
test-oldest:
	rm -rf $(OLDEST)
	$(PY) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q "$(TORCH_OLDEST)"
	echo "$(TORCH_OLDEST)" > $(OLDEST)/torch-constraint.txt
	$(OLDEST)/bin/python -m pip install -q -c $(OLDEST)/torch-constraint.txt -r $(LOCK)
	$(OLDEST)/bin/python -m pip install -q --no-deps -e .
	$(OLDEST)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|lm.eval) '
	$(OLDEST)/bin/python -m pytest -q -m "compat or torchcompat"

# Regenerate the lock from pyproject.toml with uv (newest versions the ranges allow; torch excluded, see above).
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv>=0.9"
	echo torch > $(VENV)/lock-excludes.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--excludes $(VENV)/lock-excludes.txt --custom-compile-command "make lock" -q -o $(LOCK)

bench: venv
	$(BIN)/python -m benchmarks --json runs/benchmarks.jsonl

# On a CUDA machine: flash SDPA, llama-150m eager vs compiled, memory, tokens/s, MFU (exit 1 on a mismatch).
# DATA=DIR uses a prepared data folder instead of preparing the offline sample corpus.
gpu-check: venv
	$(BIN)/python -m benchmarks.gpu_check $(if $(DATA),--data $(DATA))

clean:
	rm -rf runs .pytest_cache
