"""Train: start/stop, progress, loss curves, live metrics, GPU gauges, the engine's hints."""
from __future__ import annotations

import time

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, ProgressBar, Sparkline, Static
from textual.worker import get_current_worker

from tui.messages import Readings
from engine.core.units import fmt_eta
from engine.core.events import RunFailed, RunFinished
from tui.runstate import RunState
from tui.safe import clean, literal, middle, one_line
from tui.widgets.chart import LossChart, fmt
from tui.widgets.panels import gpu_text, hints_text


def tracker_logs(plan: list) -> tuple[str, str] | None:
    """(tracker, where its logs go) from the run's plan (the engine's ``trackers.setup`` line)."""
    for line in plan or []:
        head, _, where = str(line).partition(" logs: ")
        if head in ("tensorboard", "wandb") and where:
            return head, where
    return None


def _v(v, spec: str = ".4g") -> str:
    return "—" if v is None else format(v, spec)


PHASE_STYLE = {"training": "bold green", "finished": "bold green", "stopped": "bold yellow",
               "failed": "bold red", "detached": "bold cyan", "waiting": "dim"}


class TrainScreen(Screen):
    DEFAULT_CSS = """
    TrainScreen #status { height: 1; width: 1fr; padding: 0 1; }
    TrainScreen #progress-row { height: 1; padding: 0 1; }
    TrainScreen #progress-row ProgressBar { width: 1fr; }
    TrainScreen #progress-row ProgressBar Bar { width: 1fr; }
    TrainScreen #steps { width: 36; padding-left: 1; }
    TrainScreen #main { height: 1fr; min-height: 6; }
    TrainScreen #curves { width: 1fr; padding: 0 1; }
    TrainScreen .spark-row { height: 1; }
    TrainScreen .spark-label { width: 6; color: $foreground 70%; }
    TrainScreen Sparkline { width: 1fr; height: 1; }
    TrainScreen #loss-spark > .sparkline--max-color { color: $error; }
    TrainScreen #loss-spark > .sparkline--min-color { color: $success; }
    TrainScreen #eval-spark > .sparkline--max-color { color: $warning; }
    TrainScreen #eval-spark > .sparkline--min-color { color: $primary; }
    TrainScreen #metrics { width: 28; height: 1fr; padding: 0 1; border-left: vkey $foreground 20%; }
    TrainScreen #welcome { height: 1fr; padding: 1 2; color: $foreground 80%; }
    TrainScreen #gpu { height: auto; max-height: 5; padding: 0 1;
                       border-top: hkey $foreground 20%; }
    TrainScreen #hints-box { height: 5; border-top: hkey $foreground 20%; padding: 0 1; }
    TrainScreen.-has-hints #hints-box { height: 7; }
    """

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="status")
        with Horizontal(id="progress-row"):
            yield ProgressBar(total=100, show_eta=False, id="progress")
            yield Static(id="steps")
        with Horizontal(id="main"):
            with Vertical(id="curves"):
                with Horizontal(classes="spark-row"):
                    yield Static("loss", classes="spark-label")
                    yield Sparkline([], id="loss-spark")
                with Horizontal(classes="spark-row"):
                    yield Static("eval", classes="spark-label")
                    yield Sparkline([], id="eval-spark")
                with Horizontal(classes="spark-row"):
                    yield Static("lr", classes="spark-label")
                    yield Sparkline([], id="lr-spark")
                with Horizontal(classes="spark-row"):
                    yield Static("grad", classes="spark-label")
                    yield Sparkline([], id="grad-spark")
                yield LossChart(id="chart")
                yield Static(id="welcome")
            yield Static(id="metrics")
        yield Static(id="gpu")
        with VerticalScroll(id="hints-box", can_focus=True):
            yield Static(id="hints")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "Train"
        self.query_one("#gpu", Static).update(Text("reading GPUs…", style="dim"))
        self.render_run(self.app.run_state)
        self._poll_readings()

    def on_screen_resume(self) -> None:
        self.render_run(self.app.run_state)

    # ---- readings (GPU / host), polled in a thread, shown through messages ----------------
    @work(thread=True, exclusive=True, group="readings", exit_on_error=False)
    def _poll_readings(self) -> None:
        worker = get_current_worker()
        gpu, host, reason = self.app.make_samplers()
        while not worker.is_cancelled:
            gpus, hs = [], None
            try:
                if gpu is not None and gpu.available:
                    gpus = gpu.sample()
            except Exception as e:
                reason, gpus = f"NVML error: {e}", []
            try:
                hs = host.sample() if host is not None else None
            except Exception:
                hs = None
            self.post_message(Readings(gpus, hs, reason))
            if self.app.readings_interval <= 0:
                return            # one fixed reading (snapshots)
            if worker.cancelled_event.wait(self.app.readings_interval):
                return

    @on(Readings)
    def _on_readings(self, msg: Readings) -> None:
        text = gpu_text(msg.gpus, msg.host, msg.gpu_reason)
        lines = text.plain.count("\n") if isinstance(text, Text) else str(text).count("\n")
        widget = self.query_one("#gpu", Static)
        # its height follows its lines: lay the screen out again only when their number changes
        widget.update(text, layout=lines != self.__dict__.get("_gpu_lines"))
        self._gpu_lines = lines

    # ---- run state → widgets (≤1×/s while steps stream: tui.follow batches events) --------------
    def render_run(self, st: RunState | None) -> None:
        if not self.is_mounted:
            return
        with self.app.batch_update():
            self._draw(st)

    def _welcome_text(self) -> Text:
        cfg = self.app.config
        t = Text()
        t.append("Ready to train.\n\n", style="bold")
        if cfg is not None:
            steps = cfg.train.max_steps if cfg.train.max_steps > 0 else f"{cfg.train.epochs:g} epochs"
            t.append("model  ", style="dim")
            t.append(clean(cfg.model.name) + "\n")
            t.append("data   ", style="dim")
            t.append(clean(cfg.data.train) + "\n")
            t.append("steps  ", style="dim")
            t.append(f"{steps}\n")
            t.append("runs   ", style="dim")
            t.append(clean(cfg.output.dir) + "\n")
            if cfg.output.report_to != "none":
                from engine.training.trackers import log_location
                t.append("logs   ", style="dim")
                t.append(clean(f"{cfg.output.report_to}: {log_location(cfg.output.report_to, 'RUN_DIR')}") + "\n")
            t.append("\n")
        for key, what in (("ctrl+r", "start training"), ("F3", "edit the config"),
                          ("F2", "check the data")):
            t.append(f" {key} ", style="bold reverse")
            t.append(f" {what}\n")
        return t

    # Statics whose size never depends on their content (fixed in DEFAULT_CSS): updating them
    # repaints them alone. Any other update asks Textual for a layout pass of the whole screen,
    # which was most of what a live run cost the TUI (bench/tui_overhead.py).
    FIXED_SIZE = frozenset({"status", "steps", "metrics"})

    def _put(self, widget: Static, content) -> None:
        """Update a Static only when its content changed (most fields stay the same between
        two batches of steps), and without a layout pass where its size is fixed."""
        key = widget.id
        cache = self.__dict__.setdefault("_shown", {})
        if cache.get(key) == content:
            return
        cache[key] = content
        widget.update(content, layout=key not in self.FIXED_SIZE)

    def _draw(self, st: RunState | None) -> None:
        status = self.query_one("#status", Static)
        welcome = self.query_one("#welcome", Static)
        chart = self.query_one("#chart", LossChart)
        progress = self.query_one("#progress", ProgressBar)
        steps = self.query_one("#steps", Static)
        metrics = self.query_one("#metrics", Static)
        if st is None or st.run_dir is None:
            self._put(status, Text("no run yet", style="dim"))
            self._put(welcome, self._welcome_text())
            welcome.display, chart.display = True, False
            progress.update(total=100, progress=0)
            self._put(steps, "")
            self._put(metrics, Text("lr        —\ngrad norm —\ntokens/s  —\nepoch     —", style="dim"))
            self.query_one("#loss-spark", Sparkline).data = []
            self.query_one("#eval-spark", Sparkline).data = []
            self.query_one("#lr-spark", Sparkline).data = []
            self.query_one("#grad-spark", Sparkline).data = []
            self._hints_shown = None
            self._put(self.query_one("#hints", Static), hints_text([]))
            return
        welcome.display, chart.display = False, True
        phase = "detached" if st.detached else st.phase
        s = Text()
        s.append(f"● {phase}", style=PHASE_STYLE.get(phase, "bold"))
        if st.stop_requested and not st.ended:
            s.append(" (stopping: saving the adapter…)", style="yellow")
        s.append("  ")
        s.append(clean(st.run_dir.name), style="bold")
        if st.model:
            s.append(f"  {one_line(st.model, 40)}")
        if st.device:
            s.append(f" on {clean(st.device)}")
        if st.message and st.phase != "training":
            room = max(20, self.size.width - s.cell_len - 4)     # the end of a path matters most
            s.append("  ")
            s.append(middle(st.message, room), style="italic")
        self._put(status, s)
        total = st.total_steps or None
        if st.phase not in ("training", "finished", "stopped", "failed") and st.progress is not None:
            progress.update(total=1.0, progress=st.progress)
        else:
            progress.update(total=total, progress=st.step)
        eta = "" if st.ended else f"  ETA {fmt_eta(st.eta_seconds)}"
        self._put(steps, f"step {st.step}/{st.total_steps or '?'}{eta}")
        self.query_one("#loss-spark", Sparkline).data = st.loss_values[-200:]
        self.query_one("#eval-spark", Sparkline).data = st.eval_spark_values[-200:]
        self.query_one("#lr-spark", Sparkline).data = st.lr_values[-200:]
        self.query_one("#grad-spark", Sparkline).data = st.grad_norm_values[-200:]   # log10
        chart.empty_text = "waiting for the first loss…" if not st.ended else "no loss recorded"
        chart.set_data(st.losses, st.evals, st.total_steps)
        m = Text()
        rows = [("loss", _v(st.last_loss, ".4f")), ("eval loss", _v(st.last_eval, ".4f")),
                ("lr", _v(st.learning_rate, ".2e")), ("grad norm", _v(st.grad_norm, ".3f")),
                ("tokens/s", _v(st.tokens_per_second, ",.0f")), ("epoch", _v(st.epoch, ".2f"))]
        if st.trainable_params:
            rows.append(("trainable", f"{st.trainable_params:,}"))
        if st.checkpoints:
            rows.append(("saved", f"step {st.checkpoints[-1][0]}"))
        tracker = tracker_logs(st.plan)
        if tracker:
            rows.append(("logs", tracker[0]))
        for i, (k, v) in enumerate(rows):
            if i:
                m.append("\n")
            m.append(f"{k:<10}", style="dim")
            m.append(v, style="bold" if k == "loss" else "")
        if tracker:
            m.append("\n")
            m.append(literal(tracker[1], style="dim"))
        if isinstance(st.end, RunFinished):
            m.append("\n\nfinal loss ", style="dim")
            m.append(_v(st.final_loss, ".4f"), style="bold")
            if st.adapter_dir:
                m.append("\nadapter ", style="dim")
                m.append(middle(st.adapter_dir, 3 * 26 - 8), style="")   # 3 lines of the panel
        elif isinstance(st.end, RunFailed):
            m.append(f"\n\nfailed ({clean(st.fail_kind)})", style="bold red")
        self._put(metrics, m)
        hints = self.query_one("#hints", Static)
        if self.__dict__.get("_hints_shown") != (len(st.hints), id(st.hints), len(st.warnings), id(st.warnings)):
            self._hints_shown = (len(st.hints), id(st.hints), len(st.warnings), id(st.warnings))
            self._put(hints, hints_text(st.hints, st.warnings))
        self.set_class(bool(st.hints or st.warnings), "-has-hints")
