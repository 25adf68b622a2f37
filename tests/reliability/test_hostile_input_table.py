"""Hostile input as a table: a probe's cases as a table, so the next probe starts
from them. Each row is a command line run on real hostile files (FIFOs, /dev/zero, links to it,
damaged runs, "billion laughs" YAML, rows nested 100,000 deep, empty arguments) and the
behaviour it must show: its exit status, the one line it says, no traceback, no hang.

The table runs in ONE child process (one Python start-up for every row): each row is the CLI
called in that process under an alarm (a row that hangs is reported as hung, the others still
run) and a cap on the data segment (a row that reads without bound ends in MemoryError, which
the row reports). Classes that need processes of their own (closed pipes, a run's writer that is
still exiting, detach) or real outputs (merge, export, push) are tests of their own below.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reliability_helpers import ENGINE, cli, env_with

# ---------------------------------------------------------------------------- the table
# (id, argv, expected exit status, [substrings of stdout+stderr], stderr is one line)
# placeholders: {t} the scratch folder, {fifo} a FIFO, {zero} /dev/zero, {R} a runs folder
# holding one healthy run and damaged ones, {good} a healthy data file
ZERO = "/dev/zero"
TABLE = [
    # 1. unbounded reads: every file the program reads is a regular file of sane size
    ("import-axolotl-dev-zero", ["import-axolotl", ZERO], 1, ["/dev/zero: not a regular file (a device)"], True),
    ("import-axolotl-fifo", ["import-axolotl", "{t}/fifo.yml"], 1, ["not a regular file (a FIFO)"], True),
    ("import-axolotl-link-to-zero", ["import-axolotl", "{t}/zero.yml"], 1, ["not a regular file (a device)"], True),
    ("import-axolotl-huge", ["import-axolotl", "{t}/huge.yml"], 1, ["too large", "the limit is 4 MiB"], True),
    ("train-config-dev-zero", ["train", ZERO, "--headless"], 2, ["not a regular file (a device)"], False),
    ("train-config-fifo", ["train", "{t}/fifo.toml", "--headless"], 2, ["not a regular file (a FIFO)"], False),
    ("train-detach-config-fifo", ["train", "{t}/fifo.toml", "--detach"], 2, ["not a regular file (a FIFO)"], False),
    ("estimate-config-zero-link", ["estimate", "{t}/zero.toml"], 2, ["not a regular file (a device)"], False),
    ("estimate-config-huge", ["estimate", "{t}/huge.toml"], 2, ["too large"], False),
    ("inspect-config-fifo", ["inspect", "{good}", "--config", "{t}/fifo.toml"], 2, ["not a regular file (a FIFO)"], False),
    ("runs-config-fifo", ["runs", "{t}/fifo.toml"], 2, ["not a regular file (a FIFO)"], False),
    ("inspect-data-fifo", ["inspect", "{t}/fifo.jsonl", "--model", "builtin:tiny"], 2, ["not a regular file (a FIFO)"], True),
    ("inspect-data-json-zero-link", ["inspect", "{t}/zero.json", "--model", "builtin:tiny"], 2,
     ["not a regular file (a device)"], True),
    ("inspect-data-csv-fifo", ["inspect", "{t}/fifo.csv", "--model", "builtin:tiny"], 2, ["not a regular file (a FIFO)"], True),
    ("inspect-data-json-sparse-3gib", ["inspect", "{t}/sparse.json", "--model", "builtin:tiny"], 2,
     ["too large to read as one .json document", "save it as .jsonl"], True),
    ("runs-events-sparse-3gib", ["runs", "--dir", "{t}/runs-sparse"], 0,
     ["damaged", "events.jsonl cannot be read (too large"], None),
    ("estimate-model-config-json-fifo", ["estimate", "--set", 'model.name="{t}/model-fifo"'], 2,
     ["not a regular file (a FIFO)"], True),
    ("inspect-model-tokenizer-fifo", ["inspect", "{good}", "--model", "{t}/model-tok-fifo"], 2,
     ["tokenizer_config.json: not a regular file (a FIFO)"], True),
    ("train-detach-model-file-zero", ["train", "--detach", "--set", 'data.train="{good}"', "--set",
                                      'model.name="{t}/model-tok-zero"', "--set", 'output.dir="{t}/runs-x"'], 2,
     ["tokenizer.json: not a regular file (a device)"], True),
    ("train-data-fifo", ["train", "--headless", "--set", 'data.train="{t}/fifo.jsonl"', "--set", 'output.dir="{t}/runs-x"'],
     2, ["not a regular file (a FIFO)"], True),
    ("train-chat-template-fifo", ["train", "--headless", "--set", 'data.train="{good}"', "--set",
                                  'model.chat_template="{t}/fifo.jinja"', "--set", 'output.dir="{t}/runs-x"'],
     2, ["model.chat_template", "not a regular file (a FIFO)"], True),
    ("tui-config-zero-link", ["@tui", "{t}/zero.toml"], 2, ["not a regular file (a device)"], False),
    ("tui-attach-fifo-config", ["@tui", "attach", "{R}/fifo-config"], 2, [], None),
    # 2. damaged runs: listed as damaged with the reason, quickly; the others keep working
    ("runs-lists-damaged-and-healthy", ["runs", "--dir", "{R}"], 0,
     ["damaged", "events.jsonl cannot be read (not a regular file (a FIFO)",
      "events.jsonl cannot be read (not a regular file (a device)", "crashed"], None),
    ("stop-events-fifo", ["stop", "{R}/events-fifo"], 1, ["no live run there (state: damaged)"], True),
    ("stop-events-zero", ["stop", "{R}/events-zero"], 1, ["no live run there (state: damaged)"], True),
    ("save-run-json-fifo", ["save", "{R}/runjson-fifo"], 1, ["no live run there (state: crashed)"], True),
    ("resume-events-fifo", ["train", "--resume", "{R}/events-fifo", "--headless"], 2,
     ["cannot resume", "not a regular file (a FIFO)"], True),
    ("resume-events-zero", ["train", "--resume", "{R}/events-zero", "--headless"], 2,
     ["cannot resume", "not a regular file (a device)"], True),
    ("resume-detach-events-fifo", ["train", "--resume", "{R}/events-fifo", "--detach"], 2, ["cannot resume"], True),
    ("resume-config-fifo", ["train", "--resume", "{R}/fifo-config", "--headless"], 2, ["not a regular file (a FIFO)"], False),
    # 4. YAML aliases: a budget on what they expand to
    ("yaml-billion-laughs", ["import-axolotl", "{t}/laughs.yml"], 1,
     ["expand to more than 100,000 values", "line "], True),
    ("yaml-recursive-alias", ["import-axolotl", "{t}/recursive.yml"], 1, ["refers to itself"], True),
    ("yaml-deep-nesting", ["import-axolotl", "{t}/deep.yml"], 1, ["nested too deeply"], True),
    ("yaml-few-aliases-still-work", ["import-axolotl", "{t}/aliases.yml"], 0, ["learning_rate = 0.0002"], None),
    # 5. empty and whitespace arguments: refused wherever a path or name is expected
    *[(f"empty-{i}", argv, 2, ["an empty value"], True) for i, argv in enumerate([
        ["train", "--resume", ""], ["train", "--resume", "  ", "--detach"], ["train", "", "--headless"],
        ["train", "--resume", "\t", "--headless"], ["inspect", ""], ["inspect", "{good}", "--config", ""],
        ["inspect", "{good}", "--model", " "], ["runs", "--dir", ""], ["runs", " "], ["stop", ""], ["save", " "],
        ["merge", "", "--out", "{t}/m"], ["merge", "{R}/events-fifo", "--out", " "], ["export", ""],
        ["export", "{R}/events-fifo", "--out", ""], ["push", "", "me/x"], ["push", "{R}/events-fifo", " "],
        ["import-axolotl", ""], ["import-axolotl", "{t}/aliases.yml", "-o", ""], ["init", ""], ["init", " "],
        ["estimate", ""], ["generate", ""], ["serve-cmd", " "], ["merge", "{R}/events-fifo", "--out", "{t}/m",
                                                                 "--base", ""],
    ])],
    ("empty-attach", ["@tui", "attach", ""], 2, ["an empty RUN_DIR"], True),
    ("empty-output-dir", ["train", "--headless", "--set", 'data.train="{good}"', "--set", 'output.dir=""'], 2,
     ["output.dir", "must name the folder"], False),
    ("blank-eval", ["train", "--detach", "--set", 'data.train="{good}"', "--set", 'data.eval="  "'], 2,
     ["data.eval"], False),
    # 7. deep nesting: a problem of that line; the other rows are read
    ("jsonl-row-nested-100000-deep", ["inspect", "{t}/deep.jsonl", "--model", "builtin:tiny"], 0,
     ["rows: 3 usable of 4", "line 3: [invalid_json] invalid JSON: nested too deeply"], None),
    ("json-file-nested-100000-deep", ["inspect", "{t}/deep.json", "--model", "builtin:tiny"], 2,
     ["line 1", "nested too deeply"], True),
    ("toml-nested-100000-deep", ["estimate", "{t}/deep.toml"], 2, ["nested too deeply"], False),
    # 11. exit statuses and messages
    ("inspect-strict-says-why", ["inspect", "{t}/unterminated.jsonl", "--model", "builtin:tiny", "--strict"], 1,
     ["inspect --strict: 1 problem"], None),
    ("inspect-unterminated-string", ["inspect", "{t}/unterminated.jsonl", "--model", "builtin:tiny"], 0,
     ["line 2: [invalid_json] invalid JSON: Unterminated string"], None),
    ("inspect-json-unterminated-string", ["inspect", "{t}/unterminated.json", "--model", "builtin:tiny"], 2,
     ["Unterminated string"], True),
    ("inspect-show-out-of-range", ["inspect", "{good}", "--model", "builtin:tiny", "--show", "999"], 2,
     ["row 999 out of range"], True),
    ("inspect-show-line-out-of-range", ["inspect", "{good}", "--model", "builtin:tiny", "--show-line", "999"], 2,
     ["line 999 is not a usable row"], True),
    ("runs-dir-nonexistent", ["runs", "--dir", "{t}/no-such-folder"], 2, ["does not exist"], True),
    ("runs-dir-is-a-file", ["runs", "--dir", "{good}"], 2, ["is not a directory"], True),
    ("set-string-field-nan", ["runs", "--set", "output.name=nan", "--set", 'output.dir="{R}"'], 0, ["damaged"], None),
    ("set-string-field-number", ["runs", "--set", "output.name=1e3", "--set", 'output.dir="{R}"'], 0, ["damaged"], None),
]
# "not a regular file" cases say the path they are about
NOT_UNTIL_ALARM = 60            # seconds one row may take before it counts as hung

DRIVER = textwrap.dedent("""
    import io, json, os, resource, signal, sys, traceback
    from contextlib import redirect_stdout, redirect_stderr
    cap = 4 * 2**30              # the data segment: reading /dev/zero whole ends in MemoryError here
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    cases, alarm = json.loads(sys.stdin.read()), int(sys.argv[1])
    from engine import cli as engine_cli
    from tui import cli as tui_cli

    class Hung(BaseException):   # not an Exception: no `except Exception` in the code swallows it
        pass

    def ring(*_):
        raise Hung()
    signal.signal(signal.SIGALRM, ring)
    print("maxrss_mib_at_start", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stderr)
    out = []
    for argv in cases:
        o, e = io.StringIO(), io.StringIO()
        rc, hung = None, False
        signal.setitimer(signal.ITIMER_REAL, alarm, 1)     # again every second until the row ends
        try:
            with redirect_stdout(o), redirect_stderr(e):
                rc = tui_cli.main(argv[1:]) if argv[:1] == ["@tui"] else engine_cli.main(argv)
        except Hung:
            hung = True
        except SystemExit as x:
            rc = x.code
        except BaseException:
            e.write(traceback.format_exc())
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        out.append({"rc": rc, "out": o.getvalue(), "err": e.getvalue(), "hung": hung})
    print("maxrss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stderr)
    print(json.dumps(out), flush=True)
    os._exit(0)                  # the verdicts are out: no interpreter teardown after hostile rows
""")


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _run_dir(runs: Path, name: str) -> Path:
    """A run as a kill -9 before its first checkpoint leaves it (a config and a started log)."""
    from engine.core import config
    from engine.core import events as events_mod
    from engine.core import rundir
    d = runs / name
    d.mkdir(parents=True)
    (d / rundir.CONTROL).mkdir()
    config.save(config.load(None), d / rundir.CONFIG)
    (d / rundir.EVENTS).write_text(events_mod.dumps(events_mod.RunStarted(run_dir=str(d), total_steps=10)) + "\n")
    return d


def _hostile_files(t: Path) -> dict:
    for ext in ("yml", "toml", "jsonl", "csv", "jinja"):
        _fifo(t / f"fifo.{ext}")
    for ext in ("yml", "toml", "json"):
        (t / f"zero.{ext}").symlink_to(ZERO)
    for ext in ("yml", "toml"):
        with open(t / f"huge.{ext}", "wb") as fh:          # sparse: 64 MiB that take no disk
            fh.truncate(64 * 2**20)
    good = t / "good.jsonl"
    row = lambda i: {"messages": [{"role": "user", "content": f"q{i}"},       # noqa: E731
                                  {"role": "assistant", "content": f"a{i}"}]}
    good.write_text("".join(json.dumps(row(i)) + "\n" for i in range(3)))
    deep = "[" * 100_000 + "]" * 100_000
    (t / "deep.jsonl").write_text(json.dumps(row(0)) + "\n" + json.dumps(row(1)) + "\n" + '{"text": ' + deep
                                  + "}\n" + json.dumps(row(2)) + "\n")
    (t / "deep.json").write_text(deep)
    for sparse in (t / "sparse.json", _run_dir(t / "runs-sparse", "planted") / "events.jsonl"):
        with open(sparse, "wb") as fh:                # 3 GiB of zeros that take no disk
            fh.truncate(3 * 2**30)
    (t / "deep.toml").write_text("a = " + deep + "\n")
    (t / "deep.yml").write_text("base_model: " + "[" * 100_000 + "]" * 100_000 + "\n")
    (t / "unterminated.json").write_text('[{"text": "abc\n"}]')
    (t / "unterminated.jsonl").write_text(json.dumps(row(0)) + '\n{"text": "abc\n' + json.dumps(row(1)) + "\n")
    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    (t / "laughs.yml").write_text("base_model: builtin:tiny\n" + "\n".join(levels) + "\n")
    (t / "recursive.yml").write_text("base_model: builtin:tiny\nx: &x [1, *x]\n")
    (t / "aliases.yml").write_text("base_model: builtin:tiny\nlr: &lr 0.0002\nlearning_rate: *lr\n"
                                   "micro_batch_size: 2\n")
    # local models (copies of builtin:tiny) with one file that is a FIFO or a link to /dev/zero
    import shutil
    from engine.core import config
    from engine.models.source import model_path
    tiny = Path(model_path(config.load(None)))
    for name, fname, make in (("model-fifo", "config.json", _fifo), ("model-tok-fifo", "tokenizer_config.json", _fifo),
                              ("model-tok-zero", "tokenizer.json", lambda f: f.symlink_to(ZERO))):
        shutil.copytree(tiny, t / name)
        (t / name / fname).unlink()
        make(t / name / fname)
    # a runs folder: one healthy (crashed) run and damaged ones beside it
    runs = t / "runs"
    _run_dir(runs, "20260101-000000-healthy")
    d = _run_dir(runs, "events-fifo")
    (d / "events.jsonl").unlink()
    _fifo(d / "events.jsonl")
    d = _run_dir(runs, "events-zero")
    (d / "events.jsonl").unlink()
    (d / "events.jsonl").symlink_to(ZERO)
    d = _run_dir(runs, "runjson-fifo")
    _fifo(d / "run.json")
    d = _run_dir(runs, "fifo-config")
    (d / "config.toml").unlink()
    _fifo(d / "config.toml")
    return {"t": str(t), "R": str(runs), "good": str(good)}


@pytest.fixture(scope="module")
def table_results(tmp_path_factory):
    t = tmp_path_factory.mktemp("hostile")
    subs = _hostile_files(t)
    cwd = t / "cwd"
    cwd.mkdir()
    argvs = [[a.format(**subs) for a in argv] for _id, argv, *_ in TABLE]
    p = subprocess.run([sys.executable, "-c", DRIVER, str(NOT_UNTIL_ALARM)], input=json.dumps(argvs),
                       capture_output=True, text=True, cwd=cwd, env=env_with(), timeout=900)
    assert p.returncode == 0 and p.stdout.strip(), (p.returncode, p.stderr[-3000:])
    results = json.loads(p.stdout.strip().splitlines()[-1])
    return dict(zip([c[0] for c in TABLE], results)), subs


def test_no_row_of_the_table_created_anything(table_results):
    """Refused is refused: no run folder where the rows ran (an empty --resume used to start a
    fresh run there), none under output.dir."""
    _results, subs = table_results
    t = Path(subs["t"])
    assert not any((t / "cwd").iterdir()), list((t / "cwd").iterdir())
    assert not (t / "runs-x").exists()


@pytest.mark.parametrize("case", TABLE, ids=[c[0] for c in TABLE])
def test_hostile_input_table(table_results, case):
    results, subs = table_results
    case_id, _argv, rc, needles, one_line = case
    r = results[case_id]
    assert not r["hung"], f"{case_id}: still running after {NOT_UNTIL_ALARM} s"
    text = r["out"] + r["err"]
    assert "Traceback" not in text and "MemoryError" not in text, text[-2000:]
    assert r["rc"] == rc, (r["rc"], text[-2000:])
    for needle in needles:
        assert needle.format(**subs) in text, (needle, text[-2000:])
    if one_line:
        assert len(r["err"].strip().splitlines()) == 1, r["err"]
    if rc:
        assert r["err"].strip(), "a refusal says why on stderr"


# ---------------------------------------------------------------------------- 6. closed pipes

@pytest.mark.parametrize("argv,status", [(["runs", "--dir", "{R}"], 141),
                                         (["inspect", "{good}", "--model", "builtin:tiny"], 141),
                                         (["@tui", "runs", "--dir", "{R}"], 141),
                                         (["init", "--help"], 0)],      # argparse drops its help's write error
                         ids=["runs", "inspect", "qlora-tui-runs", "help"])
def test_a_closed_pipe_ends_quietly(tmp_path, argv, status):
    """`cmd | head` / `cmd | grep -q`: the reader is gone before the first line; the command
    ends with 141 (128 + SIGPIPE, as the shell reports it) and says nothing."""
    runs = tmp_path / "runs"
    for i in range(30):
        _run_dir(runs, f"2026010{i % 9}-0000{i:02d}-r")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(50)))
    argv = [a.format(R=runs, good=good) for a in argv]
    cmd = [sys.executable, "-m", "tui", *argv[1:]] if argv[0] == "@tui" else [*ENGINE, *argv]
    r, w = os.pipe()
    os.close(r)                                     # nobody will ever read
    try:
        p = subprocess.run(cmd, stdout=w, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env_with(),
                           timeout=120)
    finally:
        os.close(w)
    assert p.returncode == status, p.stderr[-2000:]
    assert p.stderr == "", p.stderr[-2000:]


# ---------------------------------------------------------------------------- 8. stop and resume agree

def _exiting_writer(run_dir: Path, seconds: float) -> subprocess.Popen:
    """The run's process, as it is just after its final event: still there (torch's teardown),
    holding the run's lock, gone after ``seconds``."""
    from engine.core import rundir
    code = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(float(sys.argv[2]))\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir / rundir.LOCK), str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    rundir.write_pid(run_dir, p.pid)
    return p


def test_stop_runs_and_resume_agree_on_a_run_that_just_ended(tmp_path, capsys):
    from engine.core import control
    from engine.core import events as events_mod
    from engine.core import rundir
    runs = tmp_path / "runs"
    stopped = _run_dir(runs, "stopped")
    with open(stopped / rundir.EVENTS, "a") as fh:
        fh.write(events_mod.dumps(events_mod.RunFinished(step=3, stopped=True, reason="stopped")) + "\n")
    finished = _run_dir(runs, "finished")
    with open(finished / rundir.EVENTS, "a") as fh:
        fh.write(events_mod.dumps(events_mod.RunFinished(step=10, reason="completed")) + "\n")
    holders = [_exiting_writer(stopped, 30), _exiting_writer(finished, 1.5)]
    try:
        assert rundir.process_alive(stopped) and not rundir.is_live(stopped)
        r = cli(capsys, "runs", "--dir", runs)
        assert r.returncode == 0
        assert all(line.split()[0] in ("stopped", "finished") for line in r.stdout.splitlines()[1:]), r.stdout
        for cmd in ("stop", "save"):                    # what runs says: nothing live to ask
            r = cli(capsys, cmd, stopped)
            assert r.returncode == 1 and "no live run there (state: stopped)" in r.stderr, r.stderr
        assert control.pending(stopped) == []           # no request left behind for a later resume
        # a resume waits for the exiting writer instead of calling it live; what it then says
        # is about the run (finished: nothing to resume), never "still live"
        r = cli(capsys, "train", "--resume", finished, "--detach")
        assert holders[1].poll() is not None, "the resume went on while the old writer held the run"
        assert r.returncode == 2 and "the run finished" in r.stderr and "still live" not in r.stderr, r.stderr
    finally:
        for h in holders:
            h.kill()
            h.wait()


# ---------------------------------------------------------------------------- 9. detach runs the preflight

def test_detach_runs_the_cheap_checks_before_starting(tmp_path, capsys):
    """A missing data file, model or template file, a FIFO as the data: refused by `train --detach`
    before it returns (exit 2, one line, as --headless says it), never "started" then failed 0/0."""
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "hello"}) + "\n")
    runs = tmp_path / "runs"
    base = ["--set", f'output.dir="{runs}"']
    for sets, needle, modes in (
            ([f'data.train="{tmp_path / "missing.jsonl"}"'], "no such file", ("--headless", "--detach")),
            ([f'data.train="{good}"', f'model.name="{tmp_path / "no-model"}"'], "no-model", ("--detach",)),
            ([f'data.train="{good}"', f'model.chat_template="{tmp_path / "t.jinja"}"'], "no such file",
             ("--headless", "--detach")),
            ([f'data.train="{_fifo(tmp_path / "f.jsonl")}"'], "not a regular file (a FIFO)", ("--headless", "--detach"))):
        args = sum((["--set", s] for s in sets), [])
        for mode in modes:               # the same refusal as --headless, one line
            r = cli(capsys, "train", mode, *base, *args)
            assert r.returncode == 2 and needle in r.stderr and "started in the background" not in r.stderr, \
                (mode, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not runs.exists()                            # nothing was started, no run directory


def test_detach_refuses_model_code_without_consent(tmp_path, capsys):
    from engine.core import config
    from engine.models.source import model_path
    from test_hostile_text_and_files import evil_model
    marker = tmp_path / "CODE_RAN"
    model = evil_model(Path(model_path(config.load(None))), tmp_path / "evil", marker)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "hello"}) + "\n")
    r = cli(capsys, "train", "--detach", "--set", f'model.name="{model}"', "--set", f'data.train="{good}"',
            "--set", f'output.dir="{tmp_path / "runs"}"')
    assert r.returncode == 2 and "model.trust_remote_code = true" in r.stderr, r.stderr
    assert not marker.exists() and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- 3 and 10. outputs

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory with an adapter over a local copy of builtin:tiny that sits in a folder
    named qlora-tui (the words of our card in the base's path)."""
    import shutil
    from engine.core import config
    from engine.models.source import model_path
    from outputs_fixtures import make_run_dir
    t = tmp_path_factory.mktemp("outputs")
    base = t / "qlora-tui" / "base"
    shutil.copytree(model_path(config.load(None)), base)
    return make_run_dir(t / "run", base, r=4)


def test_merge_never_deletes_what_it_did_not_create(tiny_run, tmp_path, capsys):
    from engine.outputs.modelcard import is_our_card
    out = tmp_path / "merged"
    theirs = tmp_path / "merged.partial"               # a user's folder with the name of the old staging
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    r = cli(capsys, "merge", tiny_run, "--out", out, "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert (theirs / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.partial"]   # no staging left
    modes = {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len(modes) == 1, {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert is_our_card(out / "README.md")
    # outputs that are refused before any work: a link, a folder with something in it, under a file
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "file").write_text("x")
    for bad, needle in ((tmp_path / "link", "is a symlink"), (theirs, "already exists and is not empty"),
                        (tmp_path / "file" / "m", "cannot write there")):
        before = sorted(p.name for p in tmp_path.iterdir())
        r = cli(capsys, "merge", tiny_run, "--out", bad)
        assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "[  0%]" not in r.stdout, r.stdout
        assert sorted(p.name for p in tmp_path.iterdir()) == before and not any(target.iterdir())
    assert (theirs / "notes.txt").read_text() == "mine"
    # an empty folder the user made for it: kept (same folder) and filled, never replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    inode = mine.stat().st_ino
    r = cli(capsys, "merge", tiny_run, "--out", mine, "--dtype", "fp32")
    assert r.returncode == 0 and mine.stat().st_ino == inode and (mine / "model.safetensors").is_file(), r.stderr
    # a merge that fails after its work began (a base that does not fit the adapter) leaves nothing
    r = cli(capsys, "merge", tiny_run, "--out", tmp_path / "m2", "--base", tmp_path / "no-base")
    assert r.returncode == 1 and not (tmp_path / "m2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], list(tmp_path.iterdir())


def test_init_and_import_write_through_a_file_of_their_own(tmp_path, capsys):
    (tmp_path / "qlora.toml.tmp").write_text("mine")          # the old fixed temporary name
    r = cli(capsys, "init", tmp_path / "qlora.toml")
    assert r.returncode == 0 and (tmp_path / "qlora.toml.tmp").read_text() == "mine"
    y = tmp_path / "ax.yml"
    y.write_text("base_model: builtin:tiny\n")
    (tmp_path / "out.toml.tmp").write_text("mine too")
    r = cli(capsys, "import-axolotl", y, "-o", tmp_path / "out.toml")
    assert r.returncode == 0 and (tmp_path / "out.toml.tmp").read_text() == "mine too"
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text("keep")
    (tmp_path / "link.toml").symlink_to(elsewhere)
    for argv in (["init", tmp_path / "link.toml", "--force"],
                 ["import-axolotl", y, "-o", tmp_path / "link.toml", "--force"]):
        r = cli(capsys, *argv)
        assert r.returncode in (1, 2) and "is a symlink" in r.stderr, r.stderr
        assert elsewhere.read_text() == "keep" and (tmp_path / "link.toml").is_symlink()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_push_dry_run_uploads_our_card_and_no_local_paths(tiny_run, capsys):
    from engine.outputs import modelcard
    adapter = tiny_run / "adapter"
    peft_card = (adapter / "README.md").read_bytes()             # PEFT's placeholder, written by save_pretrained
    assert not modelcard.is_our_card(adapter / "README.md")
    r = cli(capsys, "push", tiny_run, "me/tiny", "--dry-run")
    assert r.returncode == 0 and "  README.md" in r.stdout, r.stdout
    _, upload, files = modelcard.push_plan(tiny_run, "adapter")
    card = upload["README.md"]
    assert isinstance(card, bytes) and card != peft_card
    from huggingface_hub import ModelCard
    meta = ModelCard(card.decode()).data.to_dict()
    assert meta[modelcard.OURS_KEY] == {"card": "adapter"} and "base_model" not in meta   # a local base
    assert (adapter / "README.md").read_bytes() == peft_card     # the folder is never written
    # the merged checkpoint: the merge's local record (absolute paths) is not uploaded
    r = cli(capsys, "merge", tiny_run, "--out", tiny_run / "export" / "merged", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert (tiny_run / "export" / "merged" / "qlora_merge.json").is_file()
    _, upload, files = modelcard.push_plan(tiny_run, "merged")
    assert "qlora_merge.json" not in files and "model.safetensors" in files
    assert upload["README.md"] == tiny_run / "export" / "merged" / "README.md"      # the merge's own card
    local = str(tiny_run.resolve()).encode()
    for name, src in upload.items():
        if name.endswith((".json", ".md")):
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            assert local not in data or name == "README.md", name


def test_adapter_modelfile_from_line_has_no_comment(tiny_run, tmp_path, capsys):
    out = tmp_path / "gguf"
    out.mkdir()
    name = "tiny-lora-f16.gguf"
    (out / (name + ".partial")).write_text("mine")               # the old fixed staging name
    r = cli(capsys, "export", tiny_run, "--adapter-gguf", "--out", out / name)
    assert r.returncode == 0, r.stderr
    lines = (out / "tiny-lora-f16.Modelfile").read_text().splitlines()
    froms = [ln for ln in lines if ln.startswith("FROM")]
    assert froms == ["FROM BASE.gguf"], lines                   # Ollama takes the rest of the line as the path
    assert (out / (name + ".partial")).read_text() == "mine"
    r = cli(capsys, "export", tiny_run, "--adapter-gguf", "--out", out / name)     # exists, no --force
    assert r.returncode == 1 and "already exists" in r.stderr
