"""The environment of a child process that runs this same ``engine`` (``python -m engine...``):
the parent's, with the checkout this engine was imported from first on PYTHONPATH."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])


def engine_env(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env
