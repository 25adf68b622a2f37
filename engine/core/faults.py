"""Fault injection for tests of failures a CPU cannot produce on demand.

``QLORA_TUI_FAULTS`` is a comma-separated list read once per run:
- ``nan@N``: the loss of optimizer step N becomes NaN (its gradients too);
- ``oom@N``: step N raises ``torch.OutOfMemoryError``;
- ``slow=S``: every step sleeps S seconds (lets a test kill a run mid-way);
- ``diskfull@N``: the checkpoint of step N fails with ENOSPC while being written;
- ``markerfull@N``: the disk fills up as checkpoint N's ``COMPLETE`` marker is written: the
  marker and every event-log write fail with ENOSPC (a write is cut half-way) until space is
  freed (the log's reserve, see ``engine.core.events.JsonlWriter``);
- ``logfull@N``: the same for the event log alone, from step N's event on;
- ``probe:NAME``: the plan-time check of fast path NAME raises (engine.training.probes);
- ``probewrong:NAME``: that check's fast result comes out wrong (off by 50%);
- ``fp8drift``: the FP8 guard's FP8 loss comes out 2% off (engine.training.sft).
Unset in normal use; never set by the product itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Faults:
    nan_step: int | None = None
    oom_step: int | None = None
    diskfull_step: int | None = None
    markerfull_step: int | None = None
    logfull_step: int | None = None
    slow: float = 0.0
    probe_raise: frozenset = frozenset()
    probe_wrong: frozenset = frozenset()
    fp8_drift: bool = False

    @property
    def any(self) -> bool:
        return bool(self.nan_step or self.oom_step or self.diskfull_step or self.slow
                    or self.markerfull_step or self.logfull_step or self.probe_raise or self.probe_wrong
                    or self.fp8_drift)


def from_env() -> Faults:
    f = Faults()
    for item in filter(None, (x.strip() for x in os.environ.get("QLORA_TUI_FAULTS", "").split(","))):
        if item.startswith("nan@"):
            f.nan_step = int(item[4:])
        elif item.startswith("oom@"):
            f.oom_step = int(item[4:])
        elif item.startswith("diskfull@"):
            f.diskfull_step = int(item[9:])
        elif item.startswith("markerfull@"):
            f.markerfull_step = int(item[11:])
        elif item.startswith("logfull@"):
            f.logfull_step = int(item[8:])
        elif item.startswith("slow="):
            f.slow = float(item[5:])
        elif item.startswith("probe:"):
            f.probe_raise = f.probe_raise | {item[6:]}
        elif item.startswith("probewrong:"):
            f.probe_wrong = f.probe_wrong | {item[11:]}
        elif item == "fp8drift":
            f.fp8_drift = True
    return f


# the simulated full disk of markerfull/logfull: set when it fills, cleared when space is freed
import threading  # noqa: E402
DISK_FULL = threading.Event()
