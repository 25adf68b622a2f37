"""Typed run events: the spine between the engine and every consumer.

One run emits one ordered stream of events. The JSONL run log, the headless printer and
the TUI are all subscribers of it (``EventBus``); a UI attached to a run in another process
reads the same events back from ``events.jsonl`` (``follow``). Each event serialises to one
JSON object with ``type`` and ``time``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator


class FailKind(StrEnum):
    """Why a run failed (``RunFailed.kind``); the value is what events.jsonl holds."""
    ERROR = "error"
    OOM = "oom"
    NAN = "nan"
    CONFIG = "config"
    DATA = "data"
    DISK = "disk"
    KILLED = "killed"
    NODE_LOST = "node_lost"       # a multi-node job lost a node: the run is crashed, resumable


class Severity(StrEnum):
    """How much a hint matters (``Hint.severity``)."""
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Phase(StrEnum):
    """What a run is doing before/after its steps (``Status.phase``)."""
    MODEL = "model"
    TOKENIZER = "tokenizer"
    DATA = "data"
    TOKENIZE = "tokenize"
    BUILD = "build"
    RESUME = "resume"
    SAVE = "save"


class ExportKind(StrEnum):
    """What a GGUF export holds (``Exported.kind``)."""
    MODEL = "model"
    ADAPTER = "adapter"


class ExportStage(StrEnum):
    """What an export is doing (``ExportProgress.stage``)."""
    CHECK = "check"               # the source, the type, the target file: before any work
    MERGE = "merge"               # merging the adapter into its base (or reusing that merge)
    WRITE = "write"               # writing the file(s)
    VERIFY = "verify"             # reading the result back and comparing it
    FILES = "files"               # Modelfile, model card, the run's record
    DONE = "done"


@dataclass
class Event:
    type: ClassVar[str] = "event"
    time: float = field(default_factory=time.time, kw_only=True)

    def __post_init__(self):
        for f in dataclasses.fields(self):      # "oom" given, FailKind.OOM kept: typed for every reader
            enum = _ENUMS.get(f.type)
            if enum is not None and isinstance(getattr(self, f.name), str):
                setattr(self, f.name, _member(enum, getattr(self, f.name)))

    def to_dict(self) -> dict:
        d = {"type": self.type}
        d.update(dataclasses.asdict(self))
        return d


@dataclass
class RunStarted(Event):
    type: ClassVar[str] = "run_started"
    run_dir: str = ""
    model: str = ""
    device: str = ""
    total_steps: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    trainable_params: int = 0
    total_params: int = 0
    resumed_from_step: int = 0
    config: dict = field(default_factory=dict)
    plan: list = field(default_factory=list)   # what auto-choices were made, and why
    pid: int = 0
    # time to train predicted for this segment's steps (engine.planning.timing), before step 1
    predicted_seconds: float | None = None
    prediction: str = ""                        # what it was computed for (card, range, label)


@dataclass
class Status(Event):
    """A phase change before/after training: loading model, tokenizing, saving..."""
    type: ClassVar[str] = "status"
    phase: Phase | str = ""
    message: str = ""
    progress: float | None = None


@dataclass
class Step(Event):
    type: ClassVar[str] = "step"
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    epoch: float | None = None
    eta_seconds: float | None = None
    tokens_seen: int = 0
    peak_memory_bytes: int | None = None


@dataclass
class Preference(Event):
    """A preference method's own metrics (train.method = dpo, orpo, kto, simpo), beside the
    step's loss (``split = "train"``, averaged over the logging window) or an eval's
    (``split = "eval"``, over the eval pairs). Rewards are the method's implicit rewards (DPO/KTO:
    β × the log-ratio to the reference; ORPO/SimPO: scaled policy log-probabilities); accuracy is
    the share of pairs whose chosen reward beats the rejected one; kl: KTO's reference KL."""
    type: ClassVar[str] = "preference"
    step: int = 0
    method: str = ""
    split: str = "train"
    rewards_chosen: float | None = None
    rewards_rejected: float | None = None
    margin: float | None = None
    accuracy: float | None = None
    kl: float | None = None
    logps_chosen: float | None = None
    logps_rejected: float | None = None
    loss: float | None = None


@dataclass
class Eval(Event):
    type: ClassVar[str] = "eval"
    step: int = 0
    eval_loss: float | None = None


@dataclass
class Checkpoint(Event):
    type: ClassVar[str] = "checkpoint"
    step: int = 0
    path: str = ""


@dataclass
class Hint(Event):
    type: ClassVar[str] = "hint"
    rule: str = ""
    severity: Severity = Severity.WARNING
    symptom: str = ""
    cause: str = ""
    fix: str = ""
    step: int = 0
    overrides: list = field(default_factory=list)   # the fix as ``section.key=value`` (--set)


@dataclass
class RunWarning(Event):
    """Something the run goes on despite (bad rows skipped, a setting ignored, a failing event
    sink): shown by the headless printer (stderr) and the TUI, kept in the log."""
    type: ClassVar[str] = "warning"
    message: str = ""
    source: str = ""              # preflight | build | sink
    step: int = 0


@dataclass
class NumericsCheck(Event):
    """A fast path's numbers checked against the reference path on the run's own data (the FP8
    guard: the first micro-batch's loss both ways); ``kept`` False: the path was turned off."""
    type: ClassVar[str] = "numerics_check"
    path: str = ""                 # the config key of the fast path (train.fp8_base)
    step: int = 0
    reference_loss: float | None = None
    fast_loss: float | None = None
    relative_difference: float | None = None
    threshold: float = 0.0
    kept: bool = True
    seconds: float = 0.0           # what the check cost (its extra forwards)


@dataclass
class Resumed(Event):
    """Appended when ``train --resume`` continues the run; the log is never rewritten. What was
    logged past ``from_step`` (steps, evals, checkpoints, hints) is work the resume redoes:
    readers drop it (``engine.core.summary.RunSummary``)."""
    type: ClassVar[str] = "resumed"
    from_step: int = 0
    checkpoint: str = ""          # the checkpoint it continues from; "" when it starts over


@dataclass
class RunFinished(Event):
    type: ClassVar[str] = "run_finished"
    step: int = 0
    adapter_dir: str = ""
    final_loss: float | None = None
    stopped: bool = False         # True when a stop was requested (graceful stop)
    reason: str = "completed"
    train_seconds: float | None = None       # the training steps' wall time (this segment; evaluations
                                             # excluded, checkpoint saves included)
    predicted_seconds: float | None = None   # what run_started predicted for them


@dataclass
class RunFailed(Event):
    type: ClassVar[str] = "run_failed"
    reason: str = ""              # one line
    kind: FailKind = FailKind.ERROR
    step: int = 0
    detail: str = ""              # traceback or longer text, for the log only


@dataclass
class NodeProgress(Event):
    """One worker process of a multi-process job, as its node writes it to
    RUN_DIR/nodes/node-K.jsonl (``engine.core.nodes``; never to events.jsonl, which rank 0
    alone writes): at each logging step and as a heartbeat. Each line is a whole snapshot; a
    reader keeps the newest per rank (``RunSummary.nodes``). ``tokens_per_second`` is this
    process's own rate; the job's is the ``Step`` event's. ``gpu``: this process's GPU
    (``index``, ``name``, ``util_percent``, ``mem_used_bytes``, ``mem_total_bytes``), {} on the CPU."""
    type: ClassVar[str] = "node_progress"
    node: int = 0
    rank: int = 0
    local_rank: int = 0
    host: str = ""
    pid: int = 0
    step: int = 0
    tokens_per_second: float | None = None
    tokens_seen: int = 0
    heartbeat_s: float = 0.0       # the writer's heartbeat interval: a reader calls it stale after 3
    gpu: dict = field(default_factory=dict)
    done: bool = False             # the process left training (finished, stopped or failed)


@dataclass
class Exported(Event):
    """An export after training (``qlora-tui export``): the GGUF file and its verification."""
    type: ClassVar[str] = "export"
    path: str = ""
    kind: ExportKind = ExportKind.MODEL
    gguf_type: str = ""
    size_bytes: int = 0
    max_abs_diff: float | None = None
    tolerance: float | None = None
    top1_agreement: float | None = None
    tokenizer_roundtrip: bool | None = None
    seconds: float = 0.0


@dataclass
class Generations(Event):
    """``eval.prompts`` answered by the current adapter at an eval (greedy, bounded by
    ``max_new_tokens``): ``samples`` is ``[{"prompt", "answer"}]``; ``seconds`` their cost."""
    type: ClassVar[str] = "generations"
    step: int = 0
    samples: list = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class JobProgress(Event):
    """An action on a finished run (export, merge, compare, push) in a child process: how far."""
    type: ClassVar[str] = "job_progress"
    job: str = ""
    fraction: float = 0.0
    message: str = ""


@dataclass
class JobDone(Event):
    """The action's end: its report (a dict, the CLI's ``--json``), or ``error`` (one line)."""
    type: ClassVar[str] = "job_done"
    job: str = ""
    report: dict | None = None
    error: str = ""


@dataclass
class ExportStarted(Event):
    """An export target (``engine.outputs.targets``) began on a run's artifact."""
    type: ClassVar[str] = "export_started"
    target: str = ""
    src: str = ""
    artifact: str = ""             # ArtifactKind: adapter | full
    options: dict = field(default_factory=dict)
    pid: int = 0


@dataclass
class ExportProgress(Event):
    """How far an export is: ``done`` of ``total`` (a fraction of the whole export: total 1)."""
    type: ClassVar[str] = "export_progress"
    target: str = ""
    stage: ExportStage | str = ""
    done: float = 0.0
    total: float = 1.0
    message: str = ""


@dataclass
class ExportFinished(Event):
    """The export's end: its report (what ``qlora-tui export --json`` prints)."""
    type: ClassVar[str] = "export_finished"
    target: str = ""
    report: dict = field(default_factory=dict)


@dataclass
class ExportFailed(Event):
    """The export could not run or its result failed verification: ``error`` is one line."""
    type: ClassVar[str] = "export_failed"
    target: str = ""
    error: str = ""


EVENT_TYPES: dict[str, type[Event]] = {
    c.type: c for c in (RunStarted, Status, Step, Preference, Eval, Checkpoint, Hint, RunWarning, Resumed,
                        RunFinished, RunFailed, Exported, NumericsCheck, Generations, JobProgress, JobDone,
                        NodeProgress, ExportStarted, ExportProgress, ExportFinished, ExportFailed)
}
TERMINAL = (RunFinished, RunFailed)       # isinstance(ev, TERMINAL): the run's last event
EXPORT_END = (ExportFinished, ExportFailed)   # an export log's last event (``engine.outputs.jobs``)
# fields read back as their StrEnum (by annotation); a value a newer version wrote stays text
_ENUMS = {"FailKind": FailKind, "Severity": Severity, "Phase | str": Phase, "ExportKind": ExportKind,
          "ExportStage | str": ExportStage}


def _member(enum: type[StrEnum], v: str) -> str:
    try:
        return enum(v)
    except ValueError:
        return v


def from_dict(d: dict) -> Event:
    """Rebuild a typed event from its JSON form (unknown keys ignored, unknown types kept generic)."""
    cls = EVENT_TYPES.get(d.get("type", ""))
    if cls is None:
        ev = Event(time=d.get("time", 0.0))
        return ev
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    for k, v in d.items():       # a damaged line (a number that is text, say) is no event
        want = kinds.get(k)
        if want in ("int", "float", "float | None", "int | None") and v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{k}: {v!r} is not a number")
        elif (want == "str" or want in _ENUMS) and not isinstance(v, str):
            raise ValueError(f"{k}: {v!r} is not text")
    return cls(**{k: v for k, v in d.items() if k in kinds})     # enum fields: see Event.__post_init__


def _clean(v: Any):
    """JSON has no NaN/Inf: write them as strings so the line stays valid JSON."""
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def dumps(ev: Event) -> str:
    return json.dumps(_clean(ev.to_dict()), ensure_ascii=False, default=str)


# fields written as "nan"/"inf" strings by ``_clean``; text fields (a hint's rule "nan") stay text
FLOAT_FIELDS = frozenset(f.name for c in (Step, Preference, Eval, RunFinished, Status) for f in dataclasses.fields(c)
                         if f.type in ("float | None", "float", float))


def loads(line: str) -> Event:
    d = json.loads(line)
    if not isinstance(d, dict):
        raise ValueError("not an event")
    for k, v in list(d.items()):
        if v in ("nan", "inf", "-inf") and k in FLOAT_FIELDS:
            d[k] = float(v)
    return from_dict(d)


class EventBus:
    """Fan-out of one run's events to subscribers, in order; keeps the history for late joiners.

    A subscriber that raises is never silently lost: it is dropped, the failure is said on
    stderr and to the other subscribers (a ``RunWarning``, source ``sink``), and every
    ``on_sink_error(fn, exc)`` callback is called (``engine.training.runner.Run`` stops the run then:
    a run whose log cannot be written must not go on as if it were logged).
    """

    def __init__(self):
        self._subs: list[Callable[[Event], None]] = []
        self._lock = threading.Lock()
        self.history: list[Event] = []
        self.on_sink_error: list[Callable[[Callable, BaseException], None]] = []

    def subscribe(self, fn: Callable[[Event], None], replay: bool = True) -> Callable[[], None]:
        with self._lock:
            if replay:
                for ev in self.history:
                    fn(ev)
            self._subs.append(fn)

        def unsubscribe():
            with self._lock:
                if fn in self._subs:
                    self._subs.remove(fn)
        return unsubscribe

    def emit(self, ev: Event) -> None:
        with self._lock:
            self.history.append(ev)
            subs = list(self._subs)
        for fn in subs:
            try:
                fn(ev)
            except Exception as e:  # a broken consumer must not kill the run, nor vanish unsaid
                self._sink_failed(fn, e)

    def _sink_failed(self, fn, exc: BaseException) -> None:
        import sys
        with self._lock:
            if fn not in self._subs:
                return
            self._subs.remove(fn)
        name = getattr(fn, "describe", None) or getattr(fn, "__qualname__", type(fn).__name__)
        msg = f"event sink {name} failed and was dropped: {type(exc).__name__}: {str(exc)[:200]}"
        with self._lock:      # said on stderr once: by a sink that prints warnings there, else here
            printed = any(getattr(s, "shows_warnings", False) for s in self._subs)
        if not printed:
            try:
                print(f"warning: {msg}", file=sys.stderr, flush=True)
            except Exception:
                pass
        self.emit(RunWarning(source="sink", message=msg))
        for cb in list(self.on_sink_error):
            try:
                cb(fn, exc)
            except Exception:
                pass


class JsonlWriter:
    """Appends each event as one line to ``events.jsonl`` (fsync on terminal events).

    A line is written whole or not at all: each is one ``write`` on an O_APPEND descriptor and a
    write that fails is cut back off (``ftruncate``). The writer keeps ``RESERVE`` bytes of disk
    in ``events.reserve`` next to the log: when the disk is full it frees them and writes the
    line again, so the run's final event (``run_failed``, kind ``disk``) always fits. The
    failure is still raised (the disk *is* full): the bus reports it and the run stops;
    ``write_final`` then writes the terminal event into the freed space.
    """
    RESERVE = 256 * 1024

    def __init__(self, path: str | Path):
        from engine.core.faults import from_env
        self.path = Path(path)
        self.describe = f"{self.path.name} writer"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()
        self._reserve = self.path.with_name(self.path.stem + ".reserve")
        self._faults = from_env()
        self.last_written: Event | None = None
        try:
            with open(self._reserve, "wb") as fh:
                fh.write(b"\0" * self.RESERVE)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            self._release_reserve()

    def __call__(self, ev: Event) -> None:
        line = (dumps(ev) + "\n").encode("utf-8", errors="replace")
        with self._lock:
            if self._fd < 0:
                return
            self._simulated_fault(ev)
            try:
                self._append(line)
            except OSError:
                self._release_reserve()
                self._append(line, retry=True)
                self.last_written = ev
                raise
            self.last_written = ev
            if isinstance(ev, (*TERMINAL, Checkpoint, Resumed)):
                os.fsync(self._fd)

    def write_final(self, ev: Event) -> bool:
        """Write the terminal event after a failure (best effort, into the freed reserve)."""
        line = (dumps(ev) + "\n").encode("utf-8", errors="replace")
        with self._lock:
            if self._fd < 0:
                return False
            if self.last_written is ev:
                return True
            self._release_reserve()
            try:
                self._append(line, retry=True)
                os.fsync(self._fd)
                return True
            except OSError:
                return False

    def _append(self, line: bytes, retry: bool = False) -> None:
        from engine.core import faults
        size = os.fstat(self._fd).st_size
        try:
            if faults.DISK_FULL.is_set():          # injected (tests): half a line, then ENOSPC
                os.write(self._fd, line[: len(line) // 2])
                raise OSError(28, "No space left on device (injected)", str(self.path))
            n = os.write(self._fd, line)
            if n != len(line):
                raise OSError(28, "No space left on device (short write)", str(self.path))
        except OSError:
            try:
                os.ftruncate(self._fd, size)       # never leave half a line behind
            except OSError:
                pass
            raise

    def _simulated_fault(self, ev: Event) -> None:
        step = getattr(ev, "step", None)
        if self._faults.logfull_step and isinstance(ev, Step) and step == self._faults.logfull_step:
            from engine.core import faults
            faults.DISK_FULL.set()

    def _release_reserve(self) -> None:
        from engine.core import faults
        try:
            self._reserve.unlink()
        except OSError:
            pass
        faults.DISK_FULL.clear()                   # injected: the freed reserve is space again

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                try:
                    os.close(self._fd)
                except OSError:
                    pass
                self._fd = -1
                try:
                    self._reserve.unlink()
                except OSError:
                    pass


# what a damaged line can raise while it is turned into an event (it is skipped)
BAD_LINE = (ValueError, TypeError, AttributeError, KeyError, RecursionError)


# a log line is an event of at most a few KiB (a plan, a traceback's detail); a run's whole log
# stays far below a GiB. Past these it is damage (or planted), never read into memory.
MAX_LINE_BYTES = 4 * 2**20
MAX_LOG_BYTES = 2 * 2**30


class EventLog:
    """A run log read as it grows, never blocking: ``read_new()`` returns the events of the
    complete lines written since the last call. Any damage is survived: a torn last line (a
    kill, even inside a multi-byte character) is kept until its end arrives, bytes that are not
    UTF-8 and lines that are no event are skipped. The log is append-only (a resume appends a
    ``Resumed`` marker; nothing rewrites it), so an offset is all a reader keeps."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""            # the torn end of the last read: completed by the next one
        self._skipping = False         # inside a line longer than MAX_LINE_BYTES

    @property
    def pending(self) -> bool:
        """A line was begun and not finished (the writer is mid-line, or was killed there)."""
        return bool(self._partial)

    def read_new(self, strict: bool = False) -> list[Event]:
        """The events completed since the last call ([] for a log that does not exist yet). A log
        that cannot be read (a directory, no permission) gives [] or, with ``strict``, OSError."""
        from engine.core import files
        out: list[Event] = []
        try:
            with files.open_regular(self.path) as fh:    # a FIFO or a device is damage, never read
                size = os.fstat(fh.fileno()).st_size
                if size > MAX_LOG_BYTES:                 # no run logs that much: planted, or damage
                    raise files.TooLarge(self.path, size, MAX_LOG_BYTES)
                fh.seek(self._offset)
                while True:                              # in chunks: memory is the events, not the file
                    data = fh.read(1 << 20)
                    if not data:
                        break
                    self._offset += len(data)
                    *lines, self._partial = (self._partial + data).split(b"\n")
                    if len(self._partial) > MAX_LINE_BYTES:
                        self._partial = b""              # no event is that long: a damaged line, skipped
                        self._skipping = True
                    for raw in lines:
                        if self._skipping:               # the end of that overlong line
                            self._skipping = False
                            continue
                        try:
                            out.append(loads(raw.decode("utf-8", errors="replace")))
                        except BAD_LINE:
                            continue
        except FileNotFoundError:
            return out
        except OSError:
            if strict:
                raise
            return out
        return out


def read_events(path: str | Path, strict: bool = False) -> list[Event]:
    """All complete events of a run log (``EventLog(path).read_new()`` once). A log that cannot
    be read at all gives [] or, with ``strict``, raises OSError (``engine.core.rundir.info``
    reports the run as damaged)."""
    return EventLog(path).read_new(strict=strict)


class SideLogs:
    """The ``*.jsonl`` files of a folder read as they grow (a multi-node job's RUN_DIR/nodes/,
    ``engine.core.nodes``): each file an ``EventLog``, files that appear later picked up."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._logs: dict[str, EventLog] = {}

    def read_new(self) -> list[Event]:
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(".jsonl"))
        except OSError:
            return []
        out: list[Event] = []
        for n in names[:4096]:
            log = self._logs.setdefault(n, EventLog(self.folder / n))
            out += log.read_new()
        return out


def follow_batches(path: str | Path, stop: threading.Event | None = None, poll: float = 0.2,
                   until_terminal: bool = True, alive: Callable[[], bool] | None = None,
                   side: str | Path | None = None,
                   terminal: tuple[type[Event], ...] = TERMINAL) -> Iterator[list[Event]]:
    """The events of a run log, one batch per poll: all history first, then what each poll finds
    (an empty batch when nothing came, so a caller can check its own cancellation in between).
    ``side``: a folder whose ``*.jsonl`` files are merged in (``SideLogs``: a multi-node job's
    per-node progress), ahead of the log's own events of the same poll.

    Ends at a terminal event that is the last line of the log (``until_terminal``; a resumed
    run's log goes on past its earlier ``run_failed``), when ``stop`` is set, or when
    ``alive()`` turns False and no more lines come (a crashed writer). ``terminal``: the
    classes that end the log (an export's log ends at ``EXPORT_END``).
    """
    log, ended, idle = EventLog(path), False, 0
    sides = SideLogs(side) if side is not None else None
    while True:
        batch = log.read_new()
        if sides is not None:
            extra = sides.read_new()
            if extra:
                yield extra
        yield batch
        if batch:
            idle = 0
            ended = until_terminal and isinstance(batch[-1], terminal)
            if ended:
                continue               # read again at once: the end, unless something follows
        elif ended and not log.pending:
            return
        if stop is not None and stop.is_set():
            return
        if not batch and alive is not None and not alive():
            idle += 1
            if idle > 2:
                return
        if stop is not None:
            stop.wait(poll)
        else:
            time.sleep(poll)


def follow(path: str | Path, stop: threading.Event | None = None, poll: float = 0.2,
           until_terminal: bool = True, alive: Callable[[], bool] | None = None,
           side: str | Path | None = None,
           terminal: tuple[type[Event], ...] = TERMINAL) -> Iterator[Event]:
    """``follow_batches`` one event at a time (the CLI's attach, an export's log, tests)."""
    for batch in follow_batches(path, stop, poll, until_terminal, alive, side, terminal):
        yield from batch
