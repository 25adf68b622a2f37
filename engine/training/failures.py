"""How a run's failure is named: pure functions from an exception (or a halt) to ``run_failed``.

``classify_failure`` decides the kind (oom, data, config, disk, killed, error) and the one line
the user reads; it touches no thread, file or GPU (the caller passes the checkpoints it knows of),
so it is tested on its own.
"""
from __future__ import annotations

import errno
from pathlib import Path

from engine.core import events
from engine.core.units import is_nonfinite


class PreflightError(ValueError):
    """A check before a run directory exists failed (engine.training.preflight): one line."""


def is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC however the writer reports it (OSError, safetensors' or torch's own errors)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if "no space left" in text or "os error 28" in text or "disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def is_oom(e: BaseException) -> bool:
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def _is_data_error(e: BaseException) -> bool:
    from engine.dataset.data import DataError
    return isinstance(e, (DataError, PreflightError))


def _is_config_error(e: BaseException) -> bool:
    from engine.core.config import ConfigError
    from engine.models.source import ModelError
    return isinstance(e, (ModelError, ConfigError))


def classify_failure(e: BaseException, *, step: int, checkpoints: list[Path] = (),
                     detail: str = "") -> events.RunFailed:
    """The ``run_failed`` event for ``e`` raised at optimizer step ``step`` (the last one done);
    ``checkpoints``: the run's complete checkpoints, oldest first; ``detail``: the traceback."""
    last = Path(checkpoints[-1]).name if checkpoints else None
    if is_oom(e):
        kept = f"; last checkpoint {last} is intact (resume with the fix)" if last else ""
        return events.RunFailed(reason=f"CUDA out of memory at step {step + 1}{kept}", kind=events.FailKind.OOM,
                                step=step, detail=detail)
    if _is_data_error(e):
        return events.RunFailed(reason=str(e).splitlines()[0], kind=events.FailKind.DATA, step=step, detail=detail)
    if _is_config_error(e):
        return events.RunFailed(reason=" ".join(str(e).split()), kind=events.FailKind.CONFIG, step=step, detail=detail)
    if is_disk_full(e):
        kept = f"; previous checkpoint {last} kept" if last else ""
        return events.RunFailed(reason=f"disk full while saving at step {step}{kept}; free space and resume",
                                kind=events.FailKind.DISK, step=step, detail=detail)
    if isinstance(e, KeyboardInterrupt):
        return events.RunFailed(reason="interrupted", kind=events.FailKind.KILLED, step=step, detail=detail)
    msg = str(e).strip().splitlines()
    return events.RunFailed(reason=f"{type(e).__name__}: {msg[0][:300] if msg else ''}".rstrip(": "),
                            kind=events.FailKind.ERROR, step=step, detail=detail)


def nan_halt(cfg, step: int, loss) -> events.RunFailed:
    """``train.nan_policy = halt`` stopped the run at ``step``: the failure and the fix to try."""
    from engine.training.hints import extreme_scaling
    what = "loss" if is_nonfinite(loss) else "grad norm"
    extreme = extreme_scaling(cfg)
    fix = extreme[1] if extreme else "lower train.learning_rate, e.g. to 1e-4"
    return events.RunFailed(reason=f"non-finite {what} at step {step}: halted (train.nan_policy = "
                            f"halt); {fix}", kind=events.FailKind.NAN, step=step)


def log_write_failure(ev: events.Event, exc: BaseException, log_name: str) -> events.Event:
    """A run that ended while its event log could not be written ends failed, saying so (kind
    ``disk`` when the disk is full); a failure event stays what it is."""
    if not isinstance(ev, events.RunFinished):
        return ev
    disk = is_disk_full(exc)
    return events.RunFailed(kind=events.FailKind.DISK if disk else events.FailKind.ERROR, step=ev.step, reason=(
        f"{'disk full: ' if disk else ''}{log_name} could not be written ({exc}); the run stopped "
        f"at step {ev.step}" + (f", adapter saved in {ev.adapter_dir}" if ev.adapter_dir else "")
        + "; free space and resume"))
