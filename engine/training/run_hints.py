"""A run's hints, wired: its events feed the hint rules (``engine.training.hints``) and a GPU
watcher feeds them NVML utilisation of the GPU the run trains on; new hints go on the bus."""
from __future__ import annotations

import threading
import time
from typing import Callable

from engine.core import events


class HintFeed:
    """Subscribed to a run's bus: each event through the rules, each hint they return emitted.

    A NaN step the trainer's own check already reported (its ``nan`` hint) is not reported
    again by the rules."""

    def __init__(self, hints, emit: Callable[[events.Event], None]):
        self.hints = hints
        self.emit = emit
        self.last_step = 0
        self._nan_steps: set[int] = set()

    def __call__(self, ev: events.Event) -> None:
        if isinstance(ev, events.Hint):
            if ev.rule == "nan":
                self._nan_steps.add(ev.step)
            return
        if isinstance(ev, events.Step):
            self.last_step = ev.step
        for h in self.hints.observe(ev):
            if h.rule == "nan" and h.step in self._nan_steps:
                continue
            self.emit(h)

    def watch_gpu(self, running: Callable[[], bool], every: float = 2.0) -> None:
        """Feed NVML utilisation of this process's GPU to the low-GPU-use rule while ``running()``."""
        from engine.training.distributed import local_rank
        from engine.training.gpu import GpuSampler
        sampler = GpuSampler.for_cuda_device(local_rank())   # through CUDA_VISIBLE_DEVICES
        if not sampler.available:
            return
        try:
            while running():
                if self.last_step > 0:
                    for g in sampler.sample():
                        if g.util_percent is not None:
                            for h in self.hints.observe_gpu(g.util_percent, self.last_step):
                                self.emit(h)
                time.sleep(every)
        finally:
            sampler.close()


def attach(cfg, bus: events.EventBus, running: Callable[[], bool]) -> HintFeed | None:
    """Wire the hint rules to ``bus`` and start the GPU watcher (a daemon thread, while ``running()``)."""
    try:
        from engine.training.hints import HintEngine
        hints = HintEngine(cfg)
    except ImportError:
        return None
    feed = HintFeed(hints, bus.emit)
    bus.subscribe(feed, replay=False)
    threading.Thread(target=feed.watch_gpu, args=(running,), daemon=True, name="qlora-gpu-hints").start()
    return feed
