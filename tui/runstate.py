"""What the TUI knows about one run, folded from its events (UI-thread only, no widgets)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.core.units import to_float


@dataclass
class RunState:
    run_dir: Path | None = None
    model: str = ""
    device: str = ""
    total_steps: int = 0
    trainable_params: int = 0
    total_params: int = 0
    train_rows: int = 0
    plan: list = field(default_factory=list)
    phase: str = "waiting"
    message: str = ""
    progress: float | None = None
    step: int = 0
    losses: list = field(default_factory=list)        # [(step, loss)]
    evals: list = field(default_factory=list)         # [(step, eval_loss)]
    lrs: list = field(default_factory=list)           # [(step, learning_rate)]
    grad_norms: list = field(default_factory=list)    # [(step, grad_norm)], inf/nan kept
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    epoch: float | None = None
    eta_seconds: float | None = None
    checkpoints: list = field(default_factory=list)
    hints: list = field(default_factory=list)         # newest last (screens reverse)
    terminal: str = ""                                # "", run_finished, run_failed
    finished_reason: str = ""
    stopped: bool = False
    adapter_dir: str = ""
    final_loss: float | None = None
    fail_kind: str = ""
    fail_step: int = 0
    stop_requested: bool = False
    detached: bool = False
    follower_ended: bool = False
    events_seen: int = 0

    def apply(self, ev) -> None:
        self.events_seen += 1
        t = ev.type
        if t == "run_started":
            # Series reset, so that no step is shown twice. A run_started with
            # resumed_from_step == 0 is the start of the log: when it arrives again, the log was
            # replaced (a resume's rollback) and engine.core.events.follow reads the new file from its
            # start, so everything folded so far goes. A resumed segment (resumed_from_step == k)
            # redoes the work after step k: what was recorded past k is dropped.
            k = int(getattr(ev, "resumed_from_step", 0) or 0)
            self.losses = [p for p in self.losses if p[0] <= k] if k else []
            self.evals = [p for p in self.evals if p[0] <= k] if k else []
            self.lrs = [p for p in self.lrs if p[0] <= k] if k else []
            self.grad_norms = [p for p in self.grad_norms if p[0] <= k] if k else []
            self.checkpoints = [c for c in self.checkpoints if c[0] <= k] if k else []
            self.hints = [h for h in self.hints if (getattr(h, "step", 0) or 0) <= k] if k else []
            if not k:
                self.step = 0
            else:
                self.step = min(self.step, k)
            # a resumed run appends a new segment: the new segment starts over
            self.terminal = ""
            self.model = ev.model
            self.device = ev.device
            self.total_steps = ev.total_steps or self.total_steps
            self.trainable_params = ev.trainable_params
            self.total_params = getattr(ev, "total_params", 0)
            self.train_rows = getattr(ev, "train_rows", 0)
            self.plan = list(ev.plan or [])
            self.phase = "training"
            self.message = ""
        elif t == "status":
            self.phase = ev.phase or self.phase
            self.message = ev.message
            self.progress = to_float(ev.progress)
        elif t == "step":
            self.phase = "training"
            self.step = ev.step
            self.total_steps = ev.total_steps or self.total_steps
            loss = to_float(ev.loss)
            if loss is not None:
                self.losses.append((ev.step, loss))
            for name, series in (("learning_rate", self.lrs), ("grad_norm", self.grad_norms)):
                v = to_float(getattr(ev, name))
                if v is not None:
                    series.append((ev.step, v))
            for name in ("learning_rate", "grad_norm", "tokens_per_second", "epoch", "eta_seconds"):
                v = to_float(getattr(ev, name))
                if v is not None:
                    setattr(self, name, v)
        elif t == "eval":
            v = to_float(ev.eval_loss)
            if v is not None:
                self.evals.append((ev.step, v))
        elif t == "checkpoint":
            self.checkpoints.append((ev.step, ev.path))
        elif t == "hint":
            self.hints.append(ev)
        elif t == "run_finished":
            self.terminal = t
            self.stopped = bool(ev.stopped)
            self.finished_reason = ev.reason
            self.adapter_dir = ev.adapter_dir
            self.final_loss = to_float(ev.final_loss)
            self.step = ev.step or self.step
            self.phase = "stopped" if ev.stopped else "finished"
            self.message = f"{'model' if ev.adapter_dir.endswith('/model') else 'adapter'} saved to {ev.adapter_dir}" if ev.adapter_dir else ev.reason
            self.eta_seconds = 0.0
        elif t == "run_failed":
            self.terminal = t
            self.fail_kind = ev.kind
            self.fail_step = ev.step or 0
            self.finished_reason = ev.reason
            self.phase = "failed"
            self.message = ev.reason

    @property
    def live(self) -> bool:
        """Following a run that has not ended (what quitting must ask about)."""
        return self.run_dir is not None and not self.terminal and not self.detached \
            and not self.follower_ended

    @property
    def loss_values(self) -> list[float]:
        return [v for _, v in self.losses if math.isfinite(v)]

    @property
    def eval_values(self) -> list[float]:
        return [v for _, v in self.evals if math.isfinite(v)]

    @property
    def lr_values(self) -> list[float]:
        return [v for _, v in self.lrs if math.isfinite(v)]

    @property
    def grad_norm_values(self) -> list[float]:
        """log10 of the grad norm: a spike to 1e11 before a NaN stands out and the normal
        range keeps its shape (a non-finite norm is drawn at the top)."""
        finite = [v for _, v in self.grad_norms if math.isfinite(v) and v > 0]
        top = math.log10(max(finite)) + 1 if finite else 1.0
        return [math.log10(v) if math.isfinite(v) and v > 0 else (top if not math.isfinite(v) else -12.0)
                for _, v in self.grad_norms]

    @property
    def eval_spark_values(self) -> list[float]:
        """What the eval sparkline draws: a curve needs two points (one value stretched over
        the whole width reads as a flat history; the value itself is in the metrics)."""
        v = self.eval_values
        return v if len(v) >= 2 else []

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None

    @property
    def last_eval(self) -> float | None:
        return self.evals[-1][1] if self.evals else None

    @property
    def fraction(self) -> float:
        if self.total_steps <= 0:
            return 0.0
        return max(0.0, min(1.0, self.step / self.total_steps))


def from_events(events, run_dir=None) -> RunState:
    st = RunState(run_dir=Path(run_dir) if run_dir else None)
    for ev in events:
        st.apply(ev)
    return st
