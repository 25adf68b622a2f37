"""The Train screen and the run detail draw a preference method's own curves and metrics."""
from __future__ import annotations

import pytest
from textual.widgets import Sparkline

from tui.testing import write_run
from tui_helpers import demo_cfg, make_app, plain, until  # noqa: F401
from tui_helpers import anyio_backend, isolated_settings  # noqa: F401 (fixtures)

pytestmark = pytest.mark.anyio


async def test_train_screen_and_run_detail_show_the_preference_curves(tmp_path):
    run = write_run(tmp_path / "runs", steps=40, method="dpo")
    app = make_app(demo_cfg(tmp_path), attach=run)
    async with app.run_test(size=(100, 50)) as pilot:
        await until(pilot, lambda: app.run_state.follower_ended, what="history read")
        s = app.screen
        for name in ("accuracy", "margin", "chosen", "rejected"):
            assert s.query_one(f"#pref-{name}-row").display, name
            assert len(s.query_one(f"#pref-{name}-spark", Sparkline).data) == 40
        assert not s.query_one("#pref-kl-row").display          # DPO logs no KL
        m = plain(s.query_one("#metrics"))
        assert "method    dpo" in m and "accuracy  1.00 (eval 0.88)" in m and "margin    2.800" in m, m
        await pilot.press("f5")
        await until(pilot, lambda: app.screen.query_one("#runs").row_count == 1)
        await pilot.press("enter")
        await until(pilot, lambda: getattr(app.screen, "info", None) is not None)
        assert "accuracy 1.00 (eval 0.88)" in plain(app.screen.query_one("#detail-summary"))
        assert app.screen.query_one("#detail-pref-margin-row").display
        assert len(app.screen.query_one("#detail-pref-margin", Sparkline).data) == 40


async def test_an_sft_run_shows_no_preference_rows(tmp_path):
    run = write_run(tmp_path / "runs", steps=20)
    app = make_app(demo_cfg(tmp_path), attach=run)
    async with app.run_test(size=(100, 50)) as pilot:
        await until(pilot, lambda: app.run_state.follower_ended, what="history read")
        assert not any(app.screen.query_one(f"#pref-{n}-row").display for n in ("accuracy", "margin", "kl"))
        assert "method" not in plain(app.screen.query_one("#metrics"))


async def test_preference_tune_this_run_from_the_runs_screen(tmp_path):
    from engine.core import config as config_mod
    sft = write_run(tmp_path / "runs", "20260101-120000-tiny", steps=5)
    config_mod.save(config_mod.load(None, ['model.name="builtin:tiny"', "quant.double_quant=false"]),
                    sft / "config.toml")
    (sft / "adapter").mkdir()
    (sft / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "x", "r": 8}')
    bare = write_run(tmp_path / "runs", "20260102-120000-tiny", steps=5)      # no adapter: refused
    config_mod.save(config_mod.load(None), bare / "config.toml")
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f5")
        await until(pilot, lambda: app.screen.query_one("#runs").row_count == 2)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Preference-tune this run (t)" in titles
        table = app.screen.query_one("#runs")
        row = next(i for i in range(2) if "20260102" in str(table.get_row_at(i)[0]))
        table.move_cursor(row=row)
        await pilot.press("t")
        await until(pilot, lambda: any("no adapter there" in str(n.message) for n in app._notifications))
        assert app.config.train.method == "qlora"
        table.move_cursor(row=1 - row)
        await pilot.press("t")
        await until(pilot, lambda: app.current_mode == "config", what="config screen")
        cfg = app.config
        assert cfg.train.method == "dpo" and cfg.model.adapter == str(sft.resolve())
        assert cfg.quant.double_quant is False          # the run's own base settings


async def test_dataset_screen_reads_a_preference_file(tmp_path):
    import json
    u = {"role": "user", "content": "Sky?"}
    rows = [{"prompt": [u], "chosen": [{"role": "assistant", "content": f"Blue {i}."}],
             "rejected": [{"role": "assistant", "content": f"Green {i}."}]} for i in range(10)]
    rows.append(dict(rows[0], rejected=rows[0]["chosen"]))                  # line 11: identical sides
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    app = make_app(demo_cfg(tmp_path, f'data.train="{data}"'))
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f2")
        await until(pilot, lambda: app.screen.report is not None and app.screen.report.done,
                    timeout=180, what="report")
        rep = app.screen.report
        assert rep.format == "preference" and rep.rows == 10
        assert "preference" in plain(app.screen.query_one("#ds-summary"))
        assert "11" in str(app.screen.query_one("#problems").get_row_at(0)[0])
        await pilot.press("n")
        await until(pilot, lambda: "tokens" in plain(app.screen.query_one("#row-header")), timeout=120,
                    what="preview")
        view = plain(app.screen.query_one("#row-view"))
        assert "Blue 1." in view and "Green 1." not in view          # prompt + chosen, as DPO trains it
