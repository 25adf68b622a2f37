"""Runs that survive: kill -9 + resume, signals, NaN, OOM, disk full, bad input, secrets, run states.

Real 4-bit QLoRA runs on builtin:tiny. Faults a CPU cannot produce on demand (NaN at a chosen
step, CUDA OOM, ENOSPC, a slow step so a test can kill mid-run) come from QLORA_TUI_FAULTS
(engine/core/faults.py); everything else is real: real processes, real signals, real files.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core import config
from engine.core import control as ctl
from engine.core import events as events_mod
from engine.training import runner
from engine.core import rundir
from engine.core import summary

from reliability_helpers import (REPO, cli, configured, engine_cmd, env_with, events, files_containing,
                                 last_step, logged_step_numbers, only_run, start_headless, step_numbers, terminal,
                                 wait_for, wait_run_dir, wait_step, write_cfg)


def run_in_process(cfg, monkeypatch=None, faults: str = "") -> runner.Run:
    if monkeypatch is not None:
        if faults:
            monkeypatch.setenv("QLORA_TUI_FAULTS", faults)
        else:
            monkeypatch.delenv("QLORA_TUI_FAULTS", raising=False)
    run = runner.Run(cfg)
    run.start()
    assert run.join(timeout=300)
    return run


def adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "adapter_model.safetensors"))


# ---------------------------------------------------------------- kill -9, then resume

def test_kill9_at_random_step_then_resume_is_continuous_and_identical(tiny_cfg, tmp_path, monkeypatch, capsys):
    cfg = configured(tiny_cfg, {"train.max_steps": 20, "train.save_steps": 4, "train.eval_steps": 0,
                                "train.save_total_limit": 2})
    # the same run, killed -9 at a random step
    kill_at = random.Random().randint(6, 15)
    runs = tmp_path / "killed"
    cfg_path = write_cfg(cfg, tmp_path / "run.toml", {"output.dir": str(runs)})
    proc = start_headless(cfg_path, env=env_with(QLORA_TUI_FAULTS="slow=0.15"))
    # the uninterrupted reference, trained in this process while that one starts up
    monkeypatch.delenv("QLORA_TUI_FAULTS", raising=False)
    ref = runner.Run(configured(cfg, {"output.dir": str(tmp_path / "ref")}))
    ref.start()
    d = wait_run_dir(runs)
    wait_step(d, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = step_numbers(d)
    assert terminal(d) is None and before == list(range(1, len(before) + 1))
    assert rundir.info(d).state == "crashed", "a killed run must never show as live"
    ckpts = rundir.checkpoints(d)
    assert ckpts, f"no complete checkpoint by step {before[-1]} (kill_at={kill_at})"
    resume_step = rundir.checkpoint_step(ckpts[-1])
    # a half-written checkpoint newer than the last complete one is never picked
    torn = d / "checkpoints" / f"checkpoint-{resume_step + 1}"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"\0" * 10)

    assert ref.join(timeout=300)
    assert ref.result.type == "run_finished", ref.result
    ref_steps = {e.step: e for e in events(ref.run_dir) if e.type == "step"}
    assert sorted(ref_steps) == list(range(1, 21))

    r = cli(capsys, "train", "--resume", d, "--headless")     # the CLI in this process: no second start-up
    assert r.returncode == 0, (kill_at, r.stderr[-3000:])
    assert f"resuming from checkpoint-{resume_step}" in r.stdout
    assert not torn.exists()

    steps = step_numbers(d)
    assert steps == list(range(1, 21)), f"lost or duplicated steps (killed at {kill_at}): {steps}"
    # the log is append-only: the killed run's lines stay, then one resume marker at the checkpoint,
    # then the redone and remaining steps; every reader folds it to each step once
    logged = logged_step_numbers(d)
    assert logged == before + list(range(resume_step + 1, 21)), (kill_at, logged)
    markers = [i for i, e in enumerate(events(d)) if isinstance(e, events_mod.Resumed)]
    assert len(markers) == 1 and events(d)[markers[0]].from_step == resume_step
    assert events(d)[markers[0]].checkpoint.endswith(f"checkpoint-{resume_step}")
    assert [e.step for e in events(d)[:markers[0]] if isinstance(e, events_mod.Step)] == before
    assert [s for s, _ in summary.fold(events(d)).losses] == list(range(1, 21))
    starts = [e for e in events(d) if e.type == "run_started"]
    assert len(starts) == 2 and starts[-1].resumed_from_step == resume_step
    assert terminal(d).type == "run_finished" and not terminal(d).stopped
    assert rundir.info(d).state == "finished" and rundir.info(d).step == 20
    # same optimizer, scheduler, RNG and data order: every step equals the uninterrupted run
    for e in events(d):
        if e.type == "step":
            ref_e = ref_steps[e.step]
            assert e.learning_rate == pytest.approx(ref_e.learning_rate, rel=1e-6, abs=1e-12), e.step
            assert e.loss == pytest.approx(ref_e.loss, rel=1e-5), (e.step, kill_at)
            assert e.grad_norm == pytest.approx(ref_e.grad_norm, rel=1e-4), (e.step, kill_at)
    a, b = adapter_tensors(ref.run_dir / "adapter"), adapter_tensors(d / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].float() - b[k].float()).abs().max().item() < 1e-4, k
    # rotation: the last save_total_limit complete checkpoints, nothing half-written
    assert [p.name for p in rundir.checkpoints(d)] == ["checkpoint-16", "checkpoint-20"]
    assert sorted(p.name for p in (d / "checkpoints").glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-20"]


def test_resume_refuses_a_live_or_finished_run_and_frozen_changes(tiny_cfg, tmp_path):
    """Checks that need no training: a resume never runs twice, and never swaps the adapter."""
    d = tmp_path / "runs" / "r1"
    (d / "control").mkdir(parents=True)
    config.save(tiny_cfg, d / rundir.CONFIG)
    rundir.write_pid(d)                                      # this very process: live
    with (d / rundir.EVENTS).open("w") as fh:
        fh.write(events_mod.dumps(events_mod.RunStarted(total_steps=12)) + "\n")
    with pytest.raises(runner.PreflightError, match="still live"):
        runner.start_detached(None, resume=d)
    r = engine_cmd("train", "--resume", d, "--headless")
    assert r.returncode == 2 and "live" in r.stderr and "Traceback" not in r.stderr
    with (d / rundir.EVENTS).open("a") as fh:
        fh.write(events_mod.dumps(events_mod.RunFinished(step=12)) + "\n")
    with pytest.raises(runner.PreflightError, match="finished"):
        runner.resume_config(d)
    cfg, changed = runner.resume_config(d, ["train.max_steps=30"])
    assert changed == ["train.max_steps"] and cfg.train.max_steps == 30
    with pytest.raises(runner.PreflightError, match="lora.r"):
        runner.resume_config(d, ["lora.r=4", "train.max_steps=30"])
    with pytest.raises(config.ConfigError, match="batch_size"):
        runner.resume_config(d, ["train.batch_size=0"])


# ---------------------------------------------------------------- signals

SIGNALS = {signal.SIGHUP: "SIGHUP", signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl+C"}


def start_signal_run(tiny_cfg, where: Path, faults: str):
    """A 30-step headless run in its own process; (process, runs dir, output log)."""
    runs, log = where / "runs", where / "out.log"
    cfg_path = write_cfg(tiny_cfg, where / "run.toml", {"output.dir": str(runs), "train.max_steps": 30,
                                                        "train.save_steps": 0, "train.eval_steps": 0})
    return start_headless(cfg_path, env=env_with(QLORA_TUI_FAULTS=faults), log=log), runs, log


def test_signals_stop_gracefully_and_ctrl_c_twice_stops_at_once(tiny_cfg, tmp_path):
    """SIGHUP, SIGTERM and Ctrl+C each stop a run gracefully (checkpoint + adapter); Ctrl+C twice
    stops at once. Four real processes, started together: one start-up's wait for all four."""
    graceful = {sig: start_signal_run(tiny_cfg, tmp_path / sig.name, "slow=0.2") for sig in SIGNALS}
    # slow steps: a graceful stop would have to wait for the current one to end
    twice, twice_runs, twice_log = start_signal_run(tiny_cfg, tmp_path / "twice", "slow=3")
    try:
        signal_all(graceful, twice, twice_runs, twice_log)
    finally:                                    # none left running if a check failed
        for proc in [twice] + [p for p, _, _ in graceful.values()]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def signal_all(graceful, twice, twice_runs, twice_log):
    dirs = {sig: wait_run_dir(runs) for sig, (_, runs, _) in graceful.items()}
    todo = set(graceful)
    while todo:                                 # each gets its signal once it is past step 2
        for sig in [s for s in todo if last_step(dirs[s]) >= 2]:
            graceful[sig][0].send_signal(sig)
            todo.discard(sig)
        wait_for(lambda: not todo or any(last_step(dirs[s]) >= 2 for s in todo), 240, what="step 2")
    for sig, (proc, _, log) in graceful.items():
        assert_graceful_stop(proc, dirs[sig], log, SIGNALS[sig])
    assert_ctrl_c_twice(twice, wait_run_dir(twice_runs), twice_log)


def assert_graceful_stop(proc, d, log, why):
    assert proc.wait(timeout=120) == 3, (why, log.read_text()[-2000:])   # STOPPED, not 0
    fin = terminal(d)
    assert fin.type == "run_finished" and fin.stopped, (why, fin)
    assert why in fin.reason and "adapter saved" in fin.reason
    assert 2 <= fin.step < 30, why
    assert (d / "adapter" / "adapter_model.safetensors").exists(), why
    ck = rundir.checkpoints(d)
    assert ck and rundir.checkpoint_step(ck[-1]) == fin.step, why  # the stop wrote a checkpoint to resume from
    assert step_numbers(d) == list(range(1, fin.step + 1)), why
    assert rundir.info(d).state == "stopped", why


def assert_ctrl_c_twice(proc, d, log):
    wait_step(d, 1)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "Ctrl+C again" in log.read_text(), 30, what="the first Ctrl+C")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    fin = terminal(d)
    assert fin.type == "run_failed" and fin.kind == "killed" and "twice" in fin.reason
    assert not (d / "adapter").exists()
    assert rundir.info(d).state == "failed"


# ---------------------------------------------------------------- NaN / Inf

def test_nan_halts_on_that_step_with_hint_and_keeps_last_good_adapter(tiny_cfg, monkeypatch):
    cfg = configured(tiny_cfg, {"train.max_steps": 12, "train.save_steps": 3, "train.eval_steps": 0})
    run = run_in_process(cfg, monkeypatch, faults="nan@5")
    res = run.result
    assert res.type == "run_failed" and res.kind == "nan" and res.step == 5, res
    assert "learning_rate" in res.reason
    evs = events(run.run_dir)
    nan_hints = [e for e in evs if e.type == "hint" and e.rule == "nan"]
    assert len(nan_hints) == 1 and nan_hints[0].step == 5, str([(e.type, getattr(e, "step", None), getattr(e, "rule", None)) for e in evs])
    assert "learning_rate" in nan_hints[0].fix and "1e-4" in nan_hints[0].fix
    assert step_numbers(run.run_dir) == [1, 2, 3, 4, 5]     # halted on the step it occurred
    bad = [e for e in evs if e.type == "step" and e.step == 5][0]
    assert not math.isfinite(bad.loss)
    # the adapter is the last good state: finite, and no checkpoint of the poisoned step
    t = adapter_tensors(run.run_dir / "adapter")
    assert all(bool(v.float().isfinite().all()) for v in t.values())
    assert [rundir.checkpoint_step(p) for p in rundir.checkpoints(run.run_dir)] == [3]
    assert rundir.info(run.run_dir).state == "failed"


def test_nan_policy_warn_goes_on(tiny_cfg, monkeypatch):
    cfg = configured(tiny_cfg, {"train.max_steps": 8, "train.save_steps": 0, "train.eval_steps": 0,
                                "train.nan_policy": "warn"})
    run = run_in_process(cfg, monkeypatch, faults="nan@3")
    assert run.result.type == "run_finished" and not run.result.stopped, run.result
    assert step_numbers(run.run_dir) == list(range(1, 9))
    hints = [e for e in events(run.run_dir) if e.type == "hint" and e.rule == "nan"]
    assert [h.step for h in hints] == [3]
    after = [e for e in events(run.run_dir) if e.type == "step" and e.step > 3]
    assert all(math.isfinite(e.loss) for e in after)        # the poisoned gradients were dropped
    t = adapter_tensors(run.run_dir / "adapter")
    assert all(bool(v.float().isfinite().all()) for v in t.values())


# ---------------------------------------------------------------- OOM

def test_oom_fails_with_hint_and_intact_checkpoint_then_resume_with_fix(tiny_cfg, monkeypatch):
    cfg = configured(tiny_cfg, {"train.max_steps": 10, "train.save_steps": 3, "train.eval_steps": 0})
    run = run_in_process(cfg, monkeypatch, faults="oom@8")
    res = run.result
    assert res.type == "run_failed" and res.kind == "oom", res
    assert res.step == 7 and "out of memory" in res.reason and "checkpoint-6" in res.reason
    assert "\n" not in res.reason
    hint = [e for e in events(run.run_dir) if e.type == "hint" and e.rule == "oom"]
    assert len(hint) == 1
    h = hint[0]
    assert "estimate" in h.symptom                    # compares the estimate with what happened
    for fix in ("train.batch_size 4 → 2", "train.grad_accum", "data.packing"):
        assert fix in h.fix, (fix, h.fix)
    # the last checkpoint is intact: complete, loadable, at its step
    ck = rundir.checkpoints(run.run_dir)
    assert ck and ck[-1].name == "checkpoint-6"
    state = json.loads((ck[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    t = adapter_tensors(ck[-1])
    assert t and all(bool(v.float().isfinite().all()) for v in t.values())
    for f in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert (ck[-1] / f).stat().st_size > 0
    # resume with the hint's fixes applied (what the TUI offers)
    fixes = runner.oom_fix_overrides(run.cfg)
    assert "train.batch_size=2" in fixes and "train.grad_accum=2" in fixes
    monkeypatch.delenv("QLORA_TUI_FAULTS")
    again = runner.Run(None, run_dir=run.run_dir, resume=True, overrides=fixes)
    again.start()
    assert again.join(timeout=300)
    assert again.result.type == "run_finished", again.result
    assert step_numbers(run.run_dir) == list(range(1, 11))
    assert [e.from_step for e in events(run.run_dir) if isinstance(e, events_mod.Resumed)] == [6]
    logged = logged_step_numbers(run.run_dir)          # appended, never rewritten: step 7 twice
    assert logged[:7] == list(range(1, 8)) and logged[7:] == list(range(7, 11)), logged
    assert rundir.info(run.run_dir).state == summary.State.FINISHED and rundir.info(run.run_dir).step == 10
    cfg2 = config.load(run.run_dir / rundir.CONFIG)
    assert cfg2.train.batch_size == 2 and cfg2.train.grad_accum == 2
    notes = [e.message for e in events(run.run_dir) if e.type == "status" and e.phase == "resume"]
    assert notes and "train.batch_size" in notes[-1]


# ---------------------------------------------------------------- disk full

def test_disk_full_while_saving_keeps_previous_checkpoint(tiny_cfg, monkeypatch):
    cfg = configured(tiny_cfg, {"train.max_steps": 10, "train.save_steps": 3, "train.eval_steps": 0})
    run = run_in_process(cfg, monkeypatch, faults="diskfull@6")
    res = run.result
    assert res.type == "run_failed" and res.kind == "disk", res
    assert "disk full" in res.reason and "checkpoint-3 kept" in res.reason
    ck = rundir.checkpoints(run.run_dir)
    assert [p.name for p in ck] == ["checkpoint-3"] and (ck[0] / "COMPLETE").exists()
    assert not (run.run_dir / "checkpoints" / "checkpoint-6").exists()   # the torn one is gone
    assert adapter_tensors(ck[0])


# ---------------------------------------------------------------- bad input

def cli_train(capsys, *argv) -> tuple[int, str]:
    """`qlora-tui train ... --headless` in this process (the same code path), exit code + stderr."""
    from engine import cli
    try:
        rc = cli.main(["train", *map(str, argv), "--headless"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


def _cfg_file(tmp_path, body: str) -> Path:
    p = tmp_path / "bad.toml"
    p.write_text(body)
    return p


@pytest.fixture
def base_toml(tmp_path):
    runs = tmp_path / "runs"
    return ('[model]\nname = "builtin:tiny"\n[data]\ntrain = "builtin:sample"\n'
            f'[train]\nmax_steps = 2\n[output]\ndir = "{runs}"\n')


def _no_run_dir(tmp_path):
    runs = tmp_path / "runs"
    return not runs.exists() or not any(runs.iterdir())


def _one_clear_line(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines, "no message"
    for n in needles:
        assert n in err, (n, err)


def test_bad_jsonl_all_rows_bad_names_the_line(tmp_path, capsys, base_toml):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [\n{oops\n')
    rc, err = cli_train(capsys, _cfg_file(tmp_path, base_toml), "--set", f'data.train="{data}"')
    _one_clear_line(rc, err, str(data), "line 1", "invalid JSON")
    assert len(err.strip().splitlines()) == 1
    assert _no_run_dir(tmp_path)


def test_bad_jsonl_some_rows_bad_is_a_warning_with_line_numbers(tiny_cfg, tmp_path):
    from engine.models.builtin import sample_data_path
    good = sample_data_path().read_text().splitlines()[:40]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(good[:10] + ['{"messages": oops'] + good[10:]) + "\n")
    cfg = configured(tiny_cfg, {"data.train": str(data)})
    notes = runner.preflight(cfg, check_model=False)
    assert any("line 11" in n and "invalid JSON" in n for n in notes), notes


def test_empty_dataset(tmp_path, capsys, base_toml):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    rc, err = cli_train(capsys, _cfg_file(tmp_path, base_toml), "--set", f'data.train="{data}"')
    _one_clear_line(rc, err, str(data), "no rows", "data.train")
    assert _no_run_dir(tmp_path)


@pytest.mark.parametrize("override,needles", [
    ("train.learnin_rate=1e-4", ["train.learnin_rate", "unknown"]),
    ('train.batch_size="four"', ["train.batch_size", "four"]),
    ("lora.dropout=2.0", ["lora.dropout", "0.9"]),
    ("train.max_steps=-5", ["train.max_steps"]),
])
def test_bad_config_fields(tmp_path, capsys, base_toml, override, needles):
    rc, err = cli_train(capsys, _cfg_file(tmp_path, base_toml), "--set", override)
    _one_clear_line(rc, err, *needles)
    assert _no_run_dir(tmp_path)


def test_unknown_field_in_the_file_names_file_and_field(tmp_path, capsys, base_toml):
    rc, err = cli_train(capsys, _cfg_file(tmp_path, base_toml + "[lora]\nrank = 8\n"))
    _one_clear_line(rc, err, "lora.rank")
    assert _no_run_dir(tmp_path)


def test_missing_model_path(tmp_path, capsys, base_toml):
    rc, err = cli_train(capsys, _cfg_file(tmp_path, base_toml), "--set", 'model.name="/no/such/model"')
    _one_clear_line(rc, err, "model.name", "/no/such/model", "no such directory")
    assert len(err.strip().splitlines()) == 1
    assert _no_run_dir(tmp_path)


def test_lora_targets_absent_lists_the_existing_modules(tmp_path, capsys, base_toml):
    rc, err = cli_train(capsys, _cfg_file(tmp_path, base_toml), "--set",
                        'lora.target_modules=["q_proj", "query_key_value"]')
    _one_clear_line(rc, err, "lora.target_modules", "query_key_value", "q_proj", "v_proj", "down_proj")
    assert len(err.strip().splitlines()) == 1
    assert _no_run_dir(tmp_path)


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_output_dir(tmp_path, capsys, base_toml, where):
    blocker = tmp_path / "a_file.txt"
    blocker.write_text("x")
    out = str(blocker / "runs") if where == "under_a_file" else "/proc/qlora-tui-runs"
    for detach in ([], ["--detach"]):
        from engine import cli
        try:
            rc = cli.main(["train", str(_cfg_file(tmp_path, base_toml)), "--set", f'output.dir="{out}"',
                           *(detach or ["--headless"])])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        _one_clear_line(rc, err, "output.dir", out)
        assert not Path(out).exists()


def test_tokenizer_without_chat_template_falls_back_to_chatml(tiny_cfg, tmp_path):
    import shutil
    from engine.models.source import model_path
    from engine.models.tokenizer import load_tokenizer
    src = Path(model_path(tiny_cfg))
    dst = tmp_path / "no-template"
    shutil.copytree(src, dst)
    for f in dst.glob("chat_template.*"):
        f.unlink()
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = configured(tiny_cfg, {"model.name": str(dst)})
    assert runner.preflight(cfg) is not None                 # not a failure
    tok, warnings = load_tokenizer(cfg)
    assert any("ChatML" in w for w in warnings), warnings
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_trust_remote_code_stays_off(tiny_cfg, tmp_path):
    """A model directory whose architecture exists only as shipped code: refused, code never run."""
    import shutil
    from engine.training import model as model_mod
    from engine.models.source import model_path
    src = Path(model_path(tiny_cfg))
    dst = tmp_path / "custom-model"
    shutil.copytree(src, dst)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (dst / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    conf = json.loads((dst / "config.json").read_text())
    conf.update(model_type="evil_llama", architectures=["EvilForCausalLM"],
                auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (dst / "config.json").write_text(json.dumps(conf))
    cfg = configured(tiny_cfg, {"model.name": str(dst), "output.dir": str(tmp_path / "runs")})
    assert cfg.model.trust_remote_code is False and not runner.needs_remote_code_confirmation(cfg)
    with pytest.raises(runner.PreflightError) as ei:
        runner.preflight(cfg)
    msg = str(ei.value)
    assert "model.trust_remote_code = true" in msg and "auto_map" in msg and "\n" not in msg
    # the loaders themselves pass trust_remote_code=False too: transformers refuses, no code runs
    with pytest.raises(Exception):
        model_mod.check_model_skeleton(cfg)
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()
    assert runner.needs_remote_code_confirmation(configured(cfg, {"model.trust_remote_code": True}))


# ---------------------------------------------------------------- secrets

HF_SECRET = "hf_testsecretQLORAtui0123456789abcdef"


def test_hf_token_never_reaches_a_saved_config(tiny_cfg, tmp_path, monkeypatch):
    """Config saving never takes secrets from the environment. (A detached run's whole directory,
    stdout.log included, is checked for the token in the detach test below: one run, both checks.)"""
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN"):
        monkeypatch.setenv(k, HF_SECRET)
    cfg_path = write_cfg(tiny_cfg, tmp_path / "run.toml", {"train.max_steps": 6})
    config.save(config.load(cfg_path), tmp_path / "saved.toml")
    assert HF_SECRET not in (tmp_path / "saved.toml").read_text()


# ---------------------------------------------------------------- run states, control channel

def _fake_run(base: Path, name: str, evs: list, pid: int | None = None) -> Path:
    d = base / name
    (d / "control").mkdir(parents=True)
    with (d / rundir.EVENTS).open("w") as fh:
        for ev in evs:
            fh.write(events_mod.dumps(ev) + "\n")
    if pid is not None:
        rundir.write_pid(d, pid)
    return d


def test_runs_states_and_a_crashed_process_is_never_live(tmp_path):
    base = tmp_path / "runs"
    start = events_mod.RunStarted(total_steps=10)
    dead = subprocess.Popen(["true"])
    dead.wait()
    zombie = subprocess.Popen(["true"])      # exited, not yet reaped
    wait_for(lambda: open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", 10)
    _fake_run(base, "a-finished", [start, events_mod.Step(step=10), events_mod.RunFinished(step=10)])
    _fake_run(base, "b-stopped", [start, events_mod.Step(step=4), events_mod.RunFinished(step=4, stopped=True, reason="x")])
    _fake_run(base, "c-failed", [start, events_mod.RunFailed(reason="boom", kind="nan", step=3)])
    _fake_run(base, "d-live", [start, events_mod.Step(step=2)], pid=os.getpid())
    _fake_run(base, "e-crashed", [start, events_mod.Step(step=2)], pid=dead.pid)
    _fake_run(base, "f-zombie", [start, events_mod.Step(step=2)], pid=zombie.pid)
    _fake_run(base, "g-resumed-live", [start, events_mod.RunFinished(step=4, stopped=True), start], pid=os.getpid())
    h = base / "h-run-json-only"
    h.mkdir()
    rundir.write_pid(h, dead.pid)
    (base / "i-not-a-run").mkdir()
    (base / "j-file").write_text("x")
    states = {ri.name: ri.state for ri in rundir.list_runs(base)}
    zombie.wait()
    assert states == {"a-finished": "finished", "b-stopped": "stopped", "c-failed": "failed",
                      "d-live": "live", "e-crashed": "crashed", "f-zombie": "crashed",
                      "g-resumed-live": "live", "h-run-json-only": "crashed"}
    assert rundir.newest_live(base).name == "g-resumed-live"
    r = engine_cmd("runs", "--dir", base)
    assert r.returncode == 0
    rows = {l.split()[-1] if "(" not in l else l.split("  (")[0].split()[-1]: l.split()[0]
            for l in r.stdout.splitlines()[1:]}
    assert rows[str(base / "e-crashed")] == "crashed" and rows[str(base / "d-live")] == "live"
    assert "resume" in r.stdout                           # a crashed run says how to continue


def test_control_requests_are_atomic_ordered_and_stale_ones_dropped_on_resume(tiny_cfg, tmp_path):
    d = tmp_path / "r"
    p1 = ctl.request(d, "save")
    p2 = ctl.request(d, "stop")
    assert [c for _, c in ctl.pending(d)] == ["save", "stop"]
    assert json.loads(p1.read_text())["command"] == "save"
    with pytest.raises(ValueError):
        ctl.request(d, "rm -rf")
    ctl.mark_done(p1)
    assert [c for _, c in ctl.pending(d)] == ["stop"] and p1.with_suffix(".done").exists()
    # a request to a process that died is not carried out by the resumed run
    config.save(tiny_cfg, d / rundir.CONFIG)
    (d / rundir.EVENTS).write_text(events_mod.dumps(events_mod.RunStarted(total_steps=12)) + "\n")
    run = runner.Run(None, run_dir=d, resume=True)
    run.prepare()
    run._writer.close()
    assert ctl.pending(d) == [] and p2.with_suffix(".stale").exists()


def test_detach_survives_its_terminal_then_stop_and_save_through_the_control_channel(tiny_cfg, tmp_path):
    """`train --detach` inside a tmux session; the session is killed (terminal gone); the run goes
    on; `qlora-tui save` writes a checkpoint; `qlora-tui stop` stops it gracefully. HF_TOKEN is set
    and no file of the run directory holds it."""
    import shutil
    if not shutil.which("tmux"):
        pytest.skip("tmux not installed")
    runs = tmp_path / "runs"
    cfg_path = write_cfg(tiny_cfg, tmp_path / "run.toml", {"train.max_steps": 30, "train.save_steps": 0,
                                                         "train.eval_steps": 0, "output.dir": str(runs)})
    sock = f"qlt-{os.getpid()}"
    tm = ["tmux", "-L", sock]
    # with HF_TOKEN set: no file of the run (stdout.log, checkpoints, adapter included) holds it
    env = env_with(QLORA_TUI_FAULTS="slow=0.3", HF_TOKEN=HF_SECRET, HUGGING_FACE_HUB_TOKEN=HF_SECRET,
                   HF_HUB_TOKEN=HF_SECRET)
    shell = (f"cd {REPO} && {sys.executable} -m engine train {cfg_path} --detach > {tmp_path}/detach.out "
             f"2> {tmp_path}/detach.err; sleep 600")
    subprocess.run([*tm, "new-session", "-d", "-s", "det", shell], check=True, env=env)
    try:
        d = Path(wait_for(lambda: (tmp_path / "detach.out").exists()
                          and (tmp_path / "detach.out").read_text().splitlines()[:1], 120,
                          what="the detached run's directory")[0])
        assert d.parent == runs
    finally:
        subprocess.run([*tm, "kill-server"], capture_output=True)        # the terminal closes
    wait_step(d, 3)
    assert rundir.info(d).state == "live"
    s1 = last_step(d)
    r = engine_cmd("save", d, "--wait", timeout=120)
    assert r.returncode == 0 and "checkpoint written" in r.stdout, r.stdout + r.stderr
    saved = rundir.checkpoints(d)
    assert saved and rundir.checkpoint_step(saved[-1]) >= s1
    r = engine_cmd("stop", d, "--wait", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    fin = terminal(d)
    assert fin.type == "run_finished" and fin.stopped and "control channel" in fin.reason
    assert fin.step < 30 and (d / "adapter").exists()
    assert rundir.info(d).state == "stopped"
    assert step_numbers(d) == list(range(1, fin.step + 1))
    r = engine_cmd("stop", d)
    assert r.returncode == 1 and "no live run" in r.stderr
    assert rundir.checkpoints(d) and (d / rundir.STDOUT).exists()
    assert files_containing(d, HF_SECRET.encode()) == []
    assert files_containing(d, HF_SECRET[3:].encode()) == []
