# The README's commands. Each target installs what it needs into .venv (created if missing).
#   make train   train ConvS2S on Multi30k De->En and print test BLEU (see README)
#   make test    the test suite (CPU; Triton kernels through TRITON_INTERPRET=1 when there is no GPU)
#   make lint    ruff check . (settings in pyproject.toml)
#   make bench   the benchmark suite for the backends this machine has
#   make test-fairseq   convs2s against real fairseq (tests/test_fairseq_real.py) in its own .venv-fairseq
#   make bench-vs-fairseq   generation speed of convs2s's backends against fairseq's own, same model (CPU)

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH ?= torch==2.14.1
# Multi30k: ../shared/data/multi30k when present (this project's machines), else CONVS2S_DATA or the download cache.
DATA ?= $(if $(wildcard ../shared/data/multi30k/train.de.gz),../shared/data/multi30k,)
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: all install deps test lint test-fairseq train bench bench-vs-fairseq clean

all: test

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch (the build users pick: TORCH=...) and what building the extension needs, installed first because the
# package is built with --no-build-isolation against this torch; triton comes with the CUDA build of torch.
$(VENV)/.deps: $(PY) Makefile
	$(PIP) install -q "$(TORCH)" "setuptools>=64" ninja
	touch $@

deps: $(VENV)/.deps

# The package itself, editable, with the dependencies and the dev extra (tests, lint) of pyproject.toml; rebuilt
# when setup.py, pyproject.toml or the C++/CUDA sources change.
$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/*)
	$(PIP) install -q -e ".[dev]" --no-build-isolation
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .

# Real fairseq (fairseq-fixed: fairseq 0.12.2 with Python 3.11 fixes) pins old hydra/omegaconf and builds Cython
# and C++ extensions, so it gets its own environment, with the fairseq and dev extras; convs2s is installed there
# from this tree without its extension (CONVS2S_SKIP_BUILD=1; the tests use the reference backend).
# CONVS2S_REQUIRE_FAIRSEQ=1 turns the test file's import skip into a failure.
FAIRSEQ_VENV ?= .venv-fairseq
$(FAIRSEQ_VENV)/.deps: Makefile pyproject.toml
	python3 -m venv $(FAIRSEQ_VENV)
	$(FAIRSEQ_VENV)/bin/python -m pip install -q --upgrade pip
	$(FAIRSEQ_VENV)/bin/python -m pip install -q "$(TORCH)" numpy cython ninja "setuptools>=64" wheel
	CONVS2S_SKIP_BUILD=1 $(FAIRSEQ_VENV)/bin/python -m pip install -q --no-build-isolation -e ".[fairseq,dev]"
	touch $@

test-fairseq: $(FAIRSEQ_VENV)/.deps
	CONVS2S_REQUIRE_FAIRSEQ=1 PYTHONPATH=$(CURDIR) $(FAIRSEQ_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		-W ignore::UserWarning -W ignore::FutureWarning -W ignore::DeprecationWarning tests/test_fairseq_real.py \
		tests/test_fairseq_search.py

# convs2s vs fairseq's own generator on one fconv_wmt_en_de-sized model (CPU; bench/bench_vs_fairseq.py).
bench-vs-fairseq: $(FAIRSEQ_VENV)/.deps install
	PYTHONPATH=$(CURDIR) $(FAIRSEQ_VENV)/bin/python -W ignore -m bench.bench_vs_fairseq $(BENCH_ARGS)

# Multi30k De->En: preset auto = "multi30k" on a GPU, "small" on a CPU, for a fixed budget of TRAIN_UPDATES
# updates (default 600, about 23 minutes on this project's idle 2-core CPU: the update count, not the clock, fixes
# the model, so a busy or slower machine trains the same one, only later; TRAIN_MINUTES, default 120, is a safety
# net); then best.pt with beam 5 (length penalty 1.2, tuned on validation) scored on test_2016_flickr and
# test_2017_flickr (sacreBLEU + chrF), and five example translations. Run folder RUN (default runs/multi30k-de-en):
# checkpoints, train_log.jsonl, train/test metrics JSON.
# TRAIN_RECIPE: the optimizer settings, chosen on validation (bench/results/2026-12-02-cpu-train-levers.json);
# bench/device_check.sh --call 3 reads this line for the GPU recipe.
TRAIN_RECIPE ?= --lr 2e-3 --lr-scheduler plateau
train: RUN_DIR = $(or $(RUN),runs/multi30k-de-en)
train: install
	$(PY) -m convs2s train --preset auto $(if $(DATA),--data $(DATA),) --src-lang de --tgt-lang en \
		--save-dir $(RUN_DIR) --max-updates $(or $(TRAIN_UPDATES),600) --max-minutes $(or $(TRAIN_MINUTES),120) \
		$(TRAIN_RECIPE) --metrics-json $(RUN_DIR)/train_metrics.json
	$(PY) -m convs2s evaluate --checkpoint $(RUN_DIR)/best.pt --split test_2016_flickr $(if $(DATA),--data $(DATA),) \
		--beam 5 --lenpen 1.2 --examples 5 --metrics-json $(RUN_DIR)/test_metrics.json
	$(PY) -m convs2s evaluate --checkpoint $(RUN_DIR)/best.pt --split test_2017_flickr $(if $(DATA),--data $(DATA),) \
		--beam 5 --lenpen 1.2 --metrics-json $(RUN_DIR)/test_2017_metrics.json

bench: install
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info convs2s/_C*.so
