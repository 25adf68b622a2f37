"""The state of a run folded from its events: the one fold of a run log.

``RunSummary.apply(event)`` is used by every reader: ``engine.core.rundir.info`` (the state the
``runs`` command and the Runs screen list), the model card, the headless printer and the TUI's
``RunState`` (which adds only what the screen needs). The resume rules live here once:

* a ``Resumed`` marker (appended by ``train --resume``; the log is never rewritten) drops what
  was logged past its ``from_step`` (steps, evals, checkpoints, hints, warnings): the resume
  redoes that work, so every series holds each step once, in order;
* a ``RunStarted`` opens a new segment: an earlier terminal event no longer ends the run (a
  resumed run's log goes on past its ``run_failed``); ``resumed_from_step == 0`` is a fresh
  start (every series starts over), as a log written before the marker existed also reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from engine.core.events import (Checkpoint, Eval, Event, FailKind, Generations, Hint, NodeProgress, Preference,
                                Resumed, RunFailed, RunFinished, RunStarted, RunWarning, Status, Step)
from engine.core.units import to_float


class State(StrEnum):
    """A run's state. The fold of its events gives NEW, LIVE (started, not ended), FINISHED,
    STOPPED or FAILED; ``engine.core.rundir.info`` turns LIVE into CRASHED when the writing
    process is gone, and a log it cannot read into DAMAGED."""
    LIVE = "live"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"
    CRASHED = "crashed"
    NEW = "new"
    DAMAGED = "damaged"


# a run in one of these states continues from its newest complete checkpoint with --resume
RESUMABLE = frozenset({State.STOPPED, State.FAILED, State.CRASHED})
# what a resume redoes when it continues after ``from_step``: logged past it, dropped by readers
REDONE = (Step, Preference, Eval, Checkpoint, Hint, RunWarning, Generations)
# a preference method's series (Preference events): name -> its field; eval ones are "eval_" + name
PREFERENCE_SERIES = {"accuracy": "accuracy", "margin": "margin", "chosen": "rewards_chosen",
                     "rejected": "rewards_rejected", "kl": "kl"}


def redone(ev: Event, from_step: int) -> bool:
    """True for an event a resume from ``from_step`` supersedes (work past the checkpoint)."""
    return isinstance(ev, REDONE) and (getattr(ev, "step", 0) or 0) > from_step


def _until(series: list, step: int) -> list:
    return [p for p in series if p[0] <= step]


@dataclass
class RunSummary:
    run_dir: Path | None = None
    model: str = ""
    device: str = ""
    started: float | None = None                      # time of the first run_started
    total_steps: int = 0
    trainable_params: int = 0
    total_params: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    plan: list = field(default_factory=list)
    resumed_from_step: int = 0
    phase: str = "waiting"
    message: str = ""
    progress: float | None = None
    step: int = 0
    losses: list = field(default_factory=list)        # [(step, loss)], NaN kept
    evals: list = field(default_factory=list)         # [(step, eval_loss)]
    lrs: list = field(default_factory=list)           # [(step, learning_rate)]
    grad_norms: list = field(default_factory=list)    # [(step, grad_norm)], inf/nan kept
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    tokens_seen: int = 0
    epoch: float | None = None
    eta_seconds: float | None = None
    predicted_seconds: float | None = None            # run_started's time to train (this segment)
    prediction: str = ""
    train_seconds: float | None = None                # run_finished's measured training time
    checkpoints: list = field(default_factory=list)   # [(step, path)]
    preference: dict = field(default_factory=dict)    # PREFERENCE_SERIES name (eval_: eval) -> [(step, v)]
    method: str = ""                                  # the preference method, once it logged
    hints: list = field(default_factory=list)         # Hint events, newest last
    warnings: list = field(default_factory=list)      # RunWarning events, newest last
    generations: list = field(default_factory=list)   # [(step, [{"prompt", "answer"}])] at evals
    end: RunFinished | RunFailed | None = None        # the terminal event of the last segment
    finished_reason: str = ""
    stopped: bool = False
    adapter_dir: str = ""
    final_loss: float | None = None
    fail_kind: FailKind | str = ""
    fail_step: int = 0
    events_seen: int = 0
    nodes: dict = field(default_factory=dict)          # rank -> its newest NodeProgress (multi-process jobs)

    def apply(self, ev: Event) -> None:
        if isinstance(ev, NodeProgress):     # RUN_DIR/nodes/*.jsonl, merged by the reader: no log event
            old = self.nodes.get(ev.rank)
            if old is None or ev.time >= old.time:
                self.nodes[ev.rank] = ev
            return
        self.events_seen += 1
        match ev:
            case RunStarted():
                self._started(ev)
            case Resumed(from_step=k):
                self._resumed(k)
            case Status():
                self.phase = ev.phase or self.phase
                self.message = ev.message
                self.progress = to_float(ev.progress)
            case Step():
                self._step(ev)
            case Preference():
                self._preference(ev)
            case Eval(step=s, eval_loss=loss) if to_float(loss) is not None:
                self.evals.append((s, to_float(loss)))
            case Checkpoint(step=s, path=path):
                self.checkpoints.append((s, path))
            case Hint():
                self.hints.append(ev)
            case RunWarning():
                self.warnings.append(ev)
            case Generations(step=s, samples=samples) if isinstance(samples, list):
                self.generations.append((s, [x for x in samples if isinstance(x, dict)]))
            case RunFinished():
                self._finished(ev)
            case RunFailed():
                self.end = ev
                self.fail_kind, self.fail_step = ev.kind, ev.step or 0
                self.finished_reason = self.message = ev.reason
                self.phase = "failed"

    def _started(self, ev: RunStarted) -> None:
        self.started = self.started or ev.time
        self._drop_after(ev.resumed_from_step or 0)
        self.resumed_from_step = ev.resumed_from_step or 0
        self.model, self.device, self.plan = ev.model, ev.device, list(ev.plan or [])
        self.total_steps = ev.total_steps or self.total_steps
        self.trainable_params, self.total_params = ev.trainable_params, ev.total_params
        self.train_rows, self.eval_rows = ev.train_rows, ev.eval_rows
        self.phase, self.message = "training", ""
        self.predicted_seconds = _seconds(ev.predicted_seconds)
        self.prediction = ev.prediction if isinstance(ev.prediction, str) else ""
        self.train_seconds = None
        # the ETA starts from the prediction until the first logged steps measure one
        self.eta_seconds = self.predicted_seconds

    def _resumed(self, k: int) -> None:
        self._drop_after(k)
        self.phase, self.message = "resume", f"resuming after step {k}"

    def _drop_after(self, k: int) -> None:
        """A new segment continues after step ``k`` (0: from the start): what was logged past
        it is redone, and an earlier end no longer ends the run."""
        self.losses, self.evals = _until(self.losses, k), _until(self.evals, k)
        self.lrs, self.grad_norms = _until(self.lrs, k), _until(self.grad_norms, k)
        self.checkpoints = _until(self.checkpoints, k)
        self.preference = {name: _until(series, k) for name, series in self.preference.items()}
        self.hints = [h for h in self.hints if not redone(h, k)]
        self.warnings = [w for w in self.warnings if not redone(w, k)]
        self.generations = _until(self.generations, k)
        self.step = min(self.step, k)
        self.end, self.stopped, self.fail_kind, self.fail_step = None, False, "", 0
        self.finished_reason = self.adapter_dir = ""
        self.final_loss = None

    def _step(self, ev: Step) -> None:
        self.phase = "training"
        self.step = ev.step
        self.total_steps = ev.total_steps or self.total_steps
        self.tokens_seen = ev.tokens_seen or self.tokens_seen
        for value, series in ((ev.loss, self.losses), (ev.learning_rate, self.lrs), (ev.grad_norm, self.grad_norms)):
            v = to_float(value)
            if v is not None:
                series.append((ev.step, v))
        for name in ("learning_rate", "grad_norm", "tokens_per_second", "epoch", "eta_seconds"):
            v = to_float(getattr(ev, name))
            if v is not None:
                setattr(self, name, v)

    def _preference(self, ev: Preference) -> None:
        self.method = ev.method or self.method
        prefix = "eval_" if ev.split == "eval" else ""
        for name, attr in PREFERENCE_SERIES.items():
            v = to_float(getattr(ev, attr))
            if v is not None:
                self.preference.setdefault(prefix + name, []).append((ev.step, v))

    def _finished(self, ev: RunFinished) -> None:
        self.end = ev
        self.stopped = bool(ev.stopped)
        self.finished_reason, self.adapter_dir = ev.reason, ev.adapter_dir
        self.final_loss = to_float(ev.final_loss)
        self.train_seconds = _seconds(ev.train_seconds)
        if _seconds(ev.predicted_seconds) is not None:
            self.predicted_seconds = _seconds(ev.predicted_seconds)
        self.step = ev.step or self.step
        self.phase = "stopped" if ev.stopped else "finished"
        what = "model" if ev.adapter_dir.endswith("/model") else "adapter"
        self.message = f"{what} saved to {ev.adapter_dir}" if ev.adapter_dir else ev.reason
        self.eta_seconds = 0.0

    # ---- derived
    @property
    def state(self) -> State:
        match self.end:
            case RunFinished(stopped=True):
                return State.STOPPED
            case RunFinished():
                return State.FINISHED
            case RunFailed(kind=FailKind.NODE_LOST):
                return State.CRASHED         # a node died: nothing failed in the run itself; resume
            case RunFailed():
                return State.FAILED
        return State.LIVE if self.events_seen else State.NEW

    @property
    def ended(self) -> bool:
        return self.end is not None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None

    @property
    def last_eval(self) -> float | None:
        return self.evals[-1][1] if self.evals else None

    @property
    def reason(self) -> str:
        return getattr(self.end, "reason", "")

    @property
    def time_text(self) -> str:
        """``trained in 12:34 (predicted 10:00, +23%)``; the prediction alone before the end;
        '' when neither is known."""
        return time_text(self.train_seconds, self.predicted_seconds)


def _seconds(v) -> float | None:
    """A duration read back from a log: finite and not negative, else None."""
    x = to_float(v)
    return x if x is not None and math.isfinite(x) and x >= 0 else None


def time_text(actual: float | None, predicted: float | None) -> str:
    from engine.core.units import fmt_eta
    if actual is not None and predicted:
        return (f"trained in {fmt_eta(actual)} (predicted {fmt_eta(predicted)}, "
                f"{(actual / predicted - 1) * 100:+.0f}%)")
    if actual is not None:
        return f"trained in {fmt_eta(actual)} (no prediction)"
    if predicted is not None:
        return f"predicted {fmt_eta(predicted)} to train"
    return ""


def fold(evs, run_dir: str | Path | None = None) -> RunSummary:
    """The summary of a whole log (``events.read_events``)."""
    s = RunSummary(run_dir=Path(run_dir) if run_dir else None)
    for ev in evs:
        s.apply(ev)
    return s


def standing(evs: list[Event]) -> list[Event]:
    """The events that stand after every resume marker (``redone`` ones dropped), in order: for
    readers that need whole events (a step's time or tokens_seen) rather than the summary."""
    out: list[Event] = []
    for ev in evs:
        if isinstance(ev, Resumed):
            out = [e for e in out if not redone(e, ev.from_step)]
        out.append(ev)
    return out



def config_differences(run_dirs) -> list[tuple[str, list]]:
    """``[(section.key, [value of each run])]`` for the config keys whose values differ between
    the runs (their ``config.toml``); a run whose config cannot be read shows ``None``."""
    import tomllib
    flat: list[dict] = []
    for d in run_dirs:
        try:
            data = tomllib.loads((Path(d) / "config.toml").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            data = {}
        flat.append({f"{s}.{k}": v for s, sec in data.items() if isinstance(sec, dict)
                     for k, v in sec.items()})
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return [(k, [f.get(k) for f in flat]) for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
