#!/usr/bin/env bash
# Reproduce the README "Training" figures: the small variant trained from scratch on DAVIS (345 images) on this
# machine's CPUs, for 1000 and for 2500 iterations, then jobs/evaluate.py on GrabCut and Berkeley (never seen in
# training) for the untrained model (the same seed, so the same initial weights) and three checkpoints.
# About 1 h 15 min on 2 cores. Resumable: kill it at any point and rerun; training and evaluation go on where
# they stopped.
# Usage: bash bench/run_training_proof.sh [OUTPUT_DIR]
# The interpreter is $PYTHON, by default the README install's .venv/bin/python (never activated, so a plain
# `python3` would lack the project's packages); e.g. PYTHON=python3 inside an activated environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${1:-outputs/train-proof}"
DATA="${DATA_ROOT:-../shared/data}"
train() {  # train ITERATIONS
    "$PYTHON" jobs/train.py --out-dir "$OUT/run-$1" --variant small --seed 42 \
        --data "folder:$DATA/DAVIS/img,masks=$DATA/DAVIS/gt,format=binary" \
        --max-iters "$1" --lr 1e-3 --warmup-iters 25 --batch-size 4 --crop-size 256 \
        --checkpoint-interval 100 --log-interval 1 --cpus-per-worker 2 --loader-workers 1
}
train 1000
train 2500
EVAL=(GrabCut Berkeley --data-root "$DATA")
"$PYTHON" jobs/evaluate.py --random-init small --init-seed 42 "${EVAL[@]}" --name untrained --output "$OUT/eval-untrained"
for spec in 1000:300 1000:1000 2500:2500; do
    run="${spec%%:*}" it="${spec##*:}"
    "$PYTHON" jobs/evaluate.py --checkpoint "$OUT/run-$run/checkpoints/$(printf 'iter_%07d.pth' "$it")" "${EVAL[@]}" \
        --name "trained-${it}it" --output "$OUT/eval-$it"
done
"$PYTHON" jobs/evaluate.py --compare "$OUT/eval-untrained" "$OUT/eval-300" "$OUT/eval-1000" "$OUT/eval-2500" \
    --output "$OUT/compare"
"$PYTHON" -c "from interformer.training.plot import plot_loss; plot_loss('$OUT/run-2500/log.csv', '$OUT/loss.png')"
