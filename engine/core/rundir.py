"""Run directories: layout, creation, and telling live runs from finished, failed or crashed ones.

A run is *live* only while the process recorded in ``run.json`` still exists with the same
start time (so a recycled pid is never mistaken for the run) and the log has no terminal
event. A process that died without a terminal event (kill -9, power loss) is ``crashed``.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from engine.core import events
from engine.core.perms import private_files
from engine.core.summary import State, fold

CONFIG = "config.toml"
EVENTS = "events.jsonl"
RUN_JSON = "run.json"
CONTROL = "control"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
STDOUT = "stdout.log"

STATES = tuple(State)       # live, finished, stopped, failed, crashed, new, damaged


def _slug(text: str) -> str:
    text = text.rsplit("/", 1)[-1].replace("builtin:", "")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "run"


def create(runs_dir: str | Path, name: str) -> Path:
    """Make ``runs_dir/<YYYYmmdd-HHMMSS>-<name>/`` (a suffix keeps it unique); check it is writable."""
    base = Path(runs_dir).expanduser()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"output.dir {str(base)!r} cannot be created ({e.strerror}); "
                      "choose a writable directory") from None
    if not os.access(base, os.W_OK):
        raise OSError(f"output.dir {str(base)!r} is not writable; choose a writable directory")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with private_files():
        for i in range(1000):
            path = base / (f"{stamp}-{_slug(name)}" + (f"-{i}" if i else ""))
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        (path / CONTROL).mkdir()
    return path


# ---- one writer per run: an exclusive lock held for the writer's life ---------------------
LOCK = "lock"
LOCK_FD_ENV = "QLORA_TUI_LOCK_FD"          # a detached child adopts the lock its parent took
SINCE_ENV = "QLORA_TUI_WRITER_SINCE_NS"    # when the writer was started (control requests after it count)


class RunBusy(OSError):
    """Another process writes this run directory."""


def acquire_lock(run_dir: str | Path) -> int:
    """Take the run's exclusive lock (``flock`` on RUN_DIR/lock) and return its fd: keep it open
    for as long as this process writes the run. Raises RunBusy when another process holds it.
    A detached child started by ``engine.training.runner.start_detached`` adopts the fd its parent locked
    (``QLORA_TUI_LOCK_FD``), so there is no moment in which nobody holds it."""
    import fcntl
    path = Path(run_dir) / LOCK
    fd = _adopted_lock(path)
    if fd is None:
        with private_files():
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise RunBusy(f"{run_dir}: another process{f' (pid {holder})' if holder else ''} is writing "
                          f"this run; attach to it (qlora-tui attach {run_dir}) or wait until it ends") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _adopted_lock(path: Path) -> int | None:
    raw = os.environ.pop(LOCK_FD_ENV, "")
    if not raw.isdigit():
        return None
    fd = int(raw)
    try:
        st, mine = os.stat(path), os.fstat(fd)
    except OSError:
        return None
    return fd if (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev) else None


def _lock_holder(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0).decode().strip()
        return int(raw) if raw.isdigit() else None
    except (OSError, ValueError):
        return None


def writer_since_ns() -> int:
    """When this writer was started (ns since the epoch): its parent's launch time for a
    detached run (``QLORA_TUI_WRITER_SINCE_NS``), else now (called as the writer takes the run
    over). Control requests older than that were meant for a previous writer."""
    raw = os.environ.get(SINCE_ENV, "")
    return int(raw) if raw.isdigit() else time.time_ns()


def _create_time(pid: int) -> float | None:
    """When process ``pid`` started (psutil: seconds since the epoch), None when it does not exist.
    On the wall clock: setting the clock (NTP, a VM resumed from a pause) moves it."""
    import psutil
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError, OSError):
        return None


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started as the kernel counts it: clock ticks since boot (Linux's
    /proc/PID/stat, field 22), which no setting of the wall clock moves. None where there is no
    /proc or no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
        return int(raw[raw.rindex(b")") + 2:].split()[19])    # the fields after "(comm) "
    except (OSError, ValueError, IndexError):
        return None


def write_pid(run_dir: str | Path, pid: int | None = None) -> None:
    pid = pid or os.getpid()
    info = {"pid": pid, "create_time": _create_time(pid), "host": socket.gethostname(),
            "started": time.time()}
    ticks = _start_ticks(pid)
    if ticks is not None:
        info["start_ticks"] = ticks
    tmp = Path(run_dir) / (RUN_JSON + ".tmp")
    with private_files():
        tmp.write_text(json.dumps(info))
    tmp.replace(Path(run_dir) / RUN_JSON)


def _run_json(run_dir: str | Path) -> dict:
    """``run.json`` as a dict; {} when it is missing or damaged (not JSON, not an object)."""
    from engine.core import files
    try:
        info = files.loads_json(files.read_bytes(Path(run_dir) / RUN_JSON, 64 * 1024).decode("utf-8", errors="replace"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def owner_pid(run_dir: str | Path) -> int | None:
    """The pid recorded in ``run.json`` (whether or not it still runs)."""
    pid = _run_json(run_dir).get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else None


def process_alive(run_dir: str | Path) -> bool:
    """True if the process that owns the run still exists (same pid *and* same start time)."""
    info = _run_json(run_dir)
    if not info:
        return False
    if info.get("host") not in (None, socket.gethostname()):
        return False
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    import psutil
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:          # it has exited
            return False
    except (psutil.Error, ValueError, OSError):
        return False
    # the same process, not a reused pid: by its start in clock ticks since boot where run.json
    # has them (immune to the wall clock being set while the run trains), else by create_time
    if isinstance(info.get("start_ticks"), int) and not isinstance(info["start_ticks"], bool):
        ticks = _start_ticks(pid)
        if ticks is not None:
            return abs(ticks - info["start_ticks"]) <= 1     # (older run.json: rounded)
    if isinstance(info.get("create_time"), (int, float)):
        started = _create_time(pid)
        return started is not None and abs(started - info["create_time"]) < 0.05
    return True


@dataclass
class RunInfo:
    path: Path
    name: str
    state: State
    step: int = 0
    total_steps: int = 0
    final_loss: float | None = None
    last_loss: float | None = None
    started: float | None = None
    model: str = ""
    reason: str = ""
    nodes: dict | None = None        # a multi-process job: rank -> newest NodeProgress (engine.core.nodes)


def info(run_dir: str | Path) -> RunInfo:
    """The run's state from its files; a run whose files are damaged beyond reading is
    ``damaged`` with the reason (never an exception)."""
    run_dir = Path(run_dir)
    try:
        return _info(run_dir, events.read_events(run_dir / EVENTS, strict=True))
    except OSError as e:
        why = f"{EVENTS} cannot be read ({e.strerror or e}); the run's log is damaged"
    except Exception as e:  # noqa: BLE001 - any damage to the files: say so, list the others
        why = f"its files are damaged ({type(e).__name__}: {str(e)[:120]})"
    return RunInfo(path=run_dir, name=run_dir.name, state=State.DAMAGED, reason=why)


def _info(run_dir: Path, evs: list) -> RunInfo:
    """``RunInfo`` from the fold of the log (``engine.core.summary``), plus what only the files
    tell: a run without a final event is live only while its process is."""
    s = fold(evs, run_dir)
    from engine.core import nodes
    ri = RunInfo(path=run_dir, name=run_dir.name, state=s.state, step=s.step, total_steps=s.total_steps,
                 last_loss=s.last_loss, started=s.started, model=s.model, reason=s.reason,
                 nodes=nodes.latest(run_dir) or None)
    if s.state in (State.FINISHED, State.STOPPED):
        ri.final_loss = s.final_loss if s.final_loss is not None else s.last_loss
    if s.ended:
        if _resumed_since(run_dir, evs):      # a resume's process, started after the log ended
            ri.state = State.LIVE
        return ri
    ri.state = State.LIVE if process_alive(run_dir) or _alive_elsewhere(run_dir, ri.nodes) else State.NEW
    if ri.state == State.NEW and (evs or (run_dir / RUN_JSON).exists()):   # started, and gone
        ri.state = State.CRASHED
        ri.reason = "process ended without a final event (killed?); resume with qlora-tui train --resume"
        lost = nodes.lost_nodes(ri.nodes or {})
        if lost:                      # a multi-node job whose node 0 died: name what went silent
            ri.reason = ("lost " + "; ".join(nodes.describe_lost(r) for r in lost)
                         + "; resume with qlora-tui train --resume on every node")
    return ri


def _alive_elsewhere(run_dir: Path, snapshots: dict | None) -> bool:
    """A multi-node job seen from another node (shared storage): run.json names a process of
    node 0's host, which this host cannot look up; node 0's heartbeats say whether it lives."""
    if not snapshots or _run_json(run_dir).get("host") in (None, socket.gethostname()):
        return False
    from engine.core import nodes
    return any(p.node == 0 and not p.done and not nodes.is_stale(p) for p in snapshots.values())


def _resumed_since(run_dir: Path, evs: list) -> bool:
    """The run's owner is a process that started after the log's final event (a resume, detached
    or not, before it writes its marker): it is the run's next writer, not an ended one exiting."""
    last = next((e.time for e in reversed(evs) if isinstance(e, events.TERMINAL)), None)
    created = _run_json(run_dir).get("create_time")
    return (isinstance(created, (int, float)) and isinstance(last, (int, float)) and created > last
            and process_alive(run_dir))


def is_live(run_dir: str | Path) -> bool:
    """The one answer to "is this run live?" that ``runs``, ``stop``, ``attach`` and a resume all
    use: its process exists *and* its log has not ended. A run that has written its final event
    is stopped, finished or failed even while its process is still exiting."""
    return info(run_dir).state == State.LIVE


def wait_writer_exit(run_dir: str | Path, timeout: float = 60.0) -> None:
    """A run whose log has ended may still have its process exiting (torch's teardown), holding
    the run's lock: a resume waits for it (at most ``timeout`` s) instead of refusing a run that
    ``runs`` already lists as stopped (a multi-process job: its launcher too). A live run is not
    waited for."""
    if owner_pid(run_dir) == os.getpid() or os.environ.get(LOCK_FD_ENV) or is_live(run_dir):
        return                # (a run of this very process, the TUI's or a test's, has ended; or a
        #                        detached child handed the lock by a parent that waited already)
    deadline = time.monotonic() + timeout
    # a multi-process job's launcher holds the lock a moment longer than rank 0 lives
    while (process_alive(run_dir) or lock_held(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)


def lock_held(run_dir: str | Path) -> bool:
    """Another open file holds the run's lock now (a writer, or a launcher, still exiting)."""
    import fcntl
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)              # (closing releases the lock taken just now)
    return False


def list_runs(runs_dir: str | Path) -> list[RunInfo]:
    """Runs under ``runs_dir``, newest first."""
    base = Path(runs_dir).expanduser()
    if not base.is_dir():
        return []
    try:
        dirs = [p for p in base.iterdir() if p.is_dir() and ((p / EVENTS).exists() or (p / RUN_JSON).exists())]
    except OSError:
        return []
    return [info(p) for p in sorted(dirs, key=lambda p: p.name, reverse=True)]


def newest_live(runs_dir: str | Path) -> Path | None:
    for ri in list_runs(runs_dir):
        if ri.state == State.LIVE:
            return ri.path
    return None


def checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name.split("-", 1)[1])


COMPLETE = "COMPLETE"


def mark_complete(ckpt: str | Path, step: int) -> None:
    """Flush a written checkpoint to disk, then write its ``COMPLETE`` marker (the commit point)."""
    ckpt = Path(ckpt)
    for f in sorted(ckpt.rglob("*")):
        if f.is_file():
            _fsync_path(f)
    tmp = ckpt / (COMPLETE + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(str(step))
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(ckpt / COMPLETE)
    _fsync_path(ckpt)


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def rotate_checkpoints(run_dir: str | Path, keep: int | None) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints; remove older ones (marker first, so a
    half-removed checkpoint is never taken for complete). Incomplete ones newer than the
    newest complete one are left to resume to clean up. Returns the removed paths."""
    if not keep or keep < 1:
        return []
    import shutil
    ck = checkpoints(run_dir)
    removed = []
    for p in ck[:-keep]:
        try:
            (p / COMPLETE).unlink()
        except OSError:
            pass
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (a ``COMPLETE`` marker is written last), oldest first."""
    base = Path(run_dir) / CHECKPOINTS
    if not base.is_dir():
        return []
    out = []
    for p in base.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / COMPLETE).exists():
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]
