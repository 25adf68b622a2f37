"""Pilot test of the Runs screen's Export action: type, progress and the final commands."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from textual.widgets import ProgressBar, Select, Static, TextArea

from tui.screens.export import ExportScreen
from tui_helpers import demo_cfg, make_app, until
from tui_helpers import anyio_backend, isolated_settings  # noqa: F401 (fixtures)

sys.path.insert(0, str(Path(__file__).parent))

pytestmark = pytest.mark.anyio


async def open_export_dialog(pilot, app) -> None:
    """Runs screen (F5), then `e` on the selected run: the Export dialog."""
    await pilot.press("f5")
    await until(pilot, lambda: getattr(app.screen, "runs", None), what="the runs list")
    await pilot.press("e")
    await until(pilot, lambda: isinstance(app.screen, ExportScreen), what="the export dialog")


async def test_export_from_runs_screen_with_keys(tmp_path):
    from engine.training.builtin import tiny_model_dir
    from outputs_fixtures import make_run_dir
    run = make_run_dir(tmp_path / "runs" / "20260101-000000-tiny", tiny_model_dir(), r=4)
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(100, 30)) as pilot:
        await open_export_dialog(pilot, app)
        screen = app.screen
        select = screen.query_one("#export-type", Select)
        assert select.value == "f16"
        select.focus()
        # the LoRA adapter GGUF: the quickest export (the merged-model path is in test_export.py)
        await pilot.press("enter", *["down"] * 7, "enter")
        await until(pilot, lambda: select.value == "adapter", what="the adapter choice")
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


async def test_run_detail_shows_the_newest_eval(tmp_path):
    """The run detail reads RUN_DIR/eval (written by ``qlora-tui eval``) and shows base -> fine-tuned
    loss and perplexity, and the answer scores."""
    from engine.outputs import evaluate
    from outputs_fixtures import make_run_dir, make_tiny_model
    from tui.screens.runs import RunDetailScreen
    base = make_tiny_model(tmp_path / "base")
    run = make_run_dir(tmp_path / "runs" / "20260101-000000-tiny", base)
    rep = evaluate.evaluate(run, answer_rows=2, max_new_tokens=4)
    assert rep.answered == 2 and evaluate.latest(run)["tuned"]["loss"] == rep.tuned.loss
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(140, 30)) as pilot:
        app.push_screen(RunDetailScreen(run))
        await until(pilot, lambda: isinstance(app.screen, RunDetailScreen) and app.screen.info is not None,
                    what="detail")
        text = str(app.screen.query_one("#detail-summary", Static).render())
        assert f"loss {rep.base.loss:.4f} -> {rep.tuned.loss:.4f}" in text
        assert f"perplexity {rep.base.perplexity:.3f} -> {rep.tuned.perplexity:.3f}" in text
        assert f"exact match {rep.base.exact}/2 -> {rep.tuned.exact}/2" in text
