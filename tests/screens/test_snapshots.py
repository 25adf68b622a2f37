"""SVG snapshots of each screen at 80×24 (deterministic: fixed readings, fixture runs, no clocks).

Update after an intended UI change: pytest tests/screens/test_snapshots.py --snapshot-update
"""
from __future__ import annotations

import re
import asyncio

import pytest

from engine.core import config
from tui.app import DEMO_OVERRIDES, QloraApp
from tui.testing import HOSTILE_HINT, fixed_samplers, write_run



@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)           # output.dir "runs" shows as a relative path


def make_app(gpus: int = 0, **kw) -> QloraApp:
    cfg = config.load(None, DEMO_OVERRIDES)
    return QloraApp(cfg, None, samplers=fixed_samplers(gpus), readings_interval=0, **kw)


async def until(pilot, cond, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if cond():
            await pilot.pause()
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


def test_train_ready(snap_compare):
    assert snap_compare(make_app(), terminal_size=(80, 24))


def test_train_finished_run(snap_compare, tmp_path):
    run = write_run(tmp_path / "runs", hints=[HOSTILE_HINT])
    app = make_app(gpus=2, attach=run)

    async def wait(pilot):
        await until(pilot, lambda: app.run_state is not None and app.run_state.follower_ended)
    assert snap_compare(app, terminal_size=(80, 24), run_before=wait)


def test_train_finished_run_light_theme(snap_compare, tmp_path):
    """The light theme: the progress bar's empty part and the header show."""
    run = write_run(tmp_path / "runs", stop_at=23)
    app = make_app(attach=run)

    async def wait(pilot):
        app.theme = "qlora-light"
        await until(pilot, lambda: app.run_state is not None and app.run_state.follower_ended)
    assert snap_compare(app, terminal_size=(80, 24), run_before=wait)


def test_config_screen(snap_compare):
    app = make_app()

    assert snap_compare(app, terminal_size=(80, 24), run_before=lambda pilot: _open_config(pilot, app))


def test_config_screen_invalid(snap_compare):
    app = make_app()

    async def wait(pilot):
        await _open_config(pilot, app)
        field = app.screen.query_one("#in-model-name")
        field.cursor_blink = False     # a blinking cursor made the picture depend on the moment
        field.focus()
        await pilot.press("ctrl+u")    # empty model name → a problem on that field
        await until(pilot, lambda: app.form_problems)
    assert snap_compare(app, terminal_size=(80, 24), run_before=wait)


def test_runs_screen(snap_compare, tmp_path):
    write_run(tmp_path / "runs", "20260101-120000-tiny")
    write_run(tmp_path / "runs", "20260102-090000-tiny", stop_at=23)
    write_run(tmp_path / "runs", "20260103-100000-tiny", finished=False, stop_at=7)
    app = make_app()

    async def wait(pilot):
        await pilot.press("f5")
        await until(pilot, lambda: app.screen.query_one("#runs").row_count == 3)
    assert snap_compare(app, terminal_size=(80, 24), run_before=wait)


def test_run_detail_screen(snap_compare, tmp_path):
    write_run(tmp_path / "runs", hints=[HOSTILE_HINT])
    app = make_app()

    async def wait(pilot):
        await pilot.press("f5")
        await until(pilot, lambda: app.screen.query_one("#runs").row_count == 1)
        await pilot.press("enter")
        await until(pilot, lambda: getattr(app.screen, "info", None) is not None)
    assert snap_compare(app, terminal_size=(80, 24), run_before=wait)


def test_dataset_screen(snap_compare):
    app = make_app()

    async def wait(pilot):
        await pilot.press("f2")
        await until(pilot, lambda: app.screen.report is not None and app.screen.report.done,
                    timeout=120)
    assert snap_compare(app, terminal_size=(80, 24), run_before=wait)


def test_dataset_screen_preference_pair(snap_compare, tmp_path):
    """A preference pair at 80x24: the prompt, then chosen | rejected with their masks."""
    import json
    u = {"role": "user", "content": "What colour is the sky?"}
    rows = [{"prompt": [u], "chosen": [{"role": "assistant", "content": f"Blue, on a clear day ({i})."}],
             "rejected": [{"role": "assistant", "content": f"Green [red]x[/red] ({i})."}]} for i in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.load(None, DEMO_OVERRIDES + ['data.train="pairs.jsonl"', 'train.method="dpo"'])
    app = QloraApp(cfg, None, samplers=fixed_samplers(0), readings_interval=0)

    async def wait(pilot):
        await pilot.press("f2")
        await until(pilot, lambda: app.screen.report is not None and app.screen.report.done, timeout=120)
        await pilot.press("n")
        await until(pilot, lambda: "chosen" in str(app.screen.query_one("#side-chosen").content), timeout=60)
    assert snap_compare(app, terminal_size=(80, 24), run_before=wait)


async def _open_config(pilot, app):
    """F3, then wait until the form and its derived line (trainable params) are drawn."""
    await pilot.press("f3")
    await until(pilot, lambda: getattr(app.screen, "form_ready", False))
    await until(pilot, lambda: re.search(r"trainable params [0-9]", str(app.screen.query_one("#derived").render())))
