"""The followed run's messages: what the launch and follow workers post to the app, which hands
them to ``tui.controller.RunController``. Messages that one screen's workers post to it, and
the requests a screen posts to the app, live next to that screen (``tui.screens.runs.AttachRun``,
``tui.screens.config.FormEdited``, ``tui.screens.train.Readings``...)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual.message import Message


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
    """``resumed``: a resume of ``run_dir``; ``old_size``: the bytes of its events.jsonl before
    the resume (the resumed process appends past them); ``since``: when asked."""
    run_dir: Path
    resumed: bool = False
    old_size: int | None = None
    since: float = 0.0


@dataclass
class ResumeFailed(Message):
    """A resume could not be started (refused, or its process ended before it began)."""
    run_dir: Path
    error: str


@dataclass
class LaunchFailed(Message):
    error: str
