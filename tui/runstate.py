"""What the TUI knows about one run, folded from its events (UI-thread only, no widgets)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from engine.service import RunSummary


@dataclass
class RunState(RunSummary):
    """The run's summary (``engine.core.summary.RunSummary``, through ``engine.service``: the one fold of the log) plus what
    only the app knows (a stop it asked for, detached, its follower ended) and the series as
    the screen draws them."""
    stop_requested: bool = False
    detached: bool = False
    follower_ended: bool = False

    @property
    def live(self) -> bool:
        """Following a run that has not ended (what quitting must ask about)."""
        return self.run_dir is not None and not self.ended and not self.detached \
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

    #: a preference method's curves (engine.core.summary.PREFERENCE_SERIES): label -> series name
    PREFERENCE_ROWS = (("acc", "accuracy"), ("margin", "margin"), ("chosen", "chosen"), ("rejected", "rejected"),
                       ("kl", "kl"))

    def preference_values(self, name: str) -> list[float]:
        """A preference method's series (train; ``eval_`` + name for the eval one), finite values."""
        return [v for _, v in self.preference.get(name, []) if math.isfinite(v)]

    def preference_last(self, name: str) -> float | None:
        v = self.preference_values(name)
        return v[-1] if v else None

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
