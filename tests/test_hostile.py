"""Hostile input, second pass (issue 12): escape codes never reach the terminal, no code runs
without consent, private run files, one writer per run, no traceback on damaged files or bad
values, bounded memory. Real processes, real files with the hostile bytes in them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reliability_helpers import REPO, engine_cmd, env_with

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
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


class Result:
    def __init__(self, rc, out, err):
        self.returncode, self.stdout, self.stderr = rc, out, err


def cli(capsys, *args) -> Result:
    """The command line in this process (what `python -m engine ARGS` runs), output captured."""
    from engine import cli as CLI
    capsys.readouterr()
    rc = CLI.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return Result(rc, out, err)


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
    assert [p["line"] for p in doc["problems"] if p["kind"] == "control_chars"] == [3, 5]
    assert "k\x1b[2Jey" in doc["format"]["fields_seen"]
    # an error message quoting a hostile path
    bad = tmp_path / "x\x1b[2Jy.jsonl"
    r = cli(capsys, "inspect", bad, "--model", "builtin:tiny")
    assert r.returncode == 2 and "x␛[2Jy" in r.stderr
    assert_no_raw(r.stdout + r.stderr)


def test_sanitiser_table():
    from engine.safe_text import json_dumps, visible
    assert visible("a\tb\nc") == "a\tb\nc"
    assert visible("\x1b[2J\x07\r\x00\x7f") == "␛[2J␇␍␀␡"
    assert visible("\x9b\u202e\u2066\udcff") == "⟨U+009B⟩⟨U+202E⟩⟨U+2066⟩\ufffd"
    assert json.loads(json_dumps({"k\u202e": "\x9b\udcff"[:1]})) == {"k\u202e": "\x9b"}
    from tui.safe import clean                   # the TUI shows the same glyphs
    assert clean("\x1b\u202e\t") == "␛⟨U+202E⟩    "
