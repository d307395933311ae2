#!/usr/bin/env bash
# Install the Label Studio server (used by the end-to-end tests) into its own virtual environment.
# Label Studio pins its own Django/numpy stack, so it never shares an environment with the project.
# Idempotent: an existing, working venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
LS_VENV="${LS_VENV:-.ls-venv}"
LS_VERSION="1.23.2"
# `label-studio --version` is no check: it prints the version and then starts a server on 0.0.0.0:8080.
installed() {
  [ -x "$LS_VENV/bin/label-studio" ] &&
    [ "$("$LS_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("label-studio"))' 2>/dev/null)" = "$LS_VERSION" ]
}
if ! installed; then
  python3 -m venv "$LS_VENV"
  "$LS_VENV/bin/pip" install -q --disable-pip-version-check "label-studio==$LS_VERSION"
fi
installed || { echo "label-studio $LS_VERSION did not install into $LS_VENV" >&2; exit 1; }
echo "label-studio $LS_VERSION ready in $LS_VENV"
