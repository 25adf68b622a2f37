"""Messages that carry engine results into the UI thread (the only way anything crosses)."""
from __future__ import annotations

from pathlib import Path

from textual.message import Message


class RunEvents(Message):
    """A batch of events read from a run's events.jsonl."""

    def __init__(self, run_dir: Path, events: list) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.events = events


class FollowEnded(Message):
    def __init__(self, run_dir: Path, why: str) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.why = why


class RunLaunched(Message):
    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = run_dir


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
