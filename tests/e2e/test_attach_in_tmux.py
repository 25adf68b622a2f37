"""Detach, then attach from other terminals (tmux): history + live steps, closing an attach never
stops the run, ctrl+x in an attached TUI stops it through the control channel."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core import control as ctl
from engine.core import rundir

from reliability_helpers import (REPO, cli, env_with, last_step, step_numbers, terminal, wait_for, wait_step,
                                 write_cfg)

pytestmark = pytest.mark.skipif(not shutil.which("tmux"), reason="tmux not installed")

STEP_RE = re.compile(r"step (\d+)/(\d+)")


class Tmux:
    def __init__(self, name: str, env: dict):
        self.base = ["tmux", "-L", name]
        self.env = env
        self.started = False

    def __call__(self, *args, check=True) -> str:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, check=check,
                              env=self.env).stdout

    def open(self, window: str, command: str) -> None:
        """A new terminal (tmux window) running ``command``; dead panes stay for inspection."""
        if self.started:
            self("new-window", "-t", "t", "-n", window, command)
        else:
            self("new-session", "-d", "-s", "t", "-n", window, "-x", "160", "-y", "48", command)
            self("set-option", "-g", "remain-on-exit", "on")
            self.started = True

    def screen(self, window: str) -> str:
        return self("capture-pane", "-p", "-t", f"t:{window}")

    def keys(self, window: str, *keys: str) -> None:
        self("send-keys", "-t", f"t:{window}", *keys)

    def dead(self, window: str) -> bool:
        return self("list-panes", "-t", f"t:{window}", "-F", "#{pane_dead}", check=False).strip() == "1"

    def shown_step(self, window: str) -> int:
        m = STEP_RE.search(self.screen(window))
        return int(m.group(1)) if m else 0

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, env=self.env)


def test_detach_then_attach_from_other_terminals_history_live_and_stop(tiny_cfg, tmp_path, capsys,
                                                                      monkeypatch):
    runs = tmp_path / "runs"
    cfg_path = write_cfg(tiny_cfg, tmp_path / "run.toml", {"train.max_steps": 60, "train.save_steps": 0,
                                                         "train.eval_steps": 0, "output.dir": str(runs)})
    # `train --detach` in this process (no Python start-up of its own); the detached run inherits
    # the faults
    monkeypatch.setenv("QLORA_TUI_FAULTS", "slow=0.4")
    r = cli(capsys, "train", cfg_path, "--detach")
    monkeypatch.delenv("QLORA_TUI_FAULTS")
    assert r.returncode == 0, r.stderr
    d = Path(r.stdout.strip().splitlines()[-1])
    env = env_with(TERM="xterm-256color", COLUMNS="160", LINES="48")
    env.pop("TMUX", None)
    tm = Tmux(f"qlt-attach-{os.getpid()}", env)
    attach = f"cd {REPO} && {sys.executable} -m tui attach {d}"
    try:
        wait_step(d, 4)
        # 1st attach: the history so far, then live steps
        tm.open("a1", attach)
        first = wait_for(lambda: tm.shown_step("a1") >= 4 and tm.shown_step("a1"), 120,
                         what="the attached TUI to show the history")
        assert STEP_RE.search(tm.screen("a1")).group(2) == "60"
        wait_for(lambda: tm.shown_step("a1") >= first + 2, 120, what="live steps in the attached TUI")
        # 2nd and 3rd attach at once; close one through quit → detach, kill the other's terminal
        tm.open("a2", attach)
        tm.open("a3", attach)
        wait_for(lambda: tm.shown_step("a2") > 0 and tm.shown_step("a3") > 0, 120, what="more attaches")
        tm.keys("a2", "C-q")
        wait_for(lambda: "Detach" in tm.screen("a2"), 30, what="the quit dialog")
        tm.keys("a2", "d")
        wait_for(lambda: tm.dead("a2"), 30, what="the 2nd attach to quit")
        tm("kill-window", "-t", "t:a3")                     # its terminal closes (SIGHUP)
        s = last_step(d)
        wait_step(d, s + 2)
        assert terminal(d) is None and rundir.info(d).state == "live", "closing an attach stopped the run"
        assert ctl.pending(d) == []
        # ctrl+x in the 1st attach stops the run gracefully
        tm.keys("a1", "C-x")
        wait_for(lambda: terminal(d) is not None, 120, what="the run to stop")
        fin = terminal(d)
        assert fin.type == "run_finished" and fin.stopped and "control channel" in fin.reason, fin
        assert fin.step < 60 and (d / "adapter" / "adapter_model.safetensors").exists()
        assert step_numbers(d) == list(range(1, fin.step + 1))
        wait_for(lambda: "stopped" in tm.screen("a1"), 60, what="the TUI to show the stop")
        wait_for(lambda: not rundir.process_alive(d), 60, what="the run's process to end")
        assert rundir.info(d).state == "stopped"
    finally:
        tm.kill()
        if rundir.process_alive(d):
            ctl.request(d, "stop")
