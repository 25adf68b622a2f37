"""End to end: the real `qlora-tui` in tmux (as over SSH, 80x24): every screen's essential keys, then
F4, ctrl+r, live losses, ctrl+x, ctrl+q, in one app start-up."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
LOSS = re.compile(r"loss\s+(\d+\.\d{4})")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def wait_for(session: str, pattern, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    pane = ""
    while time.monotonic() < deadline:
        pane = tmux("capture-pane", "-p", "-t", session)
        if (pattern.search(pane) if hasattr(pattern, "search") else pattern in pane):
            return pane
        time.sleep(0.3)
    raise AssertionError(f"{pattern!r} never appeared; last pane:\n{pane}")


def test_real_app_in_tmux_keys_fit_80x24_then_trains_stops_and_quits(tmp_path):
    """One real app start-up (as over SSH, 80x24) for both end-to-end checks: the README promises
    80x24, so each screen's footer shows its essential keys, uncut; then F4, ctrl+r, live losses,
    ctrl+x, ctrl+q with exit status 0 and the run's adapter on disk."""
    session = f"qlora-tui-test-{os.getpid()}"
    exit_file = tmp_path / "exit_code"
    exe = shutil.which("qlora-tui", path=str(Path(sys.executable).parent)) or \
        f"{shlex.quote(sys.executable)} -m tui"
    env = (f"XDG_CONFIG_HOME={shlex.quote(str(tmp_path / 'xdg'))} TERM=tmux-256color "
           f"PYTHONPATH={shlex.quote(str(Path(__file__).resolve().parents[2]))}")
    cmd = f"cd {shlex.quote(str(tmp_path))} && env {env} {exe}; echo $? > {shlex.quote(str(exit_file))}"
    tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24", cmd)
    # (Runs: Attach / Resume / Chat show for a selected run they apply to; no run here yet)
    essential = {"F2": ["123 Tab", "np Row", "^q Quit", "^r Start", "f6 Chat"],
                 "F3": ["^s Save", "/ Find", "^q Quit", "^r Start", "f6 Chat"],
                 "F5": ["^q Quit", "f4 Train", "f6 Chat", "^p palette"],
                 "F6": ["^t Base/Tuned", "^n New", "^q Quit", "f5 Runs", "^p palette"],
                 "F4": ["^r Start", "f2 Dataset", "f3 Config", "f5 Runs", "f6 Chat", "^q Quit",
                        "^p palette"]}
    try:
        wait_for(session, "f2 Dataset", 90)
        wait_for(session, "^r Start", 90)
        # ---- every screen's essential keys fit 80x24 (F4, Train, last: the run starts there)
        for key, words in essential.items():
            tmux("send-keys", "-t", session, key)
            deadline, footer = time.monotonic() + 60, ""
            while time.monotonic() < deadline:     # the screen switch lands on its own time
                footer = tmux("capture-pane", "-p", "-t", session).rstrip("\n").splitlines()[-1]
                if all(w in footer for w in words):
                    break
                time.sleep(0.3)
            assert all(w in footer for w in words), (key, words, footer)
            if key == "F2":         # the header's labels stay with their values in a real terminal
                pane = wait_for(session, "steps/epoch", 120)
                for label in ("rows", "problems", "duplicate rows", "median", "trained tokens", "steps/epoch"):
                    assert re.search(rf"(^|\s){re.escape(label)} +[0-9]", pane, re.M), (label, pane)
        # ---- on F4: ctrl+r trains, live losses, ctrl+x stops, ctrl+q quits with status 0
        wait_for(session, "Ready to train", 20)
        tmux("send-keys", "-t", session, "C-r")
        pane = wait_for(session, LOSS, 300)
        footer = pane.rstrip("\n").splitlines()[-1]          # a live run: its keys, uncut at 80
        assert "^x Stop" in footer and "^d Detach" in footer, footer
        first = float(LOSS.search(pane).group(1))
        assert first > 0
        tmux("send-keys", "-t", session, "C-x")
        pane = wait_for(session, re.compile(r"● (stopped|finished)"), 180)
        tmux("send-keys", "-t", session, "C-q")
        deadline = time.monotonic() + 30
        while not exit_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert exit_file.exists(), "qlora-tui did not exit"
        assert exit_file.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    assert (runs[0] / "adapter" / "adapter_model.safetensors").exists()
