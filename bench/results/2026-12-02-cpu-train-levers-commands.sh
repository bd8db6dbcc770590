#!/bin/bash
# The commands of the 2026-12-02 training-lever runs (issue 20), as run from /work/main on the project's 2-core CPU
# machine (no GPU). Each lever run is `make train`'s training command of the time (small preset, 600 updates,
# seed 1, max-tokens 4000) with one setting changed; two runs at a time, one thread each (each run's per-update
# time is therefore about twice a lone run's). Files: 2026-12-02-cpu-train-levers.json (table and validation
# curves), 2026-12-02-cpu-train-levers-val-beam.json (beam/length-penalty sweep of the winner, validation only).
set -e
D=../shared/data/multi30k; PY=.venv/bin/python
run() {  # run NAME [options]: make train's training step with the given changes
  N=$1; shift
  OMP_NUM_THREADS=1 $PY -m convs2s train --preset auto --data $D --src-lang de --tgt-lang en --save-dir /tmp/r20b/$N \
    --max-updates 600 --num-threads 1 --no-progress --metrics-json /tmp/r20b/$N/train_metrics.json "$@"
}
# Round 1, 12:47-13:34 UTC (the baseline is 2026-12-02-cpu-make-train: Adam 5e-4, plateau schedule).
run lr1e3 --lr 1e-3 &
run cos1e3 --lr 1e-3 --lr-scheduler cosine --warmup-updates 50 &
wait
# The round-1 winner's length penalty, validation only (one beam search, re-ranked per penalty).
OMP_NUM_THREADS=1 $PY -m bench.tune_lenpen --checkpoint /tmp/r20b/lr1e3/best.pt --data $D --beam 5 \
  --lenpens 0.6 0.8 1.0 1.2 1.4 --num-threads 1 --out /tmp/r20b/val_lr1e3.json
cp /tmp/r20b/val_lr1e3.json bench/results/2026-12-02-cpu-train-levers-val-beam.json
# Round 2, from 13:35 UTC, beside a clean-clone CI run (.ci/run) until 14:26. Both stopped (kill) at 14:26, lr2e3
# after its update-460 validation, lr1e3_do01 after update 345, to leave the CPU to the make train run below.
run lr2e3 --lr 2e-3 &
run lr1e3_do01 --lr 1e-3 --dropout 0.1 &
# make train with the winner (TRAIN_RECIPE = --lr 2e-3 --lr-scheduler plateau; torch's default of two threads),
# started 14:22:30 UTC; alone on the machine from 14:26. Files: 2026-12-02-cpu-make-train-lr2e3-*.
s=$(date +%s); make train RUN=/tmp/r20b/make-train; echo "make train wall $(( $(date +%s) - s )) s"
# The table.
$PY -m bench.train_levers --runs base=bench/results/2026-12-02-cpu-make-train-train_log.jsonl \
  lr1e3=/tmp/r20b/lr1e3 cos1e3=/tmp/r20b/cos1e3 lr2e3=/tmp/r20b/lr2e3 lr1e3_do01=/tmp/r20b/lr1e3_do01 \
  --out bench/results/2026-12-02-cpu-train-levers.json
# Where a training step's time goes, on the idle machine (13:34 UTC, nothing else running).
$PY -m bench.profile_train --preset small --batch 128 32 32 --threads 1 2 --steps 3 --top 12 \
  --out /tmp/r20b/profile.json
cp /tmp/r20b/profile.json bench/results/2026-12-02-cpu-train-profile.json
