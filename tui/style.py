"""Rich Text styles coloured by the current Textual theme: no colour names in ``tui/``.

A ``Text`` span is styled the way Textual CSS is written, e.g. ``style="bold $error"``; the app
installs ``rich_theme(...)`` on its console, where each such name is a style in the current
theme's colour, and installs it again when the theme changes. Only the names in ``STYLES`` exist:
``$success`` (good, done), ``$error`` (failed, over a limit), ``$warning`` (attention),
``$primary`` and ``$accent`` (information), each plain, bold, or bold and reversed.
"""
from __future__ import annotations

from rich.style import Style
from rich.theme import Theme

ROLES = ("success", "error", "warning", "primary", "accent")
VARIANTS = {"": Style(), "bold ": Style(bold=True), "bold reverse ": Style(bold=True, reverse=True)}
STYLES = tuple(f"{v}${r}" for r in ROLES for v in VARIANTS)


def rich_theme(variables: dict[str, str]) -> Theme:
    """Every name in ``STYLES``, in the colours of ``variables`` (``App.get_css_variables()``)."""
    styles = {}
    for role in ROLES:
        colour = _colour(variables.get(role, ""))
        for prefix, extra in VARIANTS.items():
            styles[f"{prefix}${role}"] = colour + extra
    return Theme(styles, inherit=True)


def _colour(value: str) -> Style:
    """A theme's colour as a Rich style: ``#34D399``, or ``ansi_red`` (the terminal's own red,
    as the ANSI themes name it); anything else leaves the text's colour as it is."""
    name = value.split()[0] if value else ""
    name = name[len("ansi_"):] if name.startswith("ansi_") else name
    try:
        return Style(color=name) if name else Style()
    except Exception:       # rich.errors.ColorParseError: not a colour Rich knows
        return Style()
