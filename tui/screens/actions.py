"""Actions on a run after training: merge, compare generations, eval, serve-cmd, push.

Each is a dialog over the Runs screen (or the run detail, or the palette). Merge, compare, eval
and push run as a child process (``engine.outputs.jobs``) whose typed ``JobProgress`` / ``JobDone``
events drive the dialog: torch never loads into the TUI and no child text is parsed. The
serve command is built in a worker (no model is loaded) and shown whole, copyable (ctrl+y).
Push always lists what it would upload (a dry run) before it can upload.
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
from textual.widgets import Button, Checkbox, Input, Label, ProgressBar, Select, Static, TextArea

from tui.safe import clean, literal, middle, one_line


@dataclass
class JobEvent(Message):
    """An event of the dialog's child process (``JobProgress`` or ``JobDone``)."""
    event: object


def copyable(text: str, id: str) -> TextArea:
    """A command shown whole: read-only, never wrapped mid-token (scrolls sideways), copyable."""
    area = TextArea(clean(text), read_only=True, soft_wrap=False, show_line_numbers=False, id=id,
                    classes="copyable")
    return area


class ActionDialog(ModalScreen):
    """A dialog that runs one job of ``engine.outputs.jobs`` for ``run_dir`` and shows its end."""

    TITLE = ""
    JOB = ""
    BINDINGS = [Binding("escape", "close", "Close", id="action-close"),
                Binding("ctrl+e", "start", "Run", id="action-start", priority=True)]

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.running = False
        self.report: dict | None = None
        self.error = ""
        self.progress_seen: list[float] = []      # the fractions of the job's JobProgress events
        self._cancel = threading.Event()

    def compose(self) -> ComposeResult:
        with Vertical(classes="action-box"):
            yield Label(Text(f"{self.TITLE} ", style="bold") + literal(middle(self.run_dir.name, 50)))
            yield from self.form()
            yield ProgressBar(total=100, show_eta=False, classes="action-progress")
            yield Static("", classes="action-status")
            with VerticalScroll(classes="action-result-box"):
                yield Static("", classes="action-result")

    def form(self) -> ComposeResult:
        yield from ()

    def params(self) -> dict | None:
        return {"src": str(self.run_dir.resolve())}

    def action_close(self) -> None:
        if self.running:
            self._cancel.set()
            self.notify(f"{self.TITLE}: cancelling the running job.", markup=False)
            return
        self.dismiss(self.report)

    def action_start(self) -> None:
        if self.running:
            return
        params = self.params()
        if params is None:
            return
        self.running = True
        self.report, self.error, self.progress_seen = None, "", []
        self._cancel = threading.Event()
        self.query_one(".action-progress", ProgressBar).update(progress=0)
        self.query_one(".action-result", Static).update("")
        self._status(Text("starting…", style="dim"))
        self._run(self.JOB, params, self._cancel)

    @on(Button.Pressed, ".action-go")
    def _go(self) -> None:
        self.action_start()

    @work(thread=True, exclusive=True, group="action-job", exit_on_error=False)
    def _run(self, job: str, params: dict, cancel: threading.Event) -> None:
        from engine import service
        service.run_job(job, params, lambda ev: self.post_message(JobEvent(ev)), cancel)

    @on(JobEvent)
    def _on_job_event(self, msg: JobEvent) -> None:
        from engine.core.events import JobDone, JobProgress
        ev = msg.event
        if isinstance(ev, JobProgress):
            self.progress_seen.append(ev.fraction)
            self.query_one(".action-progress", ProgressBar).update(progress=round(ev.fraction * 100))
            self._status(literal(one_line(ev.message, 200)))
        elif isinstance(ev, JobDone):
            self.running = False
            if ev.error:
                self.error = ev.error
                self._status(Text("failed", style="$error"))
                self._result(literal(one_line(ev.error, 400), style="bold $error"))
            else:
                self.report = ev.report or {}
                self.query_one(".action-progress", ProgressBar).update(progress=100)
                self._status(Text("done", style="$success"))
                self.done(self.report)

    def done(self, report: dict) -> None:
        self._result(literal(str(report)))

    def _status(self, text: Text) -> None:
        self.query_one(".action-status", Static).update(text)

    def _result(self, text: Text) -> None:
        self.query_one(".action-result", Static).update(text)


class MergeDialog(ActionDialog):
    """Merge the adapter into its base (16-bit), then the verification line."""
    TITLE, JOB = "Merge", "merge"

    def form(self) -> ComposeResult:
        with Horizontal(classes="action-row"):
            yield Label("out", classes="action-label")
            yield Input(str(self.run_dir / "merged"), id="merge-out", compact=True)
            yield Select([("auto", "auto"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32")],
                         value="auto", allow_blank=False, compact=True, id="merge-dtype")
            yield Button("Merge (ctrl+e)", classes="action-go", variant="primary", compact=True)

    def params(self) -> dict | None:
        out = self.query_one("#merge-out", Input).value.strip()
        if not out:
            self.notify("Merge: give the new directory for the merged model.", markup=False)
            return None
        return {"src": str(self.run_dir.resolve()), "out": out,
                "dtype": str(self.query_one("#merge-dtype", Select).value)}

    def done(self, report: dict) -> None:
        t = Text()
        for line in report.get("lines", []):
            style = "bold $success" if line.strip().startswith("verified:") else ""
            t.append_text(literal(line, style=style))
            t.append("\n")
        self._result(t)

    @property
    def verified_line(self) -> str:
        return next((ln.strip() for ln in (self.report or {}).get("lines", [])
                     if ln.strip().startswith("verified:")), "")


class CompareDialog(ActionDialog):
    """The run's eval prompts answered by the base and by the fine-tuned model (greedy)."""
    TITLE, JOB = "Compare generations of", "compare"

    def form(self) -> ComposeResult:
        with Horizontal(classes="action-row"):
            yield Label("max new tokens", classes="action-label-wide")
            yield Input("48", id="compare-max", compact=True, restrict=r"[0-9]*", max_length=4)
            yield Button("Generate (ctrl+e)", classes="action-go", variant="primary", compact=True)

    def params(self) -> dict | None:
        try:
            n = int(self.query_one("#compare-max", Input).value or 0)
        except ValueError:
            n = 0
        if not 1 <= n <= 2048:
            self.notify("Compare: max new tokens must be between 1 and 2048.", markup=False)
            return None
        return {"src": str(self.run_dir.resolve()), "max_new_tokens": n}

    def done(self, report: dict) -> None:
        t = Text()
        for i, r in enumerate(report.get("results", []), 1):
            t.append(f"[{i}] ", style="bold")
            t.append_text(literal(r.get("prompt", ""), style="bold"))
            t.append("\n  base  ", style="bold $warning")
            t.append_text(literal(r.get("base", "") or "(empty)"))
            t.append("\n  tuned ", style="bold $success")
            t.append_text(literal(r.get("tuned", "") or "(empty)"))
            t.append("\n")
        self._result(t)


class EvalDialog(ActionDialog):
    """``qlora-tui eval``: base vs fine-tuned on held-out rows. The report is saved in RUN/eval/,
    where the run detail reads its table and plot."""
    TITLE, JOB = "Evaluate", "eval"

    def form(self) -> ComposeResult:
        with Horizontal(classes="action-row"):
            yield Label("data", classes="action-label")
            yield Input(placeholder="held-out rows file (empty: the run's eval rows)", id="eval-data",
                        compact=True)
        with Horizontal(classes="action-row"):
            yield Label("rows answered", classes="action-label-wide")
            yield Input("32", id="eval-answers", compact=True, restrict=r"[0-9]*", max_length=4)
            yield Button("Evaluate (ctrl+e)", classes="action-go", variant="primary", compact=True)

    def params(self) -> dict | None:
        text = self.query_one("#eval-answers", Input).value
        n = int(text) if text.isdigit() else -1
        if not 0 <= n <= 1000:
            self.notify("Evaluate: rows answered must be between 0 and 1000.", markup=False)
            return None
        data = self.query_one("#eval-data", Input).value.strip()
        return {"src": str(self.run_dir.resolve()), "data": data or None, "answer_rows": n}

    def done(self, report: dict) -> None:
        t = Text()
        for line in report.get("lines", []):
            t.append_text(literal(line))
            t.append("\n")
        t.append("escape: back; the run detail shows this table and a per-row plot.", style="dim")
        self._result(t)


class PushDialog(ActionDialog):
    """Upload to the Hub: a dry run lists the files first; then ctrl+u uploads them."""
    TITLE, JOB = "Push", "push"
    BINDINGS = [Binding("ctrl+u", "upload", "Upload", id="push-upload", priority=True)]

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self.planned: dict | None = None       # the dry run's plan, for these inputs

    def form(self) -> ComposeResult:
        with Horizontal(classes="action-row"):
            yield Label("repo", classes="action-label")
            yield Input(placeholder="USER/NAME", id="push-repo", compact=True)
            yield Select([("adapter", "adapter"), ("merged", "merged"), ("gguf", "gguf")],
                         value="adapter", allow_blank=False, compact=True, id="push-what")
            yield Checkbox("private", id="push-private", compact=True)
        with Horizontal(classes="action-row"):
            yield Button("Dry run (ctrl+e)", classes="action-go", variant="primary", compact=True)
            yield Button("Upload (ctrl+u)", id="push-go", variant="error", compact=True, disabled=True)

    def _inputs(self) -> dict:
        return {"src": str(self.run_dir.resolve()),
                "repo_id": self.query_one("#push-repo", Input).value.strip(),
                "what": str(self.query_one("#push-what", Select).value),
                "private": self.query_one("#push-private", Checkbox).value}

    def params(self) -> dict | None:
        self.planned = None
        self.query_one("#push-go", Button).disabled = True
        return self._inputs() | {"dry_run": True}

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    def _changed(self) -> None:      # another repo or what: the dry run must be done again
        if self.is_mounted and not self.running:
            self.planned = None
            self.query_one("#push-go", Button).disabled = True

    def done(self, report: dict) -> None:
        t = Text()
        dry = not report.get("url")
        t.append("would upload " if dry else "uploaded ", style="bold")
        t.append(f"{len(report.get('files', []))} files from ")
        t.append_text(literal(middle(report.get("folder", ""), 60)))
        t.append(" to ")
        t.append_text(literal(report.get("repo_id", "")))
        t.append(" (private)\n" if report.get("private") else "\n")
        for f in report.get("files", []):
            t.append("  ")
            t.append_text(literal(f))
            t.append("\n")
        if report.get("url"):
            t.append_text(literal(report["url"]))
        elif dry:
            t.append("ctrl+u uploads these files.", style="dim")
            self.planned = report
            self.query_one("#push-go", Button).disabled = False
        self._result(t)

    @on(Button.Pressed, "#push-go")
    def _upload_pressed(self) -> None:
        self.action_upload()

    def action_upload(self) -> None:
        if self.running:
            return
        if self.planned is None:
            self.notify("Push: do the dry run first (ctrl+e): it lists what would be uploaded.",
                        markup=False)
            return
        params = self._inputs() | {"dry_run": False}
        self.running = True
        self.report, self.error = None, ""
        self._cancel = threading.Event()
        self.query_one("#push-go", Button).disabled = True
        self._status(Text("uploading…", style="dim"))
        self._run(self.JOB, params, self._cancel)


@dataclass
class ServeBuilt(Message):
    command: str
    error: str = ""


class ServeDialog(ModalScreen):
    """The ``vllm serve`` command for the run's adapter, whole and copyable."""
    BINDINGS = [Binding("escape", "close", "Close", id="serve-close"),
                Binding("ctrl+y", "copy", "Copy", id="serve-copy", priority=True)]

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.command = ""
        self.error = ""

    def compose(self) -> ComposeResult:
        with Vertical(classes="action-box"):
            yield Label(Text("Serve ", style="bold") + literal(middle(self.run_dir.name, 50))
                        + Text(" with vLLM (multi-LoRA)", style="bold"))
            yield Static(Text("building the command…", style="dim"), classes="action-status")
            yield copyable("", "serve-command")
            yield Static(Text("ctrl+y copies the command; select text with the mouse.", style="dim"))

    def on_mount(self) -> None:
        self._build(self.run_dir)

    @work(thread=True, exclusive=True, exit_on_error=False)
    def _build(self, run_dir: Path) -> None:
        from engine import service
        command, why = service.serve_command(run_dir)
        self.post_message(ServeBuilt(command) if not why else ServeBuilt("", f"serve-cmd failed: {why}"))

    @on(ServeBuilt)
    def _built(self, msg: ServeBuilt) -> None:
        status = self.query_one(".action-status", Static)
        if msg.error:
            self.error = msg.error
            status.update(literal(one_line(msg.error, 400), style="bold $error"))
            return
        self.command = msg.command
        status.update(Text("run this where vLLM is installed:", style="dim"))
        self.query_one("#serve-command", TextArea).load_text(clean(msg.command))

    def action_copy(self) -> None:
        if self.command:
            self.app.copy_to_clipboard(self.command)
            self.notify("Copied the serve command.", markup=False)

    def action_close(self) -> None:
        self.dismiss(None)


ACTION_SCREENS = {"merge": MergeDialog, "compare": CompareDialog, "eval": EvalDialog, "push": PushDialog,
                  "serve": ServeDialog}
