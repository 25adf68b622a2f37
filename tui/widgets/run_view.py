"""The Train screen's parts: each shows one view of the followed run and redraws itself when
that view changes.

Every part computes its ``view`` (a plain value: tuples, numbers, strings) from the run's
``RunState`` in ``view_of``; ``view`` is a reactive, so an equal view (most parts between two
batches of steps) costs nothing and a changed one is drawn by ``watch_view``. A part whose
size never depends on its content (fixed in the CSS) repaints alone; the others ask for a
layout pass, which was most of what a live run cost the TUI (bench/tui_overhead.py).
"""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.widgets import ProgressBar, Sparkline, Static

from engine.core.events import RunFailed, RunFinished
from engine.core.units import fmt_eta
from tui.runstate import RunState
from tui.safe import clean, literal, middle, one_line
from tui.widgets.chart import LossChart
from tui.widgets.panels import generations_text, gpu_text, hints_text, nodes_text

PHASE_STYLE = {"training": "bold $success", "finished": "bold $success", "stopped": "bold $warning",
               "failed": "bold $error", "detached": "bold $primary", "waiting": "dim"}


def tracker_logs(plan: list) -> tuple[str, str] | None:
    """(tracker, where its logs go) from the run's plan (the engine's ``trackers.setup`` line)."""
    for line in plan or []:
        head, _, where = str(line).partition(" logs: ")
        if head and " " not in head and where:
            return head, where
    return None


def _v(v, spec: str = ".4g") -> str:
    return "—" if v is None else format(v, spec)


UNSHOWN = object()      # a part's view before its first show: any view differs from it


class RunPart(Static):
    """A Static that shows ``draw(view)``; ``show(st)`` sets ``view = view_of(st)``."""

    view = reactive(UNSHOWN, init=False, layout=False)
    FIXED_SIZE = False          # True: the CSS fixes its size, a new view only repaints it

    def show(self, st: RunState | None) -> None:
        self.view = self.view_of(st)

    def view_of(self, st: RunState | None):
        raise NotImplementedError

    def draw(self, view) -> Text:
        raise NotImplementedError

    def watch_view(self, view) -> None:
        self.update(self.draw(view), layout=not self.FIXED_SIZE)


class StatusLine(RunPart):
    """``● phase  run  model on device  message``."""
    FIXED_SIZE = True

    def view_of(self, st):
        if st is None or st.run_dir is None:
            return None
        return ("detached" if st.detached else st.phase, st.stop_requested and not st.ended,
                st.run_dir.name, st.model, st.device,
                st.message if st.phase != "training" else "", self.screen.size.width)

    def draw(self, view) -> Text:
        if view is None:
            return Text("no run yet", style="dim")
        phase, stopping, name, model, device, message, width = view
        s = Text()
        s.append(f"● {phase}", style=PHASE_STYLE.get(phase, "bold"))
        if stopping:
            s.append(" (stopping: saving the adapter…)", style="$warning")
        s.append("  ")
        s.append(clean(name), style="bold")
        if model:
            s.append(f"  {one_line(model, 40)}")
        if device:
            s.append(f" on {clean(device)}")
        if message:
            room = max(20, width - s.cell_len - 4)     # the end of a path matters most
            s.append("  ")
            s.append(middle(message, room), style="italic")
        return s


class StepProgress(Horizontal):
    """The progress bar (steps, or the phase's own progress while loading) and ``step k/n ETA``."""

    view = reactive(UNSHOWN, init=False, layout=False)

    def compose(self) -> ComposeResult:
        yield ProgressBar(total=100, show_eta=False, id="progress")
        yield Static(id="steps")

    def show(self, st: RunState | None) -> None:
        self.view = self.view_of(st)

    @staticmethod
    def view_of(st: RunState | None) -> tuple:
        if st is None or st.run_dir is None:
            return 100, 0, ""
        # an ETA only while steps run: a run loading (or resuming) has none yet, whatever the
        # last segment left in eta_seconds
        eta = f"  ETA {fmt_eta(st.eta_seconds)}" if st.phase == "training" and not st.ended else ""
        if eta and st.step <= st.resumed_from_step and st.predicted_seconds is not None:
            eta += " (predicted)"          # no step measured yet: the time-to-train prediction
        label = f"step {st.step}/{st.total_steps or '?'}{eta}"
        if st.phase not in ("training", "finished", "stopped", "failed") and st.progress is not None:
            return 1.0, st.progress, label
        return st.total_steps or None, st.step, label

    def watch_view(self, view: tuple) -> None:
        total, progress, label = view
        self.query_one(ProgressBar).update(total=total, progress=progress)
        self.query_one("#steps", Static).update(label, layout=False)    # its width is fixed


class Welcome(RunPart):
    """What the screen shows before the first run: the config at a glance and the keys."""

    def view_of(self, st):
        return self.app.config

    def draw(self, cfg) -> Text:
        t = Text()
        t.append("Ready to train.\n\n", style="bold")
        if cfg is not None:
            steps = cfg.train.max_steps if cfg.train.max_steps > 0 else f"{cfg.train.epochs:g} epochs"
            rows = [("model", clean(cfg.model.name)), ("data", clean(cfg.data.train)),
                    ("steps", f"{steps}"), ("runs", clean(cfg.output.dir))]
            if cfg.output.report_to != "none":
                from engine.service import log_location
                rows.append(("logs", clean(f"{cfg.output.report_to}: "
                                           f"{log_location(cfg.output.report_to, 'RUN_DIR')}")))
            for key, value in rows:
                t.append(f"{key:<7}", style="dim")
                t.append(value + "\n")
            t.append("\n")
        for key, what in (("ctrl+r", "start training"), ("F3", "edit the config"),
                          ("F2", "check the data")):
            t.append(f" {key} ", style="bold reverse")
            t.append(f" {what}\n")
        return t


def set_spark(spark: Sparkline, values: list) -> None:
    """A sparkline at most one cell per point: 3 points are 3 cells, not 3 bars stretched over
    the width (a run's first steps, a couple of evals)."""
    spark.data = values
    width = max(1, len(values))
    if spark.styles.max_width is None or spark.styles.max_width.value != width:
        spark.styles.max_width = width


class Curves(Vertical):
    """Sparklines of loss, eval loss, lr and grad norm (log10), the loss chart, and the
    welcome in its place while there is no run."""

    SERIES = (("loss", "loss-spark"), ("eval", "eval-spark"), ("lr", "lr-spark"),
              ("grad", "grad-spark"))

    def compose(self) -> ComposeResult:
        for label, spark_id in self.SERIES:
            with Horizontal(classes="spark-row"):
                yield Static(label, classes="spark-label")
                yield Sparkline([], id=spark_id)
        for label, name in RunState.PREFERENCE_ROWS:    # a preference method's own curves, when it has them
            row = Horizontal(classes="spark-row", id=f"pref-{name}-row")
            row.display = False
            with row:
                yield Static(label, classes="spark-label")
                yield Sparkline([], id=f"pref-{name}-spark")
        yield LossChart(id="chart")
        yield Welcome(id="welcome")

    def show(self, st: RunState | None) -> None:
        chart, welcome = self.query_one(LossChart), self.query_one(Welcome)
        none = st is None or st.run_dir is None
        welcome.display, chart.display = none, not none
        if none:
            welcome.show(st)
        series = ([], [], [], []) if none else (
            st.loss_values, st.eval_spark_values, st.lr_values, st.grad_norm_values)
        for (_, spark_id), values in zip(self.SERIES, series):
            set_spark(self.query_one(f"#{spark_id}", Sparkline), values[-200:])  # equal data: no redraw
        for _, name in RunState.PREFERENCE_ROWS:
            values = [] if none else st.preference_values(name)
            row = self.query_one(f"#pref-{name}-row", Horizontal)
            if row.display != bool(values):
                row.display = bool(values)
            if values:
                set_spark(self.query_one(f"#pref-{name}-spark", Sparkline), values[-200:])
        if not none:
            chart.empty_text = "waiting for the first loss…" if not st.ended else "no loss recorded"
            chart.set_data(st.losses, st.evals, st.total_steps)


class Metrics(RunPart):
    """loss, eval loss, lr, grad norm, tokens/s, epoch, and how the run ended."""
    FIXED_SIZE = True

    def view_of(self, st):
        if st is None or st.run_dir is None:
            return None
        rows = [("loss", _v(st.last_loss, ".4f")), ("eval loss", _v(st.last_eval, ".4f")),
                ("lr", _v(st.learning_rate, ".2e")), ("grad norm", _v(st.grad_norm, ".3f")),
                ("tokens/s", _v(st.tokens_per_second, ",.0f")), ("epoch", _v(st.epoch, ".2f"))]
        rows += preference_rows(st)
        if st.trainable_params:
            rows.append(("trainable", f"{st.trainable_params:,}"))
        if st.checkpoints:
            rows.append(("saved", f"step {st.checkpoints[-1][0]}"))
        tracker = tracker_logs(st.plan)
        if tracker:
            rows.append(("logs", tracker[0]))
        if st.ended and st.train_seconds is not None:        # measured against predicted
            rows.append(("time", fmt_eta(st.train_seconds) + (f" (predicted {fmt_eta(st.predicted_seconds)})"
                                                              if st.predicted_seconds is not None else "")))
        if isinstance(st.end, RunFinished):
            end = ("finished", _v(st.final_loss, ".4f"), st.adapter_dir)
        elif isinstance(st.end, RunFailed):
            end = ("failed", st.fail_kind, "")
        else:
            end = None
        return tuple(rows), tracker[1] if tracker else None, end

    def draw(self, view) -> Text:
        if view is None:
            return Text("lr        —\ngrad norm —\ntokens/s  —\nepoch     —", style="dim")
        rows, logs_at, end = view
        m = Text()
        for i, (k, v) in enumerate(rows):
            if i:
                m.append("\n")
            m.append(f"{k:<10}", style="dim")
            m.append(v, style="bold" if k == "loss" else "")
        if logs_at:
            m.append("\n")
            m.append(literal(logs_at, style="dim"))
        if end is not None and end[0] == "finished":
            m.append("\n\nfinal loss ", style="dim")
            m.append(end[1], style="bold")
            if end[2]:
                m.append("\nadapter ", style="dim")
                m.append(middle(end[2], 3 * 26 - 8), style="")   # 3 lines of the panel
        elif end is not None:
            m.append(f"\n\nfailed ({clean(end[1])})", style="bold $error")
        return m


def preference_rows(st) -> list[tuple[str, str]]:
    """A preference method's latest metrics (train, and eval where it has them) as metric rows."""
    if not st.method:
        return []
    rows = [("method", st.method)]
    for label, name, fmt in (("accuracy", "accuracy", ".2f"), ("margin", "margin", ".3f"),
                             ("chosen", "chosen", ".3f"), ("rejected", "rejected", ".3f"), ("kl", "kl", ".3f")):
        v, e = st.preference_last(name), st.preference_last("eval_" + name)
        if v is None and e is None:
            continue
        rows.append((label, _v(v, fmt) + (f" (eval {_v(e, fmt)})" if e is not None else "")))
    return rows


class GpuPanel(Static):
    """One row per GPU (or the host's CPU and RAM); ``reading`` is the newest sample."""

    reading = reactive(None, init=False, layout=False)

    def watch_reading(self, reading) -> None:
        text = gpu_text(*reading)
        lines = text.plain.count("\n")
        # its height follows its lines: lay the screen out again only when their number changes
        self.update(text, layout=lines != getattr(self, "_lines", None))
        self._lines = lines


class NodesPanel(RunPart):
    """A multi-process job's nodes and processes (RUN_DIR/nodes/, merged by the follower into
    ``RunState.nodes``): one row per GPU grouped by node, and the job's tokens/s. Hidden when
    the run is one process."""

    def view_of(self, st):
        if st is None or st.run_dir is None or not st.nodes:
            return None
        from engine.service import node_rows
        import time
        now = time.time()
        rows = tuple((r.node, r.host, r.tokens_per_second, r.stale(now) and not st.ended,
                      tuple((p.rank, p.local_rank, p.step, p.tokens_per_second, (p.gpu or {}).get("util_percent"),
                             (p.gpu or {}).get("mem_used_bytes"), (p.gpu or {}).get("mem_total_bytes"), p.done)
                            for p in r.procs))
                     for r in node_rows(st.nodes))
        return rows, st.tokens_per_second

    def draw(self, view) -> Text:
        self.display = view is not None
        return Text() if view is None else nodes_text(*view)


class HintsPanel(RunPart):
    """The engine's hints, newest first: symptom, likely cause, fix; then the run's warnings."""

    def view_of(self, st):
        if st is None or st.run_dir is None:
            return (), (), None
        return tuple(st.hints), tuple(st.warnings), (st.generations[-1] if st.generations else None)

    def draw(self, view) -> Text:
        hints, warnings, latest = view
        if latest is None:
            return hints_text(list(hints), list(warnings))
        answers = generations_text([latest])
        if not hints and not warnings:
            return answers
        return hints_text(list(hints), list(warnings)) + Text("\n") + answers
