"""Text that fits and views that follow, each a class: sentences cut at their end (paths in the middle), number
formats, the NaN hint's wording, no ETA while a run loads, sparklines not stretched, a run
detail that follows its run."""
from __future__ import annotations

import math

import pytest
from textual.widgets import Sparkline

from engine.core import config, events
from tui.safe import middle
from tui.testing import write_run
from tui_helpers import demo_cfg, make_app, plain, until
from tui_helpers import anyio_backend, isolated_settings  # noqa: F401 (fixtures)


def test_sentences_are_cut_at_their_end_and_paths_in_the_middle():
    s = middle("loading builtin:tiny (4-bit nf4) on cpu", 22)
    assert s == "loading builtin:tiny …" and len(s) == 22           # never "loading…-bit nf4"
    assert middle("non-finite loss at step 12 with learning rate 2", 12) == "non-finite …"
    p = middle("/home/someone/projects/very/long/runs/20261129-021336-tiny/adapter", 30)
    assert p.endswith("tiny/adapter") and "…" in p
    assert middle("adapter saved to /home/someone/projects/long/runs/x/adapter", 40).endswith("x/adapter")


def test_bounds_read_as_people_write_them():
    from tui.screens.config import allowed_text
    fields = dict(config.field_specs()["data"])
    assert allowed_text(fields["eval_fraction"]) == "allowed 0 to 0.5"          # not 0e+00 to 0.5
    train = dict(config.field_specs()["train"])
    assert allowed_text(train["warmup_ratio"]) == "allowed 0 to 0.5"
    assert allowed_text(train["learning_rate"]) == "allowed 1e-09 to 1"


def test_nan_hint_says_what_the_recovery_dialog_does():
    from engine.training.hints import HintEngine
    cfg = config.load(None, ["train.learning_rate=5e-2"])
    h = HintEngine(cfg).nan_hint(12, math.nan, math.inf, cfg)
    assert "from step 0 if none was saved" in h.fix and "resume from the last checkpoint" not in h.fix


def test_no_eta_while_a_resumed_run_loads():
    from tui.runstate import from_events
    from tui.widgets.run_view import StepProgress
    st = from_events([events.RunStarted(total_steps=10), events.Step(step=10, total_steps=10, loss=1.0,
                                                                     eta_seconds=0.0),
                      events.RunFinished(step=10), events.Resumed(from_step=10),
                      events.Status(phase="model", message="loading the model")], "runs/r")
    assert "ETA" not in StepProgress.view_of(st)[2]
    st.apply(events.Step(step=11, total_steps=20, loss=1.0, eta_seconds=75.0))
    assert StepProgress.view_of(st)[2].endswith("ETA 01:15")


@pytest.mark.anyio
async def test_sparklines_are_one_cell_per_point_and_the_detail_follows_its_run(tmp_path):
    runs = tmp_path / "runs"
    run = write_run(runs, "20260101-120000-tiny", steps=60, stop_at=3, finished=False)
    app = make_app(demo_cfg(tmp_path), attach=run)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.run_state is not None and app.run_state.step == 3, what="3 steps")
        await pilot.pause(0.2)
        spark = app.screen.query_one("#loss-spark", Sparkline)
        assert spark.region.width == 3                      # not 3 bars over 70 columns
        # the run detail re-reads its log: it does not stay stale when the run goes on or ends
        await pilot.press("f5")
        await until(pilot, lambda: getattr(app.screen, "runs", None), what="the runs")
        await pilot.press("enter")
        await until(pilot, lambda: getattr(app.screen, "info", None) is not None, what="the detail")
        assert app.screen.info.state == "crashed"
        w = events.JsonlWriter(run / "events.jsonl")
        w(events.RunFinished(step=3, adapter_dir=str(run / "adapter"), final_loss=2.5, stopped=True,
                             reason="stop requested"))
        w.close()
        await until(pilot, lambda: app.screen.info.state == "stopped", timeout=10, what="the re-read")
        assert "stopped" in plain(app.screen.query_one("#detail-summary"))
        assert app.screen.query_one("#detail-loss", Sparkline).region.width == 3


@pytest.mark.anyio
async def test_ctrl_x_during_start_up_is_not_lost(tmp_path, monkeypatch):
    """A stop asked while the run is still being created is sent once it exists."""
    import threading
    from engine.training import runner
    from tui_helpers import demo_cfg as cfg_of
    real, gate = runner.start_detached, threading.Event()

    def slow_start(*a, **kw):          # a loaded machine: creating the run takes a while
        gate.wait(30)
        return real(*a, **kw)
    monkeypatch.setattr(runner, "start_detached", slow_start)
    app = make_app(cfg_of(tmp_path, "train.max_steps=400", "train.eval_steps=0", "train.save_steps=0"))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+r")
        assert app.controller.launching                 # the run's process is not there yet
        await pilot.press("ctrl+x")
        assert app.run_state.stop_requested
        gate.set()
        await until(pilot, lambda: app.run_state is not None and app.run_state.ended, timeout=240,
                    what="the run to end")
        st = app.run_state
        assert isinstance(st.end, events.RunFinished) and st.end.stopped and st.step < 400


def test_dataset_header_counts_the_duplicate_rows_the_list_shows(tmp_path):
    """The header and the Problems list count the same thing: the later copies."""
    import json
    from engine.dataset.inspect import inspect
    from tui.screens.dataset import listed_lines, summary_text
    rows = [{"messages": [{"role": "user", "content": f"q{i % 3}"},
                          {"role": "assistant", "content": f"a{i % 3}"}]} for i in range(7)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.load(None, [f'data.train="{data}"'])
    report = inspect(config.load(None, [f'data.train="{data}"', "data.max_length=64"]))
    listed = [ln for ln in listed_lines(report) if ln[1] == "duplicate"]
    assert len(listed) == 4                                # 7 rows, 3 distinct
    assert "duplicate rows 4" in summary_text(report, cfg).plain


@pytest.mark.anyio
async def test_dataset_header_keeps_each_label_with_its_value(tmp_path):
    """Labels wrap with their values (tui.widgets.pairs), at any width and on the 80x24 screen:
    never `duplicate rows` at the end of one line and its count on the next."""
    import json
    import re
    from tui.screens.dataset import summary_text
    from tui_helpers import screen_text
    rows = [{"messages": [{"role": "user", "content": f"q{i % 3} mail me at someone{i % 3}@example.com"},
                          {"role": "assistant", "content": f"a{i % 3}"}]} for i in range(9)]
    folder = tmp_path / ("a-long-folder-name-for-the-dataset-header-" * 2)
    folder.mkdir()
    data = folder / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    app = make_app(demo_cfg(tmp_path, f'data.train="{data}"'))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f2")
        await until(pilot, lambda: app.screen.report is not None and app.screen.report.done,
                    timeout=120, what="report")
        await pilot.pause(0.3)
        report = app.screen.report
        shown = screen_text(app)
        for label in ("rows", "problems", "duplicate rows", "possible PII", "median", "max", "trained tokens",
                      "steps/epoch"):
            assert re.search(rf"(^|\s){re.escape(label)} +[0-9]", shown, re.M), f"{label!r} apart:\n{shown}"
        assert report.pii and report.problems and report.duplicates
        assert "/d.jsonl" in shown and str(data) not in shown        # the path shortened, its end kept
    header = summary_text(report, app.config)
    for width in range(30, 121, 6):
        lines = header.layout(width).plain.splitlines()
        assert any(ln.endswith("/d.jsonl") for ln in lines), (width, lines)     # the path fits, its end kept
        for units in header.lines:
            for u in units:
                if not callable(u) and u.cell_len <= width - header.indent:
                    assert any(u.plain in ln for ln in lines), (width, u.plain, lines)


@pytest.mark.anyio
async def test_config_banner_keeps_the_path_end_and_the_problem_whole_or_cut_at_its_end(tmp_path):
    """80x24: the config file's path is shortened in the middle (never wrapped mid-path), and the
    first problem fits the banner's rows whole or cut at its end with …, never cut by the banner."""
    from engine.core.config import Problem
    from tui.app import QloraApp
    from tui.testing import fixed_samplers
    from tui_helpers import settled
    folder = tmp_path / ("a-rather-long-folder-name-so-that-the-config-path-is-long-" * 2)
    folder.mkdir()
    path = folder / "qlora.toml"
    config.save(demo_cfg(tmp_path), path)
    app = QloraApp(config.load(path), path, samplers=fixed_samplers(), readings_interval=0)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f3")
        await until(pilot, lambda: getattr(app.screen, "form_ready", False), what="the form")
        lines = (await settled(pilot, app)).splitlines()
        assert lines[1].rstrip().endswith("/qlora.toml   ✔ valid") and "…" in lines[1], lines[1]
        screen = app.screen
        for message in ("allowed: auto, bf16", "allowed: " + ", ".join(f"choice-number-{i}" for i in range(40))):
            screen.problems = [Problem("train.optimizer", "x", message), Problem("lora.r", 0, "too small")]
            screen._show_banner()
            await pilot.pause(0.2)
            lines = (await settled(pilot, app)).splitlines()
            assert lines[1].rstrip().endswith("/qlora.toml   ✖ 2 problems:"), lines[1]
            shown = " ".join(ln.strip() for ln in lines[2:4])
            if len(message) < 60:
                assert shown.startswith(f"train.optimizer: {message}") and lines[3].strip() == "", lines[:5]
            else:                                  # two rows, cut at the end of the sentence
                assert shown.startswith("train.optimizer: allowed: choice-number-0,") and shown.endswith("…"), shown
                assert "choice-number" not in lines[4], lines[:6]
