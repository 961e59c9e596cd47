# gigaslide: every target sets up .venv/ itself on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gigaslide-installed
# torch/torchvision pinned to a matched pair; the rest comes from pyproject.toml.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test test-all lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS) 2>&1 | (grep -v "^WARNING: Location" || true)
	$(PY) -m pip install -q -e '.[dev]' 2>&1 | (grep -v "^WARNING: Location" || true)
	$(PY) -c "import gigaslide, torch, timm, openslide, tiffslide, lifelines, sklearn, cv2"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gigaslide demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) demo_out .pytest_cache
