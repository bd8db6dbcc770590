#!/usr/bin/env bash
# The one script for a lent GPU machine: build, the GPU tests (never-run paths first), compute-sanitizer on the
# native CUDA kernels, the benchmark suite, and a short Multi30k training run, split into two calls that each fit
# the device tool's per-call limit.
#
#   bash bench/device_check.sh OUT_DIR [--dry-run] [--budget SECONDS] [--call 1|2|3] [--skip STEP ...] [--print-plan]
#
# Steps, in this order, each capped in time (a step that no longer fits in --budget is skipped and says so):
#   env, build, tests, sanitizer, bench_ops, bench_model, train, recipe
# --call 1  build + tests (+ sanitizer): the never-run paths first, autotuning off (CONVS2S_TRITON_AUTOTUNE=0);
#           the tests are grouped by (op, backend), and after the step the GPU_VALIDATED entries of the groups that
#           passed are printed (OUT_DIR/gpu_record.txt), to commit into convs2s/ops/_backend.py.
# --call 2  benchmarks (autotuning on) + a 2-minute training run; build is skipped when the extension is already
#           built with CUDA (a warm machine keeps call 1's build; a fresh one rebuilds).
# --call 3  make train's GPU recipe: the Makefile's TRAIN_RECIPE on the multi30k preset for
#           RECIPE_UPDATES updates (default 3000) under a RECIPE_MINUTES cap (default 5.5), then best.pt with beam 5
#           on test_2016_flickr and test_2017_flickr (metrics JSON in OUT_DIR's archive). Meant for a warm machine
#           (call 1's build); the goal's 10 minutes of training do not fit one call.
# Each call's step caps add up to at most 470 s (--print-plan lists them), under the tool's 480 s.
# Every step writes <step>.log into a work folder, and after each step everything is packed into
# OUT_DIR/device_check.tar.gz (so a run killed at its limit still returns what it finished); OUT_DIR/summary.txt
# is the table printed last. --dry-run runs the same steps on this machine's CPU with tiny shapes (CI checks the
# script's syntax and arguments this way, and a developer rehearses before spending GPU minutes).
#
# On the GPU machine: python3 is the interpreter with torch; there is no network (pip --no-deps); Multi30k must be
# inside the working tree (copy ../shared/data/multi30k to data/multi30k, git-ignored, and carry it). The machine's
# copy of the tree cannot resolve git HEAD, so name the commit in the command (device tool, carry ["data"]):
#   CONVS2S_COMMIT=<git rev-parse HEAD here> bash bench/device_check.sh $OUT --call 1 --budget 470
#   CONVS2S_COMMIT=<...> bash bench/device_check.sh $OUT --call 2 --budget 470
set -uo pipefail

usage() { sed -n '2,25p' "$0"; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DRY=0; BUDGET=470; SKIP=" "; PLAN=0
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --budget) [ $# -ge 2 ] || usage; BUDGET=$2; shift ;;
    --skip) [ $# -ge 2 ] || usage; SKIP="$SKIP$2 "; shift ;;
    --call) [ $# -ge 2 ] || usage
            case $2 in
              1) SKIP="$SKIP""bench_ops bench_model train recipe " ;;
              2) SKIP="$SKIP""tests sanitizer recipe " ;;
              3) SKIP="$SKIP""tests sanitizer bench_ops bench_model train " ;;
              *) echo "device_check: --call takes 1, 2 or 3" >&2; exit 2 ;;
            esac
            shift ;;
    --print-plan) PLAN=1 ;;
    -h|--help) usage ;;
    *) echo "device_check: unknown argument $1" >&2; usage ;;
  esac
  shift
done
case $BUDGET in ''|*[!0-9]*) echo "device_check: --budget must be a number of seconds" >&2; exit 2 ;; esac

# Step caps (seconds). Call 1: env + build + tests + sanitizer = 470; call 2: env + build (seconds when call 1's
# build is still there) + bench_ops + bench_model + train = 470 with a fresh build's 220 replaced by 20; call 3:
# env + build (warm: 20) + recipe = 470.
STEPS="env build tests sanitizer bench_ops bench_model train recipe"
declare -A CAP=([env]=20 [build]=220 [tests]=190 [sanitizer]=40 [bench_ops]=140 [bench_model]=130 [train]=150
                [recipe]=430)
if [ $PLAN = 1 ]; then
  total=0
  for name in $STEPS; do
    [[ "$SKIP" == *" $name "* ]] && continue
    echo "$name ${CAP[$name]}"; total=$(( total + ${CAP[$name]} ))
  done
  echo "total $total"
  exit 0
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
W=$(mktemp -d)
CKPT=$(mktemp -d)     # checkpoints (hundreds of MB for the multi30k preset with Adam's state): not packed into OUT
trap 'rm -rf "$CKPT"' EXIT
START=$(date +%s)
if [ $DRY = 1 ]; then
  PY=${PY:-$ROOT/.venv/bin/python}; DEVICE=cpu; QUICK=--quick
else
  PY=${PY:-python3}; DEVICE=cuda; QUICK=
fi
export PYTHONUNBUFFERED=1
DATA=${CONVS2S_DATA:-$ROOT/data/multi30k}
GPU_TESTS=${GPU_TESTS:-}
FAIRSEQ_CAP=${FAIRSEQ_CAP:-45}    # seconds for bench_fairseq inside bench_model
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
  if [ $DRY = 0 ] && "$PY" -c "import convs2s._C as c, sys; sys.exit(0 if c.has_cuda() else 1)" 2>/dev/null; then
    echo "the extension is already built with CUDA kernels (call 1's build on this machine): not rebuilt"
  elif [ $DRY = 1 ]; then
    MAX_JOBS=2 "$PY" -m pip install -q -e . --no-build-isolation
  else
    MAX_JOBS=16 CONVS2S_CUDA_ARCHS=${CONVS2S_CUDA_ARCHS:-9.0} "$PY" -m pip install -e . --no-build-isolation --no-deps
  fi
  "$PY" -c "import convs2s.ops as o; print(o.available_backends('$DEVICE'))"
}

# The first of the given test files that exists (the tests move into tests/ops/ op by op).
first_file() { for f in "$@"; do [ -f "$f" ] && { echo "$f"; return; }; done; echo "$1"; }

# test_group OP BACKEND PART FILE KEXPR: one part of one (op, backend)'s whole test suite (CPU cases included),
# logged to tests-OP-BACKEND-PART.log; one line per part in test_groups.txt for bench/gpu_record.py, spread over 8
# workers. The dry run only lists the part (bench/gpu_record.py --collect then collects every part in one process:
# the selections must exist).
test_group() {
  local op=$1 backend=$2 part=$3 file=$4 kexpr=$5 rc
  local log="$W/tests-$op-$backend-$part.log"
  if [ $DRY = 1 ]; then
    printf '%s\t%s\t%s\t%s\t%s\n' "$op" "$backend" "$part" "$file" "$kexpr" >> "$W/test_parts.tsv"
    return
  fi
  "$PY" -m pytest -q -p no:cacheprovider -n 8 --timeout 300 -rfE "$file" -k "$kexpr" > "$log" 2>&1
  rc=$?
  echo "$op $backend $part $rc $file -k '$kexpr' :: $(tail -n 1 "$log")" | tee -a "$W/test_groups.txt"
}

# Never-run paths first: the native CUDA kernels of both ops, Triton attention in fp32 and every config; then the
# rest of each (op, backend) suite. Autotuning off: each Triton kernel compiles its first config once per variant.
gpu_tests() {
  local ca gc gs
  ca=$(first_file tests/ops/test_conv_attention.py)
  gc=$(first_file tests/ops/test_glu_conv.py tests/test_glu_conv.py)
  gs=$(first_file tests/ops/test_glu_conv_step.py tests/test_glu_conv_step.py)
  : > "$W/test_groups.txt"; : > "$W/test_parts.tsv"
  if [ -n "$GPU_TESTS" ]; then
    "$PY" -m pytest -q -p no:cacheprovider -n 8 --timeout 300 -rfE $GPU_TESTS
    return
  fi
  export CONVS2S_TRITON_AUTOTUNE=0
  test_group conv_attention native all "$ca" "native"
  test_group glu_conv native all "$gc" "native"
  test_group conv_attention triton first "$ca" "triton and (float32 or every_config)"
  test_group conv_attention triton rest "$ca" "triton and not (float32 or every_config)"
  test_group glu_conv triton all "$gc" "triton"
  test_group glu_conv_step native all "$gs" "native"
  test_group glu_conv_step triton all "$gs" "triton"
  [ $DRY = 1 ] && "$PY" -m bench.gpu_record --collect "$W/test_parts.tsv" > "$W/test_groups.txt"
  "$PY" -m bench.gpu_record "$W/test_groups.txt" --device $DEVICE | tee "$W/gpu_record.txt"
  cp "$W/gpu_record.txt" "$OUT/gpu_record.txt"
  awk '$4 != 0 {bad = 1} END {exit bad}' "$W/test_groups.txt"   # every part green
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
# fconv_wmt_en_de (210 M parameters) generating with beam 5 per backend and dtype: 64 sentences, 2 timed passes
# each (its default is 500 x 3), under a limit of its own so that it cannot eat the training run's time; it
# rewrites its JSON after every row, so a run stopped at the limit keeps the rows it finished.
bench_model() {
  local rc=0 r size="--sentences 64 --repeats 2"
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
  local minutes=${TRAIN_MINUTES:-2} preset=multi30k
  [ $DRY = 1 ] && { minutes=0.2; preset=tiny; }
  "$PY" -m convs2s train --preset $preset --data "$DATA" --device $DEVICE --max-minutes "$minutes" \
      --save-dir "$CKPT/train" --metrics-json "$W/train_metrics.json"
}

# make train's recipe (the Makefile's TRAIN_RECIPE, one source for both) on the GPU preset, then the test sets.
recipe_run() {
  if [ ! -f "$DATA/train.de.gz" ]; then echo "no Multi30k at $DATA: skipped"; return 3; fi
  local recipe updates=${RECIPE_UPDATES:-3000} minutes=${RECIPE_MINUTES:-5.5} preset=multi30k split rc=0
  recipe=$(sed -n 's/^TRAIN_RECIPE ?= //p' "$ROOT/Makefile")
  [ -n "$recipe" ] || { echo "no TRAIN_RECIPE in $ROOT/Makefile"; return 2; }
  [ $DRY = 1 ] && { updates=3; minutes=0.5; preset=tiny; }
  echo "recipe: $recipe"
  # shellcheck disable=SC2086  # the recipe is a list of options
  "$PY" -m convs2s train --preset $preset --data "$DATA" --device $DEVICE --max-updates "$updates" \
      --max-minutes "$minutes" $recipe --save-dir "$CKPT/recipe" --no-progress \
      --metrics-json "$W/recipe/train_metrics.json" || return $?
  cp "$CKPT/recipe/train_log.jsonl" "$W/recipe/"
  for split in test_2016_flickr test_2017_flickr; do
    "$PY" -m convs2s evaluate --checkpoint "$CKPT/recipe/best.pt" --split $split --data "$DATA" --beam 5 \
        --lenpen 1.2 --metrics-json "$W/recipe/${split}_metrics.json" || rc=$?
  done
  return $rc
}

# The steps run under `timeout bash -c`, which sees exported functions and variables only.
export -f env_info build gpu_tests sanitizer bench_model train_run recipe_run
export -f first_file test_group
export DRY PY DEVICE DATA W CKPT ROOT OUT QUICK GPU_TESTS FAIRSEQ_CAP
step env "${CAP[env]}" env_info
step build "${CAP[build]}" build
step tests "${CAP[tests]}" gpu_tests
step sanitizer "${CAP[sanitizer]}" sanitizer
# Benchmarks autotune (CONVS2S_TRITON_AUTOTUNE unset).
step bench_ops "${CAP[bench_ops]}" env -u CONVS2S_TRITON_AUTOTUNE \
    "$PY" -m bench.run --device $DEVICE $QUICK --only glu_conv conv_attention --out "$W/bench"
step bench_model "${CAP[bench_model]}" bench_model
step train "${CAP[train]}" train_run
step recipe "${CAP[recipe]}" recipe_run
for f in "$W"/bench/*.json "$W"/bench_model/*.json "$W"/train_metrics.json "$W"/recipe/*.json; do
  [ -f "$f" ] && echo "$f" | sed "s|$W/||"
done > "$W/json_files.txt"
echo "device_check: $(( $(date +%s) - START )) s" >> "$SUMMARY"
pack
echo; cat "$SUMMARY"
