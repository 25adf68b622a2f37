#!/usr/bin/env bash
# Set up .venv with exactly the tested set: .ci/requirements.lock pins every direct and transitive
# dependency (torch's CPU build included) with its hashes; nothing else is resolved. Then this
# project, editable, without its dependencies; tmux for the terminal end-to-end tests.
# Idempotent: the venv is rebuilt only when the lock or pyproject.toml changed (a venv left from
# another set of versions is replaced, never patched). Refresh the lock with .ci/lock.sh.
# Off this workplace's machines, torch's CPU build comes from PyTorch's index:
#   QLORA_TUI_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash .ci/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want=$(cat .ci/requirements.lock pyproject.toml | sha256sum | cut -c1-16)
quiet() { grep -v -e '^WARNING: Location' -e 'WARNING: Running pip as' || true; }
if [ "$(cat .venv/.installed 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "import torch, textual, trl" 2>/dev/null; then
  rm -rf .venv
  "$PY" -m venv .venv
  extra=()
  if [ -n "${QLORA_TUI_TORCH_INDEX:-}" ]; then extra=(--extra-index-url "$QLORA_TUI_TORCH_INDEX"); fi
  .venv/bin/python -m pip install -q --require-hashes --no-deps ${extra[@]+"${extra[@]}"} -r .ci/requirements.lock 2>&1 | quiet
  # PYTHONWARNINGS reaches the build backend too: no setuptools "Editable installation" banner
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | quiet
  .venv/bin/python -m pip check >/dev/null
  .venv/bin/python -c "import torch, textual, trl, peft, bitsandbytes"
  echo "$want" > .venv/.installed
fi
if ! command -v tmux >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq tmux) >/dev/null 2>&1 || echo "warning: tmux not installed; terminal end-to-end tests will be skipped" >&2
fi
