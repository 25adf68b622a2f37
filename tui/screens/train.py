"""Train: start/stop, progress, loss curves, live metrics, GPU gauges, the engine's hints."""
from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header
from textual.worker import get_current_worker

from tui.runstate import RunState
from tui.widgets.run_view import Curves, GpuPanel, HintsPanel, Metrics, NodesPanel, StatusLine, StepProgress


# ---- what this screen's workers post to it -------------------------------------------
@dataclass
class Readings(Message):
    """One sample of the GPUs (or the host when there is no NVIDIA GPU). Only the newest
    sample matters: one still waiting in the queue is replaced by the next."""
    gpus: list
    host: object
    gpu_reason: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Readings)


class TrainScreen(Screen):

    def compose(self) -> ComposeResult:
        yield Header()
        yield StatusLine(id="status")
        yield StepProgress(id="progress-row")
        with Horizontal(id="main"):
            yield Curves(id="curves")
            yield Metrics(id="metrics")
        yield GpuPanel(Text("reading GPUs…", style="dim"), id="gpu")
        yield NodesPanel(id="nodes")
        with VerticalScroll(id="hints-box", can_focus=True):
            yield HintsPanel(id="hints")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "Train"
        self.app.run_changed.subscribe(self, self._run_changed, immediate=True)
        self.render_run(self.app.run_state)
        self._poll_readings()

    def _run_changed(self, st: RunState | None) -> None:
        """The followed run changed (the app's ``run_changed`` signal): redrawn while shown,
        and on return to this screen otherwise."""
        if self.is_current:
            self.render_run(st)

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
        self.query_one(GpuPanel).reading = (msg.gpus, msg.host, msg.gpu_reason)

    # ---- run state → its parts (≤1×/s while steps stream: the controller batches events) -----
    def render_run(self, st: RunState | None) -> None:
        """Hand ``st`` to every part; each redraws only what changed (its reactive view)."""
        if not self.is_mounted:
            return
        with self.app.batch_update():
            for part in (StatusLine, StepProgress, Curves, Metrics, NodesPanel, HintsPanel):
                self.query_one(part).show(st)
            self.set_class(bool(st is not None and st.run_dir is not None and (st.hints or st.warnings)),
                           "-has-hints")
