"""The one fold of a run log (engine.core.summary.RunSummary) and the non-blocking reader
(engine.core.events.EventLog.read_new): resume markers, NaN, failure kinds, torn and damaged
lines, a log that grows, typed fields read back as their enums."""
from __future__ import annotations

import json
import math
import os

import pytest

from engine.core import events, rundir
from engine.core.events import (Checkpoint, Eval, FailKind, Hint, Resumed, RunFailed, RunFinished, RunStarted,
                                RunWarning, Severity, Step)
from engine.core.summary import RESUMABLE, State, fold, standing


def steps(a, b, total=10, loss=lambda s: 3.0 - s / 10):
    return [Step(step=s, total_steps=total, loss=loss(s), learning_rate=1e-3 * s, grad_norm=0.5 + s)
            for s in range(a, b + 1)]


def killed_then_resumed(k=4):
    """Steps 1..7 (checkpoints at 2, 4, 6; an eval and a hint at 6) killed; resumed from k."""
    first = [RunStarted(model="m", total_steps=10), *steps(1, 7), Checkpoint(step=2, path="c2"),
             Checkpoint(step=4, path="c4"), Eval(step=6, eval_loss=1.5), Checkpoint(step=6, path="c6"),
             Hint(rule="loss_spike", step=6, severity="warning"), RunWarning(message="bad rows", step=0)]
    again = [Resumed(from_step=k, checkpoint=f"c{k}"), RunStarted(model="m", total_steps=10, resumed_from_step=k),
             *steps(k + 1, 10, loss=lambda s: 2.0 - s / 10), RunFinished(step=10, adapter_dir="/r/adapter")]
    return first, again


def test_a_resume_marker_drops_what_is_redone_and_the_series_hold_each_step_once():
    first, again = killed_then_resumed(4)
    s = fold(first)
    assert s.state == State.LIVE and s.step == 7 and len(s.losses) == 7 and s.hints
    s.apply(again[0])                                  # the marker alone already rolls back
    assert s.step == 4 and [p[0] for p in s.losses] == [1, 2, 3, 4] and s.evals == []
    assert s.checkpoints == [(2, "c2"), (4, "c4")] and s.hints == []
    assert [w.message for w in s.warnings] == ["bad rows"]        # step 0: before any step, kept
    for ev in again[1:]:
        s.apply(ev)
    assert [p[0] for p in s.losses] == list(range(1, 11))
    assert [p[0] for p in s.lrs] == list(range(1, 11)) == [p[0] for p in s.grad_norms]
    assert s.losses[4][1] == pytest.approx(2.0 - 0.5)             # step 5 is the redone one
    assert s.state == State.FINISHED and s.final_loss is None and s.last_loss == pytest.approx(1.0)
    assert s.resumed_from_step == 4 and s.adapter_dir == "/r/adapter" and isinstance(s.end, RunFinished)
    # the same rule for readers that need whole events
    kept = standing(first + again)
    assert [e.step for e in kept if isinstance(e, Step)] == list(range(1, 11))
    assert [e.step for e in kept if isinstance(e, Checkpoint)] == [2, 4]


def test_a_resume_after_a_failure_reopens_the_run_and_from_zero_starts_over():
    first, _ = killed_then_resumed()
    s = fold(first + [RunFailed(kind="oom", step=7, reason="CUDA out of memory")])
    assert s.state == State.FAILED and s.state in RESUMABLE and s.fail_kind is FailKind.OOM
    assert s.fail_step == 7 and s.reason == "CUDA out of memory" and s.ended
    s.apply(Resumed(from_step=0))
    assert s.state == State.LIVE and not s.ended and s.fail_kind == "" and s.losses == [] and s.step == 0
    s.apply(RunStarted(total_steps=10))
    s.apply(RunFinished(step=10, stopped=True, reason="stopped by SIGTERM"))
    assert s.state == State.STOPPED and s.state in RESUMABLE and State.FINISHED not in RESUMABLE


def test_a_log_written_before_the_marker_existed_still_folds():
    """Old logs: the resume rewrote the file, then appended run_started(resumed_from_step=k)."""
    first, _ = killed_then_resumed()
    old = first[:5] + [RunFailed(kind="nan", step=4), events.Status(phase="resume"),
                       RunStarted(total_steps=10, resumed_from_step=3), *steps(4, 5)]
    s = fold(old)
    assert [p[0] for p in s.losses] == [1, 2, 3, 4, 5] and s.state == State.LIVE and s.end is None
    text = "\n".join(events.dumps(e) for e in old) + "\n"
    assert [type(e) for e in fold_text(text)] == [type(e) for e in old]


def fold_text(text):
    return [events.loads(line) for line in text.splitlines()]


def test_nan_and_inf_survive_the_log_and_stay_in_the_series():
    evs = [RunStarted(total_steps=5), *steps(1, 2), Step(step=3, loss=float("nan"), grad_norm=float("inf")),
           Eval(step=3, eval_loss=float("nan")), RunFailed(kind="nan", step=3, reason="non-finite loss")]
    back = fold_text("\n".join(events.dumps(e) for e in evs))
    s = fold(back)
    assert math.isnan(s.losses[-1][1]) and math.isinf(s.grad_norms[-1][1]) and math.isnan(s.evals[-1][1])
    assert s.last_loss != s.last_loss and s.fail_kind is FailKind.NAN and s.state == State.FAILED


@pytest.mark.parametrize("kind", list(FailKind))
def test_every_failure_kind_round_trips_as_its_enum_and_unknown_values_stay_text(kind):
    line = events.dumps(RunFailed(kind=kind.value, reason="x"))
    assert json.loads(line)["kind"] == kind.value                  # the same bytes as before
    ev = events.loads(line)
    assert ev.kind is kind and fold([ev]).fail_kind is kind
    later = events.loads(line.replace(f'"kind": "{kind.value}"', '"kind": "quota"'))
    assert later.kind == "quota" and fold([later]).state == State.FAILED
    assert events.loads(events.dumps(Hint(severity="info"))).severity is Severity.INFO
    with pytest.raises(ValueError):
        events.loads(line.replace(f'"kind": "{kind.value}"', '"kind": 3'))


def test_rundir_info_uses_the_fold(tmp_path):
    first, again = killed_then_resumed(4)
    d = tmp_path / "r"
    d.mkdir()
    w = events.JsonlWriter(d / rundir.EVENTS)
    for ev in first:
        w(ev)
    assert rundir.info(d).state == State.CRASHED and rundir.info(d).step == 7
    for ev in again:
        w(ev)
    w.close()
    ri = rundir.info(d)
    assert ri.state == State.FINISHED and ri.step == 10 and ri.last_loss == pytest.approx(1.0)


# ---- EventLog.read_new ----------------------------------------------------------------------

def test_read_new_returns_complete_lines_keeps_a_torn_one_and_skips_damage(tmp_path):
    path = tmp_path / "events.jsonl"
    log = events.EventLog(path)
    assert log.read_new() == [] and not log.pending                # no log yet: nothing, no error
    a, b = events.dumps(Step(step=1, loss=2.0)), events.dumps(Step(step=2, loss=1.9))
    tail = events.dumps(RunWarning(message="naïve — ✓"))
    with open(path, "wb") as fh:
        fh.write((a + "\n" + "{not json\n" + '{"type": "step", "step": "two"}\n' + "[1, 2]\n").encode())
        fh.write(b"\xff\xfe garbage\n")
        fh.write((b + "\n").encode() + tail.encode()[:-3])         # torn inside the text
    got = log.read_new()
    assert [e.step for e in got] == [1, 2] and log.pending
    assert events.read_events(path) == got                         # the one-shot read agrees
    assert log.read_new() == []                                    # nothing new: never blocks
    with open(path, "ab") as fh:
        fh.write(tail.encode()[-3:] + b"\n")
    more = log.read_new()
    assert len(more) == 1 and more[0].message == "naïve — ✓" and not log.pending
    with open(path, "ab") as fh:                                   # growth: only the new lines
        for s in (3, 4):
            fh.write((events.dumps(Step(step=s)) + "\n").encode())
    assert [e.step for e in log.read_new()] == [3, 4]


def test_read_new_on_an_unreadable_log(tmp_path):
    d = tmp_path / "events.jsonl"
    d.mkdir()
    assert events.EventLog(d).read_new() == []
    with pytest.raises(OSError):
        events.EventLog(d).read_new(strict=True)
    f = tmp_path / "other.jsonl"
    f.write_text(events.dumps(Step(step=1)) + "\n")
    os.chmod(f, 0)
    if os.access(f, os.R_OK):                                     # root reads anything
        return
    assert events.read_events(f) == []


def test_warnings_have_their_own_event_and_are_said_once_on_stderr(capsys):
    """A failing sink: a RunWarning to the other sinks, one line on stderr (the headless printer
    says it, so the bus does not say it again); the printer ends with the fold's outcome."""
    import io
    from engine.cli.cmd_train import HeadlessPrinter
    out, err = io.StringIO(), io.StringIO()
    bus = events.EventBus()
    printer = HeadlessPrinter(out=out, err=err)
    bus.subscribe(printer)

    def broken(ev):
        raise OSError(28, "No space left on device")
    bus.subscribe(broken)
    bus.emit(RunStarted(model="m", total_steps=2))
    bus.emit(Step(step=1, total_steps=2, loss=1.25))
    bus.emit(RunWarning(message="data.jsonl:3: not JSON (row skipped)", source="build"))
    bus.emit(RunFinished(step=2, adapter_dir="/r/adapter", reason="completed"))
    lines = err.getvalue().splitlines()
    assert len(lines) == 2 and "event sink" in lines[0] and "failed and was dropped" in lines[0]
    assert lines[1] == "warning: data.jsonl:3: not JSON (row skipped)"
    assert capsys.readouterr().err == ""
    assert [type(e) for e in bus.history].count(RunWarning) == 2
    assert out.getvalue().splitlines()[-1] == "finished at step 2: completed; adapter: /r/adapter; final loss 1.2500"
    bare = events.EventBus()                       # nobody prints warnings: the bus says it on stderr
    bare.subscribe(broken)
    bare.emit(Step(step=1))
    assert "failed and was dropped" in capsys.readouterr().err
