"""Pilot tests: each screen driven with keys, real runs on builtin:tiny, hostile text shown literally."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from textual.widgets import Input, Sparkline, Static

from engine.core import config as config_mod
from engine.core import events
from engine.core import rundir
from engine.core.summary import State
from tui.app import DEMO_OVERRIDES, QloraApp
from tui.dialogs import QuitDialog
from tui.testing import HOSTILE_HINT, fixed_samplers, write_run
from tui_helpers import demo_cfg, make_app, until  # noqa: F401
from tui_helpers import anyio_backend, isolated_settings, plain  # noqa: F401 (fixtures)

HOSTILE = "[red]x[/red] [/ \x1b[31mRED\x1b[0m [bold]"

pytestmark = pytest.mark.anyio







# ---- Config -------------------------------------------------------------------------------

async def test_config_shows_validation_errors_live_and_blocks_start(tmp_path):
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f3")
        await until(pilot, lambda: getattr(app.screen, "form_ready", False), what="form")
        screen = app.screen
        # every field of every section is in the form, with the seed's help text
        for section, items in config_mod.field_specs().items():
            for key, f in items:
                if not f.metadata.get("form", True):        # TOML-only keys ([[data.sources]])
                    continue
                row = screen.query_one(f"#row-{section}-{key}")
                assert f.metadata["help"] in plain(row.help)
        lr = screen.query_one("#in-train-learning_rate", Input)
        lr.value = "abc"
        await until(pilot, lambda: app.form_problems, what="a problem")
        row = screen.query_one("#row-train-learning_rate")
        assert row.has_class("-invalid")
        assert "must be a number" in plain(row.help)
        r = screen.query_one("#in-lora-r", Input)
        r.value = "0"
        await until(pilot, lambda: screen.query_one("#row-lora-r").has_class("-invalid"))
        assert "out of range" in plain(screen.query_one("#row-lora-r").help)
        assert "2 problems" in plain(screen.query_one("#banner"))
        # derived values follow the form as you type
        screen.query_one("#in-train-grad_accum", Input).value = "8"
        await until(pilot, lambda: "4 × 8 = 32" in plain(screen.query_one("#derived")),
                    what="effective batch")
        # a bad form never starts a run
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert app.run_state is None and app.current_mode == "config"
        lr.value = "3e-4"
        r.value = "16"
        await until(pilot, lambda: not app.form_problems, what="valid form")
        assert not row.has_class("-invalid")
        assert app.config.train.learning_rate == 3e-4 and app.config.lora.r == 16
        assert "128/16" not in plain(screen.query_one("#derived"))
        assert "32/16 = 2.00" in plain(screen.query_one("#derived"))   # the demo: alpha 32


async def test_config_shows_the_planners_choice_for_a_memory_budget(tmp_path):
    """train.gpu_memory_gib set: the Config screen says what the fit planner picks and why."""
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f3")
        await until(pilot, lambda: getattr(app.screen, "form_ready", False), what="form")
        assert "planner at" not in plain(app.screen.query_one("#derived"))
        app.screen.query_one("#in-train-gpu_memory_gib", Input).value = "2"
        await until(pilot, lambda: "planner at 2 GiB: micro-batch" in plain(app.screen.query_one("#derived")),
                    what="the planner's line", timeout=60)
        assert "gradient checkpointing" in plain(app.screen.query_one("#derived"))


async def test_config_save_and_load_toml(tmp_path):
    path = tmp_path / "mine.toml"
    app = QloraApp(demo_cfg(tmp_path), path, samplers=fixed_samplers(), readings_interval=0)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f3")
        await until(pilot, lambda: getattr(app.screen, "form_ready", False))
        app.screen.query_one("#in-lora-r", Input).value = "8"
        await until(pilot, lambda: app.config.lora.r == 8)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: path.exists(), what="saved file")
        assert config_mod.load(path).lora.r == 8
        other = tmp_path / "other.toml"
        other.write_text('[lora]\nr = 64\nalpha = 128\n')
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen.focused, Input) and
                    app.screen.focused.id == "path")
        app.screen.focused.value = str(other)
        await pilot.press("enter")
        await until(pilot, lambda: app.config.lora.r == 64, what="loaded config")
        await until(pilot, lambda: getattr(app.screen, "form_ready", False))
        assert app.screen.query_one("#in-lora-r", Input).value == "64"


# ---- Train: a real run on builtin:tiny -------------------------------------------------------

async def test_train_real_run_shows_losses_and_leaves_adapter(tmp_path):
    cfg = demo_cfg(tmp_path, "train.max_steps=8", "train.logging_steps=1", "train.eval_steps=4",
                   "train.save_steps=4", "eval.max_new_tokens=6")
    app = make_app(cfg)
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.current_mode == "train"
        await pilot.press("ctrl+r")
        await until(pilot, lambda: app.run_state is not None and app.run_state.run_dir is not None,
                    what="run dir")
        await until(pilot, lambda: app.run_state.ended, timeout=300, what="end of run")
        st = app.run_state
        assert st.state == State.FINISHED and isinstance(st.end, events.RunFinished), st.message
        spark = app.screen.query_one("#loss-spark", Sparkline)
        assert len(spark.data) >= 3
        assert all(v > 0 for v in spark.data)
        adapter = st.run_dir / "adapter" / "adapter_model.safetensors"
        assert adapter.exists()
        assert "finished" in plain(app.screen.query_one("#status"))
        # eval generations: the prompts of two data rows answered greedily at each eval (steps 4
        # and 8), bounded by eval.max_new_tokens; the latest shown on the Train screen
        gens = [e for e in events.read_events(st.run_dir / "events.jsonl")
                if isinstance(e, events.Generations)]
        assert [g.step for g in gens] == [4, 8] and all(len(g.samples) == 2 for g in gens)
        assert gens[0].samples[0]["prompt"] == gens[1].samples[0]["prompt"]
        assert [g.step for g in gens] == [s for s, _ in st.generations]
        shown = plain(app.screen.query_one("#hints"))
        assert "answers at step 8 (greedy)" in shown and gens[1].samples[0]["prompt"][:20] in shown
        # the run detail: each answer at each eval
        await pilot.press("f5")
        await until(pilot, lambda: getattr(app.screen, "runs", None), what="the runs list")
        await pilot.press("enter")
        await until(pilot, lambda: getattr(app.screen, "detail_state", None) is not None, what="detail")
        detail = plain(app.screen.query_one("#detail-hints"))
        assert "answers over the run" in detail and "step     4:" in detail and "step     8:" in detail
        await pilot.press("escape")
        # quitting after the run ended does not ask
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert app.return_code == 0


async def test_detach_reattach_and_quit_offers_stop_detach_cancel(tmp_path):
    cfg = demo_cfg(tmp_path, "train.max_steps=5000", "train.logging_steps=1", "train.eval_steps=0",
                   "train.save_steps=0")
    app = make_app(cfg)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+r")
        await until(pilot, lambda: app.run_state is not None and len(app.run_state.losses) >= 1,
                    timeout=300, what="first loss")
        run_dir = app.run_state.run_dir
        await pilot.press("ctrl+d")                      # detach: the run keeps training
        await pilot.pause()
        assert app.run_state.detached and not app.run_state.live
        assert rundir.process_alive(run_dir)
        await pilot.press("f5")                          # Runs shows it live; re-attach with a
        await until(pilot, lambda: app.screen.query_one("#runs").row_count == 1)
        await until(pilot, lambda: app.screen.runs and app.screen.runs[0].state == "live")
        await pilot.press("a")
        await until(pilot, lambda: app.current_mode == "train" and app.run_state.live
                    and len(app.run_state.losses) >= 1, what="re-attached history")
        await pilot.press("ctrl+d")                      # again, from the run's own page:
        await pilot.press("f5")                          # enter opens it, a attaches and closes it
        await until(pilot, lambda: app.screen.runs and app.screen.runs[0].state == "live")
        await pilot.press("enter")
        await until(pilot, lambda: getattr(app.screen, "info", None) is not None, what="run page")
        await pilot.press("a")
        await until(pilot, lambda: app.current_mode == "train" and app.run_state.live
                    and len(app.run_state.losses) >= 1, what="attached from the run page")
        await pilot.press("f5")
        await until(pilot, lambda: app.current_mode == "runs")
        assert type(app.screen).__name__ == "RunsScreen"    # the run page was closed
        await pilot.press("f4")
        await pilot.press("ctrl+q")                      # live run: asks first
        await until(pilot, lambda: isinstance(app.screen, QuitDialog), what="quit dialog")
        await pilot.press("escape")                      # cancel keeps the app
        await until(pilot, lambda: not isinstance(app.screen, QuitDialog))
        assert app.is_running
        await pilot.press("ctrl+q")
        await until(pilot, lambda: isinstance(app.screen, QuitDialog))
        await pilot.press("s")                           # stop (graceful) and quit
        await pilot.pause()
    assert "Stop requested" in app.exit_note
    deadline = time.monotonic() + 120
    while rundir.info(run_dir).state == "live" and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    info = rundir.info(run_dir)
    assert info.state == "stopped"
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


async def test_events_are_batched_not_one_message_per_step(tmp_path):
    run = write_run(tmp_path / "runs", steps=500)
    app = make_app(demo_cfg(tmp_path), attach=run)
    batches = []
    async with app.run_test(size=(80, 24), message_hook=lambda m: batches.append(m)
                            if type(m).__name__ == "RunEvents" else None) as pilot:
        await until(pilot, lambda: app.run_state.follower_ended, what="history read")
        assert len(app.run_state.losses) == 500
        assert len(app.screen.query_one("#loss-spark", Sparkline).data) == 200
    # 500 steps of history arrive in a few batches, not 500 messages
    assert 1 <= len(batches) <= 20


async def test_a_stopped_followers_last_batch_is_not_applied(tmp_path):
    """Detach, then re-attach to the same run within the old follower's last interval: its
    late messages must neither add their events again nor end the new follower."""
    import threading
    from engine.core import events
    from tui.messages import RunEvents
    run = write_run(tmp_path / "runs", steps=30)
    app = make_app(demo_cfg(tmp_path), attach=run)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.run_state.follower_ended, what="history read")
        n = len(app.run_state.losses)
        step = events.Step(step=31, total_steps=30, loss=1.0, time=time.time())
        app.post_message(RunEvents(run, [step], threading.Event()))        # a stale follower's
        await pilot.pause()
        assert len(app.run_state.losses) == n
        app.post_message(RunEvents(run, [step], app.controller._follow_stop))         # the current one's
        await until(pilot, lambda: len(app.run_state.losses) == n + 1, what="current batch applied")


# ---- hostile text --------------------------------------------------------------------------

async def test_markup_and_ansi_in_hints_and_names_show_literally(tmp_path):
    run = write_run(tmp_path / "runs", name="run-[red]x[red]-[", hints=[HOSTILE_HINT])
    app = make_app(demo_cfg(tmp_path), attach=run)
    async with app.run_test(size=(100, 40)) as pilot:
        await until(pilot, lambda: app.run_state.follower_ended)
        hints = plain(app.screen.query_one("#hints"))
        assert "Loss plateaus [red]x[/red] [/ ␛[31mred␛[0m" in hints
        assert "[bold]" in hints and "lora.r [/]" in hints
        assert "\x1b" not in hints
        assert "run-[red]x[red]-[" in plain(app.screen.query_one("#status"))
        await pilot.press("f5")
        await until(pilot, lambda: app.screen.query_one("#runs").row_count == 1)
        await pilot.press("enter")
        await until(pilot, lambda: getattr(app.screen, "info", None) is not None)
        assert "run-[red]x[red]-[" in plain(app.screen.query_one("#detail-summary"))


async def test_markup_in_config_values_and_errors_shows_literally(tmp_path):
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f3")
        await until(pilot, lambda: getattr(app.screen, "form_ready", False))
        app.screen.query_one("#in-train-epochs", Input).value = HOSTILE
        await until(pilot, lambda: app.form_problems)
        help_ = plain(app.screen.query_one("#row-train-epochs").help)
        assert "[red]x[/red] [/ ␛[31mRED␛[0m [bold]" in help_


async def test_dataset_screen_shows_rows_problems_and_markup_literally(tmp_path):
    data = tmp_path / "hostile.jsonl"
    good = {"messages": [{"role": "user", "content": "Say " + HOSTILE},
                         {"role": "assistant", "content": "Literal: " + HOSTILE}]}
    lines = [json.dumps(good)] * 20 + ["{not json", json.dumps({"messages": []})]
    data.write_text("\n".join(lines) + "\n")
    app = make_app(demo_cfg(tmp_path, f'data.train="{data}"'))
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f2")
        await until(pilot, lambda: app.screen.report is not None and app.screen.report.done,
                    timeout=180, what="report")
        rep = app.screen.report
        summary = plain(app.screen.query_one("#ds-summary"))
        assert rep.format in summary and f"{rep.rows:,}" in summary
        table = app.screen.query_one("#problems")
        from tui.screens.dataset import listed_lines     # problems, then duplicates and PII by line
        assert table.row_count == len(listed_lines(rep)) > len(rep.problems) >= 1
        assert str(rep.problems[0].line) in str(table.get_row_at(0)[0])
        assert "max_length" in plain(app.screen.query_one("#hist"))
        await pilot.press("n")
        await until(pilot, lambda: "tokens" in plain(app.screen.query_one("#row-header")),
                    timeout=120, what="preview")
        view = plain(app.screen.query_one("#row-view"))
        assert "[red]x[/red] [/ ␛[31mRED␛[0m [bold]" in view


# ---- themes, keys, palette -----------------------------------------------------------------

async def test_theme_choice_is_remembered(tmp_path):
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test() as pilot:
        assert {"qlora-dark", "qlora-light"} <= set(app.available_themes)
        assert app.theme == "qlora-dark"
        app.theme = "qlora-light"
        await pilot.pause()
    settings = Path(tmp_path / "xdg" / "qlora-tui" / "settings.toml")
    assert 'theme = "qlora-light"' in settings.read_text()
    app2 = make_app(demo_cfg(tmp_path))
    async with app2.run_test() as pilot:
        assert app2.theme == "qlora-light"


async def test_every_key_is_in_the_footer_and_palette(tmp_path):
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(80, 24)) as pilot:
        keys = {b.key for b in app.BINDINGS}
        assert {"f2", "f3", "f4", "f5", "ctrl+r", "ctrl+x", "ctrl+d", "ctrl+s", "ctrl+q"} <= keys
        shown = {b.key for _, b, enabled, _ in app.screen.active_bindings.values()
                 if b.show}
        # the footer shows what applies now (80 columns): Stop/Detach only while a run is live,
        # Save on the Config screen; every action is in the palette (tests/screens/test_new_user_paths.py)
        assert {"f2", "f3", "f5", "ctrl+r", "ctrl+q"} <= shown
        assert not {"f4", "ctrl+x", "ctrl+d"} & shown
        titles = " ".join(c.title for c in app.get_system_commands(app.screen))
        for word in ("Dataset", "Config", "Train", "Runs", "Start training", "Stop training",
                     "Detach", "Save config", "Theme", "Quit"):
            assert word in titles
        for key, mode in (("f2", "dataset"), ("f3", "config"), ("f5", "runs"), ("f4", "train")):
            await pilot.press(key)
            await pilot.pause()
            assert app.current_mode == mode
