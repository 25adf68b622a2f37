"""Render untrusted text literally: dataset rows, paths and error messages.

Nothing in here parses markup: ``rich.text.Text`` takes the characters as they are, and
control characters (ANSI escapes above all) are replaced by visible symbols so a row that
contains ``\\x1b[31m`` or ``[red]x[/red]`` shows those characters and restyles nothing.
"""
from __future__ import annotations

from rich.text import Text

from engine.safe_text import visible   # one owner of which characters are shown how


def clean(value: object) -> str:
    """``str(value)`` with every control character made visible (tabs → spaces); the glyphs are
    ``engine.safe_text``'s, the same the command line prints."""
    return visible(value).replace("\t", "    ")


def literal(value: object, style: str = "") -> Text:
    """A Text that shows ``value`` exactly (markup is not interpreted)."""
    return Text(clean(value), style=style)


def one_line(value: object, limit: int = 200) -> str:
    s = clean(value).replace("\n", " ⏎ ")
    return s if len(s) <= limit else s[: limit - 1] + "…"
