#!/usr/bin/env bash
# Reproduce the README "Evaluation" figures: the GrabCut baseline and an untrained (random-init) small model
# on GrabCut, Berkeley and DAVIS-345 (RITM protocol, 20 clicks per sample), then one table and one plot for both.
# Resumable: rerun after an interruption and only the missing samples are evaluated.
# Usage: bash bench/run_evaluation.sh [OUTPUT_DIR] [extra jobs/evaluate.py options, e.g. --limit 20]
# The interpreter is $PYTHON, by default the README install's .venv/bin/python (never activated, so a plain
# `python3` would lack the project's packages); e.g. PYTHON=python3 inside an activated environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${1:-outputs/eval}"
shift || true
"$PYTHON" jobs/evaluate.py --baseline grabcut GrabCut Berkeley DAVIS --output "$OUT/grabcut" "$@"
"$PYTHON" jobs/evaluate.py --random-init small GrabCut Berkeley DAVIS --output "$OUT/random-small" "$@"
"$PYTHON" jobs/evaluate.py --compare "$OUT/grabcut" "$OUT/random-small" --output "$OUT/compare"
