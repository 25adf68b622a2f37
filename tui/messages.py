"""Messages that carry engine results from worker threads into the UI thread (the only way
anything crosses). The requests a screen posts to the app live next to that screen
(``tui.screens.runs.AttachRun``, ``tui.screens.config.FormEdited``...)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from textual.message import Message


# ---- the followed run (handled by the app, which hands them to tui.controller) ------------
@dataclass
class RunEvents(Message):
    """A batch of events read from a run's events.jsonl by the follower ``follower`` (the
    stop event of that follower: a detach followed by a quick re-attach to the same run has
    two, and only the current one's messages count)."""
    run_dir: Path
    events: list
    follower: object = None


@dataclass
class FollowEnded(Message):
    run_dir: Path
    why: str
    follower: object = None


@dataclass
class RunLaunched(Message):
    """``resumed``: a resume of ``run_dir``; ``old_log`` (inode, device) of its events.jsonl
    before the resume, which the resumed process replaces (rollback); ``since``: when asked."""
    run_dir: Path
    resumed: bool = False
    old_log: tuple | None = None
    since: float = 0.0


@dataclass
class ResumeFailed(Message):
    """A resume could not be started (refused, or its process ended before it began)."""
    run_dir: Path
    error: str


@dataclass
class LaunchFailed(Message):
    error: str


# ---- screens' own workers -----------------------------------------------------------------
@dataclass
class Readings(Message):
    """One sample of the GPUs (or the host when there is no NVIDIA GPU). Only the newest
    sample matters: one still waiting in the queue is replaced by the next."""
    gpus: list
    host: object
    gpu_reason: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Readings)


@dataclass
class RowForLine(Message):
    """The row browser index of a problem's line, or why that line has no row."""
    line: int
    index: int | None
    error: str = ""
    next_index: int = 0      # no row: the first row after the line (n/p go on there)
    raw: str = ""            # no row: the line's own text


@dataclass
class ReportReady(Message):
    """A (partial or complete) dataset report."""
    report: object
    final: bool


@dataclass
class ReportFailed(Message):
    error: str


@dataclass
class PreviewReady(Message):
    index: int
    preview: object
    error: str = ""


@dataclass
class EstimateReady(Message):
    text: str
    trainable: int | None


@dataclass
class RunsListed(Message):
    runs: list
    error: str = ""


@dataclass
class RunHistory(Message):
    run_dir: Path
    events: list
    info: object = field(default=None)
