"""Runs: every run under output.dir with its state; open one to see its curves."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Sparkline, Static

from engine.service import RESUMABLE
from tui.controller import read_run
from tui.runstate import RunState
from tui.safe import clean, literal, middle, one_line
from tui.widgets.chart import LossChart
from tui.widgets.panels import generations_text, hints_text
from tui.widgets.run_view import preference_rows, set_spark


# ---- what this screen's workers post to it -------------------------------------------
@dataclass
class RunsListed(Message):
    runs: list
    error: str = ""


@dataclass
class RunHistory(Message):
    """A run's state folded from its log, and its ``service.run_info``."""
    run_dir: Path
    state: object
    info: object = None


EVAL_WIDTH = 44             # cells of the run detail's eval panel, beside the loss chart
REREAD_INTERVAL = 3.0        # seconds between two readings of an open run detail's log

STATE_STYLE = {"live": "bold $success", "finished": "$success", "stopped": "$warning", "failed": "bold $error",
               "crashed": "$error", "new": "dim"}


# ---- what the Runs screens ask of the app (they never reach into it) ------------------------
@dataclass
class AttachRun(Message):
    """Follow the live run ``run_dir`` on the Train screen."""
    run_dir: Path


@dataclass
class ResumeRun(Message):
    """Offer the recovery dialog of the ended run ``run_dir`` (its hint's fixes, if any)."""
    run_dir: Path


@dataclass
class ExportRun(Message):
    """Export ``run_dir`` as GGUF."""
    run_dir: Path


@dataclass
class PreferenceTune(Message):
    """Preference-tune the SFT run ``run_dir``: a DPO config continuing its adapter, on the Config screen."""
    run_dir: Path


@dataclass
class ChatWith(Message):
    """Chat with ``src`` (a run, or one of its checkpoints) on the Chat screen."""
    src: Path


@dataclass
class RunAction(Message):
    """One of the after-training actions on ``run_dir``: merge, compare, serve, push."""
    action: str
    run_dir: Path


# the after-training actions on an ended run: (key, action, footer label, palette title, help);
# the Runs screen and the run detail both bind them, the palette lists them
RUN_ACTIONS = [
    ("c", "chat", "Chat", "Chat with this run", "Talk to the run's model, base or fine-tuned, token by token"),
    ("e", "export", "Export", "Export run as GGUF", "The run as GGUF for llama.cpp / Ollama, verified"),
    ("m", "merge", "Merge", "Merge adapter into base", "A 16-bit merged checkpoint, verified against base + adapter"),
    ("g", "compare", "Compare", "Compare generations", "The run's eval prompts answered by base and fine-tuned"),
    ("l", "eval", "Eval", "Evaluate base vs fine-tuned",
     "Loss, perplexity, exact match and contains-answer on held-out rows, base vs fine-tuned"),
    ("s", "serve", "Serve", "Serve command (vLLM)", "The vllm serve command for the run's adapter, copyable"),
    ("p", "push", "Push", "Push to the Hub", "Upload the adapter, merged model or GGUF (dry run first)"),
    ("t", "preference", "Pref-tune", "Preference-tune this run",
     "A DPO config that continues this SFT run's adapter, on the Config screen"),
]


def action_bindings(show: tuple = ("c",)) -> list[Binding]:
    return [Binding(key, f"run_action('{action}')", label, id=f"run-{action}", show=key in show,
                    tooltip=f"{title}: {help_}") for key, action, label, title, help_ in RUN_ACTIONS]


def request_action(screen: Screen, ri, action: str) -> None:
    """Post the request for ``action`` on the run ``ri`` (a RunInfo), if the run has ended."""
    if ri is None:
        screen.notify("No run selected.", markup=False)
        return
    if ri.state in ("live", "new"):
        screen.notify(f"{ri.name} is {ri.state}: {action} it once it has saved its adapter.", markup=False)
        return
    path = Path(ri.path)
    if action == "chat":
        screen.post_message(ChatWith(path))
    elif action == "export":
        screen.post_message(ExportRun(path))
    elif action == "preference":
        screen.post_message(PreferenceTune(path))
    else:
        screen.post_message(RunAction(action, path))


@dataclass
class CompareRuns(Message):
    """Overlay the curves of ``run_dirs`` (2-4) and list the config keys that differ."""
    run_dirs: list


@dataclass
class OpenRun(Message):
    """Show ``run_dir``'s curves and hints."""
    run_dir: Path


def _loss(v) -> Text:
    return Text("—" if v is None else f"{v:.4f}")


class RunsScreen(Screen):
    BINDINGS = [Binding("ctrl+l", "reload", "Refresh", id="reload-runs", show=False),
                Binding("a", "attach", "Attach", id="attach-run",
                        tooltip="Follow the selected live run on the Train screen"),
                Binding("r", "resume", "Resume", id="resume-run",
                        tooltip="Resume the selected stopped, failed or crashed run (with its hint's fixes)"),
                Binding("space", "mark", "Mark", id="mark-run", show=False,
                        tooltip="Mark the selected run for a comparison (2 to 4 runs)"),
                Binding("v", "compare", "Compare runs", id="compare-runs",
                        tooltip="Overlay the marked runs' loss curves; the config keys that differ"),
                *action_bindings()]

    marked: list = []            # the runs marked for a comparison, in the order marked

    def action_run_action(self, action: str) -> None:
        request_action(self, self._selected(), action)

    def action_mark(self) -> None:
        ri = self._selected()
        if ri is None:
            return
        path = Path(ri.path)
        if path in self.marked:
            self.marked = [p for p in self.marked if p != path]
        elif len(self.marked) >= 4:
            self.notify("At most 4 runs compare at once: unmark one first (space).", markup=False)
            return
        else:
            self.marked = [*self.marked, path]
        self._on_listed(RunsListed(self.runs))
        self.refresh_bindings()

    def action_compare(self) -> None:
        if not 2 <= len(self.marked) <= 4:
            self.notify("Mark 2 to 4 runs with space, then press v.", markup=False)
            return
        self.post_message(CompareRuns(list(self.marked)))

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """The footer fits 80 columns by showing what applies to the selected run: Attach for a
        live one, Resume for one that ended, Chat for one that has ended (the palette lists
        every action)."""
        ri = self._selected() if self.is_mounted else None
        state = getattr(ri, "state", None)
        if action == "attach":
            return state == "live"
        if action == "resume":
            return state in RESUMABLE
        if action == "run_action" and parameters == ("chat",):
            return state not in (None, "live", "new")
        if action == "compare":
            return len(self.marked) >= 2
        return True

    @on(DataTable.RowHighlighted, "#runs")
    def _highlighted(self) -> None:
        self.refresh_bindings()

    def action_resume(self) -> None:
        ri = self._selected()
        if ri is not None:
            resume_from_list(self, ri)

    COLUMNS = [("run", "run", 22), ("state", "state", 8), ("step", "step", 7),
               ("final loss", "final", 10), ("last loss", "last", 9), ("model", "model", 12)]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="runs-where")
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "Runs"
        t = self.query_one("#runs", DataTable)
        # fixed widths (80 columns with cell padding): auto widths collapsed to the headers when
        # the table was laid out before its rows arrived; long names are shortened in the middle
        for label, key, width in self.COLUMNS:
            t.add_column(label, key=key, width=width)
        self.action_reload()
        self.set_interval(3.0, self._auto_reload)

    def on_screen_resume(self) -> None:
        self.action_reload()

    def _auto_reload(self) -> None:
        if self.is_current:
            self.action_reload()

    def action_reload(self) -> None:
        where = Text("runs in ", style="dim")
        p = Path(self.app.runs_dir())
        where.append(middle(p, 28) if p.is_absolute() else middle(f"./{p}/", 28))
        where.append("  enter open · space mark · ^p all actions", style="dim")
        self.query_one("#runs-where", Static).update(where)
        self._list(self.app.runs_dir())

    @work(thread=True, exclusive=True, group="list-runs", exit_on_error=False)
    def _list(self, runs_dir: Path) -> None:
        from engine import service
        try:
            self.post_message(RunsListed(service.runs(runs_dir)))
        except Exception as e:
            self.post_message(RunsListed([], f"{type(e).__name__}: {e}"))

    @on(RunsListed)
    def _on_listed(self, msg: RunsListed) -> None:
        t = self.query_one("#runs", DataTable)
        keep = t.cursor_row
        t.clear()
        if msg.error:
            self.notify(one_line(msg.error, 200), severity="error", markup=False)
        from tui.screens.compare import MARKS
        marked = {p: i for i, p in enumerate(self.marked)}
        for ri in msg.runs:
            step = f"{ri.step}/{ri.total_steps}" if ri.total_steps else str(ri.step)
            i = marked.get(Path(ri.path))
            name = Text(middle(ri.name, 22)) if i is None else \
                Text(f"{MARKS[i]} ", style="bold $accent") + Text(middle(ri.name, 20))
            t.add_row(name, Text(ri.state, style=STATE_STYLE.get(ri.state, "")),
                      Text(step), _loss(ri.final_loss), _loss(ri.last_loss),
                      Text(middle(ri.model or "", 12)), key=str(ri.path))
        if msg.runs:
            t.move_cursor(row=min(keep, len(msg.runs) - 1))
        self.runs = msg.runs

    runs: list = []

    def _selected(self):
        t = self.query_one("#runs", DataTable)
        if not self.runs or t.cursor_row < 0 or t.cursor_row >= len(self.runs):
            return None
        return self.runs[t.cursor_row]

    @on(DataTable.RowSelected, "#runs")
    def _open(self, event: DataTable.RowSelected) -> None:
        ri = self._selected()
        if ri is not None:
            self.post_message(OpenRun(ri.path))

    def action_export(self) -> None:
        """Export the selected run as GGUF (type, progress, then the commands to use it)."""
        request_action(self, self._selected(), "export")

    def action_attach(self) -> None:
        ri = self._selected()
        if ri is None:
            return
        if ri.state != "live":
            self.notify(f"{ri.name} is {ri.state}, not live: press enter to see its curves.",
                        markup=False)
            return
        self.post_message(AttachRun(ri.path))


def resume_from_list(screen: Screen, ri) -> None:
    """Ask for the recovery dialog of a run picked on a Runs screen, if it has ended."""
    if ri.state not in RESUMABLE:
        why = "still live: attach to it (a)" if ri.state == "live" else f"{ri.state}: nothing to resume"
        screen.notify(f"{ri.name} is {why}.", markup=False)
        return
    screen.post_message(ResumeRun(Path(ri.path)))


class RunDetailScreen(Screen):
    """One run's curves and hints, read from its events.jsonl."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="back"),
                Binding("a", "attach", "Attach", id="attach-detail", show=False),
                Binding("r", "resume", "Resume", id="resume-detail"),
                *action_bindings()]

    def action_run_action(self, action: str) -> None:
        request_action(self, self.info, action)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Resume only for a run that can be resumed; the footer then fits 80 columns."""
        if action == "resume":
            return self.info is not None and self.info.state in RESUMABLE
        if action == "run_action" and parameters == ("chat",):
            return self.can_chat
        return True

    can_chat = False         # the run has an adapter or a checkpoint to chat with

    def action_resume(self) -> None:
        if self.info is not None:
            resume_from_list(self, self.info)

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.info = None
        self.eval_report: dict | None = None     # the newest `qlora-tui eval` report, if any

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(Text("reading ") + literal(self.run_dir.name) + Text("…"), id="detail-summary")
        with Horizontal(classes="spark-row"):
            yield Static("loss", classes="spark-label")
            yield Sparkline([], id="detail-loss")
        with Horizontal(classes="spark-row"):
            yield Static("eval", classes="spark-label")
            yield Sparkline([], id="detail-eval")
        with Horizontal(classes="spark-row"):
            yield Static("lr", classes="spark-label")
            yield Sparkline([], id="detail-lr")
        with Horizontal(classes="spark-row"):
            yield Static("grad", classes="spark-label", id="detail-grad-label")
            yield Sparkline([], id="detail-grad")
        for label, name in RunState.PREFERENCE_ROWS:    # a preference run's own curves
            row = Horizontal(classes="spark-row", id=f"detail-pref-{name}-row")
            row.display = False
            with row:
                yield Static(label, classes="spark-label")
                yield Sparkline([], id=f"detail-pref-{name}")
        with Horizontal(id="detail-middle"):
            yield LossChart(id="detail-chart")
            box = VerticalScroll(id="detail-eval-box")
            box.display = False                 # until the run has an eval report
            with box:
                yield Static(id="detail-evalrep")
        with VerticalScroll(id="detail-hints-box"):
            yield Static(id="detail-hints")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = f"Run {self.run_dir.name}"
        self._read(self.run_dir)
        self.set_interval(REREAD_INTERVAL, self._reread)     # never stale: a resume, a live run

    def _reread(self) -> None:
        if self.is_current:
            self._read(self.run_dir)

    def on_screen_resume(self) -> None:         # back from a dialog (an eval just saved): at once
        self._read(self.run_dir)

    @work(thread=True, exclusive=True, exit_on_error=False)
    def _read(self, run_dir: Path) -> None:
        from engine import service
        self.eval_report = service.latest_eval(run_dir)     # the newest `qlora-tui eval` of this run
        self.post_message(RunHistory(run_dir, read_run(run_dir), service.run_info(run_dir)))

    @on(RunHistory)
    def _on_history(self, msg: RunHistory) -> None:
        st = msg.state
        ri = self.info = msg.info
        t = Text()
        t.append(clean(ri.name), style="bold")
        t.append("  ")
        t.append(ri.state, style=STATE_STYLE.get(ri.state, ""))
        t.append(f"   step {ri.step}/{ri.total_steps or '?'}")
        if st.model:
            t.append("   model ", style="dim")
            t.append(clean(st.model))
        if ri.final_loss is not None:
            t.append(f"   final loss {ri.final_loss:.4f}", style="bold")
        if st.last_eval is not None:
            t.append(f"   eval loss {st.last_eval:.4f}")
        if st.time_text:
            t.append(f"   {st.time_text}")
        if st.method:
            t.append("\n" + clean("   ".join(f"{k} {v}" for k, v in preference_rows(st))))
        if ri.reason:
            t.append("\n")
            t.append(one_line(ri.reason, 300), style="italic")
        if st.adapter_dir:
            t.append("\nadapter ", style="dim")
            t.append_text(literal(st.adapter_dir))
        if ri.state == "live":
            t.append("\na: attach to this live run", style="dim")
        else:
            from engine.service import chat_sources
            keys = (["c chat"] if chat_sources(self.run_dir) else []) + \
                ["e export", "m merge", "g compare", "l eval", "s serve", "p push"] + \
                (["r resume"] if ri.state in RESUMABLE else [])
            t.append("\n" + " · ".join(keys), style="dim")
        self.query_one("#detail-summary", Static).update(t)
        for spark_id, values in (("#detail-loss", st.loss_values), ("#detail-eval", st.eval_spark_values),
                                 ("#detail-lr", st.lr_values), ("#detail-grad", st.grad_norm_values)):
            set_spark(self.query_one(spark_id, Sparkline), values)
        for _, name in RunState.PREFERENCE_ROWS:
            values = st.preference_values(name)
            self.query_one(f"#detail-pref-{name}-row", Horizontal).display = bool(values)
            set_spark(self.query_one(f"#detail-pref-{name}", Sparkline), values)
        self.detail_state = st
        from tui.widgets.eval_view import eval_view
        view = eval_view(self.eval_report, EVAL_WIDTH - 3) if self.eval_report else None
        self.query_one("#detail-eval-box", VerticalScroll).display = view is not None
        self.query_one("#detail-evalrep", Static).update(view or "")
        self.query_one("#detail-chart", LossChart).set_data(st.losses, st.evals, st.total_steps)
        gens = generations_text(st.generations, history=True)
        self.query_one("#detail-hints", Static).update(
            hints_text(st.hints, st.warnings) + (Text("\n\nanswers over the run (greedy, at each eval):\n",
                                                      style="bold") + gens if gens else Text()))
        from engine.service import chat_sources
        self.can_chat = ri.state not in ("live", "new") and bool(chat_sources(self.run_dir))
        self.refresh_bindings()

    def action_attach(self) -> None:
        if self.info is None or self.info.state != "live":
            self.notify("Only a live run can be attached to.", markup=False)
            return
        self.post_message(AttachRun(self.run_dir))      # the app closes this screen
