#!/usr/bin/env bash
# Install the Label Studio server (used by the end-to-end tests) into its own virtual environment.
# Label Studio pins its own Django/numpy stack, so it never shares an environment with the project.
set -euo pipefail
cd "$(dirname "$0")/.."
LS_VENV="${LS_VENV:-.ls-venv}"
if [ ! -x "$LS_VENV/bin/label-studio" ]; then
  python3 -m venv "$LS_VENV"
  "$LS_VENV/bin/pip" install -q label-studio==1.23.2
fi
"$LS_VENV/bin/label-studio" --version >/dev/null 2>&1 || { echo "label-studio did not install" >&2; exit 1; }
echo "label-studio ready in $LS_VENV"
