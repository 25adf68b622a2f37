"""External trackers (``output.report_to``): where their logs go, and the set-up they need.

The HF Trainer's own integrations do the logging (``TensorBoardCallback`` writes through
``tensorboardX`` when the full ``tensorboard`` package is absent; ``WandbCallback``). Here:
each run's logs go inside its run directory, a missing package is one clear line before the
model loads, and our tokens/s joins the logged metrics (see ``engine.training.sft.EventCallback``).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PACKAGES = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb",)}
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}


class TrackerError(ValueError):
    """The tracker cannot be used; the message is one line."""


def log_location(report_to: str, run_dir: str | Path) -> str:
    """Where the tracker's files go ('' for none); the Train screen and run_started say it."""
    run_dir = Path(run_dir)
    if report_to == "tensorboard":
        return str(Path(_users("TENSORBOARD_LOGGING_DIR") or run_dir / "tensorboard"))
    if report_to == "wandb":
        mode = os.environ.get("WANDB_MODE", "online")
        where = Path(_users("WANDB_DIR") or run_dir) / "wandb"
        project = _users("WANDB_PROJECT") or "qlora-tui"
        return f"{where} (wandb {mode}, project {project})"
    return ""


def check_available(report_to: str) -> None:
    if report_to not in PACKAGES:
        return
    if not any(importlib.util.find_spec(m) for m in PACKAGES[report_to]):
        raise TrackerError(f"output.report_to = \"{report_to}\" needs the {PACKAGES[report_to][0]} package: "
                           f"pip install 'qlora-tui[{EXTRAS[report_to]}]' (or set output.report_to = \"none\")")


def setup(report_to: str, run_dir: str | Path) -> str:
    """Point the tracker at the run directory (unless the user's environment already does);
    returns the log location."""
    check_available(report_to)
    run_dir = Path(run_dir)
    if report_to == "tensorboard":
        _set_default("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    elif report_to == "wandb":
        _set_default("WANDB_DIR", str(run_dir))
        _set_default("WANDB_PROJECT", "qlora-tui")
        _set_default("WANDB_NAME", run_dir.name)
    return log_location(report_to, run_dir)


_OURS: dict[str, str] = {}     # variables we set (a later run in the same process replaces them)


def _users(key: str) -> str:
    """The environment's value of ``key`` when the user set it (not an earlier run of ours)."""
    value = os.environ.get(key, "")
    return "" if value and _OURS.get(key) == value else value


def _set_default(key: str, value: str) -> None:
    """Set ``key`` unless the user's environment set it (then their choice wins)."""
    if key in os.environ and _OURS.get(key) != os.environ[key]:
        return
    os.environ[key] = _OURS[key] = value


def finish(report_to: str) -> None:
    """Close the tracker's run so its files are complete before the run's thread ends (the HF
    callback leaves a wandb run open until the process exits)."""
    wandb = sys.modules.get("wandb") if report_to == "wandb" else None
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish()
        except Exception:  # noqa: BLE001 - the run itself is over; a tracker hiccup must not fail it
            pass
