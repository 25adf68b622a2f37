"""Follow a run log from a worker and hand events over in batches, at most one per `interval`.

``engine.service.follow`` polls the log (``EventLog.read_new``, never blocking) every ``POLL``
seconds; this keeps what it finds until ``interval`` has passed since the last
batch went out: the whole history at once when attaching, a step after a pause at once, and the
last event before a pause never held back longer than one interval. A multi-process job's
per-node progress (RUN_DIR/nodes/, ``engine.core.nodes``) is merged into the same batches.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

POLL = 0.1


def follow_batches(run_dir: str | Path, stop: threading.Event,
                   post: Callable[[list], None], alive: Callable[[], bool] | None = None,
                   interval: float = 0.1, cancelled: Callable[[], bool] = lambda: False) -> str:
    """Call ``post(batch)`` (from this thread) until the run's log ends; return why it ended."""
    from engine import service

    held: list = []
    last_post = 0.0
    why = "ended"
    try:
        for batch in service.follow(run_dir, stop, POLL, alive):
            if cancelled():
                stop.set()
                break
            held += batch
            if held and time.monotonic() - last_post >= interval:
                post(held)
                held, last_post = [], time.monotonic()
    except Exception as e:  # a broken log must end the follower, not hang it
        why = f"error: {e}"
    if held:
        post(held)
    if stop.is_set() and why == "ended":
        why = "detached"
    return why
