#!/usr/bin/env bash
# Recompile .ci/requirements.lock (every package pinned, with hashes) from pyproject.toml's
# dependencies, its [test] extra and .ci/lock.in, for CPython 3.11 on Linux x86-64 with torch's
# CPU build. With no argument the pins already in the lock are kept where pyproject.toml still
# allows them (add a dependency, and only what it needs moves); with --upgrade every package
# moves to the newest release allowed. After a refresh: bash .ci/setup.sh, the README's test
# command, and commit the lock with the versions that moved (git diff .ci/requirements.lock).
# Needs uv (pip install uv); the lock itself is installed by plain pip (.ci/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_index=${QLORA_TUI_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
links=(); [ -d /opt/wheels ] && links=(--find-links /opt/wheels)    # this workplace's torch CPU wheel
uv pip compile pyproject.toml .ci/lock.in --extra test --generate-hashes \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --extra-index-url "$torch_index" --index-strategy unsafe-best-match ${links[@]+"${links[@]}"} \
  --no-header --annotation-style line -o .ci/requirements.lock "$@"
