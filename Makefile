# Fresh machine: `make main` (set up, then quantize the embedded default) and `make test` (set up, then test).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the first-party GPU plugin installs like any third-party plugin (it registers CUDA backends only)
PLUGINS := $(foreach p,$(wildcard plugins/ojbkq-cuda),-e $(p))

.PHONY: setup test test-slow test-thorough main clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,assets]" $(PLUGINS)
	touch $@

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-thorough: setup
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest -q tests/test_properties.py

main: setup
	$(BIN)/python bench/main_job.py

clean:
	rm -rf $(VENV) runs
