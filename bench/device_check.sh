#!/usr/bin/env bash
# The one script for a lent GPU machine: build, GPU tests (bf16, every backend), compute-sanitizer on the CUDA
# kernels, the benchmark suite, and a short Multi30k training run — in one command that fits the device budget.
#
#   bash bench/device_check.sh OUT_DIR [--dry-run] [--budget SECONDS] [--skip STEP ...]
#
# Steps (in this order, each capped in time; a step that no longer fits in --budget is skipped and says so):
#   env, build, bench_ops, tests, sanitizer, bench_model, train
# (the op benchmarks come before the tests because they are what a short budget is spent for, and each of their
# rows carries max_abs_diff_vs_eager, a correctness check of its own)
# Every step writes <step>.log into a work folder, and after each step everything is packed into
# OUT_DIR/device_check.tar.gz (so a run killed at its limit still returns what it finished); OUT_DIR/summary.txt
# is the table printed last. --dry-run runs the same steps on this machine's CPU with tiny shapes (CI checks the
# script's syntax and arguments this way, and a developer rehearses before spending GPU minutes).
#
# On the GPU machine: python3 is the interpreter with torch; there is no network (pip --no-deps); Multi30k must be
# inside the working tree (copy ../shared/data/multi30k to data/multi30k, git-ignored, and carry it). The machine's
# copy of the tree cannot resolve git HEAD, so name the commit in the command, e.g. (device tool, carry ["data"]):
#   CONVS2S_COMMIT=<git rev-parse HEAD here> bash bench/device_check.sh $OUT --budget 480
# The session's whole device budget is 15 minutes including a 1-2 minute start: one such call, then give_back.
set -uo pipefail

usage() { sed -n '2,19p' "$0"; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DRY=0; BUDGET=540; SKIP=" "
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --budget) [ $# -ge 2 ] || usage; BUDGET=$2; shift ;;
    --skip) [ $# -ge 2 ] || usage; SKIP="$SKIP$2 "; shift ;;
    -h|--help) usage ;;
    *) echo "device_check: unknown argument $1" >&2; usage ;;
  esac
  shift
done
case $BUDGET in ''|*[!0-9]*) echo "device_check: --budget must be a number of seconds" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
W=$(mktemp -d)
START=$(date +%s)
if [ $DRY = 1 ]; then
  PY=${PY:-$ROOT/.venv/bin/python}; DEVICE=cpu; QUICK=--quick
else
  PY=${PY:-python3}; DEVICE=cuda; QUICK=
fi
export PYTHONUNBUFFERED=1
DATA=${CONVS2S_DATA:-$ROOT/data/multi30k}
GPU_TESTS=${GPU_TESTS:-}
FAIRSEQ_CAP=${FAIRSEQ_CAP:-120}   # seconds for bench_fairseq inside bench_model
SUMMARY=$W/summary.txt
printf '%-12s %-8s %6s  %s\n' step status secs note > "$SUMMARY"

pack() { tar czf "$OUT/device_check.tar.gz" -C "$W" . 2>/dev/null; cp "$SUMMARY" "$OUT/summary.txt"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME CAP_SECONDS COMMAND...: run with a timeout of min(CAP, time left - 10 s), log, record status.
step() {
  local name=$1 cap=$2; shift 2
  local t0 rc status remain
  remain=$(( $(left) - 10 ))
  if [[ "$SKIP" == *" $name "* ]]; then
    printf '%-12s %-8s %6s  %s\n' "$name" skipped 0 "--skip" >> "$SUMMARY"; pack; return 0
  fi
  if [ "$remain" -lt 20 ]; then
    printf '%-12s %-8s %6s  %s\n' "$name" skipped 0 "out of budget" >> "$SUMMARY"; pack; return 0
  fi
  [ "$cap" -gt "$remain" ] && cap=$remain
  echo "=== $name (cap ${cap}s, $(left)s of budget left)"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=5 "$cap" bash -c '"$@"' step "$@" > "$W/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status="rc=$rc" ;; esac
  printf '%-12s %-8s %6s  %s\n' "$name" "$status" $(( $(date +%s) - t0 )) "$(tail -n 1 "$W/$name.log" | cut -c1-90)" >> "$SUMMARY"
  tail -n 3 "$W/$name.log"
  pack
  return 0
}

env_info() {
  date -u; git -C "$ROOT" rev-parse HEAD 2>/dev/null; git -C "$ROOT" status --porcelain --untracked-files=no
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
  which nvcc compute-sanitizer || true
}

build() {
  if [ $DRY = 1 ]; then
    MAX_JOBS=2 "$PY" -m pip install -q -e . --no-build-isolation
  else
    MAX_JOBS=16 CONVS2S_CUDA_ARCHS=${CONVS2S_CUDA_ARCHS:-9.0} "$PY" -m pip install -e . --no-build-isolation --no-deps
  fi
  "$PY" -c "import convs2s.ops as o; print(o.available_backends('$DEVICE'))"
}

gpu_tests() {
  if [ $DRY = 1 ]; then
    "$PY" -m pytest -q -x -p no:cacheprovider tests/test_dispatch.py tests/test_glu_conv.py
  else
    # The files with CUDA cases (bf16 included) first; the CPU-only rest is CI's. xdist spreads the Triton JIT
    # compiles over the 16 cores. GPU_TESTS overrides the selection.
    "$PY" -m pytest -q -p no:cacheprovider -n 8 --timeout 300 -rfE ${GPU_TESTS:-tests/test_glu_conv_triton.py \
        tests/test_conv_attention_triton.py tests/test_glu_conv_native.py tests/test_conv_attention_native.py \
        tests/test_generate.py tests/test_model.py \
        tests/test_bench_fairseq.py::test_bench_on_cuda_every_backend_and_dtype}
  fi
}

sanitizer() {
  if [ $DRY = 1 ]; then
    "$PY" -m bench.sanitize_cuda --device cpu
  else
    compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m bench.sanitize_cuda --device cuda && \
    compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" -m bench.sanitize_cuda --device cuda
  fi
}

# Model level: the training step against eager (torch.compile of the whole model costs minutes of compile
# here, so the suite's compile column is left to `make bench`), then generation, then a converted fairseq
# fconv_wmt_en_de (210 M parameters) generating with beam 5 per backend and dtype: 200 sentences, 2 timed passes
# each (its default is 500 x 3), under a limit of its own so that it cannot eat the training run's time; it
# rewrites its JSON after every row, so a run stopped at the limit keeps the rows it finished.
bench_model() {
  local rc=0 r size="--sentences 200 --repeats 2"
  [ $DRY = 1 ] && size=--quick
  mkdir -p "$W/bench_model"
  "$PY" -m bench.bench_train --device $DEVICE $QUICK --presets multi30k --impls eager triton native \
      --out "$W/bench_model/train.json" || rc=$?
  "$PY" -m bench.bench_generate --device $DEVICE $QUICK --out "$W/bench_model/generate.json" || rc=$?
  timeout --signal=TERM --kill-after=5 "$FAIRSEQ_CAP" \
      "$PY" -m bench.bench_fairseq --device $DEVICE $size --out "$W/bench_model/fairseq.json" || {
    r=$?; rc=$r
    [ $r = 124 ] && echo "bench_fairseq: stopped at its $FAIRSEQ_CAP s limit; fairseq.json holds the rows it finished"
  }
  echo "bench_model: train, generate, fairseq: exit status $rc (the last failure's, if any)"
  return $rc
}

train_run() {
  if [ ! -f "$DATA/train.de.gz" ]; then echo "no Multi30k at $DATA: skipped"; return 3; fi
  local minutes=${TRAIN_MINUTES:-3} preset=multi30k
  [ $DRY = 1 ] && { minutes=0.2; preset=tiny; }
  "$PY" -m convs2s train --preset $preset --data "$DATA" --device $DEVICE --max-minutes "$minutes" \
      --save-dir "$W/ckpt" --metrics-json "$W/train_metrics.json"
}

# The steps run under `timeout bash -c`, which sees exported functions and variables only.
export -f env_info build gpu_tests sanitizer bench_model train_run
export DRY PY DEVICE DATA W ROOT QUICK GPU_TESTS FAIRSEQ_CAP
step env 30 env_info
step build 200 build
step bench_ops 170 "$PY" -m bench.run --device $DEVICE $QUICK --only glu_conv conv_attention --out "$W/bench"
step tests 150 gpu_tests
step sanitizer 90 sanitizer
step bench_model 270 bench_model
step train 400 train_run
for f in "$W"/bench/*.json "$W"/bench_model/*.json "$W"/train_metrics.json; do
  [ -f "$f" ] && echo "$f" | sed "s|$W/||"
done > "$W/json_files.txt"
echo "device_check: $(( $(date +%s) - START )) s" >> "$SUMMARY"
pack
echo; cat "$SUMMARY"
