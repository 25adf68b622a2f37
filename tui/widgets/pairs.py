"""Label + value pairs that wrap as units: a header line such as ``rows 300   problems 0   duplicate
rows 14`` breaks between pairs, never between a label and its value (``duplicate rows`` at the end
of one line and ``14`` on the next). A pair too wide for any line wraps by itself where it is."""
from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.text import Text


def fit(label: str, value: str, value_style: str = "", label_style: str = "dim"):
    """A unit ``label value`` whose value (a path: untrusted text, shown literally) is shortened in
    the middle to the cells the layout gives it, so it keeps its end."""
    from tui.safe import literal, middle

    def at(width: int) -> Text:
        return pair(label, literal(middle(value, max(8, width - len(label) - (0 if label.endswith(" ") else 1))),
                                   value_style), label_style=label_style)
    return at


def pair(label: str, value: Text | str, value_style: str = "", label_style: str = "dim") -> Text:
    """One unit: ``label value`` (the value is Text already made safe, or a str of our own)."""
    t = Text(label, style=label_style)
    if label and not label.endswith(" "):
        t.append(" ")
    t.append_text(value) if isinstance(value, Text) else t.append(value, style=value_style)
    return t


class Pairs:
    """Lines of units (``rich.text.Text``). Each line is laid out at the width it is drawn at:
    units joined by ``sep`` while they fit, a unit that does not fit starts the next row (indented
    by ``indent``), one wider than a whole row wraps by words where it is. A unit may also be a
    function of the cells it may take (a path shortened in the middle to fit: ``fit``)."""

    def __init__(self, lines: list[list[Text]] | None = None, *, sep: str = "   ", indent: int = 0) -> None:
        self.lines: list[list[Text]] = [list(ln) for ln in (lines or [])]
        self.sep, self.indent = sep, indent

    def line(self, *units: Text) -> "Pairs":
        """A new line of ``units``."""
        self.lines.append([u for u in units if u is not None and (callable(u) or u.plain)])
        return self

    def add(self, *units: Text) -> "Pairs":
        """``units`` at the end of the last line."""
        if not self.lines:
            self.lines.append([])
        self.lines[-1].extend(u for u in units if u is not None and (callable(u) or u.plain))
        return self

    @staticmethod
    def _at(u, width: int) -> Text:
        return u(width) if callable(u) else u

    @property
    def plain(self) -> str:
        return "\n".join(self.sep.join(self._at(u, 10 ** 6).plain for u in ln) for ln in self.lines)

    def __str__(self) -> str:
        return self.plain

    def layout(self, width: int) -> Text:
        """The whole text for ``width`` cells: explicit line breaks between units that do not fit."""
        width = max(1, width)
        out = Text()
        for n, units in enumerate(self.lines):
            if n:
                out.append("\n")
            col = 0
            for i, u in enumerate(units):
                if callable(u):        # as wide as the rest of this row allows (a whole row if need be)
                    room = width - col - len(self.sep) if i else width
                    u = u(room) if self._at(u, room).cell_len <= room or not i else u(width - self.indent)
                w = u.cell_len
                if i and col + len(self.sep) + w <= width:
                    out.append(self.sep)
                    col += len(self.sep)
                elif i and self.indent + w <= width:
                    out.append("\n" + " " * self.indent)
                    col = self.indent
                elif i:                          # wider than any row: it wraps from here
                    out.append("  ")
                    col += 2
                out.append_text(u)
                col += w
                if col > width:                  # wrapped: where its last row ends
                    col = u.cell_len % width if width else 0
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.layout(options.max_width)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        widest = max((len(self.sep.join(self._at(u, 10 ** 6).plain for u in ln)) for ln in self.lines), default=0)
        return Measurement(min(1, widest), min(widest, options.max_width))
