"""Helpers for the reliability tests: real runs in subprocesses, waiting on the event log."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.core import config
from engine.core import events as events_mod
from engine.core import rundir

REPO = Path(__file__).resolve().parents[1]
ENGINE = [sys.executable, "-m", "engine"]


def tiny_config(root: Path) -> config.Config:
    """A fast real-run config on builtin:tiny + builtin:sample writing under ``root``/runs (the
    tiny_cfg fixture's; module-scoped fixtures that share one run build theirs with it)."""
    return config.load(REPO / "examples" / "demo.toml",
                       [f"output.dir={str(root / 'runs')!r}".replace("'", '"'), "train.max_steps=12",
                        "train.eval_steps=6", "train.save_steps=6"])


def configured(cfg: config.Config, changes: dict | None = None) -> config.Config:
    """A copy of ``cfg`` with ``{"section.key": value}`` changes."""
    cfg = cfg.copy()
    for dotted, value in (changes or {}).items():
        sec, key = dotted.split(".", 1)
        assert hasattr(getattr(cfg, sec), key), f"no config field {dotted}"
        setattr(getattr(cfg, sec), key, value)
    return cfg


def write_cfg(cfg: config.Config, path: Path, changes: dict | None = None) -> Path:
    """Save ``cfg`` (with ``{"section.key": value}`` changes) as a TOML file for the CLI."""
    cfg = configured(cfg, changes)
    config.save(cfg, path)
    return path


def env_with(**extra) -> dict:
    env = dict(os.environ)
    env.pop("QLORA_TUI_FAULTS", None)
    env.update({k: str(v) for k, v in extra.items()})
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def engine_cmd(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*ENGINE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env or env_with())


class Result:
    def __init__(self, rc, out, err):
        self.returncode, self.stdout, self.stderr = rc, out, err


def cli(capsys, *args) -> Result:
    """The command line in this process (what `python -m engine ARGS` runs, without a second
    Python start-up), output captured. What a command sets for its own process (the run files'
    umask, the signal handlers of a headless run) is put back afterwards."""
    from engine import cli as CLI
    capsys.readouterr()
    umask = os.umask(0o077)
    os.umask(umask)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    try:
        rc = CLI.main([str(a) for a in args])
    except SystemExit as e:                   # argparse and config errors exit like the process
        rc = e.code
    finally:
        os.umask(umask)
        for s, h in handlers.items():
            signal.signal(s, h)
    out, err = capsys.readouterr()
    return Result(rc, out, err)


def start_headless(cfg_path: Path, *extra, env=None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL
    return subprocess.Popen([*ENGINE, "train", str(cfg_path), "--headless", *map(str, extra)],
                            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env or env_with())


def wait_for(pred, timeout: float = 240, every: float = 0.1, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def only_run(runs_dir: Path) -> Path:
    dirs = [p for p in Path(runs_dir).iterdir() if p.is_dir()] if Path(runs_dir).is_dir() else []
    assert len(dirs) == 1, dirs
    return dirs[0]


def wait_run_dir(runs_dir: Path, timeout: float = 120) -> Path:
    return wait_for(lambda: next((p for p in Path(runs_dir).glob("*") if (p / rundir.EVENTS).exists()), None),
                    timeout, what=f"a run directory under {runs_dir}")


def events(run_dir: Path) -> list[events_mod.Event]:
    return events_mod.read_events(Path(run_dir) / rundir.EVENTS)


def step_numbers(run_dir: Path) -> list[int]:
    """The steps that stand in the log: past a resume marker, the redone steps are dropped."""
    from engine.core.summary import standing
    return [e.step for e in standing(events(run_dir)) if isinstance(e, events_mod.Step)]


def logged_step_numbers(run_dir: Path) -> list[int]:
    """Every step line of the (append-only) log, redone ones included."""
    return [e.step for e in events(run_dir) if isinstance(e, events_mod.Step)]


def last_step(run_dir: Path) -> int:
    s = step_numbers(run_dir)
    return s[-1] if s else 0


def wait_step(run_dir: Path, n: int, timeout: float = 240) -> int:
    return wait_for(lambda: last_step(run_dir) >= n and last_step(run_dir), timeout, what=f"step {n}")


def terminal(run_dir: Path) -> events_mod.Event | None:
    t = [e for e in events(run_dir) if isinstance(e, events_mod.TERMINAL)]
    return t[-1] if t else None


def send(proc: subprocess.Popen, sig: signal.Signals) -> None:
    os.kill(proc.pid, sig)


def files_containing(root: Path, needle: bytes) -> list[Path]:
    """Every file under ``root`` (recursively, binary-safe) whose bytes contain ``needle``."""
    hits = []
    for p in Path(root).rglob("*"):
        if p.is_file() and not p.is_symlink():
            if needle in p.read_bytes():
                hits.append(p)
    return hits


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def finished_run(cfg: config.Config) -> tuple[list[events_mod.Event], events_mod.RunStarted]:
    """Train ``cfg`` in this process to the end; its events and its run_started event."""
    from engine.training import runner
    run = runner.Run(cfg)
    run.start()
    assert run.join(timeout=300)
    assert run.result.type == "run_finished", getattr(run.result, "reason", "")
    evs = events(run.run_dir)
    return evs, next(e for e in evs if isinstance(e, events_mod.RunStarted))


def finished_losses(cfg: config.Config) -> tuple[list[float], list[str]]:
    """Train ``cfg`` in this process to the end; its per-step losses and its run_started plan."""
    evs, started = finished_run(cfg)
    return [e.loss for e in evs if isinstance(e, events_mod.Step)], started.plan
