"""Export a run (engine/outputs/targets/): pick the target and its type, watch the progress,
copy the commands.

The export runs as its own process (``engine.outputs.jobs.start_export``): torch and the model
never load into the TUI. It writes typed export events (``ExportStarted``, ``ExportProgress``,
``ExportFinished`` / ``ExportFailed``) to its log under RUN_DIR/export/logs/, which this screen
follows with the reader a run's log is followed with; the targets and their options are the
registry's.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Label, ProgressBar, Select, Static, TextArea

from engine import service
from tui.safe import clean, literal, one_line
from tui.screens.actions import copyable


def target_choices() -> list[tuple[str, str]]:
    """(label, name) of every export target, in the registry's order."""
    return [(t.label, t.name) for t in service.export_targets()]


def option_choices(target: str) -> tuple[list[tuple[str, str]], str]:
    """The (label, value) pairs of ``target``'s option (its GGUF type, its dtype) and its default."""
    t = service.export_target(target)
    if not t.options:
        return [("(no options)", "")], ""
    o = t.options[0]
    return [(label, value) for value, label in o.choices], o.default


def export_params(run_dir: Path, target: str, choice: str) -> dict:
    """What the export job is asked (``engine.outputs.jobs``): the run, the target, its option."""
    t = service.export_target(target)
    options = {t.options[0].name: choice} if t.options and choice else {}
    return {"src": str(Path(run_dir).resolve()), "target": target, "options": options, "force": True}


@dataclass
class ExportEvent(Message):
    """An event of the export's log (a newer ``ExportProgress`` replaces a waiting one)."""
    event: object

    def can_replace(self, message: Message) -> bool:
        from engine.core.events import ExportProgress
        return (isinstance(message, ExportEvent) and isinstance(message.event, ExportProgress)
                and isinstance(self.event, ExportProgress))


class ExportScreen(ModalScreen):
    BINDINGS = [Binding("escape", "close", "Close", id="export-close"),
                Binding("ctrl+e", "start", "Export", id="export-start", priority=True),
                Binding("ctrl+y", "copy", "Copy", id="export-copy", priority=True)]

    def on_mount(self) -> None:
        self.query_one("#export-commands").display = False

    def on_unmount(self) -> None:
        self._stop.set()                 # the follower ends; the export process goes on by itself

    def action_copy(self) -> None:
        if self.report and self.report.get("commands"):
            self.app.copy_to_clipboard("\n".join(self.report["commands"]))
            self.notify("Copied the commands.", markup=False)

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.running = False
        self.report: dict | None = None
        self.error = ""
        self.log_path: Path | None = None          # the export's events (JSONL)
        self.shown: list[tuple[str, float]] = []   # (stage, done) of each ExportProgress shown
        self._stop = threading.Event()

    def compose(self) -> ComposeResult:
        default_target = service.export_target().name
        options, default = option_choices(default_target)
        with Vertical(id="export-box"):
            yield Label(Text("Export ") + literal(self.run_dir.name)
                        + Text(" (GGUF, Ollama, merged)", style="bold"))
            with Horizontal(id="export-row"):
                yield Select(target_choices(), value=default_target, allow_blank=False, id="export-target")
                yield Select(options, value=default, allow_blank=False, id="export-type")
                yield Button("Export (ctrl+e)", id="export-go", variant="primary")
            yield ProgressBar(total=100, show_eta=True, id="export-progress")
            yield Static("", id="export-status")
            with VerticalScroll(id="export-result-box"):
                yield Static("", id="export-result")
            yield copyable("", "export-commands")

    @on(Select.Changed, "#export-target")
    def _target_changed(self, event: Select.Changed) -> None:
        options, default = option_choices(str(event.value))
        self.query_one("#export-type", Select).set_options(options)
        self.query_one("#export-type", Select).value = default

    @on(Button.Pressed, "#export-go")
    def _go(self) -> None:
        self.action_start()

    def action_close(self) -> None:
        if self.running:
            self.notify("The export is still running; it finishes in the background of this screen.",
                        markup=False)
            return
        self.dismiss(self.report)

    def action_start(self) -> None:
        if self.running:
            return
        self.running = True
        self.report, self.error, self.shown = None, "", []
        target = str(self.query_one("#export-target", Select).value)
        choice = self.query_one("#export-type", Select).value
        self.query_one("#export-progress", ProgressBar).update(progress=0)
        self.query_one("#export-result", Static).update("")
        self.query_one("#export-status", Static).update(Text("starting…", style="dim"))
        self._export(export_params(self.run_dir, target, "" if choice is Select.BLANK else str(choice)))

    @work(thread=True, exclusive=True, group="export", exit_on_error=False)
    def _export(self, params: dict) -> None:
        job = service.start_export(params)
        self.log_path = job.events
        service.follow_export(job, lambda ev: self.post_message(ExportEvent(ev)), self._stop)

    @on(ExportEvent)
    def _event(self, msg: ExportEvent) -> None:
        from engine.core.events import ExportFailed, ExportFinished, ExportProgress
        ev = msg.event
        if isinstance(ev, ExportProgress):
            self.shown.append((str(ev.stage), ev.done))
            pct = round(100 * ev.done / ev.total) if ev.total else 0
            self.query_one("#export-progress", ProgressBar).update(progress=pct)
            status = Text(f"{ev.stage}: ", style="bold") + literal(one_line(ev.message, 200))
            self.query_one("#export-status", Static).update(status)
        elif isinstance(ev, ExportFailed):
            self._done(None, ev.error)
        elif isinstance(ev, ExportFinished):
            self._done(ev.report, "")

    def _done(self, report: dict | None, err: str) -> None:
        self.running = False
        out = self.query_one("#export-result", Static)
        if report is None:
            self.error = err or "the export failed"
            out.update(literal(one_line(self.error, 400), style="bold $error"))
            self.query_one("#export-status", Static).update(Text("failed", style="$error"))
            return
        self.report = report
        self.query_one("#export-progress", ProgressBar).update(progress=100)
        self.query_one("#export-status", Static).update(Text("done", style="$success"))
        out.update(result_text(report))
        commands = self.query_one("#export-commands", TextArea)
        commands.load_text("\n".join(clean(c) for c in report.get("commands", [])))
        commands.display = True


def result_text(r: dict) -> Text:
    t = Text()
    t.append("written ", style="bold $success")
    t.append_text(literal(r.get("path", "")))
    what = r.get("gguf_type") or r.get("dtype") or ""
    t.append(f"  ({r.get('size_bytes', 0) / 1e6:.1f} MB{', ' + what if what else ''})\n")
    verified = next((ln.strip() for ln in r.get("lines", []) if ln.strip().startswith("verified:")), "")
    if verified:
        t.append_text(literal(verified))
        t.append("\n")
    if r.get("modelfile"):
        t.append("Modelfile ", style="dim")
        t.append_text(literal(r["modelfile"]))
        t.append("\n")
    t.append("use it (ctrl+y copies):", style="bold")
    return t
