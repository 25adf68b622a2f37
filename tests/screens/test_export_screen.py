"""Pilot test of the Runs screen's Export action: type, progress and the final commands."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from textual.widgets import OptionList, ProgressBar, Select, Static, TextArea

from tui.screens.export import ExportScreen
from tui_helpers import demo_cfg, make_app, until
from tui_helpers import anyio_backend, isolated_settings  # noqa: F401 (fixtures)

sys.path.insert(0, str(Path(__file__).parents[1]))

pytestmark = pytest.mark.anyio


async def open_export_dialog(pilot, app) -> None:
    """Runs screen (F5), then `e` on the selected run: the Export dialog."""
    await pilot.press("f5")
    await until(pilot, lambda: getattr(app.screen, "runs", None), what="the runs list")
    await pilot.press("e")
    await until(pilot, lambda: isinstance(app.screen, ExportScreen), what="the export dialog")


def shown_labels(select: Select) -> list[str]:
    """The labels a Select's drop-down lists (its OptionList), in order."""
    options = select.query_one(OptionList)
    return [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]


async def test_export_from_runs_screen_with_keys(tmp_path):
    from engine.models.builtin import tiny_model_dir
    from outputs_fixtures import make_run_dir
    run = make_run_dir(tmp_path / "runs" / "20260101-000000-tiny", tiny_model_dir(), r=4)
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(100, 30)) as pilot:
        await open_export_dialog(pilot, app)
        screen = app.screen
        target = screen.query_one("#export-target", Select)
        kind = screen.query_one("#export-type", Select)
        assert target.value == "gguf" and kind.value == "f16"
        # the targets and the GGUF types come from the registry (engine/outputs/targets/)
        from engine.outputs import gguf_write, targets
        assert shown_labels(target) == [t.label for t in targets.all_targets()]
        assert [label.split()[0] for label in shown_labels(kind)] == list(gguf_write.GGUF_TYPES)
        target.focus()
        # the LoRA adapter GGUF: the quickest export (the merged-model path is in test_export.py)
        steps = targets.names().index("gguf-adapter")
        await pilot.press("enter", *["down"] * steps, "enter")
        await until(pilot, lambda: target.value == "gguf-adapter" and kind.value == "f16",
                    what="the adapter target")
        assert "q4_k_m" not in [label.split()[0] for label in shown_labels(kind)]   # k-quants: whole models
        await pilot.press("ctrl+e")
        await until(pilot, lambda: not screen.running and (screen.report or screen.error), timeout=240,
                    what="the export to finish")
        assert screen.report is not None, screen.error
        assert screen.query_one("#export-progress", ProgressBar).progress == 100
        shown = str(screen.query_one("#export-result", Static).render())
        assert "written" in shown and "verified" not in shown     # an adapter GGUF: no logit check
        # the commands whole, one a line, never wrapped mid-token: copyable
        commands = screen.query_one("#export-commands", TextArea)
        assert commands.display and commands.text.splitlines() == screen.report["commands"]
        assert any("ollama create" in c for c in screen.report["commands"])
        assert any("llama-cli -m BASE.gguf --lora" in c for c in screen.report["commands"])
        path = Path(screen.report["path"])
        assert path.is_file() and path.name.endswith("-lora-f16.gguf") and path.parent == run / "export"
        assert screen.report["kind"] == "adapter" and screen.report["tensors"] == 2 * 2 * 7
        # the progress came from the export's typed events, read from its log: what the screen
        # showed is what the child wrote there (stage and fraction), ending at "done"
        from engine.core import events
        log = events.read_events(screen.log_path)
        assert screen.log_path.parent == run / "export" / "logs"
        assert isinstance(log[0], events.ExportStarted) and log[0].target == "gguf-adapter"
        assert isinstance(log[-1], events.ExportFinished) and log[-1].report["path"] == str(path)
        written = [(str(e.stage), e.done) for e in log if isinstance(e, events.ExportProgress)]
        assert {"check", "write", "done"} <= {st for st, _ in written}
        assert screen.shown and set(screen.shown) <= set(written) and screen.shown[-1] == ("done", 1.0)
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, ExportScreen), what="the dialog closed")


async def test_train_screen_says_where_tracker_logs_go(tmp_path):
    from tui.runstate import RunState
    app = make_app(demo_cfg(tmp_path, 'output.report_to="tensorboard"'))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f4")
        await pilot.pause()
        welcome = str(app.screen.query_one("#welcome", Static).render())
        assert "logs   tensorboard: RUN_DIR/tensorboard" in welcome
        st = RunState(run_dir=tmp_path / "runs" / "r1", phase="training",
                      plan=["tensorboard logs: /x/runs/r1/tensorboard"])
        app.screen.render_run(st)
        await pilot.pause()
        metrics = str(app.screen.query_one("#metrics", Static).render())
        assert "logs      tensorboard" in metrics and "/x/runs/r1/tensorboard" in metrics


async def test_export_refusal_shows_one_line(tmp_path):
    """A tokenizer GGUF cannot express (word-level): refused before any merge, shown literally."""
    from outputs_fixtures import make_run_dir, make_tiny_model
    base = make_tiny_model(tmp_path / "base")
    run = make_run_dir(tmp_path / "runs" / "20260101-000000-words", base, r=4)
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(100, 30)) as pilot:
        await open_export_dialog(pilot, app)
        screen = app.screen
        await pilot.press("ctrl+e")
        await until(pilot, lambda: not screen.running and (screen.report or screen.error), timeout=240,
                    what="the export to end")
        assert screen.report is None
        assert screen.error.startswith("export failed:") and "WordLevel tokenizer cannot be written" in screen.error
        assert "\n" not in screen.error and not (run / "export" / "merged").exists()


async def test_eval_action_on_the_run_detail_shows_its_table_and_plot_at_80x24(tmp_path):
    """`l` on the run detail (80x24): the Evaluate dialog runs ``qlora-tui eval`` in a child that
    reports typed events, saves the report in RUN_DIR/eval/, and back on the detail its table
    (the saved numbers) and the per-row loss plot (one bar per row, base and tuned) are shown."""
    import json
    from engine.outputs import evaluate
    from outputs_fixtures import EVAL_ROWS, make_run_dir, make_tiny_model
    from textual.containers import VerticalScroll
    from textual.widgets import Input
    from tui.screens.actions import EvalDialog
    from tui.screens.runs import RunDetailScreen
    from tui.widgets.eval_view import BLOCKS
    from tui_helpers import screen_text
    base = make_tiny_model(tmp_path / "base")
    run = make_run_dir(tmp_path / "runs" / "20260101-000000-tiny", base)
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(80, 24)) as pilot:
        app.push_screen(RunDetailScreen(run))
        await until(pilot, lambda: isinstance(app.screen, RunDetailScreen) and app.screen.info is not None,
                    what="detail")
        detail = app.screen
        assert not detail.query_one("#detail-eval-box", VerticalScroll).display    # no eval yet
        assert "l eval" in str(detail.query_one("#detail-summary", Static).render())
        assert any(c.title == "Evaluate base vs fine-tuned (l)" for c in app.get_system_commands(detail))
        await pilot.press("l")
        await until(pilot, lambda: isinstance(app.screen, EvalDialog), what="the eval dialog")
        dialog = app.screen
        dialog.query_one("#eval-answers", Input).value = "x"          # restricted to digits
        dialog.query_one("#eval-answers", Input).value = "2"
        await pilot.press("ctrl+e")
        await until(pilot, lambda: not dialog.running and (dialog.report or dialog.error), timeout=240,
                    what="the eval job")
        assert not dialog.error and dialog.progress_seen[-1] == 1.0
        saved = list((run / "eval").glob("eval-*.json"))
        assert len(saved) == 1
        report = json.loads(saved[0].read_text())
        assert report["answered"] == 2 and len(report["per_row"]) == report["rows"] == len(EVAL_ROWS)
        assert "exact match" in str(dialog.query_one(".action-result", Static).render())
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is detail and
                    detail.query_one("#detail-eval-box", VerticalScroll).display, what="the eval panel")
        text = str(detail.query_one("#detail-evalrep", Static).render())
        for name, b, t in evaluate.table_rows(report):
            assert any(ln.split() == name.split() + b.split() + t.split() for ln in text.splitlines()), name
        bars = {ln.split()[0]: ln.split()[1] for ln in text.splitlines() if ln.startswith(("base ", "tuned "))}
        assert len(bars["base"]) == len(bars["tuned"]) == len(EVAL_ROWS) and set(bars["base"] + bars["tuned"]) <= set(BLOCKS)
        # one scale: a row whose loss fell shows a lower bar for the tuned model
        for (lb, lt), cb, ct in zip(report["per_row"], bars["base"], bars["tuned"]):
            assert BLOCKS.index(ct) <= BLOCKS.index(cb) if lt <= lb else BLOCKS.index(ct) >= BLOCKS.index(cb)
        shown = screen_text(app)
        assert "did it help?" in shown and "tuned" in shown and "loss per token" in shown


def test_eval_view_of_an_older_or_broken_report():
    """A report saved before per-row losses: the table, no plot; a malformed one: nothing shown.
    Many rows: the plot averages them into the panel's width, both lines on one scale."""
    from tui.widgets.eval_view import BLOCKS, columns, eval_view
    old = {"data": "x.jsonl", "rows": 3, "answered": 0, "base": {"loss": 2.0, "perplexity": 7.389},
           "tuned": {"loss": 1.0, "perplexity": 2.718}}
    text = eval_view(old, 40).plain
    assert "loss per token" in text and "2.0000" in text and "1.0000" in text and "loss per row" not in text
    assert eval_view({"base": "?"}, 40) is None and eval_view({"base": {}, "tuned": {}}, 40) is None
    pairs = [(float(i), float(i) / 2) for i in range(100)]
    cols = columns(pairs, 10)
    assert len(cols) == 10 and cols[0] == (4.5, 2.25)
    plot = eval_view(old | {"per_row": pairs}, 16).plain.splitlines()
    base = next(ln for ln in plot if ln.startswith("base ")).split()[1]
    tuned = next(ln for ln in plot if ln.startswith("tuned ")).split()[1]
    assert len(base) == len(tuned) == 10 and base[-1] == BLOCKS[-1] and tuned[0] == BLOCKS[0]
    assert all(BLOCKS.index(t) <= BLOCKS.index(b) for b, t in zip(base, tuned))
