# Two commands: `make run` and `make test`. Both build the venv and fetch the default model when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: run chat web test e2e bench clean

run: $(INSTALLED) $(MODEL)
	$(BIN)/llamarelay run

chat: $(INSTALLED) $(MODEL)
	$(BIN)/llamarelay chat

web: $(INSTALLED) $(MODEL)
	$(BIN)/llamarelay web

# The store tests start their own PostgreSQL cluster: Debian's postgresql package, installed when missing.
test: $(INSTALLED) $(MODEL)
	bash tests/install_postgres.sh
	$(BIN)/python -m pytest

# Browser tests: Debian's chromium driven by Playwright (installed on first use; no browser download).
e2e: $(INSTALLED) $(MODEL)
	bash tests_e2e/install.sh
	$(BIN)/python -m pytest tests_e2e

bench: $(INSTALLED) $(MODEL)
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/concurrency.py
	$(BIN)/python benchmarks/first_content.py

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	@echo "Installing llamarelay (llama-cpp-python compiles from source the first time: about 10 minutes)…"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

$(MODEL): | $(INSTALLED)
	$(BIN)/llamarelay fetch-model

clean:
	rm -rf $(VENV) build *.egg-info
