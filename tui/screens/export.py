"""Export a run as GGUF (llama.cpp / Ollama): pick the type, watch the progress, copy the commands.

The export runs as its own process (``engine.outputs.jobs``): torch and the model never load
into the TUI, and its typed ``JobProgress`` events drive the progress bar.
"""
from __future__ import annotations

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

from tui.safe import clean, literal, one_line
from tui.screens.actions import copyable

ADAPTER = "adapter"
TYPES = [("f16 (full quality)", "f16"), ("q8_0 (half the size)", "q8_0"), ("bf16", "bf16"),
         ("q5_1", "q5_1"), ("q5_0", "q5_0"), ("q4_1", "q4_1"), ("q4_0 (smallest)", "q4_0"),
         ("LoRA adapter only (f16)", ADAPTER)]


def export_params(run_dir: Path, choice: str) -> dict:
    """What the export job is asked (``engine.outputs.jobs``): the run, the type, adapter or model."""
    src = str(Path(run_dir).resolve())
    if choice == ADAPTER:
        return {"src": src, "gguf": "f16", "adapter": True, "force": True}
    return {"src": src, "gguf": choice, "force": True}


@dataclass
class ExportProgress(Message):
    """A ``JobProgress`` of the export process (the newest replaces a waiting one)."""
    fraction: float
    message: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, ExportProgress)


@dataclass
class ExportDone(Message):
    """The export process ended: its report, or the one line that says why not."""
    report: dict | None
    error: str


class ExportScreen(ModalScreen):
    BINDINGS = [Binding("escape", "close", "Close", id="export-close"),
                Binding("ctrl+e", "start", "Export", id="export-start", priority=True),
                Binding("ctrl+y", "copy", "Copy", id="export-copy", priority=True)]

    def on_mount(self) -> None:
        self.query_one("#export-commands").display = False

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

    def compose(self) -> ComposeResult:
        with Vertical(id="export-box"):
            yield Label(Text("Export ") + literal(self.run_dir.name)
                        + Text(" as GGUF for llama.cpp / Ollama", style="bold"))
            with Horizontal(id="export-row"):
                yield Select(TYPES, value="f16", allow_blank=False, id="export-type")
                yield Button("Export (ctrl+e)", id="export-go", variant="primary")
            yield ProgressBar(total=100, show_eta=True, id="export-progress")
            yield Static("", id="export-status")
            with VerticalScroll(id="export-result-box"):
                yield Static("", id="export-result")
            yield copyable("", "export-commands")

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
        self.report, self.error = None, ""
        choice = str(self.query_one("#export-type", Select).value)
        self.query_one("#export-progress", ProgressBar).update(progress=0)
        self.query_one("#export-result", Static).update("")
        self._export(choice)

    @work(thread=True, exclusive=True, group="export", exit_on_error=False)
    def _export(self, choice: str) -> None:
        from engine.core.events import JobProgress
        from engine.outputs import jobs

        def on_event(ev) -> None:
            if isinstance(ev, JobProgress):
                self.post_message(ExportProgress(ev.fraction, ev.message))
        done = jobs.run_child("export", export_params(self.run_dir, choice), on_event)
        self.post_message(ExportDone(done.report, done.error))

    @on(ExportProgress)
    def _progress(self, msg: ExportProgress) -> None:
        self.query_one("#export-progress", ProgressBar).update(progress=round(msg.fraction * 100))
        self.query_one("#export-status", Static).update(literal(one_line(msg.message, 200)))

    @on(ExportDone)
    def _done(self, msg: ExportDone) -> None:
        report, err = msg.report, msg.error
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
    t.append(f"  ({r.get('size_bytes', 0) / 1e6:.1f} MB, {r.get('gguf_type', '')})\n")
    if r.get("max_abs_diff") is not None:
        t.append(f"verified: tokenizer round-trips; max |logit diff| {r['max_abs_diff']:.3g} <= "
                 f"{r['tolerance']:.3g}, top-1 agreement {r['top1_agreement']:.1%}\n")
    if r.get("modelfile"):
        t.append("Modelfile ", style="dim")
        t.append_text(literal(r["modelfile"]))
        t.append("\n")
    t.append("use it (ctrl+y copies):", style="bold")
    return t
