# Two commands: `make run` and `make test`. Both build the venv and fetch the default model when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf

# llama-cpp-python compiles llama.cpp with the CMAKE_ARGS in the environment: CMAKE_ARGS="-DGGML_CUDA=on" make run
# for an NVIDIA GPU (see "GPU" in the README). $(BUILT_WITH) records those of the venv's build: other ones rebuild
# it once; none keep the build there is (CPU-only, or GPU from an earlier make).
BUILT_WITH := $(VENV)/.cmake-args
BUILT_CMAKE_ARGS := $(strip $(shell cat $(BUILT_WITH) 2>/dev/null))
export CMAKE_ARGS := $(or $(strip $(CMAKE_ARGS)),$(BUILT_CMAKE_ARGS))
# Other CMAKE_ARGS than the build's: it is rebuilt, unless the venv is new (and built with them in the first place).
ifneq ($(CMAKE_ARGS),$(BUILT_CMAKE_ARGS))
REBUILD := $(if $(wildcard $(INSTALLED)),llama-rebuild)
endif

.PHONY: run chat web test e2e bench clean llama-rebuild

run: $(INSTALLED) $(REBUILD) $(MODEL)
	$(BIN)/llamarelay run

chat: $(INSTALLED) $(REBUILD) $(MODEL)
	$(BIN)/llamarelay chat

web: $(INSTALLED) $(REBUILD) $(MODEL)
	$(BIN)/llamarelay web

# Static checks first (ruff's lint and import order, ruff format, then mypy; their settings are in pyproject.toml),
# then the suite. The store tests start their own PostgreSQL cluster: Debian's postgresql package, installed when
# missing.
test: $(INSTALLED) $(REBUILD) $(MODEL)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	bash tests/install_postgres.sh
	$(BIN)/python -m pytest

# Browser tests: Debian's chromium driven by Playwright (installed on first use; no browser download).
e2e: $(INSTALLED) $(REBUILD) $(MODEL)
	bash tests_e2e/install.sh
	$(BIN)/python -m pytest tests_e2e

bench: $(INSTALLED) $(REBUILD) $(MODEL)
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/concurrency.py
	$(BIN)/python benchmarks/first_content.py

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	@echo "Installing llamarelay (llama-cpp-python compiles from source the first time: about 10 minutes)…"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	printf '%s\n' "$$CMAKE_ARGS" > $(BUILT_WITH)
	touch $@

# The venv's llama-cpp-python compiled anew for the CMAKE_ARGS (no cached wheel, no other package touched).
llama-rebuild: $(INSTALLED)
	@echo "Rebuilding llama-cpp-python with CMAKE_ARGS=\"$$CMAKE_ARGS\" (about 10 minutes)…"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps --no-cache-dir \
		--no-binary llama-cpp-python "llama-cpp-python==$$($(BIN)/python -m pip show llama-cpp-python | sed -n 's/^Version: //p')"
	printf '%s\n' "$$CMAKE_ARGS" > $(BUILT_WITH)

$(MODEL): | $(INSTALLED)
	$(BIN)/llamarelay fetch-model

clean:
	rm -rf $(VENV) build *.egg-info
