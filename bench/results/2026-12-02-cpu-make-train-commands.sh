#!/bin/bash
# The commands of the 2026-12-02 cpu-make-train run (issue 20), as run from /work/main on the project's 2-core CPU
# machine, shared with other engineers' jobs (load average 2.3-15 during the run). Files: 2026-12-02-cpu-make-train-*.
set -e
R=/tmp/r20/run; D=../shared/data/multi30k; PY=.venv/bin/python
TRAIN="$PY -m convs2s train --preset auto --data $D --src-lang de --tgt-lang en --save-dir $R --max-updates 600
  --max-minutes 120 --save-interval-updates 50 --keep-interval-checkpoints -1 --no-progress
  --metrics-json $R/train_metrics.json"
# 1. Training, 600 updates (small preset, auto on CPU; Adam 5e-4, reduce-on-plateau, max-tokens 4000, seed 1).
#    Started 09:39:04 UTC with --num-threads 1 (then --keep-interval-checkpoints was a flag, same meaning as -1).
#    Killed after update 50 (09:51) and resumed from last.pt with --num-threads 2 to go faster under the load: it
#    went slower (updates 50->100 in 12.9 min against 8.5 min for 1->50 with one thread), so killed right after
#    checkpoint_100 (10:04:26) and resumed from last.pt with --num-threads 1 to the end. --resume continues from
#    the exact batch with the saved RNG state; the thread count changes only float summation order.
OMP_NUM_THREADS=1 $TRAIN --num-threads 1                                        # updates 1-50
OMP_NUM_THREADS=2 $TRAIN --num-threads 2 --resume $R/last.pt                    # updates 51-100
OMP_NUM_THREADS=1 $TRAIN --num-threads 1 --resume $R/last.pt                    # updates 101-600
# 2. Checkpoint averages (the newest 3 / 5 / 8 of checkpoint_50 ... checkpoint_600).
for n in 3 5 8; do $PY -m convs2s average --inputs $R --last $n --output $R/avg$n.pt; done
# 3. Validation only: greedy and beam 5 with lenpen 0.6-1.4, per checkpoint (one process each, in parallel).
for c in last best avg3 avg5 avg8; do
  OMP_NUM_THREADS=1 $PY -m bench.tune_lenpen --checkpoint $R/$c.pt --data $D --beam 5 \
    --lenpens 0.6 0.8 1.0 1.2 1.4 --num-threads 1 --out /tmp/r20/val_$c.json &
done; wait
# 4. Test sets, once: the validation winner (best.pt, beam 5, lenpen 1.2) and greedy best.pt (the old recipe).
for s in test_2016_flickr test_2017_flickr; do
  $PY -m convs2s evaluate --checkpoint $R/best.pt --split $s --data $D --beam 5 --lenpen 1.2 --num-threads 1 \
    --metrics-json /tmp/r20/test_winner_$s.json &
  $PY -m convs2s evaluate --checkpoint $R/best.pt --split $s --data $D --beam 1 --num-threads 1 \
    --metrics-json /tmp/r20/test_greedy_$s.json &
done; wait
