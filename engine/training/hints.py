"""Rules that say what is going wrong while a run trains, and what to change.

``HintEngine`` consumes the metric stream of one run (``Step`` and ``Eval`` events, GPU
utilisation samples) and returns new ``Hint`` events. Each rule fires once per *episode*:
when its condition turns true it emits one hint, stays quiet while the condition holds,
re-arms only when the condition clears, and then still waits out a cooldown (counted in
observations) so a flapping signal cannot flood the UI.

The rules follow the seed guide's "Training Loop Monitoring" and "Common Failures" tables:
NaN loss → LR too high; spike → LR too high or bad batch; plateau → LR or rank too low;
eval loss U-shape → overfitting; tokens/s drop → data pipeline; GPU util under 80 % →
bottleneck; OOM → shorter sequences, smaller micro-batch, gradient checkpointing, packing.
Fix texts quote the run's current config values when a ``Config`` is given.

Pure Python: no torch, no UI imports.
"""
from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from typing import Any

from engine.core.events import (Checkpoint, Eval, Event, Hint, Preference, RunFailed, RunFinished, RunStarted,
                                Severity, Step)
from engine.core.units import GIB, is_finite

# --- thresholds -------------------------------------------------------------------------
# Counts are in observations (logged steps, evals or GPU samples), not optimizer steps.

#: Consecutive logged steps with loss == 0 or grad_norm == 0 before "labels all masked".
ZERO_SUSTAIN = 2

#: Loss spike: current loss > SPIKE_RATIO × median of the previous SPIKE_WINDOW losses
#: and at least SPIKE_MIN_DELTA above it; needs SPIKE_MIN_HISTORY losses first.
SPIKE_WINDOW = 10
SPIKE_MIN_HISTORY = 5
SPIKE_RATIO = 1.5
SPIKE_MIN_DELTA = 0.1

#: Plateau: the loss (mean of the last PLATEAU_SMOOTH values) has not improved on its best
#: by PLATEAU_MIN_REL_IMPROVEMENT over the last PLATEAU_WINDOW logged steps. Quiet once the
#: scheduler has decayed the LR under PLATEAU_MIN_LR_FRACTION of its peak (expected then).
PLATEAU_WINDOW = 20
PLATEAU_SMOOTH = 5
PLATEAU_MIN_REL_IMPROVEMENT = 0.01
PLATEAU_MIN_LR_FRACTION = 0.1
#: Once a plateau hint fired, the episode ends only when the smoothed loss falls this far
#: below the plateau's level (noise within the plateau must not re-arm it).
PLATEAU_REARM_DROP = 0.10
#: A plateau after the loss already fell this share from its start may just be convergence:
#: the hint is then "info", not "warning".
PLATEAU_CONVERGED_DROP = 0.4

#: Overfitting: eval loss rose OVERFIT_CONSECUTIVE_RISES evals in a row, ends at least
#: OVERFIT_MIN_REL_RISE above its best, while the (smoothed) train loss kept falling.
OVERFIT_CONSECUTIVE_RISES = 2
OVERFIT_MIN_REL_RISE = 0.03

#: Under-training: at the last step, eval loss fell at every one of >= UNDERTRAIN_MIN_EVALS
#: evals, the last one still by UNDERTRAIN_MIN_REL_DROP.
UNDERTRAIN_MIN_EVALS = 3
UNDERTRAIN_MIN_REL_DROP = 0.02

#: Tokens/s drop: below TPS_DROP_RATIO × the running level (median of the last TPS_WINDOW
#: normal readings) for TPS_SUSTAIN logged steps; recovered at TPS_RECOVER_RATIO × level.
#: The first TPS_SKIP_FIRST readings (start-up, compilation) are ignored.
TPS_WINDOW = 20
TPS_MIN_HISTORY = 5
TPS_DROP_RATIO = 0.5
TPS_RECOVER_RATIO = 0.8
TPS_SUSTAIN = 2
TPS_SKIP_FIRST = 1

#: Low GPU utilisation: median of the last GPU_LOW_WINDOW samples under GPU_LOW_UTIL %
#: while training (the median ignores short pauses such as a checkpoint save).
GPU_LOW_UTIL = 80.0
GPU_LOW_WINDOW = 30

#: Cooldowns (observations of the rule's own kind) after a hint before it may fire again.
COOLDOWN = {
    "nan": 10,
    "labels_masked": 20,
    "loss_spike": 10,
    "loss_plateau": 2 * PLATEAU_WINDOW,
    "overfitting": 3,
    "tokens_per_second_drop": TPS_WINDOW,
    "low_gpu_util": 2 * GPU_LOW_WINDOW,
    "pref_log2": 10**9,                  # preference methods (train.method = dpo, orpo, kto, simpo)
    "pref_accuracy_chance": 2 * 10,
    "pref_margin_flat": 2 * 10,
    "pref_displacement": 2 * 10,
    "pref_kl": 2 * 10,
}

#: Preference methods, over their logged train metrics (``Preference`` events):
#: DPO's sigmoid loss starts at log 2 (policy = reference); still there after PREF_LOG2_N logs.
PREF_LOG2_N = 5
PREF_LOG2_TOL = 0.005
#: the window of logged metrics the other rules compare (the last one against the first one)
PREF_WINDOW = 10
#: accuracy within 0.5 ± PREF_CHANCE over the last window, past PREF_MIN_PROGRESS of the run
PREF_CHANCE = 0.1
PREF_MIN_PROGRESS = 0.2
#: margin grew by less than this over the run (last window's mean against the first window's)
PREF_MARGIN_MIN_GROWTH = 0.05
#: likelihood displacement: the chosen reward fell this much (and below 0) while the rejected fell too
PREF_DISPLACEMENT_DROP = 0.1
#: an exploding KL: the policy is more than PREF_KL_MAX nats (per sequence) from the reference
#: (KTO's KL; DPO: |reward| / β) and PREF_KL_GROWTH times as far as over the first window
PREF_KL_MAX = 20.0
PREF_KL_GROWTH = 4.0

SAFE_LR = 1e-4          # the guide's "drop to 1e-4"
LR_RANGE = (1e-4, 5e-4)  # the guide's learning-rate range for LoRA
MAX_RANK = 128           # the guide's rank range tops out here


# --- formatting -------------------------------------------------------------------------

def fmt_lr(x: float) -> str:
    """2e-4, 1.5e-4, 5e-5 (not 0.0002)."""
    if x is None or not math.isfinite(x) or x <= 0:
        return str(x)
    exp = math.floor(math.log10(x))
    mant = round(x / 10 ** exp, 3)
    if mant >= 10:
        mant, exp = mant / 10, exp + 1
    return f"{mant:g}e{exp}"


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    if abs(n) >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / 1024 ** 2:.0f} MiB"


def _num(x: float | None) -> str:
    if x is None:
        return "?"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"



def _cfg_get(cfg, dotted: str, default=None):
    if cfg is None:
        return default
    try:
        return cfg.get(dotted)
    except (AttributeError, ValueError):
        return default


# --- fixes as data: ``section.key=value`` overrides, rendered to prose here alone ---------
# A hint's ``overrides`` are what ``train --resume RUN_DIR --set ...`` and the TUI's recovery
# dialog apply; ``fix_lines`` is the one place that turns them into words.

#: why a fix helps, after its value (keys not listed need no note)
FIX_NOTES = {
    "data.packing": "no padding; packed samples stay apart in attention",
    "train.max_grad_norm": "clipping is off",
    "quant.compute_dtype": "where the GPU supports it, else fp32",
}


def _toml(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return fmt_lr(v) if 0 < v < 0.01 else f"{v:g}" if v != int(v) else f"{v:.1f}"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)


def override(key: str, value) -> str:
    """``section.key=value`` with the value written as ``--set`` (TOML) reads it."""
    return f"{key}={_toml(value)}"


def _split(ov: str):
    from engine.core.config import parse_value
    key, raw = ov.split("=", 1)
    return key.strip(), parse_value(raw.strip())


def _shown(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and 0 < v < 0.01:
        return fmt_lr(v)
    if isinstance(v, float):
        return f"{v:.1f}" if v == int(v) else f"{v:g}"
    return str(v)


def fix_lines(cfg, overrides: list[str]) -> list[str]:
    """Each override in words, in order: ``data.max_length 4096 → 2048``; a batch-size change
    reads with its grad_accum change and the effective batch it keeps."""
    pairs = [_split(o) for o in overrides]
    new = dict(pairs)
    out = []
    for key, value in pairs:
        if key == "train.grad_accum" and "train.batch_size" in new:
            continue                      # said with the batch size
        old = _cfg_get(cfg, key)
        if key == "train.batch_size" and "train.grad_accum" in new:
            ga, new_ga = _cfg_get(cfg, "train.grad_accum"), new["train.grad_accum"]
            gpus = _cfg_get(cfg, "distributed.gpus", 1) or 1
            line = f"train.batch_size {_shown(old)} → {value} with train.grad_accum {_shown(ga)} → {new_ga}"
            if is_finite(old) and is_finite(ga):
                eff, old_eff = value * new_ga * gpus, old * ga * gpus
                line += f" (effective batch {'stays' if eff == old_eff else 'becomes'} {eff})"
            out.append(line)
            continue
        notes = [FIX_NOTES[key]] if key in FIX_NOTES else []
        if is_finite(old) and is_finite(value) and old != 0:
            verb = "lower " if key == "train.learning_rate" and value < old else ""
            line = f"{verb}{key} {_shown(old)} → {_shown(value)}"
        elif old is None:
            line = f"set {key} to {_shown(value)}"
        else:
            line = f"{key} = {_shown(value)}"
            notes.insert(0, f"now {_shown(old)}")
        out.append(line + (f" ({'; '.join(notes)})" if notes else ""))
    return out


def fix_text(cfg, overrides: list[str], advice: list[str] = ()) -> str:
    """A hint's ``fix``: its overrides in words, then the advice no override can express."""
    return "; ".join(fix_lines(cfg, overrides) + list(advice))


def nan_overrides(cfg) -> list[str]:
    """What a NaN/Inf answers with: a lower LR, clipping back on, bf16 instead of fp16."""
    lr = _cfg_get(cfg, "train.learning_rate")
    out = [override("train.learning_rate", (SAFE_LR if lr > SAFE_LR else lr / 2)
                    if is_finite(lr) else SAFE_LR)]
    if _cfg_get(cfg, "train.max_grad_norm") == 0:
        out.append(override("train.max_grad_norm", 1.0))
    if _cfg_get(cfg, "quant.compute_dtype") == "fp16":
        out.append(override("quant.compute_dtype", "bf16"))
    return out


def oom_overrides(cfg, step: int = 0) -> list[str]:
    """The seed's OOM fixes for this config, most effective first (at start: sequence length;
    mid-run: gradient checkpointing). Empty when none is left to try."""
    at_start = step <= 1
    max_len = _cfg_get(cfg, "data.max_length")
    f_len = [override("data.max_length", max(256, max_len // 2))] \
        if is_finite(max_len) and max_len > 256 else []
    bs, ga = _cfg_get(cfg, "train.batch_size"), _cfg_get(cfg, "train.grad_accum")
    f_batch = []
    if is_finite(bs) and is_finite(ga) and bs > 1:
        new_bs = bs // 2
        f_batch = [override("train.batch_size", new_bs),
                   override("train.grad_accum", math.ceil(ga * bs / new_bs))]
    f_gc = [] if _cfg_get(cfg, "train.gradient_checkpointing") is True else \
        [override("train.gradient_checkpointing", True)]
    if _cfg_get(cfg, "train.activation_offload") is not True and (_cfg_get(cfg, "distributed.gpus", 1) or 1) == 1:
        # checkpointed layers' inputs to pinned CPU memory: ~1% slower, same micro-batch
        f_gc.append(override("train.activation_offload", True))
    f_pack = [] if _cfg_get(cfg, "data.packing") is True else [override("data.packing", True)]
    order = [f_len, f_batch, f_gc, f_pack] if at_start else [f_gc, f_batch, f_len, f_pack]
    out = [o for group in order for o in group]
    if _cfg_get(cfg, "quant.load_in_4bit") is False:
        out.insert(0, override("quant.load_in_4bit", True))
    return out


def hint_overrides(rule: str, cfg, step: int = 0) -> list[str]:
    """The overrides of a failure's hint (``nan`` or ``oom``), as its Hint event carries them."""
    return nan_overrides(cfg) if rule == "nan" else oom_overrides(cfg, step) if rule == "oom" else []


# --- the hints with config-aware fixes (usable without an engine) -----------------------

def nan_hint(step: int, loss: float | None, grad_norm: float | None, cfg=None) -> Hint:
    """Non-finite loss or grad norm: the LR is too high (or fp16 overflowed)."""
    parts = []
    if loss is not None:
        parts.append(f"loss = {_num(loss)}")
    if grad_norm is not None:
        parts.append(f"grad norm = {_num(grad_norm)}")
    symptom = ", ".join(parts) or "non-finite metrics"
    lr = _cfg_get(cfg, "train.learning_rate")
    dtype = _cfg_get(cfg, "quant.compute_dtype")
    extreme = extreme_scaling(cfg)
    if extreme:                      # blame what is actually extreme, not the learning rate
        cause, fix = extreme
        return Hint(rule="nan", severity=Severity.ERROR, symptom=symptom, cause=cause,
                    fix=fix + "; start a new run (lora.* cannot change on resume)", step=int(step))
    cause = "learning rate too high" + (f" (train.learning_rate = {fmt_lr(lr)})" if is_finite(lr) else "")
    if dtype == "fp16":
        cause += ", or an fp16 overflow (quant.compute_dtype = fp16)"
    if loss == 0:
        cause += "; loss 0 with a non-finite grad norm also means every label is masked"
    overrides = nan_overrides(cfg)
    advice = []
    if loss == 0:
        advice.append("check the label mask in the Dataset screen / `qlora-tui inspect --show`")
    # the recovery dialog says which: a checkpoint before the NaN, or none (then from step 0)
    advice.append("resume with the fix (from the last checkpoint, or from step 0 if none was saved)")
    return Hint(rule="nan", severity=Severity.ERROR, symptom=symptom, cause=cause,
                fix=fix_text(cfg, overrides, advice), step=int(step), overrides=overrides)


MAX_LORA_SCALE = 64.0      # alpha / r (alpha / sqrt(r) with rsLoRA); the guide's range is 1-4


def extreme_scaling(cfg) -> tuple[str, str] | None:
    """(cause, fix) when the LoRA scaling alpha/r is far outside any sane range."""
    import math
    alpha, r = _cfg_get(cfg, "lora.alpha"), _cfg_get(cfg, "lora.r")
    if not isinstance(alpha, (int, float)) or not isinstance(r, (int, float)) or r <= 0:
        return None
    scale = alpha / (math.sqrt(r) if _cfg_get(cfg, "lora.use_rslora") else r)
    if is_finite(scale) and abs(scale) <= MAX_LORA_SCALE:
        return None
    return (f"lora.alpha = {alpha:g} is extreme (LoRA scaling alpha/r = {scale:g}; usual 1 to 4): the adapter's "
            "output overflows", f"set lora.alpha to about 2×r (lora.alpha = {2 * r:g})")


def oom_hint(estimate_bytes: int | None, observed_bytes: int | None, cfg=None,
             step: int = 0, total_bytes: int | None = None) -> Hint:
    """CUDA out of memory: compare the pre-flight estimate with what happened; the seed's fixes.

    ``observed_bytes``: the peak reached before the failure (e.g. max allocated/reserved);
    ``total_bytes``: the GPU's memory, when known; ``step``: 0 or 1 = at start.
    """
    at_start = step <= 1
    symptom = "CUDA out of memory" + (" at start" if at_start else "")
    details = []
    if estimate_bytes is not None:
        details.append(f"pre-flight estimate {fmt_bytes(estimate_bytes)}")
    if observed_bytes is not None:
        details.append(f"observed peak {fmt_bytes(observed_bytes)}")
    if total_bytes is not None:
        details.append(f"GPU {fmt_bytes(total_bytes)}")
    if details:
        symptom += ": " + ", ".join(details)
    if estimate_bytes and observed_bytes and estimate_bytes > 0:
        symptom += f" ({(observed_bytes - estimate_bytes) / estimate_bytes:+.0%} vs estimate)"
    return Hint(rule="oom", severity=Severity.ERROR, symptom=symptom,
                cause=_oom_cause(cfg, at_start, estimate_bytes, observed_bytes),
                fix=_oom_fix(cfg, step), step=int(step), overrides=oom_overrides(cfg, step))


def _oom_cause(cfg, at_start: bool, estimate_bytes, observed_bytes) -> str:
    max_len = _cfg_get(cfg, "data.max_length")
    if at_start:
        cause = "sequence length too high for this GPU"
        if is_finite(max_len):
            cause = f"sequence length too high for this GPU (data.max_length = {max_len})"
    else:
        cause = "a longer batch than any before, or memory growing during training"
        if _cfg_get(cfg, "train.gradient_checkpointing") is False:
            cause += "; gradient checkpointing is off"
    if estimate_bytes and observed_bytes and observed_bytes > 1.2 * estimate_bytes:
        cause += (f"; the estimate missed {fmt_bytes(observed_bytes - estimate_bytes)} "
                  "(long rows, fp32 logits of a large vocabulary)")
    return cause


def _oom_fix(cfg, step: int) -> str:
    overrides = oom_overrides(cfg, step)
    advice = []
    if cfg is None:                       # no numbers to halve: say what to change
        advice = ["shorter data.max_length",
                  "smaller train.batch_size with more train.grad_accum (same effective batch)"]
    if not overrides and not advice:
        advice = ["a smaller model, or a GPU with more memory"]
    return fix_text(cfg, overrides, advice)


# --- episode bookkeeping ----------------------------------------------------------------

def _method_traits(method: str) -> tuple[bool, bool]:
    """(a reference pass and its β: DPO, KTO; unpaired rows, no pair accuracy: KTO) of a method's
    name (both False for a name no method has)."""
    from engine import methods
    from engine.methods.base import UNPAIRED
    try:
        m = methods.get(method)
    except methods.UnknownMethod:
        return False, False
    return bool(getattr(m, "reference", False)), m.rows[0] == UNPAIRED


def _mean(xs) -> float | None:
    vals = [float(x) for x in xs if is_finite(x)]
    return sum(vals) / len(vals) if vals else None


class _Episode:
    """Fire once when a condition turns on; re-arm when it turns off and the cooldown passed."""

    def __init__(self, cooldown: int):
        self.cooldown = cooldown
        self.active = False
        self.last_fired: int | None = None

    def update(self, condition: bool, obs: int) -> bool:
        if not condition:
            self.active = False
            return False
        if self.active:
            return False
        self.active = True
        if self.last_fired is not None and obs - self.last_fired < self.cooldown:
            return False   # the condition flapped back within the cooldown: stay quiet
        self.last_fired = obs
        return True


class HintEngine:
    """Turns one run's metric stream into ``Hint`` events (each rule once per episode).

    Feed it in order: ``observe_step`` for each ``Step``, ``observe_eval`` for each ``Eval``,
    ``observe_gpu`` for GPU utilisation samples (e.g. one a second; ignored until the first
    step and after the run finished), or ``observe(event)`` for any event. Every hint
    returned is also kept in ``history``.
    """

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.history: list[Hint] = []
        self._episodes = {rule: _Episode(cd) for rule, cd in COOLDOWN.items()}
        self._n_steps = 0
        self._n_evals = 0
        self._n_gpu = 0
        self._training = False
        self._finished = False
        self.total_steps = 0
        self._peak_lr = 0.0
        self._zero_run = 0
        self._losses: deque[float] = deque(maxlen=max(SPIKE_WINDOW, PLATEAU_SMOOTH))
        self._smoothed: list[tuple[int, float]] = []     # (step, smoothed train loss)
        self._plateau_level: float | None = None
        self._best_before = math.inf     # best smoothed loss before the plateau window
        self._epochs: list[tuple[int, float]] = []       # (step, epoch)
        self._evals: list[tuple[int, float]] = []        # (step, eval loss)
        self._tps: deque[float] = deque(maxlen=TPS_WINDOW)
        self._tps_seen = 0
        self._tps_low_run = 0
        self._tps_level: float | None = None
        self._paused = False     # an eval or checkpoint since the last step: its time is in the next reading
        self._device = ""
        self._gpu: deque[float] = deque(maxlen=GPU_LOW_WINDOW)
        self._undertrain_done = False
        self._pref: list[Preference] = []
        self._drift: list[float | None] = []

    # -- plumbing --
    def _fire(self, rule: str, obs: int, condition: bool) -> bool:
        return self._episodes[rule].update(condition, obs)

    def _emit(self, out: list[Hint], hint: Hint) -> None:
        out.append(hint)
        self.history.append(hint)

    def observe(self, ev: Event) -> list[Hint]:
        """Dispatch any event (an ``EventBus`` subscriber can call this)."""
        if isinstance(ev, Step):
            return self.observe_step(ev)
        if isinstance(ev, Preference):
            return self.observe_preference(ev) if ev.split == "train" else []
        if isinstance(ev, Eval):
            self._paused = True
            return self.observe_eval(ev)
        if isinstance(ev, Checkpoint):
            self._paused = True
        if isinstance(ev, RunStarted):
            self._device = str(ev.device or "")
        if isinstance(ev, RunFinished):
            self._finished = True
            self._training = False
            if not ev.stopped:
                return self._check_undertrained(ev.step or self.total_steps, force=True)
        if isinstance(ev, RunFailed):
            self._finished = True
            self._training = False
        return []

    @staticmethod
    def _at(series: list[tuple[int, float]], step: int) -> float | None:
        """The value of a (step, value) series at the last entry with step <= ``step``."""
        i = bisect.bisect_right(series, step, key=lambda sv: sv[0])
        return series[i - 1][1] if i else None

    def _smoothed_at(self, step: int) -> float | None:
        return self._at(self._smoothed, step)

    def _epoch_at(self, step: int) -> float | None:
        return self._at(self._epochs, step)

    # -- preference methods --
    def observe_preference(self, ev: Preference) -> list[Hint]:
        """The preference rules over the method's logged train metrics (each once per episode)."""
        out: list[Hint] = []
        self._pref.append(ev)
        p, n = self._pref, len(self._pref)
        method = ev.method
        ref, unpaired = _method_traits(method)
        beta = _cfg_get(self.cfg, "preference.beta", 0.1) if ref else None
        loss_type = _cfg_get(self.cfg, "preference.loss_type", "sigmoid")
        losses = [e.loss for e in p[:PREF_LOG2_N]]
        log2 = (method == "dpo" and loss_type == "sigmoid" and n == PREF_LOG2_N
                and all(is_finite(v) and abs(v - math.log(2)) < PREF_LOG2_TOL for v in losses))
        if self._fire("pref_log2", n, log2):
            self._emit(out, self._pref_hint(ev, "pref_log2", f"loss still at log 2 = 0.693 after {n} logged steps",
                                            "the policy has not moved from the reference: nothing is learned "
                                            "(learning rate far too low, or chosen and rejected tokenise alike)",
                                            self._lr_up(), ["check the pairs in the Dataset screen (`qlora-tui "
                                                            "inspect`): identical or truncated sides teach nothing"]))
        last, first = p[-PREF_WINDOW:], p[:PREF_WINDOW]
        full = n >= 2 * PREF_WINDOW
        progress = ev.step / self.total_steps if self.total_steps else 1.0
        acc = _mean([e.accuracy for e in last])
        chance = (not unpaired and full and progress >= PREF_MIN_PROGRESS and acc is not None
                  and abs(acc - 0.5) <= PREF_CHANCE)
        if self._fire("pref_accuracy_chance", n, chance):
            self._emit(out, self._pref_hint(ev, "pref_accuracy_chance", f"reward accuracy stuck near 0.5 "
                                            f"({acc:.2f} over the last {len(last)} logged steps)" if acc is not None else "",
                                            "the method cannot tell chosen from rejected: noisy or swapped pairs, "
                                            "or a learning rate too low", self._lr_up(),
                                            ["check that 'chosen' really is the preferred answer (`qlora-tui inspect`)"]))
        m_first, m_last = _mean([e.margin for e in first]), _mean([e.margin for e in last])
        flat = full and m_first is not None and m_last is not None and m_last - m_first < PREF_MARGIN_MIN_GROWTH
        if self._fire("pref_margin_flat", n, flat):
            ov = self._lr_up()
            if beta is not None and beta > 0.05:
                ov.append(override("preference.beta", round(beta / 2, 4)))
            self._emit(out, self._pref_hint(ev, "pref_margin_flat", f"reward margin not growing ({_num(m_first)} "
                                            f"→ {_num(m_last)})", "the chosen and rejected answers are not pulling apart",
                                            ov, []))
        c_first, c_last = _mean([e.rewards_chosen for e in first]), _mean([e.rewards_chosen for e in last])
        r_first, r_last = _mean([e.rewards_rejected for e in first]), _mean([e.rewards_rejected for e in last])
        displaced = (full and ref and None not in (c_first, c_last, r_first, r_last)
                     and c_last < 0 and c_last < c_first - PREF_DISPLACEMENT_DROP and r_last < r_first)
        if self._fire("pref_displacement", n, displaced):
            ov = []
            lr = _cfg_get(self.cfg, "train.learning_rate")
            if is_finite(lr):
                ov.append(override("train.learning_rate", lr / 2))
            if beta is not None:
                ov.append(override("preference.beta", round(min(beta * 2, 100.0), 4)))
            self._emit(out, self._pref_hint(ev, "pref_displacement", f"chosen reward falling with the rejected "
                                            f"({_num(c_first)} → {_num(c_last)}; rejected {_num(r_first)} → "
                                            f"{_num(r_last)})", "likelihood displacement: the margin grows by pushing "
                                            "both answers down, so the chosen answers get less likely too", ov,
                                            ["or train.method = \"orpo\" (it keeps an SFT term on the chosen answer)"]))
        drift = None
        if ev.kl is not None and is_finite(ev.kl):
            drift = float(ev.kl)
        elif beta and method == "dpo" and is_finite(ev.rewards_chosen) and is_finite(ev.rewards_rejected):
            drift = max(abs(ev.rewards_chosen), abs(ev.rewards_rejected)) / beta
        self._drift.append(drift)
        d_first, d_last = _mean(self._drift[:PREF_WINDOW]), _mean(self._drift[-PREF_WINDOW:])
        exploding = (full and d_first is not None and d_last is not None and d_last > PREF_KL_MAX
                     and d_last > PREF_KL_GROWTH * max(d_first, 1.0))
        if self._fire("pref_kl", n, exploding):
            ov = []
            lr = _cfg_get(self.cfg, "train.learning_rate")
            if is_finite(lr):
                ov.append(override("train.learning_rate", lr / 4))
            if beta is not None:
                ov.append(override("preference.beta", round(min(beta * 2, 100.0), 4)))
            self._emit(out, self._pref_hint(ev, "pref_kl", f"the policy is {d_last:.1f} nats from the reference "
                                            f"({'KL' if ev.kl is not None else '|reward| / β'}; {d_first:.1f} at the "
                                            "start) and still climbing",
                                            "an exploding KL: the adapter runs away from the reference and the "
                                            "rewards stop meaning anything", ov, []))
        return out

    def _lr_up(self) -> list[str]:
        lr = _cfg_get(self.cfg, "train.learning_rate")
        return [override("train.learning_rate", min(lr * 5, 1e-3))] if is_finite(lr) and lr < 1e-3 else []

    def _pref_hint(self, ev: Preference, rule: str, symptom: str, cause: str, overrides: list[str],
                   advice: list[str]) -> Hint:
        return Hint(rule=rule, severity=Severity.WARNING, symptom=symptom, cause=cause,
                    fix=fix_text(self.cfg, overrides, advice), step=int(ev.step), overrides=overrides)

    # -- steps --
    def observe_step(self, step: Step) -> list[Hint]:
        out: list[Hint] = []
        self._n_steps += 1
        n = self._n_steps
        if not self._finished:
            self._training = True
        if step.total_steps:
            self.total_steps = step.total_steps
        if is_finite(step.epoch):
            self._epochs.append((step.step, float(step.epoch)))
        if is_finite(step.learning_rate):
            self._peak_lr = max(self._peak_lr, float(step.learning_rate))
        loss, gn = step.loss, step.grad_norm

        # 1. non-finite loss / grad norm
        bad = (loss is not None and not is_finite(loss)) or (gn is not None and not is_finite(gn))
        if self._fire("nan", n, bad):
            self._emit(out, nan_hint(step.step, loss, gn, self.cfg))
        if bad:
            return out

        # 2. loss stuck at exactly 0 or grad norm exactly 0: nothing is being learned
        zero = loss == 0 or gn == 0
        self._zero_run = self._zero_run + 1 if zero else 0
        if self._fire("labels_masked", n, self._zero_run >= ZERO_SUSTAIN):
            self._emit(out, self._masked_hint(step))
        if zero:
            return out
        if loss is None:
            self._observe_tps(step, n, out)
            return out

        # 3. spike against the recent median
        prev = list(self._losses)[-SPIKE_WINDOW:]
        spike = False
        med = None
        if len(prev) >= SPIKE_MIN_HISTORY:
            med = statistics.median(prev)
            spike = loss > med * SPIKE_RATIO and loss - med >= SPIKE_MIN_DELTA
        if self._fire("loss_spike", n, spike):
            self._emit(out, self._spike_hint(step, med))
        self._losses.append(float(loss))

        # 4. plateau of the smoothed loss
        recent = list(self._losses)[-PLATEAU_SMOOTH:]
        if len(recent) == PLATEAU_SMOOTH:
            self._smoothed.append((step.step, sum(recent) / len(recent)))
            if len(self._smoothed) > PLATEAU_WINDOW:   # the value leaving the window
                self._best_before = min(self._best_before, self._smoothed[-PLATEAU_WINDOW - 1][1])
        plateau = False
        if self._episodes["loss_plateau"].active and self._plateau_level is not None:
            plateau = self._smoothed[-1][1] > self._plateau_level * (1 - PLATEAU_REARM_DROP)
        elif len(self._smoothed) > PLATEAU_WINDOW:
            window_best = min(v for _, v in self._smoothed[-PLATEAU_WINDOW:])
            plateau = window_best > self._best_before * (1 - PLATEAU_MIN_REL_IMPROVEMENT)
            lr = step.learning_rate
            if plateau and is_finite(lr) and self._peak_lr > 0 and lr < PLATEAU_MIN_LR_FRACTION * self._peak_lr:
                plateau = False   # the schedule has decayed the LR: flattening is expected
        if plateau and not self._episodes["loss_plateau"].active:
            self._plateau_level = min(self._best_before,
                                      min(v for _, v in self._smoothed[-PLATEAU_WINDOW:]))
        if self._fire("loss_plateau", n, plateau):
            self._emit(out, self._plateau_hint(step))

        # 5. tokens/s
        self._observe_tps(step, n, out)
        return out

    def _observe_tps(self, step: Step, n: int, out: list[Hint]) -> None:
        tps = step.tokens_per_second
        if not is_finite(tps):
            return
        self._tps_seen += 1
        paused, self._paused = self._paused, False
        if self._tps_seen <= TPS_SKIP_FIRST or paused:
            return      # start-up, or an interval that held an eval or a checkpoint save
        level = statistics.median(self._tps) if len(self._tps) >= TPS_MIN_HISTORY else None
        ep = self._episodes["tokens_per_second_drop"]
        if level is None:
            self._tps.append(float(tps))
            return
        low = tps < TPS_DROP_RATIO * level
        self._tps_low_run = self._tps_low_run + 1 if low else 0
        if ep.active:
            condition = tps < TPS_RECOVER_RATIO * self._tps_level   # hysteresis
        else:
            condition = self._tps_low_run >= TPS_SUSTAIN
        if condition and not ep.active:
            self._tps_level = level
        if self._fire("tokens_per_second_drop", n, condition):
            self._emit(out, self._tps_hint(step, tps, level))
        if not condition and not low:
            self._tps.append(float(tps))   # dropped readings never lower the reference level

    # -- evals --
    def observe_eval(self, ev: Eval) -> list[Hint]:
        out: list[Hint] = []
        if not is_finite(ev.eval_loss):
            return out
        self._n_evals += 1
        self._evals.append((ev.step, float(ev.eval_loss)))
        losses = [v for _, v in self._evals]
        best_i = min(range(len(losses)), key=losses.__getitem__)
        k = OVERFIT_CONSECUTIVE_RISES
        cond = False
        if best_i < len(losses) - 1 and len(losses) >= k + 1:
            tail = losses[-(k + 1):]
            rising = all(b > a for a, b in zip(tail, tail[1:]))
            cond = rising and losses[-1] >= losses[best_i] * (1 + OVERFIT_MIN_REL_RISE)
            if cond:
                t_best = self._smoothed_at(self._evals[best_i][0])
                t_now = self._smoothed_at(ev.step)
                if t_best is not None and t_now is not None and not t_now < t_best:
                    cond = False   # train loss is not falling either: not the U-shape of overfitting
        if self._fire("overfitting", self._n_evals, cond):
            self._emit(out, self._overfit_hint(ev, best_i))
        out.extend(self._check_undertrained(ev.step))
        return out

    def _check_undertrained(self, step: int, force: bool = False) -> list[Hint]:
        out: list[Hint] = []
        if self._undertrain_done or not (force or (self.total_steps and step >= self.total_steps)):
            return out
        losses = [v for _, v in self._evals]
        if len(losses) < UNDERTRAIN_MIN_EVALS:
            return out
        falling = all(b < a for a, b in zip(losses, losses[1:]))
        last_drop = (losses[-2] - losses[-1]) / losses[-2] if losses[-2] > 0 else 0.0
        if falling and last_drop >= UNDERTRAIN_MIN_REL_DROP:
            self._undertrain_done = True
            epochs = _cfg_get(self.cfg, "train.epochs")
            fix = (f"more train.epochs ({epochs:g} → {epochs + 1:g})" if is_finite(epochs)
                   else "more train.epochs")
            self._emit(out, Hint(
                rule="under_trained", severity=Severity.INFO,
                symptom=(f"eval loss still falling at the end: {_num(losses[-2])} → {_num(losses[-1])} "
                         f"(-{last_drop:.0%}) at the last eval"),
                cause="under-trained: the model has not converged",
                fix=fix + ", or resume training from the final checkpoint", step=int(step)))
        return out

    # -- GPU --
    def observe_gpu(self, util_percent: float, step: int) -> list[Hint]:
        out: list[Hint] = []
        if not self._training or not is_finite(util_percent):
            return out
        self._n_gpu += 1
        self._gpu.append(float(util_percent))
        cond = False
        med = None
        if len(self._gpu) == GPU_LOW_WINDOW:
            med = statistics.median(self._gpu)
            cond = med < GPU_LOW_UTIL
        if self._fire("low_gpu_util", self._n_gpu, cond):
            self._emit(out, self._gpu_hint(step, med))
        return out

    # -- OOM / NaN with this engine's config --
    def oom_hint(self, estimate_bytes: int | None, observed_bytes: int | None, cfg=None,
                 step: int = 0, total_bytes: int | None = None) -> Hint:
        h = oom_hint(estimate_bytes, observed_bytes, cfg if cfg is not None else self.cfg,
                     step=step, total_bytes=total_bytes)
        self.history.append(h)
        return h

    def nan_hint(self, step: int, loss: float | None, grad_norm: float | None, cfg=None) -> Hint:
        h = nan_hint(step, loss, grad_norm, cfg if cfg is not None else self.cfg)
        self.history.append(h)
        return h

    # -- hint texts --
    def _masked_hint(self, step: Step) -> Hint:
        what = []
        if step.loss == 0:
            what.append("loss = 0")
        if step.grad_norm == 0:
            what.append("grad norm = 0")
        return Hint(
            rule="labels_masked", severity=Severity.ERROR,
            symptom=f"{' and '.join(what)} for {self._zero_run} logged steps",
            cause="labels all masked (-100): nothing is being learned",
            fix=("check the label mask in the Dataset screen / `qlora-tui inspect --show`; "
                 "chat templates need {% generation %} markers for assistant-only loss"),
            step=int(step.step))

    def _spike_hint(self, step: Step, med: float | None) -> Hint:
        lr = _cfg_get(self.cfg, "train.learning_rate")
        overrides = [override("train.learning_rate", (SAFE_LR if lr > SAFE_LR else lr / 2)
                              if is_finite(lr) else SAFE_LR)]
        if _cfg_get(self.cfg, "train.max_grad_norm") == 0:
            overrides.append(override("train.max_grad_norm", 1.0))
        gn = f", grad norm {_num(step.grad_norm)}" if is_finite(step.grad_norm) else ""
        return Hint(
            rule="loss_spike", severity=Severity.WARNING,
            symptom=f"loss jumped to {_num(step.loss)} (recent median {_num(med)}{gn})",
            cause="LR too high or a bad batch",
            fix="if it recurs: " + fix_text(self.cfg, overrides, [
                "look for odd rows in the Dataset screen (`qlora-tui inspect`)"]),
            step=int(step.step), overrides=overrides)

    def _plateau_hint(self, step: Step) -> Hint:
        lr = _cfg_get(self.cfg, "train.learning_rate")
        r = _cfg_get(self.cfg, "lora.r")
        alpha = _cfg_get(self.cfg, "lora.alpha")
        fixes = []
        if is_finite(lr) and lr < LR_RANGE[1]:
            fixes.append(f"raise train.learning_rate {fmt_lr(lr)} → {fmt_lr(min(lr * 2, LR_RANGE[1]))}")
        elif not is_finite(lr):
            fixes.append("raise train.learning_rate (1e-4 to 5e-4)")
        if is_finite(r) and r < MAX_RANK:
            rank = f"raise lora.r {r} → {r * 2}"
            if is_finite(alpha):
                rank += f" (lora.alpha {alpha:g} → {alpha * 2:g})"
            fixes.append(rank)
        elif not is_finite(r):
            fixes.append("raise lora.r (8 to 128; alpha 2×r)")
        if not fixes:
            fixes.append("check the data: LR and rank are already at the top of their ranges")
        best_before = self._best_before
        first = self._smoothed[0][1]
        converged = first > 0 and best_before <= first * (1 - PLATEAU_CONVERGED_DROP)
        return Hint(
            rule="loss_plateau", severity=Severity.INFO if converged else "warning",
            symptom=(f"loss flat at ~{_num(self._smoothed[-1][1])} for {PLATEAU_WINDOW} logged steps "
                     f"(best {_num(best_before)}, start {_num(first)})"),
            cause="LR too low or rank too low — increase one" + (
                " (or it has converged)" if converged else ""),
            fix=" or ".join(fixes), step=int(step.step))

    def _overfit_hint(self, ev: Eval, best_i: int) -> Hint:
        best_step, best_loss = self._evals[best_i]
        t_best = self._smoothed_at(best_step)
        t_now = self._smoothed_at(ev.step)
        train = (f" while train loss fell {_num(t_best)} → {_num(t_now)}"
                 if t_best is not None and t_now is not None else "")
        dropout = _cfg_get(self.cfg, "lora.dropout")
        epochs = _cfg_get(self.cfg, "train.epochs")
        fixes = []
        if is_finite(dropout) and dropout >= 0.05:
            fixes.append(f"raise lora.dropout {dropout:g} → {min(0.1, dropout + 0.05):g}"
                         if dropout < 0.1 else f"lora.dropout is {dropout:g}: more data")
        else:
            fixes.append("add lora.dropout 0.05" + (f" (now {dropout:g})" if is_finite(dropout) else ""))
        best_epoch = self._epoch_at(best_step)
        where = f"best eval at step {best_step}" + (f", epoch {best_epoch:.2f}" if best_epoch is not None else "")
        if is_finite(epochs):
            target = math.ceil(best_epoch) if best_epoch is not None else epochs - 1
            target = max(1, min(target, epochs - 1)) if epochs > 1 else epochs
            fixes.append(f"fewer train.epochs ({epochs:g} → {target:g}; {where})")
        else:
            fixes.append(f"fewer train.epochs ({where})")
        fixes.append(f"use the checkpoint nearest step {best_step}")
        return Hint(
            rule="overfitting", severity=Severity.WARNING,
            symptom=f"eval loss rose {_num(best_loss)} → {_num(ev.eval_loss)} since step {best_step}{train}",
            cause="overfitting (eval loss U-shape)", fix="; ".join(fixes), step=int(ev.step))

    def _tps_hint(self, step: Step, tps: float, level: float) -> Hint:
        return Hint(
            rule="tokens_per_second_drop", severity=Severity.WARNING,
            symptom=(f"tokens/s fell to {tps:,.0f} from a running {level:,.0f} "
                     f"({tps / level - 1:+.0%})"),
            **self._slowdown_why(),
            step=int(step.step))

    def _slowdown_why(self) -> dict:
        """Cause and fix of a tokens/s drop for the device the run trains on."""
        device = self._device or str(_cfg_get(self.cfg, "train.device", "") or "")
        if device.startswith("cuda") or "gpu" in device.lower():
            return dict(cause="data pipeline issue (the GPU waits for batches), another process on "
                              "the GPU, or thermal throttling",
                        fix="check CPU and disk load in the host panel, other GPU processes and GPU "
                            "temperature/power")
        return dict(cause="other processes taking the CPU cores this run trains on, or the "
                          "data pipeline (tokenising, disk reads)",
                    fix="check CPU load in the host panel: other jobs on the same cores slow this "
                        "run; run one at a time")

    def _gpu_hint(self, step: int, med: float | None) -> Hint:
        bs = _cfg_get(self.cfg, "train.batch_size")
        ga = _cfg_get(self.cfg, "train.grad_accum")
        fixes = []
        if is_finite(bs) and is_finite(ga):
            new_bs = bs * 2
            new_ga = ga // 2 if ga >= 2 and ga % 2 == 0 else ga
            fix = f"raise train.batch_size {bs} → {new_bs}"
            if new_ga != ga:
                gpus = _cfg_get(self.cfg, "distributed.gpus", 1) or 1
                fix += f" with train.grad_accum {ga} → {new_ga} (effective batch stays {bs * ga * gpus})"
            fixes.append(fix + " if memory allows")
        else:
            fixes.append("raise train.batch_size if memory allows")
        if _cfg_get(self.cfg, "data.packing") is not True:
            fixes.append("data.packing = true (less padding)")
        fixes.append("check CPU load (tokenization, data loading) in the host panel")
        return Hint(
            rule="low_gpu_util", severity=Severity.WARNING,
            symptom=f"GPU utilisation ~{med:.0f}% over the last {GPU_LOW_WINDOW} samples (want 80-95%)",
            cause="bottleneck: data loading, too small a batch, or the CPU",
            fix="; ".join(fixes), step=int(step))
