"""The first hour of a new user (issue 17): each rough edge found then, fixed as a class."""
from __future__ import annotations

import asyncio

import pytest
from textual.widgets import Input, Static

from engine import config as C
from tui_helpers import demo_cfg, make_app, until

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)


def plain(widget: Static) -> str:
    return str(widget.render())


# ---- 1: validation runs on the loaded values, never on a half-built form -------------------

async def _watch_form_while_building(app, pilot, screen) -> list[str]:
    """Every problem the app or the banner reports until the form is built."""
    seen = []
    for _ in range(2000):
        if app.form_problems:
            seen.append(str(app.form_problems[0]))
        if app.validated_config()[0] is None:
            seen.append("ctrl+r would be refused")
        banner = plain(screen.query_one("#banner"))
        if "problem" in banner:
            seen.append(banner)
        if screen.form_ready:
            await pilot.pause()
            break
        await asyncio.sleep(0)
    return seen


async def test_loading_a_config_never_shows_false_problems(tmp_path):
    other = tmp_path / "other.toml"
    other.write_text('[lora]\nr = 64\nalpha = 128\n[quant]\nload_in_4bit = true\n'
                     '[data]\nformat = "messages"\nmax_length = 512\n[train]\nlearning_rate = 1e-4\n')
    app = make_app(C.load(other))
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f3")
        screen = app.screen
        assert await _watch_form_while_building(app, pilot, screen) == []
        await screen._load(str(other))          # the ctrl+o path, after the prompt
        assert await _watch_form_while_building(app, pilot, screen) == []
        assert not app.form_problems and app.config.lora.r == 64
        assert "✔ valid" in plain(screen.query_one("#banner"))


# ---- 2, 3: help for every form and argument; one meaning of "no config given" ---------------

def test_tui_help_prints_help_and_every_argument_has_help(capsys):
    import argparse

    from engine import cli
    from tui import cli as tui_cli
    assert tui_cli.main(["tui", "--help"]) == 0          # help, not the app
    out = capsys.readouterr().out
    assert "qlora-tui [CONFIG.toml]" in out and "--set" in out
    assert tui_cli.main(["tui", "--no-such-option"]) == 2
    parser = cli.build_parser()
    usage = parser.format_usage()
    assert "qlora-tui [CONFIG.toml]" in usage and "qlora-tui attach" in usage
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in subs.choices.items():
        assert p.prog == f"qlora-tui {name}"
        for a in p._actions:
            if a.help is None and not isinstance(a, argparse._HelpAction):
                missing.append(f"{name} {a.dest}")
    assert missing == []


def test_no_config_means_the_demo_in_every_tui_entry(tmp_path, monkeypatch):
    from engine.builtin import demo_config
    from tui import cli as tui_cli
    from tui.app import QloraApp
    from tui.testing import write_run
    demo = demo_config().to_dict()
    assert demo["lora"]["r"] == 16 and demo["data"]["max_length"] == 256
    seen = []
    monkeypatch.setattr(tui_cli, "_run_app", lambda app: seen.append(app.config.to_dict()) or 0)
    run = write_run(tmp_path / "runs")
    (run / "config.toml").unlink(missing_ok=True)
    monkeypatch.setattr("engine.rundir.newest_live", lambda d: run)
    assert tui_cli.main([]) == 0                       # qlora-tui
    assert tui_cli.main(["tui"]) == 0                  # qlora-tui tui
    assert tui_cli.main(["attach"]) == 0               # the newest live run
    assert tui_cli.main(["attach", str(run)]) == 0     # a run without a readable config
    assert seen == [demo] * 4
    assert QloraApp().config.to_dict() == demo
