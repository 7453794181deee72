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
# VIEWS=224,320,448+flip (+crops): several views per image, COMBINE=mean|concat (pipeline/views.py)
VIEWS ?=
COMBINE ?= mean
# FEATURES=a.h5+b.h5: `make head` on caches joined by image path, each part JOIN_NORM=l2|standard
FEATURES ?=
JOIN_NORM ?= l2
BATCH ?= 32
# PRECISION: the backbone's compute precision (auto|float32|bfloat16|float16), whichever runtime
# runs it; STORAGE: how the features are stored (float32|float16).
PRECISION ?= auto
STORAGE ?= float32
RUNTIME ?= auto
# Old spellings, kept one release: they say what to write instead.
ifdef FLOAT16
$(warning FLOAT16=$(FLOAT16) is now STORAGE=float16; write that instead)
STORAGE := $(if $(filter 1 yes true,$(FLOAT16)),float16,$(STORAGE))
endif
ifdef RUNTIME_PRECISION
$(warning RUNTIME_PRECISION=$(RUNTIME_PRECISION) is now PRECISION=; write PRECISION=$(or $(filter auto,$(RUNTIME_PRECISION)),$(if $(filter bf16,$(RUNTIME_PRECISION)),bfloat16,float32)) instead)
PRECISION := $(or $(filter auto,$(RUNTIME_PRECISION)),$(if $(filter bf16,$(RUNTIME_PRECISION)),bfloat16,float32))
endif
SEED ?= 0
VAL_FRACTION ?= 0.2
TEST_FRACTION ?= 0.2
SPLIT_ARGS = --seed $(SEED) --val-fraction $(VAL_FRACTION) --test-fraction $(TEST_FRACTION)
HEAD ?= all
NORM ?=
PCA ?=
# CV: folds of every cross-validation (the heads' searches, make probe, make auto).
CV ?= 3
ifdef AUTO_CV
$(warning AUTO_CV=$(AUTO_CV) is now CV=; write CV=$(AUTO_CV) instead)
CV := $(AUTO_CV)
endif
JOBS ?= 1
# GRID="svm:C=0.01,0.1,1;logreg:C=1e-3,1e-2": grids searched instead of the heads' own;
# FORCE=1: refit heads that an earlier `make head` fitted on the same cache with the same options.
GRID ?=
FORCE ?=
# make bench-heads CLASSES=100: synthetic features of that many classes, ROWS train rows each time
CLASSES ?=
ROWS ?= 3000,30000
REPEATS ?= 3
MODEL ?=
IMAGES ?=
OUT ?=
# ENGINE=ray: stage one on a Ray cluster (RAY_ADDRESS= joins one; unset starts a local one),
# CONCURRENCY backbone actors; on `make head`, the search's fits go to Ray (joblib).
ENGINE ?= local
RAY_ADDRESS ?=
CONCURRENCY ?= 1
RAY_ARGS = --engine $(ENGINE) $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS))

FEATURE_ARGS = --backbone $(BACKBONE) --weights $(WEIGHTS) $(if $(INPUT_SIZE),--input-size $(INPUT_SIZE)) \
	--pooling $(POOLING) $(if $(LAYER),--layer $(LAYER)) $(if $(VIEWS),--views $(VIEWS) --combine $(COMBINE)) --batch-size $(BATCH) \
	--precision $(PRECISION) --storage $(STORAGE) --runtime $(RUNTIME) --artifacts $(ARTIFACTS)

.PHONY: help install demo demo-data features backbones test lint format bench-features weights-from-assets clean
.PHONY: head report predict bench-heads test-slow test-all probe auto check-unseen docs

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

install: $(VENV)/.installed ## create .venv and install the package with its dependencies

# The extras, installed on first use by the targets that need them: dev (test, lint), ray
# (ENGINE=ray and the slow tier), docs (make docs), unseen (make check-unseen).
$(VENV)/.%-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[$*]'
	touch $@
RAY_EXTRA = $(if $(filter ray,$(ENGINE)),$(VENV)/.ray-installed)

weights-from-assets: ## offline machines: copy ../shared/assets weights into the Keras cache (if present)
	@if [ -d "$(ASSETS)/weights" ]; then mkdir -p "$(KERAS_MODELS)"; \
	  for f in "$(ASSETS)"/weights/*.h5; do [ -e "$(KERAS_MODELS)/$$(basename $$f)" ] || cp "$$f" "$(KERAS_MODELS)/"; done; fi

demo: install weights-from-assets ## install, then run the pipeline on the embedded digits data
	$(PY) -m pipeline demo-data --out $(DEMO_DATA)
	$(PY) -m pipeline features --data $(DEMO_DATA) $(FEATURE_ARGS)
	$(PY) -m pipeline head --data $(DEMO_DATA) $(FEATURE_ARGS) --head all $(if $(filter 1 yes true,$(FORCE)),--force)
	$(PY) -m pipeline report --data $(DEMO_DATA) --artifacts $(ARTIFACTS)

demo-data: install ## write scikit-learn's digits as PNG class folders under artifacts/data/digits
	$(PY) -m pipeline demo-data --out $(DEMO_DATA)

backbones: install ## print the backbone registry
	$(PY) -m pipeline backbones

features: install $(RAY_EXTRA) ## stage one: cache features (DATA= BACKBONE= WEIGHTS= INPUT_SIZE= POOLING= LAYER= BATCH= PRECISION=auto|float32|bfloat16|float16 STORAGE=float32|float16 RUNTIME=auto|keras|openvino SEED= VAL_FRACTION= TEST_FRACTION= ENGINE=local|ray RAY_ADDRESS= CONCURRENCY=)
	$(PY) -m pipeline features --data $(DATA) $(FEATURE_ARGS) $(SPLIT_ARGS) $(RAY_ARGS) --concurrency $(CONCURRENCY)

head: install $(RAY_EXTRA) ## stage two: fit heads on cached features (DATA= BACKBONE= ... HEAD=svm|rbf_svm|logreg|knn|ridge|softmax|forest|all NORM= PCA= CV= JOBS= GRID= FORCE=1 ENGINE=local|ray RAY_ADDRESS=)
	$(PY) -m pipeline head --data $(DATA) $(FEATURE_ARGS) $(if $(FEATURES),--features $(FEATURES) --join-norm $(JOIN_NORM)) --head $(HEAD) $(if $(NORM),--norm $(NORM)) $(if $(PCA),--pca $(PCA)) --cv $(CV) --seed $(SEED) --jobs $(JOBS) $(if $(GRID),--grid '$(GRID)') $(if $(filter 1 yes true,$(FORCE)),--force) $(RAY_ARGS)

report: install ## stage two: Markdown/HTML/JSON report of every head of DATA (artifacts/reports/<dataset>/)
	$(PY) -m pipeline report --data $(DATA) --artifacts $(ARTIFACTS)

predict: install ## classify new images: MODEL=<head .json/.skops/.joblib/softmax.keras or fine-tuned .keras> IMAGES=<dir or file> [OUT=csv] (class folders: accuracy)
	$(PY) -m pipeline predict $(if $(MODEL),--model $(MODEL)) $(if $(IMAGES),--images $(IMAGES)) --batch-size $(BATCH) --artifacts $(ARTIFACTS) $(if $(OUT),--out $(OUT))

probe: install weights-from-assets ## linear-head accuracy per cut layer, one forward pass, CV on train (DATA= BACKBONE= INPUT_SIZE= PROBE_LAYERS=a,b CV=) -> artifacts/probe/
	$(PY) -m pipeline probe --data $(DATA) $(FEATURE_ARGS) $(SPLIT_ARGS) $(if $(PROBE_LAYERS),--layers $(PROBE_LAYERS)) --cv $(CV)

auto: install weights-from-assets ## try the feature recipes (flip, scale, middle layer, joins) with svm+logreg; choose by CV on train; report (DATA= CV=)
	$(PY) -m pipeline auto --data $(DATA) $(FEATURE_ARGS) $(SPLIT_ARGS) --cv $(CV)

check-unseen: install $(VENV)/.unseen-installed weights-from-assets ## make auto on data unlike ImageNet: texture patches and hymenoptera shrunk to 48 px and blurred
	$(PY) -m pipeline unseen-data --out $(ARTIFACTS)/data --source $(ASSETS)/datasets/hymenoptera_data
	$(PY) -m pipeline auto --data $(ARTIFACTS)/data/textures $(FEATURE_ARGS) --cv $(CV)
	$(PY) -m pipeline auto --data $(ARTIFACTS)/data/hymenoptera_data_small_blurred $(FEATURE_ARGS) --cv $(CV)

bench-heads: install weights-from-assets ## fit time of the default heads / stage-one time (both timed in the run), both real data sets (artifacts/bench/heads.json); CLASSES=100 ROWS=3000,30000: on synthetic many-class features
ifdef CLASSES
	$(PY) -m pipeline bench-heads --classes $(CLASSES) --rows $(ROWS) $(if $(wildcard $(ASSETS)/datasets/hymenoptera_data),--data $(ASSETS)/datasets/hymenoptera_data) $(FEATURE_ARGS) --runtime keras --cv $(CV) --repeats $(REPEATS) --out $(ARTIFACTS)/bench/heads-$(CLASSES)-classes.json
else
	$(PY) -m pipeline bench-heads --data $(ASSETS)/datasets/hymenoptera_data --data $(ASSETS)/datasets/cats_and_dogs_filtered $(FEATURE_ARGS) --runtime keras --cv $(CV) --out $(ARTIFACTS)/bench/heads.json
endif

test: install $(VENV)/.dev-installed ## the test suite without its slow tier (a few minutes on 2 cores)
	$(PY) -m pytest -q -m "not slow"

test-slow: install $(VENV)/.dev-installed $(VENV)/.ray-installed weights-from-assets ## the slow tier: every backbone built, kill-and-resume runs, Ray, real data
	$(PY) -m pytest -q -m slow

test-all: install $(VENV)/.dev-installed $(VENV)/.ray-installed weights-from-assets ## both tiers, as CI runs them
	$(PY) -m pytest -q

lint: install $(VENV)/.dev-installed ## ruff lint and format check
	$(PY) -m ruff check pipeline tests && $(PY) -m ruff format --check pipeline tests

format: install $(VENV)/.dev-installed ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix pipeline tests; $(PY) -m ruff format pipeline tests

docs: $(VENV)/.docs-installed ## build the documentation site (mkdocs, strict: a warning fails) into artifacts/site/
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir $(ARTIFACTS)/site

bench-features: install $(RAY_EXTRA) weights-from-assets ## benchmark stage one: Keras and runtime forward passes, whole stage per runtime, start-up (BENCH_DATA=, N=; ENGINE=ray: local vs Ray with 1 and 2 actors)
	$(PY) -m pipeline bench-features --data $(or $(BENCH_DATA),$(ASSETS)/datasets/cats_and_dogs_filtered) --backbone $(BACKBONE) --batch-size $(BATCH) --images $(or $(N),400) --out $(ARTIFACTS)/bench/$(if $(filter ray,$(ENGINE)),features_ray,features).json $(RAY_ARGS)

# Stage three (fine-tuning). UNFREEZE: backbone layers to unfreeze, counted from the end:
# n >= 0 | all | block (the backbone's last block). Not LAYER= (stage one's cut layer).
UNFREEZE ?= block
EPOCHS ?= 10
LR ?= 1e-5
HEAD_EPOCHS ?= 50
PATIENCE ?= 3
AUGMENT ?= 1
# Augmented copies per training image cached at the cut, 0..64 (0: a full forward pass every epoch).
AUG_COPIES ?= 8
CLASS_WEIGHT ?= balanced
RESTART ?= 0
NAME ?=
# Old spellings, kept one release: they say what to write instead.
ifdef LAYERS
$(warning LAYERS=$(LAYERS) is now UNFREEZE=$(LAYERS); write that instead)
UNFREEZE := $(LAYERS)
endif
ifdef AUG_VIEWS
$(warning AUG_VIEWS=$(AUG_VIEWS) is now AUG_COPIES=$(AUG_VIEWS); write that instead)
AUG_COPIES := $(AUG_VIEWS)
endif
FINETUNE_ARGS = --backbone $(BACKBONE) --weights $(WEIGHTS) $(if $(INPUT_SIZE),--input-size $(INPUT_SIZE)) \
	--unfreeze $(UNFREEZE) --epochs $(EPOCHS) --lr $(LR) --head-epochs $(HEAD_EPOCHS) --patience $(PATIENCE) \
	--augment $(AUGMENT) --aug-copies $(AUG_COPIES) --class-weight $(CLASS_WEIGHT) --batch-size $(BATCH) --precision $(PRECISION) \
	$(SPLIT_ARGS) --restart $(RESTART) $(if $(NAME),--name $(NAME)) --artifacts $(ARTIFACTS)
.PHONY: finetune bench-finetune

finetune: install weights-from-assets ## stage three: fine-tune the last UNFREEZE layers (DATA= BACKBONE= WEIGHTS= INPUT_SIZE= UNFREEZE=n|block|all EPOCHS= LR= AUGMENT= AUG_COPIES= PATIENCE= NAME= RESTART=1)
	$(PY) -m pipeline finetune --data $(DATA) $(FINETUNE_ARGS)

bench-finetune: install weights-from-assets ## one phase-two epoch (last block) / one stage-one pass (BENCH_DATA=, N=, AUG_COPIES=)
	$(PY) -m pipeline bench-finetune --data $(or $(BENCH_DATA),$(ASSETS)/datasets/cats_and_dogs_filtered) --backbone $(BACKBONE) --weights $(WEIGHTS) --batch-size $(BATCH) --images $(or $(N),256) --aug-copies $(AUG_COPIES) --out $(ARTIFACTS)/bench/finetune.json

clean: ## remove artifacts (keeps artifacts/README.md)
	find $(ARTIFACTS) -mindepth 1 ! -name README.md -delete
