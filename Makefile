# make train [ARGS="--config configs/debug.yaml"]   fit + test SimpleCNN on MNIST
# make test                                        the test suite (slow tests included)
# Both build .venv first, and rebuild it when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BROWSERS := chromium chromium-browser google-chrome google-chrome-stable

.PHONY: train test lint venv browser clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

train: venv
	$(PY) train.py $(ARGS)

test: venv browser
	$(PY) -m pytest $(PYTEST_ARGS)

# Headless Chromium for the gallery's browser tests, from Debian/Ubuntu packages when absent.
# Without it those tests skip (and fail under CI, where $$CI is set).
browser:
	@for b in $(BROWSERS); do command -v $$b >/dev/null && exit 0; done; \
	echo "installing chromium (apt-get) for the browser tests"; \
	$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium \
	  || echo "could not install chromium: the browser tests will be skipped"

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) logs lightning_logs wandb .pytest_cache
