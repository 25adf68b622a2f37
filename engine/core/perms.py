"""Run directories are private (0700 directories, 0600 files).

Events, config, logs, checkpoints and adapters of a run are its owner's alone: on a shared
GPU box the default umask (022) would make them world-readable. QLORA_TUI_GROUP_ACCESS=1
lets the group read them (0750 / 0640) for teams that share runs; others never get access.
Used by the run directory (``engine.core.rundir``), the control file and the nodes' heartbeats.
"""
from __future__ import annotations

import os
from pathlib import Path

GROUP_ACCESS_ENV = "QLORA_TUI_GROUP_ACCESS"


def group_access() -> bool:
    return os.environ.get(GROUP_ACCESS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def file_umask() -> int:
    return 0o027 if group_access() else 0o077


def use_private_umask() -> int:
    """Set this process's umask for the run files it creates (a run's writer keeps it for its
    life; its children inherit it). Returns the previous umask."""
    return os.umask(file_umask())


class private_files:
    """``with private_files():`` files and directories created inside get the run's modes."""

    def __enter__(self):
        self._old = use_private_umask()
        return self

    def __exit__(self, *exc):
        os.umask(self._old)
        return False


def make_private(run_dir: str | Path) -> None:
    """Take group (unless group access is on) and other permissions off everything in a run
    directory (one made by an older version, or under another umask)."""
    strip = file_umask()
    for root, dirs, files in os.walk(run_dir):
        for name in [root, *(os.path.join(root, f) for f in files)]:
            try:
                mode = os.lstat(name).st_mode
                if not os.path.islink(name) and mode & strip:
                    os.chmod(name, mode & 0o777 & ~strip)
            except OSError:
                pass
