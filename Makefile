# make train [ARGS="--config configs/debug.yaml"]   fit + test SimpleCNN on MNIST
# make test                                        the test suite (slow tests included)
# Both build .venv first, and rebuild it when pyproject.toml or constraints.txt change.
# `make test` installs nothing system-wide: without Chromium the browser tests skip, saying how to
# enable them (apt-get install chromium, or CHROMIUM=/path/to/chrome). .ci/run installs it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test lint venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

train: venv
	$(PY) train.py $(ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) logs lightning_logs wandb .pytest_cache
