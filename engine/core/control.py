"""The control channel: how any process (an attached TUI, `qlora-tui stop`) steers a live run.

A request is one small JSON file dropped atomically into ``RUN_DIR/control/``:
``<unix-ns>-<command>.json`` holding ``{"command": ..., "time": ..., "pid": ...}``.
The run polls the folder between optimizer steps (cheap: one ``listdir``), carries the
request out and renames the file to ``*.done`` once it is carried out: for both commands, once
the checkpoint they ask for is complete (``Carried``; one path for one GPU and many). Commands:

- ``stop``: graceful stop: save a checkpoint and the adapter, then ``run_finished(stopped=True)``.
- ``save``: write a checkpoint now and go on.

Files survive the requester's exit, so a request is never lost, and any number of
attached UIs can send them. Nothing listens on a port.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = ("stop", "save")


def request(run_dir: str | Path, command: str) -> Path:
    if command not in COMMANDS:
        raise ValueError(f"unknown control command {command!r}; allowed: {', '.join(COMMANDS)}")
    from engine.core.perms import private_files
    folder = Path(run_dir) / "control"
    name = f"{time.time_ns()}-{command}.json"
    tmp = folder / (name + ".tmp")
    with private_files():
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"command": command, "time": time.time(), "pid": os.getpid()}))
    tmp.replace(folder / name)
    return folder / name


def pending(run_dir: str | Path) -> list[tuple[Path, str]]:
    """Unhandled requests, oldest first."""
    folder = Path(run_dir) / "control"
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
    except OSError:
        return []
    out = []
    for n in names:
        cmd = n.rsplit("-", 1)[-1][:-5]
        if cmd in COMMANDS:
            out.append((folder / n, cmd))
    return out


def sent_ns(path: Path) -> int:
    """When a request was sent (ns since the epoch, from its name); 0 if unreadable."""
    head = path.name.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def mark_done(path: Path) -> None:
    try:
        path.replace(path.with_suffix(".done"))
    except OSError:
        pass


@dataclass
class Requests:
    """Pending requests folded into what the run does at this step."""
    stop: bool = False
    save: bool = False
    paths: list[Path] = field(default_factory=list)


def fold(requests: list[tuple[Path, str]]) -> Requests:
    """``pending`` entries as one decision: stop if any asks to, save if any asks to."""
    cmds = [cmd for _path, cmd in requests]
    return Requests(stop="stop" in cmds, save="save" in cmds, paths=[path for path, _cmd in requests])


class Carried:
    """Requests being carried out: each is read once (``take``) and marked done (``done``) by the
    caller when what it asked for exists, i.e. when the checkpoint of that step is complete."""

    def __init__(self):
        self.paths: list[Path] = []

    def take(self, run_dir: str | Path) -> Requests:
        req = fold([(p, c) for p, c in pending(run_dir) if p not in self.paths])
        self.paths += req.paths
        return req

    def done(self) -> None:
        for path in self.paths:
            mark_done(path)
        self.paths.clear()
