"""The thin app: one handler for failed background tasks, colours from the theme only, screens
that ask the app (posted requests) instead of changing it."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
from rich.color import ANSI_COLOR_NAMES
from textual.widgets import Static

from tui.testing import write_run
from tui_helpers import demo_cfg, make_app, until  # noqa: F401
from tui_helpers import anyio_backend, isolated_settings  # noqa: F401 (fixtures)

TUI = Path(__file__).resolve().parents[2] / "tui"
STYLE_WORDS = {"bold", "dim", "italic", "reverse", "underline", "strike", "blink", "not", "on", "b", "i", "u"}


def _colour_style_strings(path: Path) -> list[str]:
    """String literals of ``path`` that are Rich styles naming a colour (``"bold red"``)."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type != tokenize.STRING:
            continue
        try:
            value = ast.literal_eval(tok.string)
        except (ValueError, SyntaxError):
            continue              # an f-string: its text is not a style
        words = value.split() if isinstance(value, str) else []
        if words and all(w in STYLE_WORDS or w in ANSI_COLOR_NAMES for w in words) \
                and any(w in ANSI_COLOR_NAMES for w in words):
            out.append(f"{path.relative_to(TUI.parent)}:{tok.start[0]}: {value!r}")
    return out


def test_no_colour_names_in_the_tui():
    """Every colour comes from the theme: Rich styles name roles ("bold $error"), CSS uses
    variables ($warning); a literal colour would ignore the light theme and the 16-colour one."""
    offenders = [o for p in sorted(TUI.rglob("*.py")) for o in _colour_style_strings(p)]
    names = "|".join(sorted(ANSI_COLOR_NAMES, key=len, reverse=True))
    for p in sorted(TUI.rglob("*.tcss")):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(rf":[^;{{]*\b({names})\b", line.split("/*")[0]):
                offenders.append(f"{p.name}:{i}: {line.strip()}")
    assert offenders == []


def test_screens_ask_the_app_and_never_change_it():
    """Screens, dialogs and widgets post requests (AttachRun, FormEdited...): none assigns to
    the app's attributes or reaches the run controller."""
    offenders = []
    for p in [*(TUI / "screens").glob("*.py"), *(TUI / "widgets").glob("*.py"), TUI / "dialogs.py"]:
        for node in ast.walk(ast.parse(p.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                if "self.app." in ast.unparse(t) or ast.unparse(t).startswith("app."):
                    offenders.append(f"{p.name}:{node.lineno}: {ast.unparse(t)}")
            if isinstance(node, ast.Attribute) and node.attr in ("controller", "follow_run") \
                    and "app" in ast.unparse(node.value):
                offenders.append(f"{p.name}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []



@pytest.mark.anyio
async def test_a_background_task_that_raises_is_one_literal_line(tmp_path):
    """on_worker_state_changed: a worker that raised is reported once, literally, and the app
    goes on; a follow worker that died also ends the following of its run."""
    run = write_run(tmp_path / "runs", finished=False, stop_at=7)
    app = make_app(demo_cfg(tmp_path), attach=run)

    def boom():
        raise OSError("disk [red]gone[/red]")

    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.run_state.follower_ended, what="history read")
        app.run_worker(boom, name="export", group="x", thread=True, exit_on_error=False)
        await until(pilot, lambda: any("disk [red]gone" in str(n.message) for n in app._notifications),
                    what="the notification")
        note = [n for n in app._notifications if "disk [red]gone" in str(n.message)][-1]
        assert str(note.message) == "export: OSError: disk [red]gone[/red]" and note.severity == "error"
        assert not note.markup
        app.run_worker(boom, name="follow", group="follow", thread=True, exit_on_error=False)
        await until(pilot, lambda: "stopped following" in app.run_state.message, what="follow ended")
        assert app.run_state.phase == "crashed" and not app.run_state.live
        await pilot.press("f5")                       # still answers keys
        await until(pilot, lambda: app.current_mode == "runs")


@pytest.mark.anyio
async def test_text_already_drawn_takes_the_new_theme_colours(tmp_path):
    """A Rich style names a theme role: the finished phase is the theme's success colour, in
    the dark theme and, after a switch made on another screen, in the light one."""
    run = write_run(tmp_path / "runs")
    app = make_app(demo_cfg(tmp_path), attach=run)

    def phase_colour() -> str:
        status = app.screen.query_one("#status", Static)
        content = status.visual
        start = str(content).index("● finished")
        spans = [s for s in content.spans if s.start <= start < s.end and s.style.foreground]
        return spans[-1].style.foreground.hex.upper()

    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.run_state.follower_ended, what="history read")
        await pilot.pause()
        assert phase_colour() == app.current_theme.success.upper()
        await pilot.press("f5")
        await until(pilot, lambda: app.current_mode == "runs")
        app.theme = "qlora-light"
        await pilot.pause()
        await pilot.press("f4")
        await until(pilot, lambda: app.current_mode == "train")
        await until(pilot, lambda: phase_colour() == "#047857", what="the light theme's success")
