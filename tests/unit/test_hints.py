"""The hint rules on synthetic metric series: each fires (right rule, right step), none fires
on a healthy noisy curve, and a long-lasting condition gives one hint, not one per step."""
from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest

from engine.training import hints as hints_mod
from engine.core.config import Config
from engine.core.events import Eval, Hint, RunFinished, Step
from engine.training.hints import HintEngine, nan_hint, oom_hint

LOG_EVERY = 10   # optimizer steps between logged steps, as with train.logging_steps = 10


def healthy_losses(n: int, seed: int = 0) -> list[float]:
    """A decreasing loss curve with 3 % multiplicative noise."""
    rng = random.Random(seed)
    return [(0.8 + 1.7 * math.exp(-i / 60)) * (1 + rng.gauss(0, 0.03)) for i in range(n)]


def step(i: int, loss: float | None, *, total: int = 2000, lr: float | None = 2e-4,
         gn: float | None = 0.6, tps: float | None = 5000.0, epoch: float | None = None) -> Step:
    return Step(step=(i + 1) * LOG_EVERY, total_steps=total, loss=loss, learning_rate=lr,
                grad_norm=gn, tokens_per_second=tps, epoch=epoch)


def feed(engine: HintEngine, losses, start: int = 0, **kw) -> list[Hint]:
    out = []
    for j, loss in enumerate(losses):
        out += engine.observe_step(step(start + j, loss, **kw))
    return out


def rules(hints: list[Hint]) -> list[str]:
    return [h.rule for h in hints]


# --- healthy run: nothing fires -------------------------------------------------------------

@pytest.mark.parametrize("seed", range(10))
def test_healthy_run_gives_no_hints(seed):
    rng = random.Random(100 + seed)
    eng = HintEngine(Config())
    losses = healthy_losses(200, seed=seed)
    total = 200 * LOG_EVERY
    out = []
    for i, loss in enumerate(losses):
        s = step(i, loss, total=total, lr=2e-4 * (1 - i / 200) + 1e-6,
                 gn=0.6 * (1 + rng.gauss(0, 0.2)), tps=5000 * (1 + rng.gauss(0, 0.05)),
                 epoch=3 * (i + 1) / 200)
        out += eng.observe_step(s)
        for _ in range(5):
            out += eng.observe_gpu(90 + rng.gauss(0, 3), s.step)
        if (i + 1) % 20 == 0:   # eval loss falls and flattens, with noise, no U-shape
            e = 1.0 + 1.2 * math.exp(-i / 50) + rng.gauss(0, 0.005)
            out += eng.observe_eval(Eval(step=s.step, eval_loss=e))
    assert out == []
    assert eng.history == []


# --- non-finite -------------------------------------------------------------------------------

def test_nan_fires_once_at_the_right_step():
    eng = HintEngine(Config())
    out = feed(eng, healthy_losses(20))
    out += feed(eng, [float("nan")] * 30, start=20)
    assert rules(out) == ["nan"]
    h = out[0]
    assert h.severity == "error" and h.step == 21 * LOG_EVERY
    assert "nan" in h.symptom and "2e-4 → 1e-4" in h.fix


def test_inf_grad_norm_with_finite_loss_fires():
    eng = HintEngine()
    out = feed(eng, healthy_losses(10))
    out += eng.observe_step(step(10, 1.2, gn=float("inf")))
    assert rules(out) == ["nan"] and out[0].step == 11 * LOG_EVERY
    assert "grad norm = inf" in out[0].symptom


def test_nan_rearms_after_recovery_and_cooldown():
    eng = HintEngine()
    out = feed(eng, [float("nan")] * 3)
    out += feed(eng, healthy_losses(hints_mod.COOLDOWN["nan"] + 5), start=3)
    out += feed(eng, [float("nan")], start=100)
    assert rules(out) == ["nan", "nan"]


def test_nan_hint_mentions_fp16_only_when_fp16():
    cfg = Config()
    cfg.quant.compute_dtype = "fp16"
    h = nan_hint(5, float("nan"), None, cfg)
    assert "fp16" in h.cause and "bf16" in h.fix
    cfg.quant.compute_dtype = "bf16"
    assert "fp16" not in nan_hint(5, float("nan"), None, cfg).cause
    cfg.train.learning_rate = 1e-4   # already at the guide's value: halve it
    assert "1e-4 → 5e-5" in nan_hint(5, float("nan"), None, cfg).fix
    assert "to 1e-4" in nan_hint(5, float("nan"), None, None).fix


# --- labels all masked -----------------------------------------------------------------------

def test_loss_stuck_at_zero_fires_once():
    eng = HintEngine()
    out = feed(eng, [0.0] * 40)
    assert rules(out) == ["labels_masked"]
    assert out[0].step == hints_mod.ZERO_SUSTAIN * LOG_EVERY
    assert "qlora-tui inspect --show" in out[0].fix and "Dataset screen" in out[0].fix


def test_grad_norm_zero_fires():
    eng = HintEngine()
    out = feed(eng, healthy_losses(5))
    out += feed(eng, [1.5] * 3, start=5, gn=0.0)
    assert rules(out) == ["labels_masked"] and out[0].step == 7 * LOG_EVERY
    assert "grad norm = 0" in out[0].symptom


def test_single_zero_does_not_fire():
    eng = HintEngine()
    losses = healthy_losses(30)
    losses[10] = 0.0
    assert feed(eng, losses) == []


# --- loss spike ------------------------------------------------------------------------------

def test_spike_fires_at_the_spike():
    eng = HintEngine(Config())
    losses = healthy_losses(60)
    losses[40] = losses[39] * 3
    out = feed(eng, losses)
    assert rules(out) == ["loss_spike"]
    assert out[0].step == 41 * LOG_EVERY
    assert "LR too high or a bad batch" == out[0].cause
    assert "2e-4 → 1e-4" in out[0].fix


def test_sustained_jump_gives_one_spike_hint():
    eng = HintEngine()
    out = feed(eng, healthy_losses(30) + [6.0] * 8)
    assert rules(out) == ["loss_spike"]


def test_spike_fix_mentions_disabled_clipping():
    cfg = Config()
    cfg.train.max_grad_norm = 0.0
    eng = HintEngine(cfg)
    out = feed(eng, healthy_losses(20) + [9.0])
    assert "train.max_grad_norm = 1.0" in out[0].fix


# --- plateau ----------------------------------------------------------------------------------

def flat_after(n_down: int, n_flat: int, level: float = 1.3, seed: int = 3) -> list[float]:
    rng = random.Random(seed)
    down = [2.5 - (2.5 - level) * i / n_down for i in range(n_down)]
    return down + [level * (1 + rng.gauss(0, 0.02)) for _ in range(n_flat)]


def test_long_plateau_gives_one_hint():
    eng = HintEngine(Config())
    out = feed(eng, flat_after(15, 300))
    assert rules(out) == ["loss_plateau"]
    h = out[0]
    # the loss stops improving at observation 15: a whole window must pass first, and noise
    # in the flat part (new chance lows) may delay it by up to about another window
    assert 15 + hints_mod.PLATEAU_WINDOW <= h.step // LOG_EVERY <= 15 + 3 * hints_mod.PLATEAU_WINDOW
    assert "LR too low or rank too low" in h.cause
    assert "2e-4 → 4e-4" in h.fix and "lora.r 32 → 64" in h.fix


def test_plateau_rearms_only_after_a_real_drop():
    rng = random.Random(5)
    second_level = [1.0 * (1 + rng.gauss(0, 0.02)) for _ in range(100)]   # e.g. a new epoch
    eng = HintEngine()
    out = feed(eng, flat_after(15, 80, level=1.3) + second_level)
    assert rules(out) == ["loss_plateau", "loss_plateau"]
    assert out[1].step > 95 * LOG_EVERY + hints_mod.PLATEAU_WINDOW * LOG_EVERY


def test_plateau_quiet_once_the_schedule_decayed_the_lr():
    eng = HintEngine()
    losses = flat_after(15, 80)
    out = []
    for i, loss in enumerate(losses):
        lr = 2e-4 if i < 15 else 1e-6   # linear decay reached its end
        out += eng.observe_step(step(i, loss, lr=lr))
    assert "loss_plateau" not in rules(out)


def test_plateau_fix_when_lr_and_rank_are_at_the_top():
    cfg = Config()
    cfg.train.learning_rate = 5e-4
    cfg.lora.r = 128
    eng = HintEngine(cfg)
    out = feed(eng, flat_after(15, 60))
    assert rules(out) == ["loss_plateau"] and "check the data" in out[0].fix


# --- overfitting / under-training -------------------------------------------------------------

def run_with_evals(eng: HintEngine, evals: list[float], train_falls: bool = True) -> list[Hint]:
    """10 logged steps between evals; train loss falls (or rises) steadily."""
    out = []
    i = 0
    for e in evals:
        for _ in range(10):
            loss = 2.0 - 0.01 * i if train_falls else 1.0 + 0.004 * i
            out += eng.observe_step(step(i, loss, epoch=(i + 1) / 40))
            i += 1
        out += eng.observe_eval(Eval(step=i * LOG_EVERY, eval_loss=e))
    return out


def test_overfitting_fires_on_u_shape_with_falling_train_loss():
    eng = HintEngine(Config())
    out = run_with_evals(eng, [1.9, 1.7, 1.6, 1.65, 1.72, 1.8, 1.9])
    assert rules(out) == ["overfitting"]
    h = out[0]
    assert h.step == 5 * 10 * LOG_EVERY   # the second consecutive rise
    assert "lora.dropout 0.05" in h.fix and "train.epochs (3 → 1" in h.fix
    assert "step 300" in h.fix and "1.6" in h.symptom


def test_overfitting_needs_consecutive_rises():
    eng = HintEngine()
    out = run_with_evals(eng, [1.9, 1.7, 1.75, 1.6, 1.62, 1.5])   # noisy but improving
    assert out == []


def test_overfitting_needs_falling_train_loss():
    eng = HintEngine()
    out = run_with_evals(eng, [1.9, 1.7, 1.6, 1.65, 1.72, 1.8], train_falls=False)
    assert "overfitting" not in rules(out)


def test_under_trained_at_the_end():
    eng = HintEngine(Config())
    out = []
    for i in range(30):
        out += eng.observe_step(step(i, 2.0 - 0.02 * i, total=300))
        if (i + 1) % 10 == 0:
            out += eng.observe_eval(Eval(step=(i + 1) * LOG_EVERY, eval_loss=2.0 - 0.1 * (i + 1) / 10))
    assert rules(out) == ["under_trained"]
    assert out[0].severity == "info" and out[0].step == 300
    assert "train.epochs (3 → 4)" in out[0].fix
    assert eng.observe(RunFinished(step=300)) == []   # once only


# --- tokens/s ---------------------------------------------------------------------------------

def test_tokens_per_second_drop_fires_once():
    eng = HintEngine()
    losses = healthy_losses(60)
    out = []
    for i, loss in enumerate(losses):
        tps = 5000.0 if i < 30 else 1500.0
        out += eng.observe_step(step(i, loss, tps=tps))
    assert rules(out) == ["tokens_per_second_drop"]
    assert out[0].step == (30 + hints_mod.TPS_SUSTAIN) * LOG_EVERY
    assert "data pipeline" in out[0].cause and "5,000" in out[0].symptom


def test_single_tokens_per_second_dip_does_not_fire():
    eng = HintEngine()
    out = []
    for i, loss in enumerate(healthy_losses(40)):
        tps = 800.0 if i in (0, 25) else 5000.0   # slow first step, one checkpoint save
        out += eng.observe_step(step(i, loss, tps=tps))
    assert out == []


# --- GPU utilisation --------------------------------------------------------------------------

def test_low_gpu_util_fires_once_while_training():
    eng = HintEngine(Config())
    assert eng.observe_gpu(5.0, 0) == []          # not training yet: loading the model
    eng.observe_step(step(0, 2.0))
    out = []
    for k in range(200):
        out += eng.observe_gpu(45.0, 10 + k)
    assert rules(out) == ["low_gpu_util"]
    assert out[0].step == 10 + hints_mod.GPU_LOW_WINDOW - 1
    assert "bottleneck" in out[0].cause
    assert "train.batch_size 2 → 4 with train.grad_accum 4 → 2" in out[0].fix


def test_short_gpu_idle_does_not_fire():
    eng = HintEngine()
    eng.observe_step(step(0, 2.0))
    out = []
    for k in range(120):
        util = 0.0 if 50 <= k < 60 else 92.0   # a checkpoint save
        out += eng.observe_gpu(util, k)
    assert out == []


def test_gpu_samples_after_the_run_are_ignored():
    eng = HintEngine()
    eng.observe_step(step(0, 2.0))
    eng.observe(RunFinished(step=10, stopped=True))
    assert all(eng.observe_gpu(0.0, 10) == [] for _ in range(100))


# --- OOM --------------------------------------------------------------------------------------

def test_oom_hint_at_start_with_config_numbers():
    cfg = Config()
    h = HintEngine(cfg).oom_hint(14 * hints_mod.GIB, 23 * hints_mod.GIB, cfg)
    assert h.rule == "oom" and h.severity == "error"
    assert "14.0 GiB" in h.symptom and "23.0 GiB" in h.symptom
    assert "data.max_length = 4096" in h.cause and "missed 9.0 GiB" in h.cause
    assert h.fix.startswith("data.max_length 4096 → 2048")
    assert "train.batch_size 2 → 1 with train.grad_accum 4 → 8 (effective batch stays 8)" in h.fix
    assert "train.gradient_checkpointing = true (now auto)" in h.fix
    assert "data.packing = true" in h.fix


def test_oom_hint_mid_training_leads_with_checkpointing_and_skips_what_is_set():
    cfg = Config()
    cfg.train.batch_size = 1
    cfg.train.gradient_checkpointing = False
    cfg.data.packing = True
    h = oom_hint(None, 30 * hints_mod.GIB, cfg, step=250)
    assert h.step == 250 and "step" not in h.symptom    # renderers put "step N:" in front
    assert "gradient checkpointing is off" in h.cause
    assert h.fix.startswith("train.gradient_checkpointing = true (now false)")
    assert "train.batch_size" not in h.fix and "data.packing" not in h.fix
    cfg.train.gradient_checkpointing = True
    assert "gradient_checkpointing" not in oom_hint(None, None, cfg, step=250).fix


def test_oom_hint_without_config_still_says_what_to_change():
    h = oom_hint(None, None, None)
    for key in ("data.max_length", "train.batch_size", "train.grad_accum",
                "train.gradient_checkpointing", "data.packing"):
        assert key in h.fix


# --- misc -------------------------------------------------------------------------------------

def test_observe_dispatches_events():
    eng = HintEngine()
    out = []
    for ev in [step(0, 0.0), step(1, 0.0), Eval(step=20, eval_loss=1.0)]:
        out += eng.observe(ev)
    assert rules(out) == ["labels_masked"] and eng.history == out


@pytest.mark.parametrize("x,text", [(2e-4, "2e-4"), (1e-4, "1e-4"), (5e-5, "5e-5"), (1.5e-4, "1.5e-4")])
def test_fmt_lr(x, text):
    assert hints_mod.fmt_lr(x) == text


def test_hints_and_gpu_import_no_ui_and_no_torch():
    code = ("import sys, engine.training.hints, engine.training.gpu; "
            "bad = [m for m in ('textual', 'rich', 'torch') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_units_have_one_meaning_each():
    """engine.core.units owns the number helpers the engine and the TUI share."""
    from engine.core.units import fmt_eta, is_finite, is_nonfinite, to_float
    assert [is_finite(v) for v in (1, 2.5, None, float("nan"), float("inf"), True, "1")] == \
        [True, True, False, False, False, False, False]
    assert [is_nonfinite(v) for v in (1, None, float("nan"), float("-inf"), False)] == \
        [False, False, True, True, False]
    assert [to_float(v) for v in (" 2e-4 ", 3, None, True, "x", [1])] == [2e-4, 3.0, None, None, None, None]
    assert [fmt_eta(v) for v in (None, float("nan"), -5, 59, 61, 3725)] == \
        ["--:--", "--:--", "00:00", "00:59", "01:01", "1:02:05"]
