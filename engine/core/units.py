"""Units and number helpers shared by the engine and the TUI (one owner each)."""
from __future__ import annotations

import math

GIB = 1024 ** 3
MIB = 1024 ** 2


def is_finite(x) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite; None is not."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_nonfinite(x) -> bool:
    """A number that is NaN or infinite (what halts a run); None and non-numbers are not."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isfinite(x)


def to_float(v) -> float | None:
    """A number from a value read back from a file (JSON, YAML: ``"2e-4"`` too); None if not one."""
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v.strip() if isinstance(v, str) else v)
    except (TypeError, ValueError):
        return None


def fmt_eta(seconds: float | None) -> str:
    """``MM:SS`` or ``H:MM:SS``; ``--:--`` when unknown."""
    if seconds is None or not is_finite(seconds):
        return "--:--"
    s = int(max(0, seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
