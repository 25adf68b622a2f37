"""Per-node progress of a multi-process job: RUN_DIR/nodes/node-K.jsonl.

Global rank 0 alone writes the run's log (events.jsonl), checkpoints and adapter. Every worker
process of every node appends ``events.NodeProgress`` snapshots (its step, its own tokens/s, its
GPU) to its node's file, at each logging step and as a heartbeat; the readers merge them: the
follower (``events.follow_batches(side=...)``, the TUI's attach) and ``latest`` (``runs``). The
run directory must be on storage every node shares (``output.dir``), as the checkpoints are.

A line is written whole (one ``write`` under an exclusive ``flock``: the node's processes
share the file). ``latest`` reads only each file's tail, so a long job's heartbeats never make
``runs`` slow or its memory grow.
"""
from __future__ import annotations

import fcntl
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from engine.core import events

NODES = "nodes"
TAIL_BYTES = 256 * 1024        # what ``latest`` reads of each node file: many heartbeats of every rank
STALE_BEATS = 3                # a heartbeat older than this many intervals: the process is gone


def nodes_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / NODES


def node_file(run_dir: str | Path, node: int) -> Path:
    return nodes_dir(run_dir) / f"node-{node}.jsonl"


def node_log(run_dir: str | Path, node: int) -> Path:
    """A node's launcher output when it was started detached (node 0's is RUN_DIR/stdout.log)."""
    return nodes_dir(run_dir) / f"node-{node}.log"


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between heartbeats for a job whose collectives time out after ``timeout_s``:
    a tenth of it, 1 to 10 s (a dead node is named well before the collective gives up)."""
    return max(1.0, min(10.0, timeout_s / 10.0))


def append(path: Path, ev: events.NodeProgress) -> None:
    """One snapshot, one line, written whole (the node's other processes write the same file)."""
    from engine.core.perms import private_files
    line = (events.dumps(ev) + "\n").encode("utf-8", errors="replace")
    with private_files():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
    finally:
        os.close(fd)


def _files(run_dir: str | Path) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(nodes_dir(run_dir))
    except OSError:
        return []
    out = []
    for n in names:
        m = re.fullmatch(r"node-(\d+)\.jsonl", n)
        if m:
            out.append((int(m.group(1)), nodes_dir(run_dir) / n))
    return sorted(out)


def _tail_events(path: Path) -> list[events.Event]:
    from engine.core import files
    try:
        with files.open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - TAIL_BYTES))
            data = fh.read(TAIL_BYTES)
    except OSError:
        return []
    lines = data.split(b"\n")
    if size > TAIL_BYTES:
        lines = lines[1:]                  # the first one is cut
    out = []
    for raw in lines[:-1]:                 # the last is empty or torn
        try:
            out.append(events.loads(raw.decode("utf-8", errors="replace")))
        except events.BAD_LINE:
            continue
    return out


def latest(run_dir: str | Path) -> dict[int, events.NodeProgress]:
    """rank -> the newest snapshot of every process of the job (the tails of the node files)."""
    out: dict[int, events.NodeProgress] = {}
    for _node, path in _files(run_dir):
        for ev in _tail_events(path):
            if isinstance(ev, events.NodeProgress) and (ev.rank not in out or ev.time >= out[ev.rank].time):
                out[ev.rank] = ev
    return out


def is_stale(p: events.NodeProgress, now: float | None = None) -> bool:
    """The process has sent no heartbeat for ``STALE_BEATS`` intervals (and did not say it left)."""
    now = time.time() if now is None else now
    return not p.done and now - p.time > STALE_BEATS * max(p.heartbeat_s, 0.5)


@dataclass
class NodeRow:
    """One node of a job: its processes (one per GPU), newest snapshots."""
    node: int
    host: str
    procs: list[events.NodeProgress]

    @property
    def tokens_per_second(self) -> float | None:
        rates = [p.tokens_per_second for p in self.procs if p.tokens_per_second is not None]
        return sum(rates) if rates else None

    def stale(self, now: float | None = None) -> bool:
        return bool(self.procs) and all(is_stale(p, now) for p in self.procs)

    @property
    def ranks(self) -> str:
        rs = sorted(p.rank for p in self.procs)
        return f"rank {rs[0]}" if len(rs) == 1 else (f"ranks {rs[0]}-{rs[-1]}" if rs == list(range(rs[0], rs[-1] + 1))
                                                     else "ranks " + ",".join(map(str, rs)))


def by_node(snapshots: dict[int, events.NodeProgress]) -> list[NodeRow]:
    """The snapshots grouped by node, node 0 first, each node's processes by local rank."""
    groups: dict[int, list[events.NodeProgress]] = {}
    for p in snapshots.values():
        groups.setdefault(p.node, []).append(p)
    return [NodeRow(node=k, host=(v[0].host if v else ""), procs=sorted(v, key=lambda p: p.local_rank))
            for k, v in sorted(groups.items())]


def lost_nodes(snapshots: dict[int, events.NodeProgress], now: float | None = None) -> list[NodeRow]:
    """Nodes whose every process has stopped sending heartbeats without saying it left."""
    return [row for row in by_node(snapshots) if row.stale(now)]


def describe_lost(row: NodeRow, now: float | None = None) -> str:
    """``node 1 (host gpu-b, ranks 2-3): no heartbeat for 7 s``."""
    now = time.time() if now is None else now
    age = now - max(p.time for p in row.procs)
    from engine.core.safe_text import visible
    return f"node {row.node} (host {visible(row.host)}, {row.ranks}): no heartbeat for {age:.0f} s"
