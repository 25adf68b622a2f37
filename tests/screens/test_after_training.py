"""The TUI after training: chat with a run, and every action on a run (merge, compare,
serve-cmd, push, export) from the Runs screen, the run detail and the palette, at 80x24.

One finished run over builtin:tiny with a real LoRA adapter (non-zero lora_B) and a realistic
log is built once per module; the chat loads it in-process, the actions run as child processes
(``engine.outputs.jobs``) and report typed events."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
from textual.widgets import Button, Input, Static, TextArea

from engine.core.events import JobDone
from tui.screens.actions import CompareDialog, MergeDialog, PushDialog, ServeDialog
from tui.screens.chat import ChatScreen
from tui.screens.export import ExportScreen
from tui.screens.runs import RunDetailScreen
from tui_helpers import demo_cfg, footer_keys, make_app, screen_text, settled, until
from tui_helpers import anyio_backend, isolated_settings  # noqa: F401 (fixtures)

sys.path.insert(0, str(Path(__file__).parents[1]))

RUN = "20260101-120000-tiny"
FAILED = "20260101-130000-failed"
LONG = "a-rather-long-folder-name-so-that-every-path-in-the-walk-is-shortened"
LONG_ERROR = ("CUDA out of memory while allocating the optimizer state for layer 31 of 32; "
              "the batch of 16 sequences of 4096 tokens did not fit next to the 4-bit base " * 3)
HOSTILE = "say [red]x[/red] \x1b[31mnow"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """runs/RUN: a finished run (events.jsonl as a real run writes it) with an adapter, a
    config and eval data; a checkpoint holding a second adapter."""
    from engine.models.builtin import tiny_model_dir
    from outputs_fixtures import make_adapter, make_run_dir
    from tui.testing import write_run
    runs = tmp_path_factory.mktemp("after") / LONG / "runs"
    run = make_run_dir(runs / RUN, tiny_model_dir(), r=4)
    (run / "events.jsonl").unlink()
    write_run(runs, RUN, steps=60)
    make_adapter(tiny_model_dir(), run / "checkpoints" / "checkpoint-30", r=4, seed=7)
    # a run that failed with a long error (written through the engine's own writer)
    from engine.core import events
    failed = write_run(runs, FAILED, steps=60, finished=False, stop_at=12)
    w = events.JsonlWriter(failed / "events.jsonl")
    w(events.RunFailed(reason=LONG_ERROR, kind="error", step=12, time=1_767_268_900.0))
    w.close()
    (failed / "config.toml").write_text((run / "config.toml").read_text())
    return runs


def _cfg(tmp_path, runs: Path):
    return demo_cfg(tmp_path, f'output.dir="{runs}"')


async def _open_runs(pilot, app, name: str = RUN):
    """The Runs screen (F5) with ``name`` selected (the failed run is listed first)."""
    from textual.widgets import DataTable
    await pilot.press("f5")
    await until(pilot, lambda: len(getattr(app.screen, "runs", [])) == 2, what="the runs list")
    app.screen.query_one("#runs", DataTable).move_cursor(row=[ri.name for ri in app.screen.runs].index(name))
    await pilot.pause()


async def _enter_detail(pilot, app, what: str = "the run detail") -> None:
    """Enter on the Runs screen's selected run: its run detail, once loaded."""
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, RunDetailScreen) and app.screen.info, what=what)


async def _open_detail(pilot, app, name: str):
    await _open_runs(pilot, app, name)
    await _enter_detail(pilot, app)


def _history(runs: Path) -> list[dict]:
    return [json.loads(ln) for ln in (runs / RUN / "chat.jsonl").read_text().splitlines()]


# ---- the engine half -------------------------------------------------------------------------
def test_chat_model_streams_the_same_answer_generate_gives_and_stops(finished):
    """Greedy chat == `generate.compare` for the same prompt, tuned and base (the adapter off);
    a stop event ends an answer early; the system prompt goes through the run's template."""
    from engine.outputs import chat, generate
    run = finished / RUN
    m = chat.ChatModel(run)
    steps = []
    m.load(lambda f, msg: steps.append(f))
    assert steps[-1] == 1.0 and m.info["mode"] == "cpu, fp32"
    greedy = chat.Sampling(temperature=0, max_new_tokens=12)
    hist = [{"role": "user", "content": "what is the capital of canada ?"}]
    tuned = "".join(m.stream(hist, greedy)).strip()
    base = "".join(m.stream(hist, greedy, tuned=False)).strip()
    ref = generate.compare(run, prompts=[hist[0]["content"]], max_new_tokens=12)[0]
    assert (tuned, base) == (ref["tuned"], ref["base"]) and tuned != base
    assert "you are terse" in m.render(hist, system="you are terse")

    stop = threading.Event()
    pieces = []
    for p in m.stream(hist, chat.Sampling(temperature=1.0, max_new_tokens=400), stop=stop):
        pieces.append(p)
        stop.set()
    assert 1 <= len(m.tok("".join(pieces), add_special_tokens=False).input_ids) < 400
    with pytest.raises(chat.ChatError, match="top_p"):
        chat.Sampling(top_p=0).check()


def test_jobs_child_reports_typed_events_and_one_line_errors(finished, tmp_path):
    from engine.outputs import jobs
    seen = []
    done = jobs.run_child("push", {"src": str(finished / RUN), "repo_id": "me/tiny", "dry_run": True},
                          seen.append)
    assert isinstance(done, JobDone) and not done.error and seen[-1] is done
    assert "adapter_model.safetensors" in done.report["files"] and done.report["url"] == ""
    done = jobs.run_child("merge", {"src": str(tmp_path / "nowhere"), "out": str(tmp_path / "m")},
                          seen.append)
    assert done.error.startswith("merge failed:") and "no such directory" in done.error
    assert "\n" not in done.error


# ---- chat ------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_chat_from_runs_streams_toggles_base_stops_and_keeps_the_transcript(finished, tmp_path):
    app = make_app(_cfg(tmp_path, finished))
    async with app.run_test(size=(80, 24)) as pilot:
        await _open_runs(pilot, app)
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.model is not None,
                    what="the chat model loaded")
        screen = app.screen
        assert screen.src == finished / RUN / "adapter"
        assert "tuned" in str(screen.query_one("#chat-status", Static).render())
        screen.query_one("#chat-temp", Input).value = "0"
        screen.query_one("#chat-max", Input).value = "8"
        screen.query_one("#chat-input", Input).focus()
        await pilot.press(*HOSTILE.replace("\x1b", ""), "enter")
        await until(pilot, lambda: not screen.answering and screen.history[-1]["role"] == "assistant",
                    what="the first answer")
        shown = screen.transcript_text()
        assert "you say [red]x[/red] [31mnow" in shown          # literally: no markup applied
        tuned = screen.history[-1]["content"]
        from tui.safe import clean
        assert tuned and str(screen.query(".chat-msg").last().render()) == "tuned " + clean(tuned)
        # the same history, answered by the base (the adapter off)
        await pilot.press("ctrl+t")
        await pilot.press(*"and again", "enter")
        await until(pilot, lambda: not screen.answering and screen.history[-1]["role"] == "assistant"
                    and screen.history[-1].get("model") == "base", what="the base answer")
        assert str(screen.query(".chat-msg").last().render()).startswith("base ")
        # stopped mid-answer: the footer offers ctrl+k only while answering
        screen.query_one("#chat-max", Input).value = "2000"
        screen.query_one("#chat-temp", Input).value = "1"
        await pilot.press("ctrl+t")
        extra = 0                  # a sampled answer can end (EOS) before ctrl+k lands: ask again
        for extra in range(3):
            await pilot.press(*"tell me more", "enter")
            await until(pilot, lambda: screen.answering and len(str(screen._answer.render())) > 12,
                        what="the answer to start")
            await pilot.press("ctrl+k")
            await until(pilot, lambda: not screen.answering, what="the stop")
            if screen.history[-1].get("stopped"):
                break
        last = screen.history[-1]
        assert last["stopped"] and last["model"] == "tuned"
        assert str(screen.query(".chat-msg").last().render()).endswith("[stopped]")

    rec = _history(finished)
    assert [r["role"] for r in rec][-6:] == ["user", "assistant"] * 3
    first = -5 - 2 * extra
    assert rec[first]["content"] == tuned and rec[first]["model"] == "tuned" and rec[first + 2]["model"] == "base"
    assert rec[-1]["stopped"] is True and rec[-1]["adapter"].endswith("adapter")

    # reopened (F6 now opens the newest finished run): the transcript is back; ctrl+n starts anew
    app = make_app(_cfg(tmp_path, finished))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f6")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.history,
                    what="the transcript read back")
        assert app.screen.history[-1]["stopped"] and "tell me more" in app.screen.transcript_text()
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.screen.history == [] and app.screen.transcript_text() == ""
    assert _history(finished)[-1]["role"] == "clear"


@pytest.mark.anyio
async def test_chat_with_a_stopped_run_loads_with_progress_and_takes_the_system_prompt(tmp_path):
    """F6 opens the newest ended run, a stopped one too; the model loads in a worker whose
    progress reaches the bar; the system prompt and sampling settings reach the model (greedy:
    the answer the engine gives for the same system prompt); a bad top-p is one line."""
    from engine.outputs import chat
    from engine.models.builtin import tiny_model_dir
    from outputs_fixtures import make_run_dir
    from tui.screens.chat import ChatLoading
    from tui.testing import write_run
    runs = tmp_path / "runs"
    name = "20260102-120000-stopped"
    run = make_run_dir(runs / name, tiny_model_dir(), r=4)
    (run / "events.jsonl").unlink()
    write_run(runs, name, steps=60, stop_at=23)                    # ended by a stop, adapter saved
    from engine.core import rundir
    assert rundir.info(run).state == "stopped"
    seen = []
    app = make_app(_cfg(tmp_path, runs))
    async with app.run_test(size=(80, 24), message_hook=seen.append) as pilot:
        await pilot.press("f6")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.model is not None,
                    what="the stopped run's model")
        screen = app.screen
        assert screen.run_dir == run
        fractions = [m.fraction for m in {id(m): m for m in seen if isinstance(m, ChatLoading)}.values()]   # (each bubbles)
        assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
        assert not screen.query_one("#chat-progress").display            # hidden once loaded
        screen.query_one("#chat-temp", Input).value = "0"
        screen.query_one("#chat-max", Input).value = "10"
        screen.query_one("#chat-top-p", Input).value = "0"
        screen.query_one("#chat-system", Input).value = "you answer in french"
        screen.query_one("#chat-input", Input).focus()
        await pilot.press(*"hello there", "enter")
        await until(pilot, lambda: any("top_p" in str(n.message) for n in app._notifications),
                    what="the top-p refusal")
        note = [str(n.message) for n in app._notifications if "top_p" in str(n.message)][-1]
        assert note.startswith("Sampling: ") and "\n" not in note and screen.history == []
        screen.query_one("#chat-top-p", Input).value = "0.9"
        screen.query_one("#chat-input", Input).value = "hello there"
        await pilot.press("enter")
        await until(pilot, lambda: not screen.answering and screen.history
                    and screen.history[-1]["role"] == "assistant", what="the answer")
        got = screen.history[-1]["content"]
    m = chat.ChatModel(run / "adapter")
    m.load(lambda f, msg: None)
    hist = [{"role": "user", "content": "hello there"}]
    greedy = chat.Sampling(temperature=0, max_new_tokens=10)
    assert got == "".join(m.stream(hist, greedy, system="you answer in french"))
    assert got != "".join(m.stream(hist, greedy))          # the system prompt changed the answer


@pytest.mark.anyio
async def test_chat_with_a_checkpoint_from_the_run_detail(finished, tmp_path):
    app = make_app(_cfg(tmp_path, finished))
    async with app.run_test(size=(80, 24)) as pilot:
        await _open_detail(pilot, app, RUN)
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.model is not None,
                    what="the chat")
        screen = app.screen
        assert [p.name for p in screen._choices] == ["adapter", "checkpoint-30"]
        from textual.widgets import Select
        screen.query_one("#chat-source", Select).value = str(finished / RUN / "checkpoints" / "checkpoint-30")
        await until(pilot, lambda: screen.src.name == "checkpoint-30" and screen.model is not None,
                    what="the checkpoint loaded")
        assert "checkpoint-30" in screen.model.info["adapter"]


# ---- the actions -----------------------------------------------------------------------------
@pytest.mark.anyio
async def test_merge_from_runs_shows_its_verification_line(finished, tmp_path):
    app = make_app(_cfg(tmp_path, finished))
    async with app.run_test(size=(80, 24)) as pilot:
        await _open_runs(pilot, app)
        await pilot.press("m")
        await until(pilot, lambda: isinstance(app.screen, MergeDialog), what="the merge dialog")
        screen = app.screen
        out = tmp_path / "merged"
        screen.query_one("#merge-out", Input).value = str(out)
        await pilot.press("ctrl+e")
        await until(pilot, lambda: not screen.running and (screen.report or screen.error), timeout=240,
                    what="the merge")
        assert screen.report is not None, screen.error
        assert screen.progress_seen and screen.progress_seen[-1] == 1.0
        assert screen.verified_line.startswith("verified: max |logit diff|")
        assert screen.verified_line in str(screen.query_one(".action-result", Static).render())
        assert (out / "config.json").is_file()


@pytest.mark.anyio
async def test_compare_serve_and_push_from_the_run_detail(finished, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))        # no cached token either
    app = make_app(_cfg(tmp_path, finished))
    async with app.run_test(size=(80, 24)) as pilot:
        await _open_detail(pilot, app, RUN)
        detail = app.screen
        # serve-cmd: whole and copyable
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, ServeDialog) and app.screen.command,
                    what="the serve command")
        cmd = app.screen.command
        assert "\nvllm serve " in cmd and "--lora-modules" in cmd
        assert app.screen.query_one("#serve-command", TextArea).text == cmd
        await pilot.press("ctrl+y")
        assert app.clipboard == cmd
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is detail, what="back to the detail")
        # compare generations: base and tuned for the run's eval prompts
        await pilot.press("g")
        await until(pilot, lambda: isinstance(app.screen, CompareDialog), what="the compare dialog")
        screen = app.screen
        screen.query_one("#compare-max", Input).value = "6"
        await pilot.press("ctrl+e")
        await until(pilot, lambda: not screen.running and (screen.report or screen.error), timeout=240,
                    what="the generations")
        assert screen.report is not None, screen.error
        results = screen.report["results"]
        assert len(results) == 3 and results[0]["prompt"] == "what is the capital of canada ?"
        shown = str(screen.query_one(".action-result", Static).render())
        assert "base" in shown and "tuned" in shown and results[0]["prompt"] in shown
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is detail, what="back to the detail")
        # push: the dry run first; upload only after it, for the same inputs
        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, PushDialog), what="the push dialog")
        screen = app.screen
        go = screen.query_one("#push-go", Button)
        await pilot.press("ctrl+u")
        assert go.disabled and screen.report is None          # refused: no dry run yet
        screen.query_one("#push-repo", Input).value = "me/tiny-chat"
        await pilot.press("ctrl+e")
        await until(pilot, lambda: not screen.running and screen.planned, what="the dry run")
        shown = str(screen.query_one(".action-result", Static).render())
        assert "would upload" in shown and "adapter_model.safetensors" in shown and not go.disabled
        screen.query_one("#push-repo", Input).value = "me/other"
        await pilot.pause()
        assert go.disabled and screen.planned is None          # changed inputs: dry run again
        screen.query_one("#push-repo", Input).value = "me/tiny-chat"
        await pilot.press("ctrl+e")
        await until(pilot, lambda: not screen.running and screen.planned, what="the dry run again")
        await pilot.press("ctrl+u")
        await until(pilot, lambda: not screen.running and screen.error, timeout=120, what="the upload")
        assert screen.error.startswith("push failed: no Hugging Face token")


@pytest.mark.anyio
async def test_every_run_action_is_in_the_palette(finished, tmp_path):
    from textual.command import CommandPalette
    app = make_app(_cfg(tmp_path, finished))
    async with app.run_test(size=(80, 24)) as pilot:
        titles = {c.title for c in app.get_system_commands(app.screen)}
        for t in ("Chat with this run (Runs: c)", "Export run as GGUF (Runs: e)",
                  "Merge adapter into base (Runs: m)", "Compare generations (Runs: g)",
                  "Serve command (vLLM) (Runs: s)", "Push to the Hub (Runs: p)", "Chat screen (F6)"):
            assert t in titles
        await _open_runs(pilot, app)
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert "Merge adapter into base (m)" in titles and "Chat with this run (c)" in titles
        await pilot.press("f4", "ctrl+p")                  # from the Train screen: on Runs' selection
        await until(pilot, lambda: isinstance(app.screen, CommandPalette), what="the palette")
        await pilot.press(*"serve command", "enter")
        await until(pilot, lambda: isinstance(app.screen, ServeDialog) and app.screen.command,
                    what="the serve dialog from the palette")
        assert app.current_mode == "runs"
        await pilot.press("escape", "ctrl+p")
        await until(pilot, lambda: isinstance(app.screen, CommandPalette), what="the palette")
        await pilot.press(*"export run", "enter")
        await until(pilot, lambda: isinstance(app.screen, ExportScreen), what="the export dialog")


@pytest.mark.anyio
async def test_every_action_of_every_screen_is_in_the_palette(finished, tmp_path):
    """The README's promise: every key of every screen (Dataset, Config, Train, Chat, Runs, the run
    detail, compare runs) is a palette command there, and every run action (chat, export, merge,
    compare generations, serve, push, preference-tune) from any of them."""
    from textual.binding import Binding
    from tui.screens.compare import CompareRunsScreen
    from tui.screens.runs import RUN_ACTIONS
    app = make_app(_cfg(tmp_path, finished))

    def check(where: str) -> None:
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for b in list(app.BINDINGS) + list(app.screen.BINDINGS):
            if isinstance(b, Binding) and b.description and b.action != "quit":   # Quit: Textual's own
                key0 = b.key.split(",")[0]
                assert any(t.endswith((f"({key0})", f"({key0.upper()})")) for t in titles), (where, b.key, titles)
        for key, _, _, title, _ in RUN_ACTIONS:
            assert f"{title} ({key})" in titles or f"{title} (Runs: {key})" in titles, (where, title, titles)

    async with app.run_test(size=(80, 24)) as pilot:
        for key, mode in (("f2", "dataset"), ("f3", "config"), ("f4", "train"), ("f6", "chat"), ("f5", "runs")):
            await pilot.press(key)
            await until(pilot, lambda: app.current_mode == mode, what=mode)
            check(mode)
        await _open_detail(pilot, app, RUN)
        check("run detail")
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, RunDetailScreen), what="the runs list")
        for name in (RUN, FAILED):
            app.screen.query_one("#runs").move_cursor(row=[ri.name for ri in app.screen.runs].index(name))
            await pilot.press("space")
        await pilot.press("v")
        await until(pilot, lambda: isinstance(app.screen, CompareRunsScreen), what="compare runs")
        check("compare runs")


# ---- every screen and dialog at 80x24 ----------------------------------------------------------
async def _check_footer(pilot, app, where: str) -> None:
    """Each key the footer should show is on the bottom line, with its label, not cut."""
    bottom = (await settled(pilot, app)).splitlines()[-1]
    keys = footer_keys(app)
    assert keys, where
    for item in keys:
        assert item in bottom, f"{where}: footer lacks {item!r}: {bottom!r}"


async def _check_path_end(pilot, app, tail: str, where: str) -> None:
    text = await settled(pilot, app)
    assert tail in text, f"{where}: no {tail!r} on screen:\n{text}"


LIVE = "20260101-140000-live"


@pytest.fixture
def walk_runs(finished):
    """The module's runs plus, for this test only, a live run (its writer a stand-in process that
    this test starts and ends) and the failed run's config asking for the model's own code."""
    import shutil
    import subprocess
    from engine.core import config as config_mod
    from engine.core import rundir
    from tui.testing import write_run
    failed_cfg = finished / FAILED / "config.toml"
    saved = failed_cfg.read_text()
    cfg = config_mod.load(failed_cfg)
    cfg.model.trust_remote_code = True
    config_mod.save(cfg, failed_cfg)
    live = write_run(finished, LIVE, steps=60, finished=False, stop_at=5)
    (live / "config.toml").write_text(saved)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    rundir.write_pid(live, writer.pid)
    try:
        yield finished
    finally:
        writer.kill()
        writer.wait()
        shutil.rmtree(live)
        failed_cfg.write_text(saved)


@pytest.mark.anyio
async def test_walk_every_screen_and_dialog_at_80x24(walk_runs, tmp_path):
    """A long runs path and a long data path, a failed run with a long error, a finished run and a
    live one: every screen's footer shows its keys whole and every path keeps its end; every dialog
    (export, merge, compare, serve, push, resume, load, save as, the model's own code, quit) says
    its keys."""
    from textual.widgets import DataTable
    from tui.dialogs import PathPrompt, QuitDialog, RemoteCodeDialog, ResumeFixDialog
    from tui.screens.compare import CompareRunsScreen
    finished = walk_runs
    data = finished.parent / "the-walk-data-with-a-long-name.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(20)))
    app = make_app(demo_cfg(tmp_path, f'output.dir="{finished}"', f'data.train="{data}"'))
    async with app.run_test(size=(80, 24)) as pilot:
        for key, mode in (("f2", "dataset"), ("f3", "config"), ("f4", "train"), ("f6", "chat"),
                          ("f5", "runs")):
            await pilot.press(key)
            await until(pilot, lambda: app.current_mode == mode, what=mode)
            await pilot.pause(0.3)
            await _check_footer(pilot, app, mode)
            if mode == "dataset":            # the data file's path keeps its end
                await until(pilot, lambda: app.screen.report is not None and app.screen.report.done,
                            what="the dataset report")
                await _check_path_end(pilot, app, "/the-walk-data-with-a-long-name.jsonl", "dataset header")
                assert LONG[:20] not in screen_text(app)
            if mode == "config":             # save as: a path prompt that says its keys
                await pilot.press("ctrl+s")
                await until(pilot, lambda: isinstance(app.screen, PathPrompt), what="the save-as prompt")
                text = await settled(pilot, app)
                assert "Save config as" in text and "enter: ok   esc: cancel" in text, text
                await pilot.press("escape")
                await until(pilot, lambda: app.current_mode == "config" and not isinstance(app.screen, PathPrompt),
                            what="back to the config")
        await until(pilot, lambda: len(getattr(app.screen, "runs", [])) == 3, what="the three runs")
        await pilot.pause(0.3)
        runs_screen = app.screen
        await _check_path_end(pilot, app, "/runs", "runs header")           # the runs folder keeps its end
        assert LONG[:20] not in screen_text(app)               # ...shortened in the middle
        text = await settled(pilot, app)
        where = next(ln for ln in text.splitlines() if "runs in " in ln)
        assert where.rstrip().endswith("^p all actions") and "/runs" in where   # whole, path end kept
        assert "tiny" in text and "failed" in text and "space mark" in text
        # the finished run's detail: its adapter path keeps its end
        table = runs_screen.query_one("#runs", DataTable)
        names = [ri.name for ri in runs_screen.runs]
        table.move_cursor(row=names.index(RUN))
        await _enter_detail(pilot, app, "the finished run's detail")
        await _check_footer(pilot, app, "run detail")
        await _check_path_end(pilot, app, f"{RUN}/adapter", "run detail")
        dialogs = [("e", ExportScreen, "(ctrl+e)"), ("m", MergeDialog, "(ctrl+e)"),
                   ("g", CompareDialog, "(ctrl+e)"), ("s", ServeDialog, "ctrl+y"),
                   ("p", PushDialog, "(ctrl+u)")]
        for key, cls, says in dialogs:
            await pilot.press(key)
            await until(pilot, lambda: isinstance(app.screen, cls), what=cls.__name__)
            await pilot.pause(0.3)
            text = await settled(pilot, app)
            assert says in text, f"{cls.__name__} does not say {says}:\n{text}"
            assert RUN in text, f"{cls.__name__}: the run's name is cut:\n{text}"
            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, RunDetailScreen), what="back")
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is runs_screen, what="the runs list")
        # the failed run: its long error in the detail (cut at the end, never mid-path), resume dialog
        table.move_cursor(row=names.index(FAILED))
        await _enter_detail(pilot, app, "the failed run's detail")
        await _check_footer(pilot, app, "failed run detail")
        assert "CUDA out of memory while allocating" in await settled(pilot, app)
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ResumeFixDialog), what="the resume dialog")
        assert "CUDA out of memory" in await settled(pilot, app)
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, RunDetailScreen), what="back")
        await pilot.press("escape", "ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, PathPrompt), what="the load prompt")
        await pilot.press("escape")
        # chat on the finished run, at 80x24: its adapter path keeps its end
        table.move_cursor(row=names.index(RUN))
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.model is not None,
                    what="the chat")
        await _check_footer(pilot, app, "chat")
        await _check_path_end(pilot, app, f"{RUN}/adapter", "chat status")
        # compare the finished and the failed run
        await pilot.press("f5")
        await until(pilot, lambda: app.screen is runs_screen, what="the runs list")
        for name in (RUN, FAILED):
            table.move_cursor(row=names.index(name))
            await pilot.press("space")
        await pilot.press("v")
        await until(pilot, lambda: isinstance(app.screen, CompareRunsScreen) and app.screen.differences,
                    what="the comparison")
        await _check_footer(pilot, app, "compare runs")
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is runs_screen, what="the runs list")
        # the failed run asks for the model's own code: resume, then the confirmation; no starts nothing
        table.move_cursor(row=names.index(FAILED))
        await _enter_detail(pilot, app, "the failed run's detail")
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ResumeFixDialog), what="the resume dialog")
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, RemoteCodeDialog), what="the remote-code dialog")
        text = await settled(pilot, app)
        for says in ("Resuming this run will run Python code", "(y)", "(n)", "builtin:tiny"):
            assert says in text, f"the remote-code dialog lacks {says!r}:\n{text}"
        await pilot.press("n")
        await until(pilot, lambda: not isinstance(app.screen, RemoteCodeDialog), what="no")
        assert app.run_state is None or not app.run_state.live
        if isinstance(app.screen, RunDetailScreen):
            await pilot.press("escape")
        await until(pilot, lambda: app.screen is runs_screen, what="the runs list")
        # the live run: attached, the Train footer offers Stop and Detach; quit asks first
        table.move_cursor(row=names.index(LIVE))
        await pilot.press("a")
        await until(pilot, lambda: app.current_mode == "train" and app.run_state is not None
                    and app.run_state.live, what="the live run attached")
        await _check_footer(pilot, app, "train, live run")
        bottom = (await settled(pilot, app)).splitlines()[-1]
        assert "Stop" in bottom and "Detach" in bottom, bottom
        await pilot.press("ctrl+q")
        await until(pilot, lambda: isinstance(app.screen, QuitDialog), what="the quit dialog")
        text = await settled(pilot, app)
        for says in (LIVE, "Stop (s)", "Detach (d)", "Cancel (esc)", "qlora-tui attach"):
            assert says in text, f"the quit dialog lacks {says!r}:\n{text}"
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, QuitDialog), what="cancel")
        assert app.is_running
        await pilot.press("ctrl+d")
        await until(pilot, lambda: not app.run_state.live, what="detached")
