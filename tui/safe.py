"""Render untrusted text literally: dataset rows, paths and error messages.

Nothing in here parses markup: ``rich.text.Text`` takes the characters as they are, and
control characters (ANSI escapes above all) are replaced by visible symbols so a row that
contains ``\\x1b[31m`` or ``[red]x[/red]`` shows those characters and restyles nothing.
"""
from __future__ import annotations

from rich.text import Text

from engine.core.safe_text import visible   # one owner of which characters are shown how


def clean(value: object) -> str:
    """``str(value)`` with every control character made visible (tabs → spaces); the glyphs are
    ``engine.core.safe_text``'s, the same the command line prints."""
    return visible(value).replace("\t", "    ")


def literal(value: object, style: str = "") -> Text:
    """A Text that shows ``value`` exactly (markup is not interpreted)."""
    return Text(clean(value), style=style)


def one_line(value: object, limit: int = 200) -> str:
    s = clean(value).replace("\n", " ⏎ ")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def middle(value: object, limit: int) -> str:
    """One line of at most ``limit`` cells, shortened in the middle: a path keeps its end
    (``/home/…/runs/x/adapter``), which is the part that tells runs apart. A sentence (words,
    no path) is cut at its end instead (``loading builtin:tiny (4-bit…``)."""
    s = one_line(value, 10 ** 9)
    if len(s) <= limit:
        return s
    if limit <= 1:
        return "…"[:limit]
    words, sep, last = s.rpartition(" ")
    if sep and "/" in last and len(words) + 9 < limit:     # "adapter saved to …/x/adapter"
        return words + " " + middle(last, limit - len(words) - 1)
    if sep and "/" not in s:        # a sentence, not a path: cut at its end, never mid-word
        return one_line(s, limit)
    head = (limit - 1) // 3
    return s[:head] + "…" + s[len(s) - (limit - 1 - head):]
