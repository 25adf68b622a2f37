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


def _trained(text) -> str:
    """The characters a preview draws as trained (the reverse-video style), in order."""
    marked = sorted((sp.start, sp.end) for sp in text.spans if "reverse" in str(sp.style) and "error" not in str(sp.style))
    return "".join(text.plain[a:b] for a, b in marked)


async def test_dataset_screen_shows_pairs_side_by_side_with_their_masks(tmp_path):
    """80x24: prompt, chosen | rejected with the trainer's masks (the inspector's preview of each
    side), tokens per side in the Lengths tab, identical / empty / over-max_length pairs by line in
    the Problems tab; a row's own markup and escapes are shown literally."""
    import json
    from engine.dataset import inspect as inspect_mod
    u = {"role": "user", "content": "Sky?"}
    rows = [{"prompt": [u], "chosen": [{"role": "assistant", "content": f"Blue {i}."}],
             "rejected": [{"role": "assistant", "content": f"Green {i}" + (" [red]x[/red] \x1b[31mnow" if i == 1 else "")}]}
            for i in range(10)]
    rows.append(dict(rows[0], rejected=rows[0]["chosen"]))                  # line 11: identical sides
    rows.append(dict(rows[1], chosen=[{"role": "assistant", "content": " "}]))   # line 12: an empty side
    rows.append(dict(rows[2], chosen=[{"role": "assistant", "content": "blue " * 60}]))  # line 13: over
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = demo_cfg(tmp_path, f'data.train="{data}"', 'train.method="dpo"', "data.max_length=48")
    app = make_app(cfg)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f2")
        await until(pilot, lambda: app.screen.report is not None and app.screen.report.done,
                    timeout=180, what="report")
        rep = app.screen.report
        assert rep.format == "preference" and rep.rows == 11
        summary = plain(app.screen.query_one("#ds-summary"))
        assert "pairs over max_length 1" in summary
        sides = plain(app.screen.query_one("#sides"))
        for name, st in rep.sides.items():
            assert f"{name:<11}min {st['min']:>6,}   median {st['median']:>6,.0f}   max {st['max']:>6,}" in sides
        table = app.screen.query_one("#problems")
        listed = {str(table.get_row_at(i)[0]): str(table.get_row_at(i)[1]) for i in range(table.row_count)}
        assert listed == {"2": "control_chars", "11": "identical_pair", "12": "empty_content",
                          "13": "over max_length"}, listed
        await pilot.press("n")
        await until(pilot, lambda: "chosen" in plain(app.screen.query_one("#side-chosen")), timeout=120,
                    what="the pair's preview")
        pv = inspect_mod.preview(cfg, 1)
        prompt = app.screen.query_one("#row-view").content
        chosen = app.screen.query_one("#side-chosen").content
        rejected = app.screen.query_one("#side-rejected").content
        assert "Sky?" in prompt.plain and "Blue 1." not in prompt.plain and not _trained(prompt)
        assert "Blue 1." in chosen.plain and "Green 1" in rejected.plain
        for side, shown in (("chosen", chosen), ("rejected", rejected)):
            want = "".join(t for t, tr in pv.sides[side].segments if tr)
            assert _trained(shown) == want.replace("\x1b", "␛"), side
        assert "[red]x[/red] ␛[31mnow" in rejected.plain          # literal, never markup or an escape
        assert "\x1b" not in rejected.plain
        app.screen.query_one("#problems").move_cursor(row=3)
        await pilot.press("2", "enter")
        await until(pilot, lambda: "✂" in plain(app.screen.query_one("#side-chosen")), timeout=120,
                    what="line 13's pair")
        assert "(line 13)" in plain(app.screen.query_one("#row-header"))
        assert "✂" not in plain(app.screen.query_one("#side-rejected"))


async def test_dataset_screen_shows_a_kto_rows_label(tmp_path):
    import json
    rows = [{"prompt": [{"role": "user", "content": f"Q{i}?"}],
             "completion": [{"role": "assistant", "content": f"A{i}."}], "label": i % 2 == 0} for i in range(10)]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    app = make_app(demo_cfg(tmp_path, f'data.train="{data}"', 'train.method="kto"'))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f2")
        await until(pilot, lambda: app.screen.report is not None and app.screen.report.done,
                    timeout=180, what="report")
        assert "labels     5 desirable, 5 undesirable" in plain(app.screen.query_one("#sides"))
        for key, label in (("n", "undesirable"), ("n", "desirable")):
            await pilot.press(key)
            await until(pilot, lambda: "label" in plain(app.screen.query_one("#row-header")), timeout=120,
                        what="the row's preview")
            header = plain(app.screen.query_one("#row-header"))
            assert f"label {label}" in header, header
            assert not app.screen.query_one("#row-sides").display
            app.screen.query_one("#row-header").update("")
