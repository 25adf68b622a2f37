"""Follow a run log on a thread and hand events over in batches, at most one per `interval`.

``engine.core.events.follow`` blocks until the next line arrives, so a reader thread iterates it
into a queue and the calling (worker) thread drains the queue: everything that is already
there goes out as one batch (the whole history at once when attaching), then it waits
``interval`` before the next batch. The last event before a pause is never held back.
"""
from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Callable

_END = object()


def follow_batches(events_path: str | Path, stop: threading.Event,
                   post: Callable[[list], None], alive: Callable[[], bool] | None = None,
                   interval: float = 0.1, cancelled: Callable[[], bool] = lambda: False) -> str:
    """Call ``post(batch)`` (from this thread) until the log ends; return why it ended."""
    from engine.core import events

    q: queue.SimpleQueue = queue.SimpleQueue()
    outcome = {"why": "ended"}

    def reader():
        try:
            for ev in events.follow(events_path, stop=stop, alive=alive):
                q.put(ev)
        except Exception as e:  # a broken log must end the follower, not hang it
            outcome["why"] = f"error: {e}"
        finally:
            q.put(_END)

    t = threading.Thread(target=reader, name="qlora-tui-follow", daemon=True)
    t.start()
    last_post = 0.0
    while True:
        try:
            item = q.get(timeout=0.25)
        except queue.Empty:
            if cancelled():
                stop.set()
            continue
        batch, ended = [], item is _END
        if not ended:
            batch.append(item)
        while not ended:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                ended = True
            else:
                batch.append(item)
        if batch:
            wait = interval - (time.monotonic() - last_post)
            if wait > 0 and not ended:
                # wait out the interval, then include whatever arrived meanwhile
                time.sleep(wait)
                while True:
                    try:
                        item = q.get_nowait()
                    except queue.Empty:
                        break
                    if item is _END:
                        ended = True
                        break
                    batch.append(item)
            post(batch)
            last_post = time.monotonic()
        if ended:
            if stop.is_set() and outcome["why"] == "ended":
                outcome["why"] = "detached"
            return outcome["why"]
