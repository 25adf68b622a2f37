"""Compare 2-4 runs: their loss and eval-loss curves overlaid, and the config keys that differ."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import DataTable, Footer, Header, Static

from tui.controller import read_run
from tui.safe import middle, one_line
from tui.widgets.chart import fmt

MARKS = ["●", "▲", "■", "◆"]            # train loss of run 1..4
EVAL_MARKS = ["○", "△", "□", "◇"]       # its eval loss
COLOURS = ["loss-overlay--r0", "loss-overlay--r1", "loss-overlay--r2", "loss-overlay--r3"]


class OverlayChart(Widget):
    """Several runs' loss (filled marks) and eval loss (hollow marks) on shared axes."""
    COMPONENT_CLASSES = {*COLOURS, "loss-overlay--axis"}
    AXIS = 9

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.series: list[tuple[list, list]] = []      # [(losses, evals)] per run

    def set_series(self, series: list[tuple[list, list]]) -> None:
        self.series = series
        self.refresh()

    def grid(self, width: int, height: int) -> tuple[list[list[tuple[str, int]]], float, float]:
        """Rows of (char, run index or -1) and the y range; later runs draw over earlier ones."""
        pts = [(s, v) for losses, evals in self.series for s, v in (*losses, *evals) if math.isfinite(v)]
        rows = [[(" ", -1)] * width for _ in range(height)]
        if not pts or width < 2 or height < 2:
            return rows, 0.0, 0.0
        lo_s = min(s for s, _ in pts)
        hi_s = max(s for s, _ in pts)
        lo_v, hi_v = min(v for _, v in pts), max(v for _, v in pts)
        span_s, span_v = max(1, hi_s - lo_s), (hi_v - lo_v) or 1.0
        for i, (losses, evals) in enumerate(self.series):
            for points, mark in ((losses, MARKS[i % 4]), (evals, EVAL_MARKS[i % 4])):
                for s, v in points:
                    if not math.isfinite(v):
                        continue
                    x = round((s - lo_s) / span_s * (width - 1))
                    y = height - 1 - round((v - lo_v) / span_v * (height - 1))
                    rows[y][x] = (mark, i)
        return rows, lo_v, hi_v

    def render_line(self, y: int) -> Strip:
        width, height = self.size
        plot_w = max(1, width - self.AXIS - 1)
        rows, lo, hi = self.grid(plot_w, height)
        axis = self.get_component_rich_style("loss-overlay--axis")
        label = fmt(hi) if y == 0 else fmt(lo) if y == height - 1 else ""
        segs = [Segment(f"{label:>{self.AXIS - 1}} │" if self.series else " " * (self.AXIS + 1), axis)]
        if not self.series or y >= len(rows):
            return Strip(segs)
        for ch, i in rows[y]:
            style = self.get_component_rich_style(COLOURS[i % 4]) if i >= 0 else Style()
            segs.append(Segment(ch, style))
        return Strip(segs)


@dataclass
class Compared(Message):
    states: list
    differences: list


class CompareRunsScreen(Screen):
    """2-4 runs picked on the Runs screen (space marks them, v compares)."""
    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="compare-back")]

    def __init__(self, run_dirs: list[Path]) -> None:
        super().__init__()
        self.run_dirs = [Path(d) for d in run_dirs]
        self.differences: list = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="compare-legend")
        yield OverlayChart(id="compare-chart")
        yield DataTable(id="compare-config", cursor_type="row", zebra_stripes=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = f"Compare {len(self.run_dirs)} runs"
        self._read(self.run_dirs)

    @work(thread=True, exclusive=True, exit_on_error=False)
    def _read(self, run_dirs: list[Path]) -> None:
        from engine.service import config_differences
        self.post_message(Compared([read_run(d) for d in run_dirs], config_differences(run_dirs)))

    @on(Compared)
    def _on_compared(self, msg: Compared) -> None:
        self.differences = msg.differences
        legend = Text()
        width = max(12, (self.size.width - 4) // len(self.run_dirs) - 16)
        for i, (d, st) in enumerate(zip(self.run_dirs, msg.states)):
            style = self.query_one(OverlayChart).get_component_rich_style(COLOURS[i % 4])
            legend.append(f"{MARKS[i % 4]}{EVAL_MARKS[i % 4]} ", style=style)
            legend.append(middle(d.name, width))
            last = st.evals[-1][1] if st.evals else None
            legend.append(f" {fmt(st.losses[-1][1]) if st.losses else '—'}"
                          f"/{fmt(last) if last is not None else '—'}  ", style="dim")
        legend.append("\n(filled: loss, hollow: eval loss; last loss/eval after each name)", style="dim")
        self.query_one("#compare-legend", Static).update(legend)
        self.query_one(OverlayChart).set_series([(st.losses, st.evals) for st in msg.states])
        t = self.query_one("#compare-config", DataTable)
        t.clear(columns=True)
        col = max(8, (self.size.width - 26) // len(self.run_dirs) - 2)
        t.add_column("config key", width=22)
        for i, d in enumerate(self.run_dirs):
            t.add_column(f"{MARKS[i % 4]} {middle(d.name, col - 2)}", width=col)
        if not msg.differences:
            t.add_row(Text("(no config key differs)", style="dim"), *[""] * len(self.run_dirs))
        for key, values in msg.differences:
            t.add_row(Text(key), *[Text(middle("—" if v is None else one_line(v, 200), col))
                                   for v in values])
