#!/usr/bin/env bash
# Reproduce the README "Evaluation" figures: the GrabCut baseline and an untrained (random-init) small model
# on GrabCut, Berkeley and DAVIS-345 (RITM protocol, 20 clicks per sample), then one table and one plot for both.
# Resumable: rerun after an interruption and only the missing samples are evaluated.
# Usage: bash bench/run_evaluation.sh [OUTPUT_DIR] [extra jobs/evaluate.py options, e.g. --limit 20]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-outputs/eval}"
shift || true
python3 jobs/evaluate.py --baseline grabcut GrabCut Berkeley DAVIS --output "$OUT/grabcut" "$@"
python3 jobs/evaluate.py --random-init small GrabCut Berkeley DAVIS --output "$OUT/random-small" "$@"
python3 jobs/evaluate.py --compare "$OUT/grabcut" "$OUT/random-small" --output "$OUT/compare"
