# The README's commands. Each target installs what it needs into .venv (created if missing).
#   make train   train ConvS2S on Multi30k De->En and print test BLEU (see README)
#   make test    the test suite (CPU; Triton kernels through TRITON_INTERPRET=1 when there is no GPU)
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

.PHONY: all install deps test test-fairseq train bench bench-vs-fairseq clean

all: test

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Third-party packages; triton comes with the CUDA build of torch at the version torch pins.
$(VENV)/.deps: $(PY) Makefile
	$(PIP) install -q "$(TORCH)" numpy pytest pytest-benchmark hypothesis sentencepiece sacrebleu sacremoses tqdm matplotlib ninja
	touch $@

deps: $(VENV)/.deps

# The package itself, editable; rebuilt when setup.py or the C++/CUDA sources change.
$(VENV)/.installed: $(VENV)/.deps setup.py $(wildcard csrc/*)
	$(PIP) install -q -e . --no-build-isolation
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Real fairseq (fairseq-fixed: fairseq 0.12.2 with Python 3.11 fixes) pins old hydra/omegaconf and builds Cython
# and C++ extensions, so it gets its own environment; convs2s is used from this tree (reference backend, no build).
# CONVS2S_REQUIRE_FAIRSEQ=1 turns the test file's import skip into a failure.
FAIRSEQ_VENV ?= .venv-fairseq
$(FAIRSEQ_VENV)/.deps: Makefile
	python3 -m venv $(FAIRSEQ_VENV)
	$(FAIRSEQ_VENV)/bin/python -m pip install -q --upgrade pip
	$(FAIRSEQ_VENV)/bin/python -m pip install -q "$(TORCH)" numpy cython ninja setuptools wheel pytest hypothesis \
		sentencepiece sacrebleu subword-nmt==0.3.8 sacremoses
	$(FAIRSEQ_VENV)/bin/python -m pip install -q --no-build-isolation fairseq-fixed==0.12.3.1
	touch $@

test-fairseq: $(FAIRSEQ_VENV)/.deps
	CONVS2S_REQUIRE_FAIRSEQ=1 PYTHONPATH=$(CURDIR) $(FAIRSEQ_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		-W ignore::UserWarning -W ignore::FutureWarning -W ignore::DeprecationWarning tests/test_fairseq_real.py \
		tests/test_fairseq_search.py

# convs2s vs fairseq's own generator on one fconv_wmt_en_de-sized model (CPU; bench/bench_vs_fairseq.py).
bench-vs-fairseq: $(FAIRSEQ_VENV)/.deps install
	PYTHONPATH=$(CURDIR) $(FAIRSEQ_VENV)/bin/python -W ignore -m bench.bench_vs_fairseq $(BENCH_ARGS)

# Multi30k De->En: preset auto = "multi30k" on a GPU, "small" on a CPU, for TRAIN_MINUTES (default 20) of
# wall-clock time; then test_2016_flickr sacreBLEU + chrF of the best checkpoint and five example translations.
# Run folder: RUN (default runs/multi30k-de-en): checkpoints, train_log.jsonl, train/test metrics JSON.
train: install
	$(PY) -m convs2s train --preset auto $(if $(DATA),--data $(DATA),) --src-lang de --tgt-lang en \
		--save-dir $(or $(RUN),runs/multi30k-de-en) --max-minutes $(or $(TRAIN_MINUTES),20) \
		--metrics-json $(or $(RUN),runs/multi30k-de-en)/train_metrics.json
	$(PY) -m convs2s evaluate --checkpoint $(or $(RUN),runs/multi30k-de-en)/best.pt --split test_2016_flickr \
		$(if $(DATA),--data $(DATA),) --examples 5 --metrics-json $(or $(RUN),runs/multi30k-de-en)/test_metrics.json

bench: install
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info convs2s/_C*.so
