"""engine.core.events.follow: history, live lines, the end of a log, and a log replaced under it."""
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


def replace_atomically(path, evs):
    tmp = path.with_suffix(".tmp")
    write(tmp, evs, "w")
    tmp.replace(path)


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


def test_follow_reopens_a_replaced_log_and_reads_the_new_file(tmp_path):
    log = tmp_path / "events.jsonl"
    write(log, [events.RunStarted(total_steps=4), events.Step(step=1), events.Step(step=2), events.Step(step=3)])
    q, stop, t = start(log)
    try:
        assert [getattr(e, "step", None) for e in take(q, 4)] == [None, 1, 2, 3]
        old_inode = os.stat(log).st_ino
        # a resume's rollback: the log rewritten without step 3, renamed over the old one
        replace_atomically(log, [events.RunStarted(total_steps=4), events.Step(step=1), events.Step(step=2),
                                 events.Status(phase="resume", message="resuming from checkpoint-2")])
        assert os.stat(log).st_ino != old_inode
        write(log, [events.RunStarted(total_steps=4, resumed_from_step=2), events.Step(step=3)])
        again = take(q, 6)
        assert [e.type for e in again] == ["run_started", "step", "step", "status", "run_started", "step"]
        assert again[3].phase == "resume" and again[4].resumed_from_step == 2
        write(log, [events.Step(step=4), events.RunFinished(step=4)])
        assert [e.type for e in take(q, 2)] == ["step", "run_finished"]
        assert q.get(timeout=5) is None              # ends at the terminal event at the end
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
