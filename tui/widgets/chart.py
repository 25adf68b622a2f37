"""A multi-row loss chart drawn with block characters (works in 16 colours and over SSH)."""
from __future__ import annotations

import math

from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

BLOCKS = " ▁▂▃▄▅▆▇█"


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2e}"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def _buckets(points: list[tuple[int, float]], lo_step: int, hi_step: int, width: int) -> list[float | None]:
    cols: list[list[float]] = [[] for _ in range(width)]
    span = max(1, hi_step - lo_step)
    for step, v in points:
        if not math.isfinite(v):
            continue
        i = int((step - lo_step) / span * (width - 1)) if width > 1 else 0
        cols[max(0, min(width - 1, i))].append(v)
    return [sum(c) / len(c) if c else None for c in cols]


def _filled(cols: list) -> list:
    """Columns between two points carry the earlier value: with fewer steps than columns the
    bars stay contiguous (a blank column reads as missing data). Past the last point, and
    before the first, stays blank: no data there yet."""
    out, last = list(cols), None
    seen = [i for i, c in enumerate(cols) if c is not None]
    if not seen:
        return out
    for i in range(seen[0], seen[-1] + 1):
        if out[i] is None:
            out[i] = last
        last = out[i]
    return out


class LossChart(Widget):
    """Train loss as filled columns, eval loss as ● markers; y range on the left."""

    COMPONENT_CLASSES = {"loss-chart--bar", "loss-chart--eval", "loss-chart--axis"}
    AXIS = 9

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.losses: list[tuple[int, float]] = []
        self.evals: list[tuple[int, float]] = []
        self.total_steps = 0
        self.empty_text = "no loss yet"

    def set_data(self, losses, evals, total_steps: int = 0) -> None:
        losses, evals = list(losses), list(evals)
        if (losses, evals, total_steps) == (self.losses, self.evals, self.total_steps):
            return                      # nothing new: no repaint
        self.losses, self.evals, self.total_steps = losses, evals, total_steps
        self._chart_cache = None
        self.refresh()

    def _layout(self, plot_w: int):
        """(lo, hi, loss columns, eval columns) for this width, computed once per data change
        (render_line runs once per row: bucketing every point per row made redraws costly)."""
        cache = getattr(self, "_chart_cache", None)
        if cache is not None and cache[0] == plot_w:
            return cache[1]
        values = [v for _, v in self.losses + self.evals if math.isfinite(v)]
        if not values:
            out = None
        else:
            lo, hi = min(values), max(values)
            if hi - lo < 1e-9:
                lo, hi = lo - 0.5, hi + 0.5
            steps = [s for s, _ in self.losses + self.evals]
            lo_step = min(steps)
            hi_step = max(max(steps), self.total_steps or 0)
            out = (lo, hi, _filled(_buckets(self.losses, lo_step, hi_step, plot_w)),
                   _buckets(self.evals, lo_step, hi_step, plot_w))
        self._chart_cache = (plot_w, out)
        return out

    def render_line(self, y: int) -> Strip:
        width, height = self.size.width, self.size.height
        axis_style = self.get_component_rich_style("loss-chart--axis")
        plot_w = max(1, width - self.AXIS)
        layout = self._layout(plot_w)
        if layout is None:
            text = self.empty_text if y == height // 2 else ""
            return Strip([Segment(text.center(width)[:width], axis_style)])
        lo, hi, cols, ecols = layout
        # row y covers the value band [row_lo, row_hi]; y=0 is the top
        band = (hi - lo) / height
        row_lo = hi - (y + 1) * band
        label = fmt(hi) if y == 0 else fmt(lo) if y == height - 1 else ""
        segs = [Segment(label.rjust(self.AXIS - 1)[: self.AXIS - 1] + "│", axis_style)]
        bar = self.get_component_rich_style("loss-chart--bar")
        ev = self.get_component_rich_style("loss-chart--eval")
        chars = []
        for c, e in zip(cols, ecols):
            if e is not None and row_lo <= e <= row_lo + band + 1e-12:
                chars.append(("●", ev))
                continue
            if c is None:
                chars.append((" ", Style()))
                continue
            fill = (c - row_lo) / band if band else 0.0
            level = 8 if fill >= 1 else max(0, int(round(fill * 8)))
            if y == height - 1 and level == 0:
                level = 1   # every point shows at least a sliver
            chars.append((BLOCKS[level], bar))
        # merge runs of one style
        run, style = "", None
        for ch, st in chars:
            if st is not style and run:
                segs.append(Segment(run, style))
                run = ""
            style = st
            run += ch
        if run:
            segs.append(Segment(run, style))
        return Strip(segs).adjust_cell_length(width)
