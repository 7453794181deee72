# The front door: every target is a one-line call of `python -m pipeline`.
# Variables (override on the command line): make features DATA=path BACKBONE=vgg16 ...
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARTIFACTS ?= artifacts
ASSETS ?= ../shared/assets
KERAS_MODELS := $(or $(KERAS_HOME),$(HOME)/.keras)/models

DEMO_DATA := $(ARTIFACTS)/data/digits
DATA ?= $(DEMO_DATA)
BACKBONE ?= mobilenet_v2
WEIGHTS ?= imagenet
INPUT_SIZE ?=
POOLING ?= avg
LAYER ?=
BATCH ?= 32
FLOAT16 ?= 0
PRECISION ?= float32
SEED ?= 0

FEATURE_ARGS = --backbone $(BACKBONE) --weights $(WEIGHTS) $(if $(INPUT_SIZE),--input-size $(INPUT_SIZE)) \
	--pooling $(POOLING) $(if $(LAYER),--layer $(LAYER)) --batch-size $(BATCH) \
	$(if $(filter 1 yes true,$(FLOAT16)),--float16) --precision $(PRECISION) --artifacts $(ARTIFACTS)

.PHONY: help install demo demo-data features backbones test lint format bench-features weights-from-assets clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv and install the package with its dependencies

weights-from-assets: ## offline machines: copy ../shared/assets weights into the Keras cache (if present)
	@if [ -d "$(ASSETS)/weights" ]; then mkdir -p "$(KERAS_MODELS)"; \
	  for f in "$(ASSETS)"/weights/*.h5; do [ -e "$(KERAS_MODELS)/$$(basename $$f)" ] || cp "$$f" "$(KERAS_MODELS)/"; done; fi

demo: install weights-from-assets ## install, then run the pipeline on the embedded digits data
	$(PY) -m pipeline demo-data --out $(DEMO_DATA)
	$(PY) -m pipeline features --data $(DEMO_DATA) $(FEATURE_ARGS)

demo-data: install ## write scikit-learn's digits as PNG class folders under artifacts/data/digits
	$(PY) -m pipeline demo-data --out $(DEMO_DATA)

backbones: install ## print the backbone registry
	$(PY) -m pipeline backbones

features: install ## stage one: cache features (DATA= BACKBONE= WEIGHTS= INPUT_SIZE= POOLING= LAYER= BATCH= FLOAT16=1)
	$(PY) -m pipeline features --data $(DATA) $(FEATURE_ARGS) --seed $(SEED)

test: install ## run the test suite
	$(PY) -m pytest -q

lint: install ## ruff lint and format check
	$(PY) -m ruff check pipeline tests && $(PY) -m ruff format --check pipeline tests

format: install ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix pipeline tests; $(PY) -m ruff format pipeline tests

bench-features: install weights-from-assets ## benchmark stage one vs the pure forward pass (BENCH_DATA=, N=)
	$(PY) -m pipeline bench-features --data $(or $(BENCH_DATA),$(ASSETS)/datasets/cats_and_dogs_filtered) --backbone $(BACKBONE) --batch-size $(BATCH) --images $(or $(N),400) --out $(ARTIFACTS)/bench/features.json

clean: ## remove artifacts (keeps artifacts/README.md)
	find $(ARTIFACTS) -mindepth 1 ! -name README.md -delete
