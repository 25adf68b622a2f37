"""Pilot tests of recovery in the TUI: a failed run resumed with the fix, the confirmation before
a model's own code runs, and a dataset problem opened in the row browser. Real runs on
builtin:tiny; the OOM comes from QLORA_TUI_FAULTS, which the detached run process inherits."""
from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
from textual.widgets import DataTable, Static, TabbedContent

from engine.core import config
from engine.core import events
from engine.core import rundir
from engine.core.summary import State
from tui.app import DEMO_OVERRIDES, QloraApp
from tui.dialogs import RemoteCodeDialog, ResumeFixDialog
from tui.runstate import RunState
from tui.testing import fixed_samplers
from tui_helpers import demo_cfg, make_app, plain, until  # noqa: F401
from tui_helpers import anyio_backend  # noqa: F401 (fixtures)

pytestmark = pytest.mark.anyio
HOSTILE = "[red]x[/red] [/ \x1b[31mRED\x1b[0m [bold]"



@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("QLORA_TUI_FAULTS", raising=False)
    monkeypatch.chdir(tmp_path)




def _where(app, run_dir) -> str:
    """The followed run's phase and message, and the tails of its log and output."""
    st = app.run_state
    log = (run_dir / rundir.EVENTS).read_text(errors="replace").splitlines()[-4:]
    out = (run_dir / rundir.STDOUT).read_text(errors="replace").splitlines()[-6:]
    return f"phase {st.phase!r}, {st.message!r}; log ends {log}; output ends {out}"


def dialog_text(screen) -> str:
    return "\n".join(plain(w) for w in screen.query(Static))


# ---- OOM → resume with the fix ------------------------------------------------------------

async def test_oom_offers_resume_with_fix_and_the_resumed_run_finishes(tmp_path, monkeypatch):
    cfg = demo_cfg(tmp_path, "train.max_steps=6", "train.logging_steps=1", "train.eval_steps=0",
                   "train.save_steps=2")
    monkeypatch.setenv("QLORA_TUI_FAULTS", "oom@4")      # inherited by the detached run
    app = make_app(cfg)
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("ctrl+r")
        await until(pilot, lambda: isinstance(app.screen, ResumeFixDialog), timeout=120,
                    what="the resume-with-fix dialog")
        st = app.run_state
        run_dir = st.run_dir
        assert st.state == State.FAILED and st.fail_kind == events.FailKind.OOM
        assert "failed" in plain(app.screen_stack[-2].query_one("#status"))   # under the dialog
        text = dialog_text(app.screen)
        assert "Out of memory" in text and "train.batch_size=2" in text
        assert "train.grad_accum=2" in text
        first_started = [e for e in events.read_events(run_dir / rundir.EVENTS) if e.type == "run_started"]
        assert len(first_started) == 1
        monkeypatch.delenv("QLORA_TUI_FAULTS")          # the resumed process must not OOM again
        await pilot.press("r")
        await until(pilot, lambda: not isinstance(app.screen, ResumeFixDialog), what="dialog gone")
        await until(pilot, lambda: app.run_state.state == State.FINISHED or
                    app.run_state.phase in ("failed", "crashed"), timeout=240,
                    what="the resumed run to end", detail=lambda: _where(app, run_dir))
        st = app.run_state
        assert st.state == State.FINISHED, st.message
        assert st.run_dir == run_dir and not st.stopped
        evs = events.read_events(run_dir / rundir.EVENTS)
        starts = [e for e in evs if e.type == "run_started"]
        assert len(starts) == 2 and starts[-1].resumed_from_step == 2
        resume = [e for e in evs if e.type == "status" and e.phase == "resume"]
        assert resume and "train.batch_size" in resume[-1].message
        assert config.load(run_dir / rundir.CONFIG).train.batch_size == 2
        # the Train screen was reset from the new history: every step once, in order
        assert [s for s, _ in st.losses] == list(range(1, 7))
        assert "finished" in plain(app.screen.query_one("#status"))
        assert not isinstance(app.screen, ResumeFixDialog)


async def test_nan_offer_lowers_the_learning_rate(tmp_path):
    app = make_app(demo_cfg(tmp_path))
    d = tmp_path / "runs" / "r1"
    d.mkdir(parents=True)
    for lr, want in ((2e-3, "train.learning_rate=1e-4"), (1e-4, "train.learning_rate=5e-5")):
        config.save(demo_cfg(tmp_path, f"train.learning_rate={lr}"), d / rundir.CONFIG)
        st = RunState(run_dir=d)
        st.apply(events.RunFailed(kind="nan", step=5))
        fixes, what = app.controller.resume_fixes(st)
        assert fixes == [want] and "NaN" in what


async def test_resume_dialog_escape_dismisses_and_errors_are_one_line(tmp_path):
    """A failed run read from its log: the offer appears; esc leaves it; a refused resume is
    reported in one line, never as a traceback."""
    d = tmp_path / "runs" / "20260101-oom-[red]x"
    (d / "control").mkdir(parents=True)
    config.save(demo_cfg(tmp_path), d / rundir.CONFIG)
    w = events.JsonlWriter(d / rundir.EVENTS)
    w(events.RunStarted(model="builtin:tiny", total_steps=10))
    w(events.Step(step=1, total_steps=10, loss=2.0))
    w(events.RunFailed(reason="CUDA out of memory at step 2 [bold]", kind="oom", step=1))
    w.close()
    app = make_app(demo_cfg(tmp_path), attach=d)
    async with app.run_test(size=(100, 32)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, ResumeFixDialog), what="offer")
        assert "20260101-oom-[red]x" in dialog_text(app.screen)
        assert "at step 2 [bold]" in dialog_text(app.screen)
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, ResumeFixDialog))
        assert isinstance(app.run_state.end, events.RunFailed)
        # resume refused (a frozen section): one line, no traceback
        app.controller.resume(d, ["lora.r=4"])
        await until(pilot, lambda: not app.controller.launching, what="refusal")
        assert app.run_state.phase == "failed"
        assert "cannot change on resume" in app.run_state.message
        assert "Traceback" not in app.run_state.message
        assert not isinstance(app.screen, ResumeFixDialog)


# ---- trust_remote_code: an explicit yes only -------------------------------------------------

def remote_code_model(tmp_path) -> Path:
    from engine.models.source import model_path
    src = Path(model_path(demo_cfg(tmp_path)))
    dst = tmp_path / "model-[red]x[/red]"
    shutil.copytree(src, dst)
    (dst / "modeling_evil.py").write_text(
        f"open({str(tmp_path / 'REMOTE_CODE_RAN')!r}, 'w').write('ran')\n")
    conf = json.loads((dst / "config.json").read_text())
    conf.update(auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (dst / "config.json").write_text(json.dumps(conf))
    return dst


async def test_remote_code_needs_confirmation_and_no_starts_nothing(tmp_path):
    model = remote_code_model(tmp_path)
    cfg = demo_cfg(tmp_path, f'model.name="{model}"', "model.trust_remote_code=true")
    app = make_app(cfg)
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("ctrl+r")
        await until(pilot, lambda: isinstance(app.screen, RemoteCodeDialog), what="confirmation")
        text = dialog_text(app.screen)
        assert str(model) in text                      # the name, markup and all, literally
        assert "Python code from the model repository" in text
        await pilot.press("ctrl+r")                    # a second ctrl+r stacks nothing
        await pilot.pause()
        assert len([s for s in app.screen_stack if isinstance(s, RemoteCodeDialog)]) == 1
        await pilot.press("enter")                     # the focused default is No
        await until(pilot, lambda: not isinstance(app.screen, RemoteCodeDialog))
        assert app.run_state is None and not app.controller.launching
        await pilot.press("ctrl+r")
        await until(pilot, lambda: isinstance(app.screen, RemoteCodeDialog))
        await pilot.press("n")
        await until(pilot, lambda: not isinstance(app.screen, RemoteCodeDialog))
        await pilot.pause(0.5)
        assert app.run_state is None and not app.controller.launching
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "REMOTE_CODE_RAN").exists()


# ---- Dataset: a problem opens its row --------------------------------------------------------

async def test_problem_opens_its_row_or_says_it_has_none(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    long = {"messages": [{"role": "user", "content": "hi " * 400},
                         {"role": "assistant", "content": "Long " + HOSTILE}]}
    lines = ([json.dumps(good)] * 4 + ["{not json " + HOSTILE, json.dumps({"messages": []}),
             json.dumps(long)] + [json.dumps(good)] * 3)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    app = make_app(demo_cfg(tmp_path, f'data.train="{data}"'))
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("f2")
        await until(pilot, lambda: app.screen.report is not None and app.screen.report.done,
                    timeout=120, what="report")
        screen = app.screen
        probs = screen.report.problems
        by_line = {p.line: i for i, p in enumerate(probs)}
        assert {5, 6, 7} <= set(by_line)
        screen.query_one("#ds-tabs", TabbedContent).active = "tab-problems"
        table = screen.query_one("#problems", DataTable)
        table.focus()
        await pilot.pause()
        # a usable row with a problem (too long): its row opens in the browser
        table.move_cursor(row=by_line[7])
        await pilot.press("enter")
        await until(pilot, lambda: "(line 7)" in plain(screen.query_one("#row-header")),
                    timeout=60, what="row of line 7")
        assert screen.query_one("#ds-tabs", TabbedContent).active == "tab-rows"
        assert "row 5 of 8" in plain(screen.query_one("#row-header"))
        assert "Long [red]x[/red] [/ ␛[31mRED␛[0m [bold]" in plain(screen.query_one("#row-view"))
        # a line that failed to parse has no row: said so, the error shown literally
        screen.query_one("#ds-tabs", TabbedContent).active = "tab-problems"
        table.focus()
        table.move_cursor(row=by_line[5])
        await pilot.press("enter")
        await until(pilot, lambda: "has no row" in plain(screen.query_one("#row-view")),
                    what="no-row message")
        view = plain(screen.query_one("#row-view"))
        assert "Line 5 has no row: it failed to parse" in view
        assert "line 5 is not a usable row: invalid JSON" in view
        assert "\x1b" not in view
        # the line itself is shown, sanitised
        assert "line 5 as it is in the file" in view and "{not json [red]x[/red]" in view
        # n goes on from that line: the first row after line 5 (line 7 is row 5), not row 2
        await pilot.press("n")
        await until(pilot, lambda: "tokens" in plain(screen.query_one("#row-header")), timeout=60)
        assert "row 5 of 8" in plain(screen.query_one("#row-header"))
        # duplicates are listed by line, like problems, and open their rows the same way
        listed = [table.get_row_at(i) for i in range(table.row_count)]
        dups = [i for i, r in enumerate(listed) if str(r[1]) == "duplicate"]
        assert dups and any("same as line 1" in str(listed[i][2]) for i in dups)
