# The front door: every target is a one-line call of `python -m pipeline`.
# Variables (override on the command line): make features DATA=path BACKBONE=vgg16 ...
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
# PY: the interpreter that runs the pipeline (default: the virtual environment's)
PY ?= $(ARG_VENV)/bin/python
ARTIFACTS ?= artifacts
ASSETS ?= ../shared/assets

DATA ?= $(ARG_ARTIFACTS)/data/digits
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
# PRECISION: the backbone's compute precision (auto|float32|bfloat16|float16|int8), whichever runtime
# runs it; STORAGE: how the features are stored (float32|float16).
PRECISION ?= auto
STORAGE ?= float32
RUNTIME ?= auto
SEED ?= 0
VAL_FRACTION ?= 0.2
TEST_FRACTION ?= 0.2
HEAD ?= all
NORM ?=
PCA ?=
# CV: folds of every cross-validation (the heads' searches, make probe, make auto).
CV ?= 3
# JOBS: parallel fits of each search; 0 (the default): every core for big searches of the
# heads whose solver uses one (svm, rbf_svm), one job for the others.
JOBS ?= 0
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
PROBE_LAYERS ?=
BENCH_DATA ?= $(ARG_ASSETS)/datasets/cats_and_dogs_filtered
N ?=
# make audit: a near-duplicate cosine (default: calibrated on copies of your images).
THRESHOLD ?=
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
# What phase two trains on: auto (the faster for EPOCHS, estimated) | activations | images.
PHASE_TWO ?= auto
CLASS_WEIGHT ?= balanced
RESTART ?= 0
NAME ?=
# make features TRAIN_PER_CLASS=30 SEED=1 or SPLIT_FILE=a.csv: the cache's own split (nothing extracted
# again; docs/features.md). make protocol / make curve (research protocols on one cache): TRAIN_PER_CLASS=30 or SPLIT_FILE=a.csv,
# SEEDS=0,1,2,3,4 (default 5 seeds for protocol, 3 for curve), SHOTS=1,2,5,10,all.
TRAIN_PER_CLASS ?=
SPLIT_FILE ?=
SEEDS ?=
SHOTS ?= 1,2,5,10,all
# METRIC=accuracy|balanced_accuracy|macro_f1: what make head's searches score and its heads are
# ranked by (default accuracy); the protocols' headline (default balanced_accuracy, or top5).
METRIC ?=

# A user's value reaches the CLI as one argument, whatever it holds (; & $(...) quotes spaces):
# raw gives a variable's text as typed on the command line or in the environment, unexpanded by
# make (`$(shell ...)` stays text); ARG_<VAR> holds it and is exported, and the recipes pass
# "$$ARG_<VAR>", so bash never parses it. The user variables themselves are not exported (make
# would expand them to do so). The Makefile's own defaults above are expanded as usual.
raw = $(if $(filter command line environment%,$(origin $1)),$(value $1),$($1))
OLD_VARS := FLOAT16 RUNTIME_PRECISION AUTO_CV LAYERS AUG_VIEWS
USER_VARS := PYTHON VENV PY ARTIFACTS ASSETS DATA BACKBONE WEIGHTS INPUT_SIZE POOLING LAYER VIEWS \
	COMBINE FEATURES JOIN_NORM BATCH PRECISION STORAGE RUNTIME SEED VAL_FRACTION TEST_FRACTION HEAD \
	NORM PCA CV JOBS GRID FORCE CLASSES ROWS REPEATS MODEL IMAGES OUT ENGINE RAY_ADDRESS CONCURRENCY \
	PROBE_LAYERS BENCH_DATA N THRESHOLD \
	UNFREEZE EPOCHS LR HEAD_EPOCHS PATIENCE AUGMENT AUG_COPIES PHASE_TWO CLASS_WEIGHT RESTART NAME \
	TRAIN_PER_CLASS SPLIT_FILE SEEDS SHOTS METRIC
unexport $(USER_VARS) $(OLD_VARS)

# Old spellings, kept one release: they say what to write instead.
ifdef FLOAT16
$(warning FLOAT16=$(call raw,FLOAT16) is now STORAGE=float16; write that instead)
STORAGE := $(if $(filter 1 yes true,$(call raw,FLOAT16)),float16,$(call raw,STORAGE))
endif
ifdef RUNTIME_PRECISION
OLD_PRECISION := $(call raw,RUNTIME_PRECISION)
NEW_PRECISION := $(or $(filter auto,$(OLD_PRECISION)),$(if $(filter bf16,$(OLD_PRECISION)),bfloat16,float32))
$(warning RUNTIME_PRECISION=$(OLD_PRECISION) is now PRECISION=; write PRECISION=$(NEW_PRECISION) instead)
PRECISION := $(NEW_PRECISION)
endif
ifdef AUTO_CV
$(warning AUTO_CV=$(call raw,AUTO_CV) is now CV=; write CV=$(call raw,AUTO_CV) instead)
CV := $(call raw,AUTO_CV)
endif
ifdef LAYERS
$(warning LAYERS=$(call raw,LAYERS) is now UNFREEZE=$(call raw,LAYERS); write that instead)
UNFREEZE := $(call raw,LAYERS)
endif
ifdef AUG_VIEWS
$(warning AUG_VIEWS=$(call raw,AUG_VIEWS) is now AUG_COPIES=$(call raw,AUG_VIEWS); write that instead)
AUG_COPIES := $(call raw,AUG_VIEWS)
endif

$(foreach v,$(USER_VARS),$(eval export ARG_$v := $$(call raw,$v)))
# make-level paths (prerequisites): the raw text too, never expanded by make.
VENV_DIR := $(ARG_VENV)
# $(call pipeline,<command and options>) runs `python -m pipeline ...` and first prints it with
# the values in place, quoted for pasting (make's own echo would show "$ARG_DATA"); not under
# make -s. PIPELINE_FROM_MAKE: the CLI's errors name the make variable (EPOCHS=), not --epochs.
QUIET := $(findstring s,$(firstword -$(MAKEFLAGS)))
pipeline = @cmd=("$$ARG_PY" -m pipeline $1); \
	$(if $(QUIET),,printf '%q ' "$${cmd[@]}"; echo;) PIPELINE_FROM_MAKE=1 "$${cmd[@]}"
# opt,VAR,--flag: the flag and its value, only when VAR is set.
opt = $(if $(ARG_$1),$2 "$$ARG_$1")

SPLIT_ARGS = --seed "$$ARG_SEED" --val-fraction "$$ARG_VAL_FRACTION" --test-fraction "$$ARG_TEST_FRACTION"
RAY_ARGS = --engine "$$ARG_ENGINE" $(call opt,RAY_ADDRESS,--ray-address)
FEATURE_ARGS = --backbone "$$ARG_BACKBONE" --weights "$$ARG_WEIGHTS" $(call opt,INPUT_SIZE,--input-size) \
	--pooling "$$ARG_POOLING" $(call opt,LAYER,--layer) $(if $(ARG_VIEWS),--views "$$ARG_VIEWS" --combine "$$ARG_COMBINE") \
	--batch-size "$$ARG_BATCH" --precision "$$ARG_PRECISION" --storage "$$ARG_STORAGE" --runtime "$$ARG_RUNTIME" \
	--artifacts "$$ARG_ARTIFACTS"
FINETUNE_ARGS = --backbone "$$ARG_BACKBONE" --weights "$$ARG_WEIGHTS" $(call opt,INPUT_SIZE,--input-size) \
	--unfreeze "$$ARG_UNFREEZE" --epochs "$$ARG_EPOCHS" --lr "$$ARG_LR" --head-epochs "$$ARG_HEAD_EPOCHS" \
	--patience "$$ARG_PATIENCE" --augment "$$ARG_AUGMENT" --aug-copies "$$ARG_AUG_COPIES" \
	--phase-two "$$ARG_PHASE_TWO" --class-weight "$$ARG_CLASS_WEIGHT" --batch-size "$$ARG_BATCH" --precision "$$ARG_PRECISION" \
	$(SPLIT_ARGS) --restart "$$ARG_RESTART" $(call opt,NAME,--name) --artifacts "$$ARG_ARTIFACTS"

.PHONY: help install demo demo-data features backbones test lint format bench-features bench-stage-one weights-from-assets clean
.PHONY: head report predict bench-heads test-slow test-all probe auto check-unseen docs finetune bench-finetune
.PHONY: audit export bench-audit protocol curve bench-protocol

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV_DIR)/.installed: pyproject.toml
	"$$ARG_PYTHON" -m venv "$$ARG_VENV"
	"$$ARG_PY" -m pip install -q --upgrade pip
	"$$ARG_PY" -m pip install -q -e .
	touch "$$ARG_VENV/.installed"

install: $(VENV_DIR)/.installed ## create .venv and install the package with its dependencies

# The extras, installed on first use by the targets that need them: dev (test, lint), ray
# (ENGINE=ray and the slow tier), docs (make docs), unseen (make check-unseen), export
# (make export: pyarrow for Parquet).
$(VENV_DIR)/.%-installed: $(VENV_DIR)/.installed pyproject.toml
	"$$ARG_PY" -m pip install -q -e '.[$*]'
	touch "$$ARG_VENV/.$*-installed"
RAY_EXTRA = $(if $(filter ray,$(ARG_ENGINE)),$(VENV_DIR)/.ray-installed)

weights-from-assets: ## offline machines: copy ../shared/assets weights into the Keras cache (if present)
	@models="$${KERAS_HOME:-$$HOME/.keras}/models"; \
	if [ -d "$$ARG_ASSETS/weights" ]; then \
	  for f in "$$ARG_ASSETS"/weights/*.h5; do \
	    [ -e "$$models/$$(basename "$$f")" ] || { mkdir -p "$$models" && cp "$$f" "$$models/"; }; \
	  done; fi

demo: install weights-from-assets ## install, then run the pipeline on the embedded digits data
	$(call pipeline,demo-data --out "$$ARG_ARTIFACTS/data/digits")
	$(call pipeline,features --data "$$ARG_ARTIFACTS/data/digits" $(FEATURE_ARGS))
	$(call pipeline,head --data "$$ARG_ARTIFACTS/data/digits" $(FEATURE_ARGS) --head all $(if $(filter 1 yes true,$(ARG_FORCE)),--force))
	$(call pipeline,report --data "$$ARG_ARTIFACTS/data/digits" --artifacts "$$ARG_ARTIFACTS")

demo-data: install ## write scikit-learn's digits as PNG class folders under artifacts/data/digits
	$(call pipeline,demo-data --out "$$ARG_ARTIFACTS/data/digits")

backbones: install ## print the backbone registry
	$(call pipeline,backbones)

features: install $(RAY_EXTRA) ## stage one: cache features (DATA= BACKBONE= WEIGHTS= INPUT_SIZE= POOLING= LAYER= BATCH= PRECISION=auto|float32|bfloat16|float16 STORAGE=float32|float16 RUNTIME=auto|keras|openvino SEED= VAL_FRACTION= TEST_FRACTION= or TRAIN_PER_CLASS=30 SEED= or SPLIT_FILE=a.csv ENGINE=local|ray RAY_ADDRESS= CONCURRENCY=)
	$(call pipeline,features --data "$$ARG_DATA" $(FEATURE_ARGS) $(SPLIT_ARGS) $(call opt,TRAIN_PER_CLASS,--train-per-class) $(call opt,SPLIT_FILE,--split-file) $(RAY_ARGS) --concurrency "$$ARG_CONCURRENCY")

head: install $(RAY_EXTRA) ## stage two: fit heads on cached features (DATA= BACKBONE= ... HEAD=svm|rbf_svm|logreg|knn|ridge|softmax|forest|all NORM= PCA= CV= JOBS= GRID= METRIC=accuracy|balanced_accuracy|macro_f1 FORCE=1 ENGINE=local|ray RAY_ADDRESS=)
	$(call pipeline,head --data "$$ARG_DATA" $(FEATURE_ARGS) $(if $(ARG_FEATURES),--features "$$ARG_FEATURES" --join-norm "$$ARG_JOIN_NORM") --head "$$ARG_HEAD" $(call opt,NORM,--norm) $(call opt,PCA,--pca) --cv "$$ARG_CV" --seed "$$ARG_SEED" --jobs "$$ARG_JOBS" $(call opt,GRID,--grid) $(call opt,METRIC,--metric) $(if $(filter 1 yes true,$(ARG_FORCE)),--force) $(RAY_ARGS))

report: install ## stage two: Markdown/HTML/JSON report of every head of DATA, ranked on the metric the heads were chosen by (METRIC= of make head) (artifacts/reports/<dataset>/)
	$(call pipeline,report --data "$$ARG_DATA" --artifacts "$$ARG_ARTIFACTS")

predict: install ## classify new images: MODEL=<head .json/.skops/.joblib/softmax.keras or fine-tuned .keras> IMAGES=<dir or file> [OUT=csv or folder] (class folders: accuracy)
	$(call pipeline,predict $(call opt,MODEL,--model) $(call opt,IMAGES,--images) --batch-size "$$ARG_BATCH" --artifacts "$$ARG_ARTIFACTS" $(call opt,OUT,--out))

probe: install weights-from-assets ## linear-head accuracy per cut layer, one forward pass, CV on train (DATA= BACKBONE= INPUT_SIZE= PROBE_LAYERS=a,b CV=) -> artifacts/probe/
	$(call pipeline,probe --data "$$ARG_DATA" $(FEATURE_ARGS) $(SPLIT_ARGS) $(call opt,PROBE_LAYERS,--layers) --cv "$$ARG_CV")

auto: install weights-from-assets ## try the feature recipes (flip, scale, middle layer, joins) with svm+logreg; choose by CV on train; report (DATA= CV=)
	$(call pipeline,auto --data "$$ARG_DATA" $(FEATURE_ARGS) $(SPLIT_ARGS) --cv "$$ARG_CV")

check-unseen: install $(VENV_DIR)/.unseen-installed weights-from-assets ## make auto on data unlike ImageNet: texture patches and hymenoptera shrunk to 48 px and blurred
	$(call pipeline,unseen-data --out "$$ARG_ARTIFACTS/data" --source "$$ARG_ASSETS/datasets/hymenoptera_data")
	$(call pipeline,auto --data "$$ARG_ARTIFACTS/data/textures" $(FEATURE_ARGS) --cv "$$ARG_CV")
	$(call pipeline,auto --data "$$ARG_ARTIFACTS/data/hymenoptera_data_small_blurred" $(FEATURE_ARGS) --cv "$$ARG_CV")

audit: install weights-from-assets ## duplicates, leaks, likely label errors, outliers, balance, a map (DATA= CV= THRESHOLD=; stage one first if no cache) -> artifacts/audit/<dataset>/
	$(call pipeline,audit --data "$$ARG_DATA" $(FEATURE_ARGS) $(SPLIT_ARGS) --cv "$$ARG_CV" $(call opt,THRESHOLD,--threshold))

export: install $(VENV_DIR)/.export-installed ## features, labels, paths, splits (and the audit's out-of-fold probabilities) as .npz and Parquet -> artifacts/export/<dataset>/
	$(call pipeline,export --data "$$ARG_DATA" $(FEATURE_ARGS) $(SPLIT_ARGS))

# HEAD= only when given: the protocols' default heads are svm,logreg (not all); METRIC= only when
# given: theirs is balanced_accuracy, make head's accuracy.
PROTOCOL_ARGS = --data "$$ARG_DATA" $(FEATURE_ARGS) $(if $(filter command line environment%,$(origin HEAD)),--head "$$ARG_HEAD") \
	$(call opt,SEEDS,--seeds) $(call opt,METRIC,--metric) --cv "$$ARG_CV"

protocol: install ## N per class to train, the rest to test, over seeds: mean +- std per head (DATA= TRAIN_PER_CLASS=30 or SPLIT_FILE=a.csv SEEDS=0,1,2,3,4 HEAD=svm,logreg or linear_eval METRIC=balanced_accuracy) -> artifacts/protocols/ (and its page, index.html)
	$(call pipeline,protocol $(PROTOCOL_ARGS) $(call opt,TRAIN_PER_CLASS,--train-per-class) $(call opt,SPLIT_FILE,--split-file))

curve: install ## few-shot curve on the cache: the protocol per N (DATA= SHOTS=1,2,5,10,all SEEDS=0,1,2 HEAD= METRIC=) -> artifacts/protocols/<dataset>/<cache>/curve.{json,md,png} and <dataset>/index.html
	$(call pipeline,curve $(PROTOCOL_ARGS) --shots "$$ARG_SHOTS")

bench-protocol: install ## head fits of a 5-seed, 30-per-class protocol on 100 synthetic classes (width 1,280; svm,logreg then linear_eval) / one stage-one pass of the same images -> artifacts/bench/protocol.json
	"$$ARG_PY" -m pipeline.benchmarks.protocol --out "$$ARG_ARTIFACTS/bench/protocol.json"

bench-audit: install weights-from-assets ## the audit's time / stage one's, both timed in the run (BENCH_DATA=) -> artifacts/bench/audit.json
	$(call pipeline,bench-audit --data "$$ARG_BENCH_DATA" $(FEATURE_ARGS) --cv "$$ARG_CV" --out "$$ARG_ARTIFACTS/bench/audit.json")

bench-heads: install weights-from-assets ## fit time of the default heads / stage-one time (both timed in the run), both real data sets (artifacts/bench/heads.json); CLASSES=100 ROWS=3000,30000: on synthetic many-class features
ifdef CLASSES
	$(call pipeline,bench-heads --classes "$$ARG_CLASSES" --rows "$$ARG_ROWS" $(if $(wildcard $(ARG_ASSETS)/datasets/hymenoptera_data),--data "$$ARG_ASSETS/datasets/hymenoptera_data") $(FEATURE_ARGS) --runtime keras --cv "$$ARG_CV" --repeats "$$ARG_REPEATS" --out "$$ARG_ARTIFACTS/bench/heads-$$ARG_CLASSES-classes.json")
else
	$(call pipeline,bench-heads --data "$$ARG_ASSETS/datasets/hymenoptera_data" --data "$$ARG_ASSETS/datasets/cats_and_dogs_filtered" $(FEATURE_ARGS) --runtime keras --cv "$$ARG_CV" --out "$$ARG_ARTIFACTS/bench/heads.json")
endif

test: install $(VENV_DIR)/.dev-installed ## the test suite without its slow tier (a few minutes on 2 cores)
	"$$ARG_PY" -m pytest -q -m "not slow"

test-slow: install $(VENV_DIR)/.dev-installed $(VENV_DIR)/.ray-installed weights-from-assets ## the slow tier: every backbone built, kill-and-resume runs, Ray, real data
	"$$ARG_PY" -m pytest -q -m slow

test-all: install $(VENV_DIR)/.dev-installed $(VENV_DIR)/.ray-installed weights-from-assets ## both tiers, as CI runs them
	"$$ARG_PY" -m pytest -q

lint: install $(VENV_DIR)/.dev-installed ## ruff lint and format check
	"$$ARG_PY" -m ruff check pipeline tests && "$$ARG_PY" -m ruff format --check pipeline tests

format: install $(VENV_DIR)/.dev-installed ## apply ruff fixes and formatting
	"$$ARG_PY" -m ruff check --fix pipeline tests; "$$ARG_PY" -m ruff format pipeline tests

docs: $(VENV_DIR)/.docs-installed ## build the documentation site (mkdocs, strict: a warning fails) into artifacts/site/
	NO_MKDOCS_2_WARNING=1 "$$ARG_PY" -m mkdocs build --strict --site-dir "$$ARG_ARTIFACTS/site"

bench-features: install $(RAY_EXTRA) weights-from-assets ## benchmark stage one: Keras and runtime forward passes, whole stage per runtime, start-up (BENCH_DATA=, N=; ENGINE=ray: local vs Ray with 1 and 2 actors)
	$(call pipeline,bench-features --data "$$ARG_BENCH_DATA" --backbone "$$ARG_BACKBONE" --batch-size "$$ARG_BATCH" --images "$${ARG_N:-400}" --out "$$ARG_ARTIFACTS/bench/$(if $(filter ray,$(ARG_ENGINE)),features_ray,features).json" $(RAY_ARGS))

bench-stage-one: install weights-from-assets ## whole stage one on N (2000) cats-and-dogs images: int8 vs OpenVINO fp32 vs the tf.data way, rounds interleaved; every head's val accuracy per precision (artifacts/bench/stage_one.json)
	"$$ARG_PY" -m pipeline.benchmarks.stage_one_whole --data "$$ARG_BENCH_DATA/train" --images "$${ARG_N:-2000}" --heads-data "$$ARG_ASSETS/datasets/hymenoptera_data" --heads-data "$$ARG_ASSETS/datasets/cats_and_dogs_filtered" --out "$$ARG_ARTIFACTS/bench/stage_one.json"

finetune: install weights-from-assets ## stage three: fine-tune the last UNFREEZE layers (DATA= BACKBONE= WEIGHTS= INPUT_SIZE= UNFREEZE=n|block|all EPOCHS= LR= AUGMENT= AUG_COPIES= PHASE_TWO= PATIENCE= NAME= RESTART=1)
	$(call pipeline,finetune --data "$$ARG_DATA" $(FINETUNE_ARGS))

bench-finetune: install weights-from-assets ## one phase-two epoch (last block) / one stage-one pass (BENCH_DATA=, N=, AUG_COPIES=)
	$(call pipeline,bench-finetune --data "$$ARG_BENCH_DATA" --backbone "$$ARG_BACKBONE" --weights "$$ARG_WEIGHTS" --batch-size "$$ARG_BATCH" --images "$${ARG_N:-256}" --aug-copies "$$ARG_AUG_COPIES" --out "$$ARG_ARTIFACTS/bench/finetune.json")

clean: ## remove artifacts (keeps artifacts/README.md)
	find "$$ARG_ARTIFACTS" -mindepth 1 ! -name README.md -delete
