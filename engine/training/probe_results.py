"""What each fast path's check found in this process (``engine.training.probes`` runs the checks):
the paths' own modules ask ``passed`` before taking their fast path, without importing the checks."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Result:
    name: str
    label: str
    ok: bool
    error: float | None              # the largest relative error measured (None: it raised)
    tolerance: float
    why: str | None                  # why it failed
    seconds: float


RESULTS: dict[tuple, Result] = {}


def passed(name: str) -> bool:
    """False once probe ``name`` has failed in this process (the path's module then takes the
    reference path); True where it passed or never ran."""
    return all(r.ok for k, r in RESULTS.items() if k[0] == name)


