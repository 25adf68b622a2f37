#!/usr/bin/env bash
# Set up .venv with everything qlora-tui and its tests need (idempotent, offline-safe for torch):
# torch 2.13.0 (CPU build, from the local wheel cache) first, so nothing pulls a CUDA build,
# then the project with its test extras; tmux for the terminal end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, textual, trl" 2>/dev/null || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
  # PYTHONWARNINGS reaches the build backend too: no setuptools "Editable installation" banner
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import torch, textual, trl, peft, bitsandbytes" && touch .venv/.installed
fi
if ! command -v tmux >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq tmux) >/dev/null 2>&1 || echo "warning: tmux not installed; terminal end-to-end tests will be skipped" >&2
fi
