"""What the live TUI costs the run it shows: tokens/s headless vs the same run started from the TUI.

    python bench/tui_overhead.py                      # 3 pairs, 300 steps, writes bench/RESULTS.md
    python bench/tui_overhead.py --pairs 4 --steps 200 --no-write

Alternates A/B/A/B... on the same config (default ``examples/demo.toml``, builtin:tiny on the
CPU, eval and checkpoints off, a step event every step):

  A  headless: ``python -m engine train CFG --headless --set ...`` (no UI at all; its stdout
     goes to a file, the environment is the one ``runner.start_detached`` gives its child);
  B  the real ``qlora-tui CFG --set ...`` in a detached tmux session at 120x40: F4, ctrl+r,
     the run trains in its own process while the TUI follows events.jsonl and renders live on
     the same cores; when ``engine.core.rundir`` says the run is over, ctrl+q.

Tokens/s is the run's own: real (non-pad) tokens from its events.jsonl,
Δtokens_seen / Δtime between the step after the warm-up and the last step. Both sides are
watched the same way (``rundir.info`` once a second). Each run gets its own ``output.dir``.
Prints a summary (medians, B/A, per-pair ratios, load averages, CPU time of the TUI process)
and appends it to bench/RESULTS.md as the section "TUI overhead" (replacing an older one).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.core import events  # noqa: E402
from engine.core import rundir  # noqa: E402
from engine.core.summary import standing  # noqa: E402

SECTION = "## TUI overhead"
CLK = os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat)."""
    def read():
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = f[3] + f[4]
        return sum(f) - idle, sum(f)
    b0, t0 = read()
    time.sleep(seconds)
    b1, t1 = read()
    return (b1 - b0) / max(1, t1 - t0)


def wait_quiet(limit: float = 0.15, patience: float = 300) -> float:
    """Wait (up to ``patience`` s) until the machine is quiet: another benchmark on the same
    cores would be measured as overhead. Returns the busy fraction seen last."""
    deadline = time.monotonic() + patience
    busy = cpu_busy()
    while busy > limit and time.monotonic() < deadline:
        print(f"  waiting for a quiet machine ({100 * busy:.0f}% busy, load {loadavg()})", flush=True)
        time.sleep(5)
        busy = cpu_busy()
    return busy


def child_env() -> dict:
    """The environment runner.start_detached gives the training process (same for A and B)."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def tokens_per_s(run_dir: Path, warmup: int) -> tuple[float, int, float, float]:
    """(real tokens/s after the warm-up, steps measured, seconds measured, median per-step
    tokens/s) from events.jsonl. The last one is robust to a stall from outside (the VM's
    neighbours): a few slow steps move the first figure, not it."""
    # a resumed log repeats the steps it redid: the ones that stand after its marker
    steps = [e for e in standing(events.read_events(run_dir / rundir.EVENTS)) if isinstance(e, events.Step)]
    by = {e.step: e for e in steps}
    steps = [by[k] for k in sorted(by) if k >= warmup]
    if len(steps) < 2:
        raise RuntimeError(f"{run_dir}: only {len(steps)} step events after the warm-up")
    a, b = steps[0], steps[-1]
    dt = b.time - a.time
    per = [(y.tokens_seen - x.tokens_seen) / (y.time - x.time)
           for x, y in zip(steps, steps[1:]) if y.time > x.time and y.step == x.step + 1]
    return (b.tokens_seen - a.tokens_seen) / dt, b.step - a.step, dt, statistics.median(per)


def the_run(out_dir: Path, timeout: float, proc=None) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [p for p in out_dir.iterdir() if p.is_dir()] if out_dir.exists() else []
        if runs:
            return runs[0]
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the run process exited ({proc.returncode}) before its run directory")
        time.sleep(0.2)
    raise TimeoutError(f"no run directory appeared under {out_dir}")


def wait_over(run_dir: Path, timeout: float, poll: float = 1.0, proc=None) -> str:
    """Wait until the run is no longer live (rundir's view); return its state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = rundir.info(run_dir).state
        if st not in ("live", "new"):
            return st
        if proc is not None and proc.poll() is not None:   # ended before writing a run.json
            return rundir.info(run_dir).state
        time.sleep(poll)
    raise TimeoutError(f"{run_dir} still live after {timeout:.0f} s")


def proc_cpu(pid: int) -> float | None:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / CLK
    except (OSError, IndexError, ValueError):
        return None


def run_headless(cfg: str, sets: list[str], work: Path, timeout: float) -> Path:
    out = work / "runs"
    argv = [sys.executable, "-m", "engine", "train", cfg, "--headless"]
    for s in sets + [f"output.dir={out}"]:
        argv += ["--set", s]
    with open(work / "headless.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=child_env())
        try:
            run = the_run(out, 120, proc=proc)
            state = wait_over(run, timeout, proc=proc)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if state != "finished":
        raise RuntimeError(f"headless run ended {state}: see {work / 'headless.log'}")
    return run


def tmux(*args: str, check: bool = True) -> str:
    return subprocess.run(["tmux", *args], check=check, capture_output=True, text=True).stdout


def wait_pane(session: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pane = ""
    while time.monotonic() < deadline:
        pane = tmux("capture-pane", "-p", "-t", session)
        if text in pane:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} never appeared on the pane; last pane:\n{pane}")


def tui_pid(session: str) -> int | None:
    """The qlora-tui process: the child of the pane's shell."""
    try:
        shell = int(tmux("list-panes", "-t", session, "-F", "#{pane_pid}").split()[0])
    except (ValueError, IndexError):
        return None
    for _ in range(50):
        try:
            kids = [int(k) for t in Path(f"/proc/{shell}/task").iterdir()
                    for k in (t / "children").read_text().split()]
        except OSError:
            kids = []
        if kids:
            return kids[0]
        time.sleep(0.1)
    return None


def run_tui(cfg: str, sets: list[str], work: Path, timeout: float, session: str,
            warmup: int) -> tuple[Path, dict]:
    out = work / "runs"
    exit_file = work / "exit_code"
    exe = shutil.which("qlora-tui", path=str(Path(sys.executable).parent)) or \
        f"{shlex.quote(sys.executable)} -m tui"
    args = " ".join(f"--set {shlex.quote(s)}" for s in sets + [f"output.dir={out}"])
    env = f"XDG_CONFIG_HOME={shlex.quote(str(work / 'xdg'))} TERM=tmux-256color"
    cmd = (f"cd {shlex.quote(str(ROOT))} && env {env} {exe} {shlex.quote(cfg)} {args}; "
           f"echo $? > {shlex.quote(str(exit_file))}")
    extra: dict = {}
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", cmd)
    try:
        pid = tui_pid(session)
        wait_pane(session, "f4 Train", 60)
        tmux("send-keys", "-t", session, "F4")
        wait_pane(session, "Ready to train", 30)
        tmux("send-keys", "-t", session, "C-r")
        run = the_run(out, 60)
        # the TUI's CPU while it follows the measured steps (not the launch: start_detached's
        # preflight imports torch in the TUI process once, before training)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and rundir.info(run).state in ("live", "new") and not any(
                isinstance(e, events.Step) and e.step >= warmup for e in events.read_events(run / rundir.EVENTS)):
            time.sleep(0.05)
        cpu0, t0 = (proc_cpu(pid) if pid else None), time.monotonic()
        state = wait_over(run, timeout)
        cpu1, t1 = (proc_cpu(pid) if pid else None), time.monotonic()
        if cpu0 is not None and cpu1 is not None:
            extra["tui_cpu_s"] = cpu1 - cpu0
            extra["wall_s"] = t1 - t0
        # the TUI sees the end within ~0.1 s; then ctrl+q quits without asking
        time.sleep(1.0)
        tmux("send-keys", "-t", session, "C-q")
        deadline = time.monotonic() + 30
        while not exit_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        extra["exit"] = exit_file.read_text().strip() if exit_file.exists() else "did not exit"
        # the training process was started by the TUI in its own session: make sure it is gone
        deadline = time.monotonic() + 60
        while rundir.process_alive(run) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        tmux("kill-session", "-t", session, check=False)
        # an error above must not leave the detached training process running
        for run_dir in (out.iterdir() if out.exists() else []):
            pid = rundir.owner_pid(run_dir)
            if pid and rundir.process_alive(run_dir):
                try:
                    os.kill(pid, 15)
                except OSError:
                    pass
    if state != "finished":
        raise RuntimeError(f"TUI run ended {state}: see {run / rundir.STDOUT}")
    return run, extra


def fmt(x: float) -> str:
    return f"{x:,.0f}"


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="examples/demo.toml")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=900, help="per run, seconds")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config overrides (both sides)")
    ap.add_argument("--note", default="", help="a line added to the RESULTS.md section")
    ap.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    return ap.parse_args()


def _shown_command(argv: list[str]) -> str:
    """The command line as RESULTS.md shows it (the --note text is printed below the table, not here)."""
    shown, skip = [], False
    for a in argv:
        if skip or a == "--note":
            skip = a == "--note"
            continue
        if not a.startswith("--note="):
            shown.append(a)
    return " ".join(["python bench/tui_overhead.py", *map(shlex.quote, shown)])


def _one(args, sets: list[str], base: Path, i: int, side: str) -> dict:
    """One measured run: A headless or B in the TUI; its row of figures (printed as well)."""
    work = base / f"{i}{side}"
    work.mkdir()
    quiet = wait_quiet()
    la = loadavg()
    t = time.monotonic()
    extra: dict = {}
    if side == "A":
        run = run_headless(args.config, sets, work, args.timeout)
    else:
        run, extra = run_tui(args.config, sets, work, args.timeout,
                             f"qlora-overhead-{os.getpid()}-{i}", args.warmup)
    tps, n, dt, per = tokens_per_s(run, args.warmup)
    row = {"pair": i + 1, "side": side, "tps": tps, "steps": n, "secs": dt, "per": per,
           "load": la, "load_after": loadavg(), "busy_before": quiet, "wall": time.monotonic() - t, **extra}
    more = ""
    if "tui_cpu_s" in extra:
        more = (f", TUI process {extra['tui_cpu_s']:.1f} CPU-s over "
                f"{extra['wall_s']:.0f} s ({100 * extra['tui_cpu_s'] / extra['wall_s']:.1f}% "
                f"of a core), exit {extra['exit']}")
    print(f"pair {i + 1} {side}: {fmt(tps)} tokens/s over {n} steps / {dt:.1f} s "
          f"(median step {fmt(per)}) "
          f"(load {la} → {row['load_after']}){more}", flush=True)
    return row


def _measure(args, sets: list[str], base: Path) -> list[dict]:
    """The A/B pairs, alternating; no tmux session is left behind, whatever fails."""
    rows: list[dict] = []
    try:
        for i in range(args.pairs):
            for side in ("A", "B"):
                rows.append(_one(args, sets, base, i, side))
    finally:
        for line in tmux("list-sessions", "-F", "#{session_name}", check=False).split():
            if line.startswith(f"qlora-overhead-{os.getpid()}-"):
                tmux("kill-session", "-t", line, check=False)
    return rows


def _section(rows: list[dict], args, sets: list[str], command: str, load_before: str) -> str:
    """The RESULTS.md section: the table of pairs and the medians."""
    a = [r["tps"] for r in rows if r["side"] == "A"]
    b = [r["tps"] for r in rows if r["side"] == "B"]
    pair_ratios = [rb["tps"] / ra["tps"] for ra, rb in zip(rows[0::2], rows[1::2])]
    ma, mb = statistics.median(a), statistics.median(b)
    pa = statistics.median(r["per"] for r in rows if r["side"] == "A")
    pb = statistics.median(r["per"] for r in rows if r["side"] == "B")
    tui_cpu = [r["tui_cpu_s"] / r["wall_s"] for r in rows if "tui_cpu_s" in r]
    verdict = "met" if mb / ma >= 0.98 else "**not met**"
    lines = [
        f"{SECTION}",
        "",
        f"`{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs, no GPU). builtin:tiny, `{args.config}` with "
        f"`--set {' --set '.join(sets)}`; A = `python -m engine train CFG --headless --set ...`, "
        "B = the same config in the real `qlora-tui CFG --set ...` in tmux at 120x40, F4, ctrl+r, "
        "live until the run ends, ctrl+q. Alternating A/B; tokens/s = real (non-pad) tokens from "
        f"the run's events.jsonl, Δtokens_seen/Δtime from step {args.warmup} to the last step.",
        "",
        "| pair | A headless tokens/s | B TUI tokens/s | B/A | median step A, B (B/A) "
        "| load avg (1/5/15 min) at A; B | TUI process CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for ra, rb, q in zip(rows[0::2], rows[1::2], pair_ratios):
        cpu = (f"{100 * rb['tui_cpu_s'] / rb['wall_s']:.1f}% of a core" if "tui_cpu_s" in rb else "?")
        lines.append(f"| {ra['pair']} | {fmt(ra['tps'])} | {fmt(rb['tps'])} | {q:.3f} | "
                     f"{fmt(ra['per'])}, {fmt(rb['per'])} ({rb['per'] / ra['per']:.3f}) | "
                     f"{ra['load']}; {rb['load']} | {cpu} |")
    lines += [
        "",
        f"Median A {fmt(ma)} tokens/s, median B {fmt(mb)} tokens/s: **B/A = {mb / ma:.3f}** "
        f"(per pair {', '.join(f'{q:.3f}' for q in pair_ratios)}; median of pair ratios "
        f"{statistics.median(pair_ratios):.3f}). Target B/A ≥ 0.98: {verdict}. "
        + (f"The TUI process used {statistics.median(tui_cpu) * 100:.1f}% of one core (median) "
           "while following the measured steps. " if tui_cpu else "")
        + f"Load average before the series {load_before}, after {loadavg()}. "
        f"Median per-step tokens/s (robust to a stall from outside): A {fmt(pa)}, B {fmt(pb)}, "
        f"B/A {pb / pa:.3f}.",
    ]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines) + "\n"


def _write_results(text: str) -> None:
    """Replace an older "TUI overhead" section of bench/RESULTS.md (up to the next "## "), keep the rest."""
    res = ROOT / "bench" / "RESULTS.md"
    old = res.read_text() if res.exists() else ""
    old = re.sub(rf"(?ms)^{re.escape(SECTION)}\n.*?(?=^## |\Z)", "", old).rstrip("\n")
    res.write_text((old + "\n\n" if old else "") + text)
    print(f"written to {res}")


def main() -> int:
    args = _parse_args()
    if shutil.which("tmux") is None:
        print("tmux not installed", file=sys.stderr)
        return 2
    sets = [f"train.max_steps={args.steps}", "train.eval_steps=0", "train.save_steps=0",
            "train.logging_steps=1"] + args.sets
    command = _shown_command(sys.argv[1:])
    base = Path(tempfile.mkdtemp(prefix="qlora-tui-overhead-"))
    load_before = loadavg()
    print(f"config {args.config} --set {' --set '.join(sets)}; work in {base}; load {load_before}")
    rows = _measure(args, sets, base)
    text = _section(rows, args, sets, command, load_before)
    print()
    print(text)
    if not args.no_write:
        _write_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
