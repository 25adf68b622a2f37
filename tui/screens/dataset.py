"""Dataset: what was detected and why, problems by line, token lengths vs max_length, rows.

``engine.dataset.inspect`` does all the work in a thread worker; partial reports arrive as messages
(≤10/s) so a large file fills the screen progressively while the UI stays responsive.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, ProgressBar, Static, TabbedContent, TabPane
from textual.worker import get_current_worker

from tui.safe import clean, literal, one_line
from tui.widgets.pairs import Pairs, fit, pair


# ---- what this screen's workers post to it -------------------------------------------
@dataclass
class RowForLine(Message):
    """The row browser index of a problem's line, or why that line has no row."""
    line: int
    index: int | None
    error: str = ""
    next_index: int = 0      # no row: the first row after the line (n/p go on there)
    raw: str = ""            # no row: the line's own text


@dataclass
class ReportReady(Message):
    """A (partial or complete) dataset report."""
    report: object
    final: bool


@dataclass
class ReportFailed(Message):
    error: str


@dataclass
class PreviewReady(Message):
    index: int
    preview: object
    error: str = ""


def histogram_text(report, width: int = 36) -> Text:
    from engine.dataset.inspect import bucket_label
    hist = list(report.histogram or [])
    t = Text()
    if not hist:
        t.append("no token lengths yet", style="dim")
        return t
    maxlen = report.max_length
    peak = max((c for _, _, c in hist), default=0) or 1
    marked = False
    for lo, hi, count in hist:
        if not marked and maxlen is not None and lo >= maxlen:
            t.append(f"{'':>13}┄┄ max_length {maxlen} ┄┄\n", style="bold $warning")
            marked = True
        over = maxlen is not None and hi > maxlen
        bar = "█" * max(1 if count else 0, int(round(count / peak * width)))
        a, b = bucket_label(lo, hi).split("–")
        t.append(f"{a:>6}–{b:<6}", style="dim")
        t.append("│")
        t.append(bar.ljust(width), style="$error" if over else "$primary")
        t.append(f" {count}\n")
    if not marked and maxlen is not None:
        t.append(f"{'':>13}(all rows fit max_length {maxlen})\n", style="dim")
    n = report.truncated_rows or 0
    rows = report.rows or 0
    if n:
        pct = f" ({n / rows:.0%})" if rows else ""
        t.append(f"{n} row(s){pct} are longer than max_length={maxlen} and would be truncated",
                 style="bold $error")
    else:
        t.append(f"no row is longer than max_length={maxlen}", style="$success")
    return t


def sides_text(report) -> Pairs:
    """Preference data (the Lengths tab, above the histogram): tokens per side, KTO's labels."""
    out = Pairs(indent=11)
    sides = getattr(report, "sides", None) or {}
    for name, s in sides.items():
        t = Text(f"{name:<11}", style="bold")
        t.append(f"min {s['min']:>6,}   median {s['median']:>6,.0f}   max {s['max']:>6,}  tokens")
        out.line(t)
    if sides:
        out.line(Text("(prompt: with its chat template; answers: their trained tokens; the histogram "
                      "below: each pair's longer side)" if "chosen" in sides else
                      "(prompt: with its chat template; completion: its trained tokens)", style="dim"))
    labels = getattr(report, "labels", None) or {}
    if labels:
        t = Text("labels     ", style="bold")
        t.append(f"{labels.get('desirable', 0):,} desirable", style="$success")
        t.append(", ")
        t.append(f"{labels.get('undesirable', 0):,} undesirable", style="$error")
        out.line(t)
    return out


def duplicate_rows(groups) -> int:
    """Rows that repeat an earlier one (each group's later copies): what the list shows."""
    if isinstance(groups, int):
        return groups
    return sum(max(0, len(list(g)) - 1) for g in groups or [])


def summary_text(report, cfg) -> Pairs:
    """The header: each label stays with its value when the line wraps (tui.widgets.pairs)."""
    out = Pairs(indent=9)
    srcs = getattr(report, "sources", None) or []
    if srcs:                      # a mixture ([[data.sources]]): each source's share and problems
        out.line(pair("sources  ", f"{len(srcs)}, {getattr(cfg.data, 'mix', 'concat')}", "bold"))
        for s in srcs:
            t = Text("  ")
            t.append_text(literal(s.get("name", "?")))
            t.append(f"  {clean(str(s.get('format', '?')))}, {s.get('train', 0):,} rows ", style="dim")
            t.append(f"{s.get('share', 0):.0%}", style="bold")
            t.append(f", {s.get('eval', 0):,} eval", style="dim")
            probs = s.get("problems", 0)
            t.append(f", {probs:,} problems", style="bold $error" if probs else "$success")
            if s.get("first_problem"):
                t.append(" (first: ", style="dim")
                t.append(one_line(clean(s["first_problem"]), 80), style="$error")
                t.append(")", style="dim")
            for n in s.get("notes") or []:
                t.append(f"; {one_line(clean(n), 60)}", style="$warning")
            out.line(t)
    else:
        out.line(fit("file     ", str(cfg.data.train or report.path)))   # as the user wrote it, its end kept
    out.line(pair("format   ", clean(report.format or "?"), "bold"))
    if report.format_reason:
        out.add(pair("because", literal(report.format_reason)))
    out.line(pair("rows     ", f"{report.rows:,}", "bold"))
    if not report.done:
        out.add(Text(f"(reading… {report.rows_read:,} so far)", style="$warning"))
    probs = getattr(report, "n_problems", None)
    probs = len(report.problems or []) if probs is None else probs
    out.add(pair("problems", f"{probs:,}", "bold $error" if probs else "bold $success"))
    dups = getattr(report, "duplicate_rows", 0) or duplicate_rows(report.duplicates)
    if dups:              # the rows the Problems tab lists: each later copy, not the groups
        out.add(pair("duplicate rows", str(dups), "bold $warning"))
    pii = getattr(report, "pii_total", 0) or len(report.pii or [])   # all of them, not the first listed
    if pii:
        out.add(pair("possible PII", f"{pii:,}", "bold $warning"))
    over = getattr(report, "over_max_length_total", 0)
    if over:
        what = "pairs" if report.format == "preference" else "rows"
        out.add(pair(f"{what} over max_length", f"{over:,}", "bold $error"))
    for w in (getattr(report, "warnings", None) or [])[:2]:
        out.line(Text("⚠ " + one_line(w, 150), style="$warning"))
    st = report.stats or {}
    if st:
        units = [pair(k, f"{st[k]:,.0f}") for k in ("min", "median", "p95", "max")
                 if isinstance(st.get(k), (int, float))]
        out.line(Text("tokens   ", style="dim") + units[0] if units else Text("tokens", style="dim"), *units[1:])
    if report.trained_tokens_total:
        out.add(pair("trained tokens", f"{report.trained_tokens_total:,}"))
    if report.steps_per_epoch:
        out.add(pair("steps/epoch", f"{report.steps_per_epoch:,}"))
    imgs = getattr(report, "images", None) or {}
    if imgs:
        out.line(pair("images   ", f"{imgs.get('count', 0):,}", "bold"),
                 Text(f"visual tokens {imgs.get('visual_tokens_total', 0):,} (in the token counts)", style="dim"))
        bad = imgs.get("bad_images", 0)
        out.add(pair("missing/unreadable", str(bad), "bold $error" if bad else "bold $success"))
    return out


def preview_text(preview, start: int = 0, end: int | None = None) -> Text:
    """Context dim, trained tokens highlighted; tool calls, tool results and weight-0 turns
    labelled «…» (results italic, weight-0 answers struck); what max_length cuts off is marked ✂.
    ``start``/``end``: only those characters of the rendered text (a preference row's prompt, or
    one side's answer)."""
    from engine.modalities.text import MARK_LABELS
    from engine.dataset.inspect import marked_segments
    t = Text()
    cut = getattr(preview, "cut_char", None)
    pos, before = 0, None
    for text, trained, kind, shown in _between(marked_segments(preview), start, end):
        if not shown:                      # outside start..end: counted, not drawn
            pos += len(text)
            continue
        if kind and kind != before:        # tool calls, tool results and weight-0 turns, labelled
            t.append(f"«{MARK_LABELS[kind]}»", style="bold $accent" if kind != "weight_0" else "bold $warning")
        before = kind
        style = "bold reverse $success" if trained else "dim"
        if kind == "tool_result":
            style = "italic $accent"
        elif kind == "weight_0":
            style = "dim strike"
        if cut is not None and pos <= cut < pos + len(text):
            head, tail = text[: cut - pos], text[cut - pos:]
            t.append(clean(head), style=style)
            t.append(" ✂ max_length ", style="bold reverse $error")
            t.append(clean(tail), style=style + " strike")
        elif cut is not None and pos >= cut:
            t.append(clean(text), style=style + " strike")
        else:
            t.append(clean(text), style=style)
        pos += len(text)
    return t


def _between(segments, start: int, end: int | None):
    """The segments as (text, trained, kind, shown): cut where characters ``start``..``end``
    begin and end, the pieces outside them not shown (positions keep counting from the start of
    the whole text, so the ✂ cut is found by its offset)."""
    pos = 0
    stop = end if end is not None else float("inf")
    for text, trained, kind in segments:
        cuts = sorted({0, len(text), *(c - pos for c in (start, stop) if pos < c < pos + len(text))})
        for x, y in zip(cuts, cuts[1:]):
            yield text[x:y], trained, kind, start <= pos + x < stop
        pos += len(text)


def side_title(name: str, pv) -> Text:
    t = Text(name, style="bold")
    t.append(f"  {pv.n_tokens} tokens, {pv.n_trained} trained", style="dim")
    if pv.truncated_at is not None:
        t.append("  ✂ over max_length", style="bold $error")
    return t


def image_text(i: int, info: dict) -> Text:
    """An image of an image row: path (literal), size, format, visual tokens; its picture is a
    Thumbnail below it (tui.images: Kitty, Sixel or half-blocks, as the terminal allows)."""
    t = Text()
    t.append(f"image {i + 1}  ", style="bold")
    t.append_text(literal(str(info.get("path", "?"))))
    t.append(f"\n  {info.get('width', '?')}x{info.get('height', '?')} {clean(str(info.get('format', '?')))}, "
             f"{info.get('bytes', 0):,} bytes, {info.get('tokens', '?')} visual tokens (not trained)",
             style="dim")
    return t


def image_widgets(preview) -> list:
    """Per image: its line, then its thumbnail, or the reason there is none."""
    from tui.widgets.thumbnail import Thumbnail
    out = []
    pics = getattr(preview, "pictures", None) or []
    for i, info in enumerate(getattr(preview, "images", None) or []):
        out.append(Static(image_text(i, info), classes="image-info"))
        pic = pics[i] if i < len(pics) else None
        if pic is not None and pic.error:
            out.append(Static(Text("  cannot show this image: ", style="bold $error") + literal(pic.error),
                              classes="image-problem"))
        elif pic is not None and pic.mode != "off":
            out.append(Thumbnail(pic))
    return out


class SourceLine(str):
    """A line of one source of a mixture (``[[data.sources]]``), shown as ``b.jsonl:17``: its
    row is not in the mix (it failed to load), so Enter shows the source file's line itself."""

    def __new__(cls, path: str, line: int):
        self = super().__new__(cls, f"{Path(path).name}:{line}")
        self.path, self.line = path, line
        return self


def listed_lines(report, limit: int = 5000) -> list[tuple[int, str, str]]:
    """(line, kind, message) of everything the report names by line, as the CLI lists them:
    problems, then each mixture source's problems (by ``SourceLine``), then exact and near
    duplicates (each later copy, naming the first), then possible PII (masked). Enter on any
    of them opens that line's row."""
    out = [(p.line, p.kind, p.message) for p in (report.problems or [])]
    for s in getattr(report, "sources", None) or []:
        out += [(SourceLine(str(s.get("path", "?")), p["line"]), p["kind"], f"[{s.get('name', '?')}] {p['message']}")
                for p in s.get("problem_lines") or []]
    for kind, groups in (("duplicate", report.duplicates), ("near-duplicate",
                                                           getattr(report, "near_duplicates", []))):
        for g in groups if isinstance(groups, list) else []:
            lines = list(g)
            out += [(ln, kind, f"same as line {lines[0]}") for ln in lines[1:]]
    for f in getattr(report, "pii", None) or []:
        out.append((f.line, "possible PII", f"{f.kind}: {f.masked}"))
    what = "pair" if "chosen" in (getattr(report, "sides", None) or {}) else "row"
    for line, n in getattr(report, "over_max_length", None) or []:      # preference data
        out.append((line, "over max_length", f"{n} tokens > max_length {report.max_length}: "
                    f"this {what}'s longer side is truncated"))
    return out[:limit]


class DatasetScreen(Screen):
    TABS = Binding.Group("Tab", compact=True)
    ROWS = Binding.Group("Row", compact=True)
    BINDINGS = [
        Binding("1", "tab('tab-lengths')", "Lengths tab", id="tab-lengths", group=TABS),
        Binding("2", "tab('tab-problems')", "Problems tab", id="tab-problems", group=TABS),
        Binding("3", "tab('tab-rows')", "Rows tab", id="tab-rows", group=TABS),
        Binding("n", "row(1)", "Next row", id="next-row", group=ROWS),
        Binding("p", "row(-1)", "Prev row", id="prev-row", group=ROWS),
        Binding("ctrl+l", "reload", "Reload", id="reload-dataset", show=False,  # palette: fits 80 cols
                tooltip="Read the dataset again"),
    ]

    def action_tab(self, pane: str) -> None:
        tabs = self.query_one("#ds-tabs", TabbedContent)
        tabs.active = pane
        widget = {"tab-problems": "#problems", "tab-rows": "#row-scroll"}.get(pane)
        if widget:
            self.query_one(widget).focus()

    def __init__(self) -> None:
        super().__init__()
        self.report = None
        self.row_index = 0
        self._jump_line: int | None = None    # a problem's line whose row is being looked up
        self._listed: list = []               # the Problems tab's (line, kind, message)
        self._key = None
        self._cancel: threading.Event | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="ds-summary")
        with Horizontal(id="ds-progress-row"):
            yield ProgressBar(total=1.0, show_eta=False, id="ds-progress")
        with TabbedContent(id="ds-tabs"):
            with TabPane("Lengths", id="tab-lengths"):
                with VerticalScroll():
                    yield Static(id="sides")
                    yield Static(id="hist")
            with TabPane("Problems", id="tab-problems"):
                yield DataTable(id="problems", cursor_type="row", zebra_stripes=True)
            with TabPane("Rows", id="tab-rows"):
                yield Static(id="row-header")
                with VerticalScroll(id="row-scroll"):
                    yield Static(id="row-view")
                    with Horizontal(id="row-sides"):       # a preference pair: chosen | rejected
                        yield Static(id="side-chosen", classes="side")
                        yield Static(id="side-rejected", classes="side")
                    yield Vertical(id="row-images")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "Dataset"
        table = self.query_one("#problems", DataTable)
        table.add_columns("line", "kind", "message")
        self._start_if_changed()

    def on_screen_resume(self) -> None:
        self._start_if_changed()

    def on_unmount(self) -> None:
        if self._cancel is not None:
            self._cancel.set()

    def _start_if_changed(self) -> None:
        cfg = self.app.config
        d = cfg.to_dict()
        key = (repr(d["data"]), repr(d["model"]))
        if key != self._key:
            self._key = key
            self.action_reload()

    def action_reload(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
        self._cancel = threading.Event()
        self.report = None
        self.query_one("#ds-progress-row").remove_class("-done")
        self.query_one("#ds-progress", ProgressBar).update(total=None, progress=0)
        self.query_one("#ds-summary", Static).update(
            Text("reading ") + literal(self.app.config.data.train) + Text("…"))
        self.query_one("#hist", Static).update("")
        self.query_one("#sides", Static).update("")
        self.query_one("#problems", DataTable).clear()
        self.query_one("#row-header", Static).update("")
        self.query_one("#row-view", Static).update("")
        self._show_sides(None)
        self._show_images([])
        self._inspect(self.app.config, self._cancel)

    @work(thread=True, exclusive=True, group="inspect", exit_on_error=False)
    def _inspect(self, cfg, cancel: threading.Event) -> None:
        worker = get_current_worker()
        from engine.dataset import inspect as inspect_mod
        last = [0.0]

        def on_partial(report) -> None:
            if worker.is_cancelled:
                cancel.set()
            now = time.monotonic()
            if now - last[0] >= 0.1:          # ≤10 partial redraws a second
                last[0] = now
                self.post_message(ReportReady(report, final=False))
        try:
            report = inspect_mod.inspect(cfg, on_partial=on_partial, cancel=cancel)
        except Exception as e:
            if not cancel.is_set():
                self.post_message(ReportFailed(f"{type(e).__name__}: {e}"))
            return
        if not cancel.is_set():
            self.post_message(ReportReady(report, final=True))

    @on(ReportFailed)
    def _on_failed(self, msg: ReportFailed) -> None:
        self.query_one("#ds-progress-row").add_class("-done")
        t = Text("Cannot read the dataset: ", style="bold $error")
        t.append_text(literal(msg.error))
        self.query_one("#ds-summary", Static).update(t)

    @on(ReportReady)
    def _on_report(self, msg: ReportReady) -> None:
        rep = msg.report
        if msg.final is False and self.report is not None and getattr(self.report, "done", False):
            return
        self.report = rep
        with self.app.batch_update():
            self.query_one("#ds-summary", Static).update(summary_text(rep, self.app.config))
            bar = self.query_one("#ds-progress", ProgressBar)
            frac = getattr(rep, "progress", None)
            if rep.done:
                self.query_one("#ds-progress-row").add_class("-done")
            elif isinstance(frac, (int, float)):
                bar.update(total=1.0, progress=frac)
            self.query_one("#hist", Static).update(histogram_text(rep))
            side_stats = sides_text(rep)
            self.query_one("#sides", Static).display = bool(side_stats.lines)
            self.query_one("#sides", Static).update(side_stats)
            table = self.query_one("#problems", DataTable)
            listed = listed_lines(rep)
            if table.row_count != len(listed):
                table.clear()
                for line, kind, message in listed:
                    table.add_row(Text(str(line)), literal(kind), Text(one_line(message, 300)))
            self._listed = listed
            if rep.done and msg.final:
                self._show_row(self.row_index)

    def action_row(self, delta: int) -> None:
        if self.report is None or not self.report.done:
            return
        self.query_one("#ds-tabs", TabbedContent).active = "tab-rows"
        # after a line with no row, row_index sits half-way between its neighbours
        target = self.row_index + delta * (0.5 if self.row_index != int(self.row_index) else 1)
        self._show_row(int(max(0, min((self.report.rows or 1) - 1, target))))

    # ---- problems → rows: enter on a problem opens its row (or says it has none) -----------
    @on(DataTable.RowSelected, "#problems")
    def _on_problem_selected(self, event: DataTable.RowSelected) -> None:
        rep = self.report
        probs = self._listed if rep is not None else []
        i = event.cursor_row
        if not (0 <= i < len(probs)):
            return
        if not rep.done:
            self.notify("Still reading the dataset: try again when the report is complete.",
                        markup=False)
            return
        line = probs[i][0]
        if isinstance(line, SourceLine):
            self._show_source_line(line, probs[i][2])
            return
        self._jump_line = line
        self.query_one("#ds-tabs", TabbedContent).active = "tab-rows"
        self.query_one("#row-header", Static).update(
            Text(f"line {line}   finding its row…", style="dim"))
        self.query_one("#row-view", Static).update("")
        self._show_sides(None)
        self._show_images([])
        self._row_for_line(self.app.config, line)

    def _show_source_line(self, where: SourceLine, message: str) -> None:
        """A mixture source's problem: the source file's line as it is (it has no row in the mix)."""
        from engine.dataset.inspect import raw_line
        self._jump_line = None
        self.query_one("#ds-tabs", TabbedContent).active = "tab-rows"
        h = Text()
        h.append_text(literal(str(where)))
        h.append("   a source's line: not in the mix   n/p: rows of the mix", style="dim")
        self.query_one("#row-header", Static).update(h)
        t = Text("This line of a source failed to load, so the mix leaves it out (training skips it).\n\n",
                 style="bold $error")
        t.append_text(literal(message))
        raw = raw_line(where.path, where.line)
        if raw:
            t.append(f"\n\n{where} as it is in the file:\n", style="dim")
            t.append_text(literal(raw))
        self.query_one("#row-view", Static).update(t)
        self._show_images([])

    @work(thread=True, exclusive=True, group="row-for-line", exit_on_error=False)
    def _row_for_line(self, cfg, line: int) -> None:
        try:
            from engine.dataset import inspect as inspect_mod
            index = inspect_mod.row_index_for_line(cfg, line)
        except inspect_mod.NoRowAtLine as e:           # the line is no usable row (it failed to parse)
            self.post_message(RowForLine(line, None, str(e), e.next_index, e.raw))
            return
        except ValueError as e:
            self.post_message(RowForLine(line, None, str(e)))
            return
        except Exception as e:
            self.post_message(RowForLine(line, None, f"{type(e).__name__}: {e}"))
            return
        self.post_message(RowForLine(line, index))

    @on(RowForLine)
    def _on_row_for_line(self, msg: RowForLine) -> None:
        if msg.line != self._jump_line:
            return
        if msg.index is not None and self.report is not None:
            self._show_row(msg.index)
            return
        h = Pairs([[Text(f"line {msg.line}", style="bold"), Text("no row", style="dim"),
                    Text("n/p: next/previous row", style="dim")]])
        self.query_one("#row-header", Static).update(h)
        self._show_sides(None)
        t = Text(f"Line {msg.line} has no row: it failed to parse as a training example, so "
                 "the row browser cannot show it (training skips it).\n\n", style="bold $error")
        t.append_text(literal(msg.error))
        if msg.raw:
            t.append(f"\n\nline {msg.line} as it is in the file:\n", style="dim")
            t.append_text(literal(msg.raw))
        self.query_one("#row-view", Static).update(t)
        self._show_images([])
        # n goes on with the first row after this line, p with the one before it
        self.row_index = msg.next_index - 0.5

    def _show_row(self, index: int) -> None:
        self._jump_line = None
        self.row_index = index
        self.query_one("#row-header", Static).update(
            Text(f"row {index + 1} of {self.report.rows:,}   rendering…", style="dim"))
        self._preview(self.app.config, index)

    @work(thread=True, exclusive=True, group="preview", exit_on_error=False)
    def _preview(self, cfg, index: int) -> None:
        try:
            from engine.dataset import inspect as inspect_mod
            pv = inspect_mod.preview(cfg, index)
            if getattr(pv, "images", None):
                from tui import images
                how = images.mode()
                pv.pictures = [images.picture(info.get("path", ""), how) for info in pv.images]
        except Exception as e:
            self.post_message(PreviewReady(index, None, f"{type(e).__name__}: {e}"))
            return
        self.post_message(PreviewReady(index, pv))

    @on(PreviewReady)
    def _on_preview(self, msg: PreviewReady) -> None:
        if msg.index != self.row_index or self._jump_line is not None:
            return
        header = self.query_one("#row-header", Static)
        view = self.query_one("#row-view", Static)
        rows = self.report.rows if self.report else 0
        if msg.preview is None:
            header.update(Text(f"row {msg.index + 1} of {rows:,}", style="bold"))
            view.update(Text("cannot render this row: ", style="bold $error") + literal(msg.error))
            self._show_sides(None)
            self._show_images([])
            return
        pv = msg.preview
        where = Text(f"row {msg.index + 1} of {rows:,}", style="bold")
        if getattr(pv, "line", None):
            where.append(f"  (line {pv.line})", style="dim")
        sides = getattr(pv, "sides", None) or {}
        label = getattr(pv, "label", None)
        if len(sides) > 1:         # a pair: each side's tokens below, in its column
            count = Text("prompt, chosen | rejected")
        else:
            count = Text(f"{pv.n_tokens} tokens, {pv.n_trained} trained")
        legend = Text("trained", style="bold reverse $success") + Text(" / ") + Text("context", style="dim")
        h = Pairs([[where] + ([pair("label", "desirable" if label else "undesirable",
                                    "bold $success" if label else "bold $error")] if label is not None else [])
                   + [count, legend, Text("n/p: next/previous", style="dim")]])
        header.update(h)
        if len(sides) > 1:
            view.update(preview_text(pv, 0, pv.prompt_chars))
            self._show_sides(sides, pv.prompt_chars)
        else:
            view.update(preview_text(pv))
            self._show_sides(None)
        self._show_images(image_widgets(pv))

    def _show_sides(self, sides: dict | None, start: int = 0) -> None:
        """A preference pair's answers side by side, each with its own mask (the prompt they
        share is in the row view above); hidden for any other row."""
        box = self.query_one("#row-sides", Horizontal)
        box.display = bool(sides)
        for name in ("chosen", "rejected"):
            pv = (sides or {}).get(name)
            self.query_one(f"#side-{name}", Static).update(
                side_title(name, pv) + Text("\n") + preview_text(pv, start) if pv is not None else "")

    def _show_images(self, widgets: list) -> None:
        box = self.query_one("#row-images", Vertical)
        box.remove_children()
        if widgets:
            box.mount_all(widgets)
