"""engine.core.events.follow: history, live lines, a resume appended to the log, the end of a log."""
from __future__ import annotations

import os
import queue
import threading
import time

from engine.core import events


def write(path, evs, mode="a"):
    with open(path, mode, encoding="utf-8") as fh:
        for ev in evs:
            fh.write(events.dumps(ev) + "\n")


def start(path, **kw):
    q: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def reader():
        try:
            for ev in events.follow(path, stop=stop, poll=0.02, **kw):
                q.put(ev)
        finally:
            q.put(None)
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    return q, stop, t


def take(q, n, timeout=10.0):
    out, end = [], time.monotonic() + timeout
    while len(out) < n:
        ev = q.get(timeout=max(0.01, end - time.monotonic()))
        assert ev is not None, f"follow ended after {out}"
        out.append(ev)
    return out


def test_follow_reads_history_then_appended_lines_and_ends_at_the_last_terminal_event(tmp_path):
    log = tmp_path / "events.jsonl"
    write(log, [events.RunStarted(total_steps=4), events.Step(step=1), events.Step(step=2), events.Step(step=3)])
    q, stop, t = start(log)
    try:
        assert [getattr(e, "step", None) for e in take(q, 4)] == [None, 1, 2, 3]
        inode = os.stat(log).st_ino
        # a resume appends its marker and a new segment: the file is never replaced
        write(log, [events.Resumed(from_step=2, checkpoint="checkpoint-2"),
                    events.RunStarted(total_steps=4, resumed_from_step=2), events.Step(step=3)])
        with open(log, "ab") as fh:                  # a line being written: not an event yet
            fh.write(events.dumps(events.Step(step=4)).encode()[:9])
        again = take(q, 3)
        assert [type(e) for e in again] == [events.Resumed, events.RunStarted, events.Step]
        assert again[0].from_step == 2 and again[1].resumed_from_step == 2 and again[2].step == 3
        with open(log, "ab") as fh:
            fh.write(events.dumps(events.Step(step=4)).encode()[9:] + b"\n")
        write(log, [events.RunFinished(step=4)])
        assert [type(e) for e in take(q, 2)] == [events.Step, events.RunFinished]
        assert q.get(timeout=5) is None              # ends at the terminal event at the end
        assert os.stat(log).st_ino == inode
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()


def test_follow_goes_on_past_an_earlier_failure_of_a_resumed_run(tmp_path):
    log = tmp_path / "events.jsonl"
    write(log, [events.RunStarted(total_steps=4), events.Step(step=1), events.RunFailed(kind="oom", step=1),
                events.Status(phase="resume"), events.RunStarted(resumed_from_step=1), events.Step(step=2)])
    q, stop, t = start(log)
    try:
        assert [e.type for e in take(q, 6)][-1] == "step"
        write(log, [events.RunFinished(step=2)])
        assert take(q, 1)[0].type == "run_finished"
        assert q.get(timeout=5) is None
    finally:
        stop.set()
        t.join(5)


def test_follow_ends_on_stop_and_on_a_dead_writer(tmp_path):
    log = tmp_path / "events.jsonl"
    write(log, [events.RunStarted(total_steps=4), events.Step(step=1)])
    q, stop, t = start(log)
    take(q, 2)
    stop.set()
    assert q.get(timeout=5) is None
    q, stop, t = start(log, alive=lambda: False)
    take(q, 2)
    assert q.get(timeout=5) is None
