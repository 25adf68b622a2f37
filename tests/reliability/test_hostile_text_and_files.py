"""Hostile text and files: escape codes never reach the terminal, no code runs
without consent, private run files, one writer per run, no traceback on damaged files or bad
values, bounded memory. Real processes, real files with the hostile bytes in them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reliability_helpers import REPO, cli, engine_cmd, env_with
from tui_helpers import anyio_backend, plain  # noqa: F401 (fixtures)

# a terminal title change (OSC), clear screen (CSI), BEL, the 8-bit CSI and a bidi override
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x9b1m \u202eevil\u202c \x07"
RAW = ("\x1b", "\x07", "\x9b", "\u202e", "\u202c")


def assert_no_raw(text: str) -> None:
    for ch in RAW:
        assert ch not in text, f"raw {ch!r} reached the terminal: {text[:300]!r}"


def hostile_jsonl(path: Path, n: int = 6) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"hello {i}"},
                          {"role": "assistant", "content": f"fine {i}"}]} for i in range(n)]
    rows[2]["messages"][1]["content"] = "answer " + HOSTILE
    rows[4] = {"messages": rows[4]["messages"], "k\x1b[2Jey": 1}
    rows[5] = {"messages": rows[5]["messages"], "k\x1b[2Jey": 2}      # the same name again: line 6 too
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cli_output_of_untrusted_text_is_sanitised(tmp_path, capsys):
    data = hostile_jsonl(tmp_path / "hostile.jsonl")
    for args in (["--show", "3"], ["--show-line", "3"], ["--show", "3", "--color", "always"], []):
        r = cli(capsys, "inspect", data, "--model", "builtin:tiny", *args)
        assert r.returncode == 0, r.stderr
        ours = ("\x1b[1;32m", "\x1b[0m", "\x1b[2m", "\x1b[7m")   # --color always: our own codes only
        out = r.stdout
        for code in ours:
            out = out.replace(code, "")
        assert_no_raw(out + r.stderr)
        if args:
            assert "␛]0;pwned␇" in r.stdout and "⟨U+202E⟩evil" in r.stdout
    # the summary reports those rows as a problem of their own, by line (text and field name)
    assert "line 3: [control_chars] ANSI escape sequence and bidi override" in r.stdout
    assert "line 5: [control_chars]" in r.stdout and "k␛[2Jey" in r.stdout
    r = cli(capsys, "inspect", data, "--model", "builtin:tiny", "--json")
    assert_no_raw(r.stdout)
    doc = json.loads(r.stdout)                  # escapes, not glyphs: the JSON stays exact
    assert [p["line"] for p in doc["problems"] if p["kind"] == "control_chars"] == [3, 5, 6]
    assert "k\x1b[2Jey" in doc["format"]["fields_seen"]
    # an error message quoting a hostile path
    bad = tmp_path / "x\x1b[2Jy.jsonl"
    r = cli(capsys, "inspect", bad, "--model", "builtin:tiny")
    assert r.returncode == 2 and "x␛[2Jy" in r.stderr
    assert_no_raw(r.stdout + r.stderr)


def test_sanitiser_table():
    from engine.core.safe_text import json_dumps, visible
    assert visible("a\tb\nc") == "a\tb\nc"
    assert visible("\x1b[2J\x07\r\x00\x7f") == "␛[2J␇␍␀␡"
    assert visible("\x9b\u202e\u2066\udcff") == "⟨U+009B⟩⟨U+202E⟩⟨U+2066⟩\ufffd"
    assert json.loads(json_dumps({"k\u202e": "\x9b\udcff"[:1]})) == {"k\u202e": "\x9b"}
    from tui.safe import clean                   # the TUI shows the same glyphs
    assert clean("\x1b\u202e\t") == "␛⟨U+202E⟩    "


# ---------------------------------------------------------------- 1. remote code before consent

def evil_model(src: Path, dst: Path, marker: Path, *, arch: bool = True, tokenizer: bool = True) -> Path:
    """A copy of ``src`` whose tokenizer (and architecture) exist only as shipped Python files
    that leave ``marker`` behind when imported."""
    import shutil
    shutil.copytree(src, dst)
    (dst / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'a').write('tokenizer ')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    (dst / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'a').write('model ')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    if tokenizer:
        tc = json.loads((dst / "tokenizer_config.json").read_text())
        tc.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
        (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    if arch:
        conf = json.loads((dst / "config.json").read_text())
        conf.update(model_type="evil_llama", architectures=["EvilForCausalLM"],
                    auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                              "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
        (dst / "config.json").write_text(json.dumps(conf))
    return dst



@pytest.fixture
def fresh_consent():
    from engine.models.consent import _consent
    saved = dict(_consent, granted=set(_consent["granted"]))
    yield
    _consent.clear()
    _consent.update(saved)


@pytest.mark.anyio
async def test_no_model_code_runs_before_consent_in_the_tui(tmp_path, monkeypatch, fresh_consent):
    from engine.core import config
    from tui_helpers import demo_cfg, make_app, until
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    from engine.models.source import model_path
    marker = tmp_path / "CODE_RAN"
    src = Path(model_path(config.load(None)))
    model = evil_model(src, tmp_path / "evil", marker, arch=False)   # only the tokenizer is code
    app = make_app(demo_cfg(tmp_path, f'model.name="{model}"', "model.trust_remote_code=true"))
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f2")
        summary = lambda: plain(app.screen.query_one("#ds-summary"))   # noqa: E731
        await until(pilot, lambda: "shipped with the model" in summary(), timeout=120, what="refusal")
        assert "confirm" in summary() and "token counts" in summary()
        await pilot.press("f3")
        await until(pilot, lambda: getattr(app.screen, "form_ready", False), what="config form")
        await pilot.pause(0.5)
        assert not marker.exists()
    assert not marker.exists()


def test_no_model_code_runs_without_consent_on_the_cli(tmp_path, capsys, fresh_consent):
    from engine.core import config
    from engine.models.source import model_path
    marker = tmp_path / "CODE_RAN"
    model = evil_model(Path(model_path(config.load(None))), tmp_path / "evil", marker)
    data = hostile_jsonl(tmp_path / "d.jsonl")
    r = cli(capsys, "inspect", data, "--model", model)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "model.trust_remote_code = true" in r.stderr, r.stderr
    assert not marker.exists()


def test_import_axolotl_says_remote_code_and_never_overwrites_its_input(tmp_path, capsys):
    y = tmp_path / "ax.yml"
    original = "base_model: builtin:tiny\ntrust_remote_code: true\nadapter: qlora\nload_in_4bit: true\n"
    y.write_text(original)
    r = cli(capsys, "import-axolotl", y)
    assert r.returncode == 0 and "trust_remote_code: true carried over" in r.stdout
    r = cli(capsys, "import-axolotl", y, "-o", y, "--force")
    assert r.returncode == 1 and "Axolotl config itself" in r.stderr and y.read_text() == original
    d = tmp_path / "outdir"
    d.mkdir()
    r = cli(capsys, "import-axolotl", y, "-o", d, "--force")
    assert r.returncode == 1 and "is a directory" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ax.yml", "outdir"] and not any(d.iterdir())


def test_preflight_refuses_a_shipped_tokenizer_over_a_builtin_architecture(tiny_cfg, tmp_path, fresh_consent):
    from engine.training import runner
    from reliability_helpers import configured
    from engine.models.source import model_path
    marker = tmp_path / "CODE_RAN"
    model = evil_model(Path(model_path(tiny_cfg)), tmp_path / "evil", marker, arch=False)
    cfg = configured(tiny_cfg, {"model.name": str(model)})
    with pytest.raises(runner.PreflightError, match="tokenizer is Python code shipped with the model"):
        runner.preflight(cfg)
    assert not marker.exists() and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- 3-6. one private writer per run

def crashed_run(cfg, runs: Path) -> Path:
    """A run directory as a kill -9 before the first checkpoint leaves it."""
    from engine.core import config
    from engine.core import events as events_mod
    from engine.core import rundir
    from engine.training import runner
    d = rundir.create(runs, "crashed")
    config.save(runner.absolutise(cfg), d / rundir.CONFIG)
    (d / rundir.EVENTS).write_text(events_mod.dumps(events_mod.RunStarted(run_dir=str(d), total_steps=cfg.train.max_steps)) + "\n")
    return d


def assert_private(run_dir: Path) -> None:
    import stat
    for p in [run_dir, *run_dir.rglob("*")]:
        if p.is_symlink():
            continue
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, f"{p} is {oct(mode)}"
        assert mode & 0o700 == (0o700 if p.is_dir() else 0o600) or not p.is_dir(), f"{p} is {oct(mode)}"


def test_one_writer_per_run_two_real_processes_detach_and_a_prompt_stop(tiny_cfg, tmp_path, capsys,
                                                                       monkeypatch):
    from engine.core import control as ctl
    from engine.core import rundir
    from reliability_helpers import configured, events, step_numbers, terminal, wait_for, ENGINE
    # 2,000 steps of 0.6 s: the winner is still training whenever the loser's check lands, however
    # slowly the loser starts on a loaded box (it is stopped after 2 steps, so this costs ~1 s)
    cfg = configured(tiny_cfg, {"train.max_steps": 2000, "train.save_steps": 0, "train.eval_steps": 0})
    d = crashed_run(cfg, tmp_path / "runs")
    env = env_with(QLORA_TUI_FAULTS="slow=0.6")
    # two resumes started together: one trains, the other exits 2 with one line
    procs = [subprocess.Popen([*ENGINE, "train", "--resume", str(d), "--headless"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    loser = wait_for(lambda: next((p for p in procs if p.poll() is not None), None), 240, what="the loser")
    winner = next(p for p in procs if p is not loser)
    out, err = loser.communicate()
    assert loser.returncode == 2 and "another process" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    wait_for(lambda: len(step_numbers(d)) >= 2, 240, what="the winner's steps")
    ctl.request(d, "stop")
    _, err = winner.communicate(timeout=240)
    assert winner.returncode == 3, err[-2000:]             # exitcodes.STOPPED: distinct from completed
    first = terminal(d).step
    # a detached resume, and a stop sent right after it started: carried out, not taken as stale
    monkeypatch.setenv("QLORA_TUI_FAULTS", "slow=0.3")
    r = cli(capsys, "train", "--resume", d, "--detach")
    assert r.returncode == 0, r.stderr
    ctl.request(d, "stop")
    r2 = cli(capsys, "train", "--resume", d, "--detach")       # the first one's child writes it
    assert r2.returncode == 2 and len(r2.stderr.strip().splitlines()) == 1, r2.stderr
    assert "d.toml" not in r2.stdout and str(d) not in r2.stdout
    wait_for(lambda: len([e for e in events(d) if e.type == "run_finished"]) == 2, 240, what="the stop")
    fin = terminal(d)
    assert fin.stopped and first < fin.step < 2000, fin
    assert step_numbers(d) == list(range(1, fin.step + 1))
    wait_for(lambda: not rundir.process_alive(d), 60, what="the child's exit")
    assert_private(d)                      # events, config, stdout.log, checkpoints, adapter, control


def test_resume_refusals_are_one_line_exit_2(tiny_cfg, tmp_path, capsys):
    from engine.core import events as events_mod
    from engine.core import rundir
    d = crashed_run(tiny_cfg, tmp_path / "runs")
    with open(d / rundir.EVENTS, "a") as fh:
        fh.write(events_mod.dumps(events_mod.RunFinished(step=12)) + "\n")           # a finished run
    cases = [([], "finished"), (["--set", "lora.r=4"], "cannot change on resume"),
             (["--set", "train.learning_rate=fast"], "train.learning_rate")]
    for extra, needle in cases:
        r = cli(capsys, "train", "--resume", d, "--headless", *extra)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
        # one line (a config problem: the file's line, then the problem, as every command says it)
        assert len(r.stderr.strip().splitlines()) == (2 if "learning_rate" in needle else 1), r.stderr
    (d / rundir.CONFIG).write_bytes(b"[train\nmax_steps = \xff\n")          # corrupt config.toml
    r = cli(capsys, "train", "--resume", d, "--headless")
    assert r.returncode == 2 and "config.toml" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_damaged_run_files_are_listed_as_damaged_never_a_traceback(tiny_cfg, tmp_path, capsys):
    from engine.core import events as events_mod
    from engine.core import rundir
    runs = tmp_path / "runs"
    good = crashed_run(tiny_cfg, runs)
    torn = crashed_run(tiny_cfg, runs)
    with open(torn / rundir.EVENTS, "ab") as fh:       # a kill inside a multi-byte character, then junk
        fh.write(b'[1]\n{"type": "step", "step": "x"}\n\xff\xfe\n' + events_mod.dumps(events_mod.Step(step=1, loss=2.0)).encode()
                 + b"\n" + '{"type": "status", "message": "caf\u00e9'.encode()[:-1])
    (torn / rundir.RUN_JSON).write_text('["not", "an", "object"]')
    dirlog = crashed_run(tiny_cfg, runs)
    (dirlog / rundir.EVENTS).unlink()
    (dirlog / rundir.EVENTS).mkdir()                   # events.jsonl that is a directory
    (dirlog / rundir.RUN_JSON).write_text('"pid"')
    r = cli(capsys, "runs", "--dir", runs)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = {ln.split()[-1] if "(" not in ln else ln.split("  (")[0].split()[-1]: ln
             for ln in r.stdout.splitlines()[1:]}
    assert lines[str(good)].startswith("crashed") and lines[str(torn)].startswith("crashed")
    assert "1/" in lines[str(torn)]
    assert lines[str(dirlog)].startswith("damaged") and "events.jsonl cannot be read" in lines[str(dirlog)]
    for d in (torn, dirlog):
        r = cli(capsys, "stop", d)
        assert r.returncode == 1 and "no live run" in r.stderr and "Traceback" not in r.stderr
    assert [e.step for e in events_mod.read_events(torn / rundir.EVENTS) if e.type == "step"] == [1]
    assert list(events_mod.follow(torn / rundir.EVENTS, until_terminal=False, alive=lambda: False, poll=0.01))


# ---------------------------------------------------------------- 8. disk full: the last word is always written

def _run_with_faults(cfg, monkeypatch, faults: str):
    from engine.core import faults as faults_mod
    from engine.training import runner
    monkeypatch.setenv("QLORA_TUI_FAULTS", faults)
    faults_mod.DISK_FULL.clear()
    run = runner.Run(cfg)
    run.start()
    assert run.join(timeout=300)
    faults_mod.DISK_FULL.clear()
    return run


def _log_lines(run_dir: Path) -> list[dict]:
    raw = (run_dir / "events.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(l) for l in raw.decode("utf-8").splitlines()]     # every line whole


@pytest.mark.parametrize("fault,step", [("markerfull@6", 6), ("logfull@4", 4)])
def test_disk_full_in_the_marker_or_the_log_ends_failed_disk_with_a_whole_last_line(
        tiny_cfg, monkeypatch, capfd, fault, step):
    from engine.core import events as events_mod
    from engine.core import rundir
    from reliability_helpers import configured
    cfg = configured(tiny_cfg, {"train.max_steps": 10, "train.save_steps": 3, "train.eval_steps": 0})
    run = _run_with_faults(cfg, monkeypatch, fault)
    lines = _log_lines(run.run_dir)
    last = lines[-1]
    assert last["type"] == "run_failed" and last["kind"] == "disk", last
    assert [l for l in lines if l["type"] in ("run_failed", "run_finished")] == [last]
    assert rundir.info(run.run_dir).state == "failed"
    ck = [p.name for p in rundir.checkpoints(run.run_dir)]
    assert not (run.run_dir / "checkpoints" / "checkpoint-6").exists() or "checkpoint-6" in ck
    if fault.startswith("marker"):     # the half-written checkpoint is gone, the previous one kept
        assert ck == ["checkpoint-3"] and "checkpoint-3 kept" in last["reason"]
    else:                              # the log failed: said on stderr and to the other sinks, run stopped
        assert "events.jsonl writer failed" in capfd.readouterr().err
        assert any(isinstance(e, events_mod.RunWarning) and e.source == "sink" and "events.jsonl writer failed"
                   in e.message for e in run.bus.history)
        assert "events.jsonl could not be written" in last["reason"] and last["step"] < 10
    assert not (run.run_dir / "events.reserve").exists()


# ---------------------------------------------------------------- 9-10. bad data and values: one line

def _bad_files(tmp_path: Path) -> dict:
    f = {}
    for name, raw in {"junk.parquet": b"PAR1junk", "empty.parquet": b"",
                      "latin1.json": b'[{"text": "caf\xe9"}]', "latin1.csv": b"text\nok\ncaf\xe9\n",
                      "latin1.jsonl": b'{"text": "caf\xe9"}\n'}.items():
        (tmp_path / name).write_bytes(raw)
        f[name] = tmp_path / name
    return f


def test_bad_files_and_values_are_one_line_never_a_traceback(tmp_path, capsys, tiny_cfg):
    files = _bad_files(tmp_path)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    expect = {"junk.parquet": "not a readable parquet file", "empty.parquet": "not a readable parquet file",
              "latin1.json": "not UTF-8 text (byte 0xE9 at line 1)",
              "latin1.csv": "not UTF-8 text (byte 0xE9 at line 3)"}
    for name, needle in expect.items():
        for argv in (["inspect", files[name], "--model", "builtin:tiny"],
                     ["train", "--headless", "--set", f'data.train="{good}"', "--set", f'data.eval="{files[name]}"']):
            r = cli(capsys, *argv)
            assert r.returncode == 2 and needle in r.stderr and str(files[name]) in r.stderr, (argv, r.stderr)
            assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # a JSONL line that is not UTF-8 is a problem of that line, not of the file
    r = cli(capsys, "inspect", files["latin1.jsonl"], "--model", "builtin:tiny")
    assert r.returncode == 2 and "line 1" in r.stderr
    # BOMs are accepted (TOML, CSV, JSONL)
    (tmp_path / "bom.toml").write_bytes(b'\xef\xbb\xbf[model]\nname = "builtin:tiny"\n')
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext\nhello\n")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "hello"}\n')
    for data in ("bom.csv", "bom.jsonl"):
        r = cli(capsys, "inspect", tmp_path / data, "--config", tmp_path / "bom.toml")
        assert r.returncode == 0 and "rows: 1 usable of 1" in r.stdout, r.stdout + r.stderr
    # values that used to pass preflight and fail as a run
    for override, needle in ((["train.seed=4294967296"], "train.seed"),
                             (['model.chat_template="/no/such/template.jinja"'], "no such file"),
                             (['model.chat_template="{% if %}"'], "TemplateSyntaxError")):
        r = cli(capsys, "train", "--headless", "--set", f'data.train="{good}"',
                "--set", f'output.dir="{tmp_path / "runs"}"', *sum((["--set", o] for o in override), []))
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()
    # init and estimate arguments
    d = tmp_path / "adir"
    d.mkdir()
    for argv, needle in ((["init", tmp_path / "missing" / "x.toml"], "does not exist"),
                         (["init", d, "--force"], "is a directory")):
        r = cli(capsys, *argv)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    for bad in ("nan", "inf", "1e308", "-1"):
        r = cli(capsys, "estimate", "--gpu-mem", bad)
        assert r.returncode == 2 and "give the GPU's memory in GiB" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- 11. bounded memory

MEMORY_BOUND_MIB = 2048        # docs/INSPECT.md: inspect stays under 2 GiB whatever one row holds


def test_inspect_memory_is_bounded_for_huge_rows(tmp_path):
    """A 10 MB row is measured from a prefix; a row over the 16 MiB limit is a problem of its
    line; the inspect process's peak RSS stays under the stated bound."""
    import random
    random.seed(0)
    words = ["alpha", "beta", "gamma", "delta", "token", "hello", "world", "x"]
    big = " ".join(random.choice(words) for _ in range(10_000_000 // 6))
    data = tmp_path / "huge.jsonl"
    with open(data, "w") as fh:
        for i in range(4):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                              {"role": "assistant", "content": f"a{i}"}]}) + "\n")
        fh.write(json.dumps({"messages": [{"role": "user", "content": big},
                                          {"role": "assistant", "content": "ok"}]}) + "\n")
        fh.write(json.dumps({"text": big + big + big[:1_000_000]}) + "\n")      # > 16 MiB
    probe = ("import json, resource, subprocess, sys\n"
             "r = subprocess.run([sys.executable, '-m', 'engine', 'inspect', sys.argv[1], '--model', "
             "'builtin:tiny', '--json'], capture_output=True, text=True)\n"
             "print(json.dumps({'rc': r.returncode, 'out': r.stdout, 'err': r.stderr[-2000:], "
             "'peak_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n")
    res = json.loads(subprocess.run([sys.executable, "-c", probe, str(data)], capture_output=True, text=True,
                                    cwd=REPO, env=env_with(), timeout=600).stdout)
    assert res["rc"] == 0, res["err"]
    assert res["peak_mib"] < MEMORY_BOUND_MIB, res["peak_mib"]
    doc = json.loads(res["out"])
    assert [(p["line"], p["kind"]) for p in doc["problems"] if p["kind"] == "row_too_large"] == [(6, "row_too_large")]
    assert doc["rows"]["usable"] == 5 and doc["tokens"]["truncated_rows"] == 1
    assert doc["tokens"]["stats"]["max"] > 1_000_000        # the long row's length, measured by scaling


# ---------------------------------------------------------------- smaller ones

def test_smaller_refusals(tmp_path, capsys):
    from engine.core import config
    from engine.training.hints import nan_hint
    msgs = tmp_path / "msgs.jsonl"
    msgs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(40)))
    # a format forced onto rows of another: zero usable rows is a problem that says what they look like
    r = cli(capsys, "inspect", msgs, "--model", "builtin:tiny", "--set", 'data.format="alpaca"', "--strict")
    assert r.returncode == 1 and "rows: 0 usable of 40" in r.stdout, r.stdout
    assert "[mixed_format]" in r.stdout and "look like messages" in r.stdout
    r = cli(capsys, "train", "--headless", "--set", f'data.train="{msgs}"', "--set", 'data.format="alpaca"',
            "--set", f'output.dir="{tmp_path / "runs"}"')
    assert r.returncode == 2 and "look like messages" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # max_steps = 0 trains nothing: refused
    r = cli(capsys, "train", "--headless", "--set", "train.max_steps=0", "--set", f'data.train="{msgs}"')
    assert r.returncode == 2 and "train.max_steps" in r.stderr
    # an extreme lora.alpha is blamed, not the learning rate
    h = nan_hint(1, float("nan"), None, config.load(None, ["lora.alpha=1e308"]))
    assert "lora.alpha" in h.cause and "learning rate" not in h.cause and "lora.alpha" in h.fix
    # merge checks --out before loading anything
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli(capsys, "merge", tmp_path / "no-such-run", "--out", blocker / "merged")
    assert r.returncode != 0 and "cannot write there" in r.stderr, r.stderr
    # the TUI refuses to start without a terminal
    p = subprocess.run([sys.executable, "-m", "tui"], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, cwd=tmp_path, env=env_with(), timeout=120)
    assert p.returncode == 2 and "needs a terminal" in p.stderr and "--headless" in p.stderr, p.stderr
