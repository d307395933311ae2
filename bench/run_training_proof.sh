#!/usr/bin/env bash
# Reproduce the README "Training" figures: the small variant trained from scratch on DAVIS (345 images) for
# 1000 iterations on this machine's CPUs, then jobs/evaluate.py on GrabCut and Berkeley (never seen in training)
# for the untrained model (the same seed, so the same initial weights), a mid-run checkpoint and the final one.
# Resumable: kill it at any point and rerun; training and evaluation go on where they stopped.
# Usage: bash bench/run_training_proof.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-outputs/train-proof}"
DATA="${DATA_ROOT:-../shared/data}"
python3 jobs/train.py --out-dir "$OUT/run" --variant small --seed 42 \
    --data "folder:$DATA/DAVIS/img,masks=$DATA/DAVIS/gt,format=binary" \
    --max-iters 1000 --lr 1e-3 --warmup-iters 25 --batch-size 4 --crop-size 256 \
    --checkpoint-interval 100 --cpus-per-worker 2 --loader-workers 1
EVAL=(GrabCut Berkeley --data-root "$DATA")
python3 jobs/evaluate.py --random-init small --init-seed 42 "${EVAL[@]}" --name untrained --output "$OUT/eval-untrained"
python3 jobs/evaluate.py --checkpoint "$OUT/run/checkpoints/iter_0000300.pth" "${EVAL[@]}" --name "trained-300it" \
    --output "$OUT/eval-300"
python3 jobs/evaluate.py --checkpoint "$OUT/run/checkpoints/iter_0001000.pth" "${EVAL[@]}" --name "trained-1000it" \
    --output "$OUT/eval-1000"
python3 jobs/evaluate.py --compare "$OUT/eval-untrained" "$OUT/eval-300" "$OUT/eval-1000" --output "$OUT/compare"
