"""Compare runs on the Runs screen: mark 2-4 runs (space), v overlays their loss and
eval-loss curves and lists the config keys that differ, at 80x24."""
from __future__ import annotations

import pytest
from textual.widgets import DataTable

from engine.core import config
from tui.screens.compare import CompareRunsScreen, OverlayChart
from tui.testing import write_run
from tui_helpers import demo_cfg, footer_keys, make_app, settled, until
from tui_helpers import anyio_backend, isolated_settings  # noqa: F401 (fixtures)


def _run(runs, name: str, steps: int, *sets: str):
    d = write_run(runs, name, steps=steps)
    config.save(config.load(None, list(sets)), d / "config.toml")
    return d


async def _runs_screen(pilot, app, n: int):
    """F5, once the Runs screen lists ``n`` runs: (the screen, its run names in row order, the table)."""
    await pilot.press("f5")
    await until(pilot, lambda: len(getattr(app.screen, "runs", [])) == n, what="the runs")
    screen = app.screen
    return screen, [ri.name for ri in screen.runs], screen.query_one("#runs", DataTable)


@pytest.mark.anyio
async def test_mark_two_runs_and_compare_them(tmp_path):
    runs = tmp_path / "runs"
    a = _run(runs, "20260101-120000-r8", 60, "lora.r=8", "train.learning_rate=2e-4")
    b = _run(runs, "20260102-120000-r32", 40, "lora.r=32", "train.learning_rate=2e-4")
    _run(runs, "20260103-120000-other", 20)
    from engine.core.summary import config_differences
    assert config_differences([a, b]) == [("lora.r", [8, 32])]
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(80, 24)) as pilot:
        screen, names, table = await _runs_screen(pilot, app, 3)
        await pilot.press("v")                         # nothing marked: v is not offered
        assert not isinstance(app.screen, CompareRunsScreen)
        for name in (a.name, b.name):
            table.move_cursor(row=names.index(name))
            await pilot.press("space")
        assert screen.marked == [a, b]
        assert "v Compare runs" in (await settled(pilot, app)).splitlines()[-1]
        assert "● 20260101" in await settled(pilot, app)     # the marks show in the list
        await pilot.press("v")
        await until(pilot, lambda: isinstance(app.screen, CompareRunsScreen) and app.screen.differences,
                    what="the comparison")
        cmp = app.screen
        chart = cmp.query_one(OverlayChart)
        assert [len(losses) for losses, _ in chart.series] == [60, 40]
        assert [len(evals) for _, evals in chart.series] == [3, 2]
        rows, lo, hi = chart.grid(60, 10)
        drawn = {ch for row in rows for ch, _ in row}
        assert {"●", "▲", "○", "△"} <= drawn and lo < hi
        text = await settled(pilot, app)
        assert "lora.r" in text and " 8 " in text and " 32 " in text
        assert "learning_rate" not in text                   # equal in both: not listed
        assert all(item in text.splitlines()[-1] for item in footer_keys(app))
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is screen, what="back to the runs")


@pytest.mark.anyio
async def test_four_runs_compare_and_a_fifth_mark_is_refused_in_one_line(tmp_path):
    runs = tmp_path / "runs"
    made = [_run(runs, f"2026010{i}-120000-r{4 * i}", 10 + i, f"lora.r={4 * i}") for i in range(1, 6)]
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(80, 24)) as pilot:
        screen, names, table = await _runs_screen(pilot, app, 5)
        for d in made:
            table.move_cursor(row=names.index(d.name))
            await pilot.press("space")
        assert screen.marked == made[:4]
        note = [str(n.message) for n in app._notifications][-1]
        assert note == "At most 4 runs compare at once: unmark one first (space)."
        await pilot.press("v")
        await until(pilot, lambda: isinstance(app.screen, CompareRunsScreen) and app.screen.differences,
                    what="the comparison")
        chart = app.screen.query_one(OverlayChart)
        assert [len(losses) for losses, _ in chart.series] == [11, 12, 13, 14]
        assert app.screen.differences == [("lora.r", [4, 8, 12, 16])]
        bottom = (await settled(pilot, app)).splitlines()[-1]
        assert all(item in bottom for item in footer_keys(app))
