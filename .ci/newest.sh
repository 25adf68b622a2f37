#!/usr/bin/env bash
# Drift check: a second venv (.venv-newest) from the newest releases pyproject.toml allows (torch
# stays the lock's CPU build: the CUDA builds belong to GPU boxes), the engine's core path run
# there (tests/e2e/test_core_path.py: train -> eval -> train -> checkpoint -> resume -> save -> merge ->
# export, text and vision), and the versions that differ from the lock printed. Fails when the
# newest releases break that path: the fix is code, or an upper bound in pyproject.toml with the
# reason in the commit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
quiet() { grep -v -e '^WARNING: Location' -e 'WARNING: Running pip as' || true; }
rm -rf .venv-newest
"$PY" -m venv .venv-newest
torch_pin=$(grep -E '^torch==' .ci/requirements.lock | cut -d' ' -f1)
echo "$torch_pin" > .venv-newest/constraints.txt
.venv-newest/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
PYTHONWARNINGS=ignore .venv-newest/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
  -c .venv-newest/constraints.txt -e ".[test]" 2>&1 | quiet
.venv-newest/bin/python - <<'PY'
import re, subprocess, sys
lock = {}
for line in open(".ci/requirements.lock"):
    m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
    if m:
        lock[m.group(1).lower().replace("_", "-")] = m.group(2)
now = {}
for line in subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                           capture_output=True, text=True).stdout.splitlines():
    if "==" in line:
        k, v = line.split("==", 1)
        now[k.lower().replace("_", "-")] = v
diff = sorted(k for k in set(lock) | set(now) if lock.get(k) != now.get(k) and k not in ("pip",))
print(f"newest releases: {len(diff)} of {len(now)} packages differ from .ci/requirements.lock")
for k in diff:
    print(f"  {k:32s} lock {lock.get(k, '-'):16s} newest {now.get(k, '-')}")
PY
.venv-newest/bin/python -m pytest -q -p no:cacheprovider tests/e2e/test_core_path.py tests/training/test_eval_then_train.py
