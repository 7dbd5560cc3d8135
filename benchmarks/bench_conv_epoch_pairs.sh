#!/bin/bash
# The issue-14 comparison in one run: the old code (a checkout of c846873, the first argument) on the
# 99% recipe against this code on the fast recipe (gamma 0.5, --min-diagonal 0), one epoch of 3,000
# images from fresh and from trained models (run folders: $OLD_RUN, $NEW_RUN), twice over; the old code
# with one BLAS thread and with its own default (two), this code with one thread and with --threads 2.
# Usage: bash benchmarks/bench_conv_epoch_pairs.sh /path/to/old/checkout [python]
set -euo pipefail
OLD=${1:?usage: bench_conv_epoch_pairs.sh /path/to/old/checkout [python]}
PY=${2:-.venv/bin/python}
OLD_RUN=${OLD_RUN:-runs/sweep_conv99/default/seed=0}
NEW_RUN=${NEW_RUN:-runs/sweep_conv_fast/default/seed=0}
B="benchmarks/bench_conv_epoch.py --data-dir ${DATA_DIR:-../shared/data} --images 3000"
FAST="--gamma 0.5 --min-diagonal 0"
for rep in 1 2; do
  echo "== repetition $rep"
  OPENBLAS_NUM_THREADS=1 PYTHONPATH=$OLD $PY $B
  PYTHONPATH=$OLD $PY $B
  $PY $B $FAST
  $PY $B $FAST --threads 2
  OPENBLAS_NUM_THREADS=1 PYTHONPATH=$OLD $PY $B --init $OLD_RUN --lr 1e-4
  PYTHONPATH=$OLD $PY $B --init $OLD_RUN --lr 1e-4
  $PY $B --init $OLD_RUN --lr 1e-4
  $PY $B --init $OLD_RUN --lr 1e-4 --threads 2
  $PY $B --init $NEW_RUN $FAST --lr 1e-4
  $PY $B --init $NEW_RUN $FAST --lr 1e-4 --threads 2
done
