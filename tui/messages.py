"""Messages that carry engine results into the UI thread (the only way anything crosses)."""
from __future__ import annotations

from pathlib import Path

from textual.message import Message


class RunEvents(Message):
    """A batch of events read from a run's events.jsonl by the follower ``follower`` (the
    stop event of that follower: a detach followed by a quick re-attach to the same run has
    two, and only the current one's messages count)."""

    def __init__(self, run_dir: Path, events: list, follower=None) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.events = events
        self.follower = follower


class FollowEnded(Message):
    def __init__(self, run_dir: Path, why: str, follower=None) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.why = why
        self.follower = follower


class RunLaunched(Message):
    """``resumed``: a resume of ``run_dir``; ``old_size``: the bytes of its events.jsonl before
    the resume (the resumed process appends past them); ``since``: when asked."""

    def __init__(self, run_dir: Path, resumed: bool = False, old_size: int | None = None,
                 since: float = 0.0) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.resumed = resumed
        self.old_size = old_size
        self.since = since


class ResumeFailed(Message):
    """A resume could not be started (refused, or its process ended before it began)."""

    def __init__(self, run_dir: Path, error: str) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.error = error


class LaunchFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class Readings(Message):
    """One sample of the GPUs (or the host when there is no NVIDIA GPU)."""

    def __init__(self, gpus: list, host, gpu_reason: str) -> None:
        super().__init__()
        self.gpus = gpus
        self.host = host
        self.gpu_reason = gpu_reason


class RowForLine(Message):
    """The row browser index of a problem's line, or why that line has no row."""

    def __init__(self, line: int, index: int | None, error: str = "", next_index: int = 0,
                 raw: str = "") -> None:
        super().__init__()
        self.line = line
        self.index = index
        self.error = error
        self.next_index = next_index      # no row: the first row after the line (n/p go on there)
        self.raw = raw                    # no row: the line's own text


class ReportReady(Message):
    """A (partial or complete) dataset report."""

    def __init__(self, report, final: bool) -> None:
        super().__init__()
        self.report = report
        self.final = final


class ReportFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class PreviewReady(Message):
    def __init__(self, index: int, preview, error: str = "") -> None:
        super().__init__()
        self.index = index
        self.preview = preview
        self.error = error


class EstimateReady(Message):
    def __init__(self, text: str, trainable: int | None) -> None:
        super().__init__()
        self.text = text
        self.trainable = trainable


class RunsListed(Message):
    def __init__(self, runs: list, error: str = "") -> None:
        super().__init__()
        self.runs = runs
        self.error = error


class RunHistory(Message):
    def __init__(self, run_dir: Path, events: list, info) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.events = events
        self.info = info
