"""A new user's paths through the app: each rough edge found on them, fixed as a class."""
from __future__ import annotations

import asyncio

import pytest
from textual.widgets import Input, Static

from engine.core import config as config_mod
from tui_helpers import demo_cfg, make_app, until
from tui_helpers import anyio_backend, isolated_settings, plain  # noqa: F401 (fixtures)

pytestmark = pytest.mark.anyio





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
    app = make_app(config_mod.load(other))
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f3")
        screen = app.screen
        assert await _watch_form_while_building(app, pilot, screen) == []
        from tui.dialogs import PathPrompt
        loads = app.config_generation
        await pilot.press("ctrl+o")             # the real ctrl+o path: the prompt, then the file
        await until(pilot, lambda: isinstance(app.screen, PathPrompt), what="prompt")
        app.screen.query_one(Input).value = str(other)
        await pilot.press("enter")
        await until(pilot, lambda: app.screen is screen and app.config_generation > loads, what="loaded")
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
    from engine.models.builtin import demo_config
    from tui import cli as tui_cli
    from tui.app import QloraApp
    from tui.testing import write_run
    demo = demo_config().to_dict()
    assert demo["lora"]["r"] == 16 and demo["data"]["max_length"] == 256
    seen = []
    monkeypatch.setattr(tui_cli, "_run_app", lambda app: seen.append(app.config.to_dict()) or 0)
    run = write_run(tmp_path / "runs")
    (run / "config.toml").unlink(missing_ok=True)
    monkeypatch.setattr("engine.core.rundir.newest_live", lambda d: run)
    assert tui_cli.main([]) == 0                       # qlora-tui
    assert tui_cli.main(["tui"]) == 0                  # qlora-tui tui
    assert tui_cli.main(["attach"]) == 0               # the newest live run
    assert tui_cli.main(["attach", str(run)]) == 0     # a run without a readable config
    assert seen == [demo] * 4
    assert QloraApp().config.to_dict() == demo


# ---- 4: the recovery dialog offers every fix the hint named, and says where it restarts -----

def _failed_run(tmp_path, name, cfg, kind="nan", checkpoint_step=None, hint=None):
    from engine.core import events
    from engine.core import rundir
    d = tmp_path / "runs" / name
    (d / "control").mkdir(parents=True)
    config_mod.save(cfg, d / rundir.CONFIG)
    if checkpoint_step:
        ck = d / rundir.CHECKPOINTS / f"checkpoint-{checkpoint_step}"
        ck.mkdir(parents=True)
        rundir.mark_complete(ck, checkpoint_step)
    w = events.JsonlWriter(d / rundir.EVENTS)
    w(events.RunStarted(model="builtin:tiny", total_steps=10))
    w(events.Step(step=1, total_steps=10, loss=2.0))
    if hint is not None:
        w(hint)
    w(events.RunFailed(reason=f"{kind} at step 6", kind=kind, step=6))
    w.close()
    return d


def _dialog_text(screen) -> str:
    return "\n".join(str(w.render()) for w in screen.query(Static))


async def test_recovery_offers_every_named_fix_and_says_restart_without_checkpoint(tmp_path):
    from engine.training import hints
    from engine.training import runner
    from tui.dialogs import ResumeFixDialog
    cfg = demo_cfg(tmp_path, "train.max_grad_norm=0", "train.learning_rate=2e-3")
    hint = hints.nan_hint(6, float("nan"), float("inf"), cfg)
    assert hint.overrides == ["train.learning_rate=1e-4", "train.max_grad_norm=1.0"]
    # the hint's prose is rendered from the same overrides, in the same order
    assert hint.fix.startswith("; ".join(hints.fix_lines(cfg, hint.overrides)))
    d = _failed_run(tmp_path, "nan-no-ckpt", cfg, hint=hint)
    app = make_app(cfg, attach=d)
    async with app.run_test(size=(100, 32)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, ResumeFixDialog), what="offer")
        text = _dialog_text(app.screen)
        assert "restart from step 0" in text and "Resume from" not in text
        assert "train.learning_rate 2e-3 → 1e-4" in text
        assert "train.max_grad_norm = 1.0" in text
        assert "--set train.learning_rate=1e-4 --set train.max_grad_norm=1.0" in text
        assert app.screen.query_one("#resume").label.plain.startswith("Restart")
    # with a complete checkpoint: it resumes from there; OOM fixes are the runner's too
    cfg2 = demo_cfg(tmp_path, "data.max_length=1024")
    d2 = _failed_run(tmp_path, "oom-ckpt", cfg2, kind="oom", checkpoint_step=4)
    assert runner.oom_fix_overrides(cfg2, 6) == hints.oom_hint(None, None, cfg2, step=6).overrides
    app = make_app(cfg2, attach=d2)
    async with app.run_test(size=(100, 32)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, ResumeFixDialog), what="offer")
        text = _dialog_text(app.screen)
        assert "Resume from the checkpoint at step 4" in text
        for line in hints.fix_lines(cfg2, hints.oom_overrides(cfg2, 6)):
            assert line in text


# ---- 5: the slowdown hint knows the device and ignores eval / checkpoint pauses ------------

def _tps_run(device: str, pauses: bool):
    from engine.core import events
    from engine.training.hints import HintEngine
    eng = HintEngine(config_mod.Config())
    out = eng.observe(events.RunStarted(device=device, total_steps=400))
    for i in range(1, 60):
        slow = i in (20, 21, 40, 41)              # the two readings after each pause
        if pauses and i in (20, 40):
            out += eng.observe(events.Eval(step=i - 1, eval_loss=1.0))
        if pauses and i in (21, 41):
            out += eng.observe(events.Checkpoint(step=i - 1, path="x"))
        out += eng.observe(events.Step(step=i, total_steps=400, loss=2.0 - i / 100, grad_norm=0.5,
                                  learning_rate=2e-4, tokens_per_second=900 if slow else 5000))
    return [h for h in out if h.rule == "tokens_per_second_drop"]


def test_slowdown_hint_knows_the_device_and_skips_eval_and_checkpoint_pauses():
    assert _tps_run("cpu", pauses=True) == []          # the pauses were evals and a save
    cpu = _tps_run("cpu", pauses=False)
    assert cpu and "GPU" not in cpu[0].cause + cpu[0].fix and "CPU" in cpu[0].fix
    gpu = _tps_run("cuda:0 (NVIDIA H100)", pauses=False)
    assert gpu and "GPU" in gpu[0].cause
    for h in cpu + gpu:                                 # the step is said once, by the renderer
        assert f"step {h.step}" not in h.symptom and "at step" not in h.symptom


# ---- 8: every action is in the palette, and works from any screen where it makes sense ------

async def test_every_binding_is_a_palette_command_and_load_works_anywhere(tmp_path):
    from textual.binding import Binding

    from tui.dialogs import PathPrompt
    from tui.screens.runs import RunDetailScreen
    other = tmp_path / "other.toml"
    other.write_text("[lora]\nr = 8\nalpha = 16\n")
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(80, 24)) as pilot:
        for key, mode in (("f2", "dataset"), ("f3", "config"), ("f4", "train"), ("f5", "runs")):
            await pilot.press(key)
            await until(pilot, lambda: app.current_mode == mode)
            titles = [c.title for c in app.get_system_commands(app.screen)]
            for b in list(app.BINDINGS) + list(app.screen.BINDINGS):
                if isinstance(b, Binding) and b.description:
                    key0 = b.key.split(",")[0]
                    assert any(f"({key0})" in t or f"({key0.upper()})" in t for t in titles) or \
                        b.action == "quit", (mode, b.key, titles)
            assert any(t.startswith("Load config") for t in titles)
        # ctrl+o from the Train screen: the prompt, the file, and the Config form follows
        await pilot.press("f4")
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, PathPrompt), what="prompt")
        app.screen.query_one(Input).value = str(other)
        await pilot.press("enter")
        await until(pilot, lambda: app.config.lora.r == 8, what="loaded")
        await pilot.press("f3")
        await until(pilot, lambda: app.screen.form_ready and
                    app.screen.query_one("#in-lora-r", Input).value == "8", what="form")
        # a missing file: one clean line naming it, no `<file> =` or ⏎
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, PathPrompt), what="prompt")
        app.screen.query_one(Input).value = "nope.toml"
        await pilot.press("enter")
        await until(pilot, lambda: any("nope.toml" in str(n.message) for n in app._notifications))
        msg = [str(n.message) for n in app._notifications if "nope.toml" in str(n.message)][-1]
        assert msg.startswith("nope.toml: config file not found") and "<file>" not in msg
        assert "⏎" not in msg and "problem(s)" not in msg
    detail = [b for b in RunDetailScreen.BINDINGS if b.description]
    assert detail                                      # its keys are listed when it is open


# ---- 17: train --detach returns once the child holds the run directory ----------------------

def test_detach_returns_before_the_checks_and_the_child_records_a_refusal(tmp_path, capsys):
    """The parent does no preflight (that took ~10 s): a data file that the checks refuse still
    gets a run directory at once, and the child writes the refusal where `runs` shows it."""
    import time
    from pathlib import Path

    from engine.core import rundir
    from reliability_helpers import cli
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    repo = Path(__file__).resolve().parents[2]
    # the parent in this process (no Python start-up of its own); the child is its own process
    r = cli(capsys, "train", repo / "examples" / "demo.toml", "--detach",
            "--set", f"output.dir='{tmp_path / 'runs'}'", "--set", f"data.train='{bad}'")
    assert r.returncode == 0, r.stderr
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    assert (run_dir / rundir.RUN_JSON).exists() and (run_dir / rundir.CONFIG).exists()
    assert f"qlora-tui attach {run_dir}" in r.stderr and "stdout.log" in r.stderr
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and rundir.info(run_dir).state != "failed":
        time.sleep(0.3)
    info = rundir.info(run_dir)
    assert info.state == "failed" and "bad.jsonl" in info.reason, (info, (run_dir / "stdout.log").read_text())


# ---- 12, 13: charts read as data; dialogs keep the screen visible ---------------------------

def test_chart_columns_are_contiguous_and_one_eval_is_no_curve():
    from tui.runstate import RunState
    from tui.widgets.chart import _buckets, _filled
    cols = _filled(_buckets([(1, 3.0), (2, 2.5), (3, 2.0)], 1, 3, 40))
    first = next(i for i, c in enumerate(cols) if c is not None)
    last = max(i for i, c in enumerate(cols) if c is not None)
    assert all(c is not None for c in cols[first:last + 1])
    st = RunState(evals=[(20, 2.0)])
    assert st.eval_spark_values == []
    st.evals.append((40, 1.8))
    assert st.eval_spark_values == [2.0, 1.8]


def test_histogram_buckets_are_the_same_in_cli_and_tui():
    from engine.dataset.inspect import Report, bucket_label
    from tui.screens.dataset import histogram_text
    assert bucket_label(20, 25) == "20–24"
    rep = Report(path="x", histogram=[(20, 25, 3), (25, 30, 1)], max_length=256, rows=4)
    tui = histogram_text(rep).plain
    assert "20–24" in tui and "25–29" in tui and "20–25" not in tui


async def test_dialogs_keep_the_screen_visible_dimmed(tmp_path):
    from tui.dialogs import PathPrompt
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, PathPrompt))
        bg = app.screen.styles.background
        assert 0 < bg.a < 1                        # translucent: the Train screen shows through
        assert "Ready to train" in "".join(str(s) for s in app.screen_stack[-2].query_one("#welcome").render().plain)


# ---- 9, 10: tabs have keys; long paths keep their end; the runs table's widths are fixed ----

def test_long_paths_are_shortened_in_the_middle():
    from tui.safe import middle
    p = "/home/someone/projects/very/long/runs/20261129-021336-tiny/adapter"
    s = middle(p, 30)
    assert len(s) == 30 and s.endswith("tiny/adapter") and s.startswith("/home") and "…" in s
    assert middle("short", 30) == "short"


async def test_dataset_tabs_have_their_own_keys_and_runs_columns_are_fixed(tmp_path):
    from textual.widgets import DataTable, TabbedContent

    from tui.screens.runs import RunsScreen
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f2")
        await until(pilot, lambda: app.current_mode == "dataset")
        tabs = app.screen.query_one("#ds-tabs", TabbedContent)
        for key, pane in (("2", "tab-problems"), ("3", "tab-rows"), ("1", "tab-lengths")):
            await pilot.press(key)
            await until(pilot, lambda: tabs.active == pane, what=pane)
        await pilot.press("f5")
        await until(pilot, lambda: app.current_mode == "runs")
        table = app.screen.query_one("#runs", DataTable)
        assert [c.width for c in table.columns.values()] == [w for _, _, w in RunsScreen.COLUMNS]
        assert all(not c.auto_width for c in table.columns.values())


# ---- 11: what is drawn in colour alone survives 16 colours, in both themes ------------------

@pytest.mark.parametrize("theme", ["qlora-dark", "qlora-light"])
async def test_bar_and_header_stay_visible_in_16_colours(tmp_path, theme):
    from rich.color import ColorSystem
    from textual.widgets import Header, ProgressBar
    from textual.widgets._progress_bar import Bar

    def ansi16(c) -> int:
        return c.rich_color.downgrade(ColorSystem.STANDARD).number

    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(80, 24)) as pilot:
        app.theme = theme
        await pilot.pause()
        screen = app.screen
        bg = screen.styles.background
        bar = screen.query_one(ProgressBar).query_one(Bar)
        empty = bar.get_component_styles("bar--bar").background
        header = screen.query_one(Header).styles.background
        assert ansi16(bg + empty) != ansi16(bg), theme
        assert ansi16(bg + header) != ansi16(bg), theme
        from tui.widgets.panels import gpu_text
        from tui.testing import fixed_samplers
        gpu, host, reason = fixed_samplers()
        spans = gpu_text([], host.sample(), reason).spans
        assert not any("red" in str(s.style) or "yellow" in str(s.style) for s in spans[:1])


# ---- 15: messages whole: JSON errors keep their column; an offline hub says so at once -------

def test_json_errors_keep_their_column(tmp_path):
    from engine.dataset import data
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "bad\x01 ctrl"}\n')
    problems = [err for _, _, err in data.iter_raw(p) if err]
    assert problems == ["invalid JSON: Invalid control character at column 14"]


def test_offline_estimate_of_a_hub_id_says_what_to_do(monkeypatch, capsys):
    from engine import cli
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")     # nothing listens: refused
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")        # and nothing cached
    rc = cli.main(["estimate", "--set", 'model.name="someorg/some-model"'])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "someorg/some-model" in err and "unreachable" in err and "local model directory" in err
    assert err.endswith("huggingface-cli download someorg/some-model --local-dir DIR)")


# ---- 7: resume from the Runs screen; learning-rate and grad-norm curves ----------------------

async def test_runs_screen_resumes_with_the_dialog_and_detail_shows_lr_and_grad(tmp_path):
    from textual.widgets import Sparkline

    from engine.core import events
    from engine.training import hints
    from tui.dialogs import ResumeFixDialog
    from tui.runstate import from_events
    from tui.screens.runs import RunDetailScreen
    cfg = demo_cfg(tmp_path)
    d = _failed_run(tmp_path, "20260101-120000-nan", cfg,
                    hint=hints.nan_hint(6, float("nan"), 1e11, cfg), checkpoint_step=4)
    st = from_events(events.read_events(d / "events.jsonl"))
    st.apply(events.Step(step=5, total_steps=10, loss=2.0, learning_rate=1e-3, grad_norm=1e11))
    assert st.grad_norm_values[-1] == pytest.approx(11.0)       # log10: a spike stands out
    app = make_app(cfg)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f5")
        await until(pilot, lambda: app.current_mode == "runs" and app.screen.runs, what="runs")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, RunDetailScreen) and
                    app.screen.info is not None, what="detail")
        assert app.screen.query_one("#detail-lr", Sparkline) is not None
        assert app.screen.query_one("#detail-grad", Sparkline) is not None
        await pilot.press("r")                                    # resume from the detail too
        await until(pilot, lambda: isinstance(app.screen, ResumeFixDialog), what="dialog")
        text = _dialog_text(app.screen)
        assert "Resume from the checkpoint at step 4" in text and "train.learning_rate" in text
        await pilot.press("escape")
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, RunDetailScreen))
        await pilot.press("r")                                    # and from the list
        await until(pilot, lambda: isinstance(app.screen, ResumeFixDialog), what="dialog")


# ---- 9: a focused dropdown looks focused; an open one has a border --------------------------

async def test_focused_and_open_dropdowns_stand_out(tmp_path):
    from textual.widgets import Select
    from textual.widgets._select import SelectCurrent, SelectOverlay
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f3")
        await until(pilot, lambda: app.screen.form_ready, what="form")
        selects = list(app.screen.query(Select))
        a, b = selects[0], selects[1]
        a.focus()
        await pilot.pause()
        focused = a.query_one(SelectCurrent).styles.background
        plain_bg = b.query_one(SelectCurrent).styles.background
        assert focused != plain_bg
        await pilot.press("enter")                      # open it
        await until(pilot, lambda: a.expanded, what="open dropdown")
        assert a.query_one(SelectOverlay).styles.border_top[0] not in ("", "none", "hidden")
