"""engine.service: the verbs both faces call, each one rule over its owner. Real configs, real run
directories (written as a run writes them: tui.testing.write_run), the real planner, inspector and
`estimate` CLI. A real builtin:tiny run started, stopped and resumed through these verbs is in
tests/screens/test_recovery.py and tests/screens/test_screens.py (the TUI's ctrl+r, ctrl+x and resume)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine import service
from engine.core import config, events, rundir
from engine.core.units import GIB
from engine.planning import estimate
from engine.training.preflight import PreflightError
from tui.testing import write_run

ROOT = Path(__file__).resolve().parents[2]


def demo(tmp_path, *extra):
    return service.demo_config([f'output.dir="{tmp_path / "runs"}"', *extra])


def test_config_verbs_round_trip_and_name_the_bad_field(tmp_path):
    cfg = demo(tmp_path, "lora.r=8")
    path = tmp_path / "c.toml"
    service.save_config(cfg, path)
    assert service.load_config(path).lora.r == 8
    assert service.load_config(path, ["lora.r=4"]).lora.r == 4
    data = cfg.to_dict()
    good, problems = service.config_from_form(data, str(path))
    assert problems == [] and good.to_dict() == cfg.to_dict()
    data["train"]["batch_size"] = -3
    bad, problems = service.config_from_form(data, str(path))
    assert bad is None and [p.field for p in problems] == ["train.batch_size"]
    with pytest.raises(service.ConfigError):
        service.load_config(tmp_path / "missing.toml")


def test_effective_batch_is_one_rule(tmp_path):
    assert service.effective_batch(4, 2, 3) == 24 == config.effective_batch(4, 2, 3)
    cfg = demo(tmp_path, "train.batch_size=3", "train.grad_accum=5", "distributed.gpus=2")
    assert service.config_effective_batch(cfg) == 3 * 5 * cfg.distributed.processes
    assert cfg.distributed.processes == 2
    assert not hasattr(config.Config, "effective_batch")          # the duplicate is gone


def test_gpu_budget_is_the_smallest_known_limit(tmp_path):
    cfg = demo(tmp_path, "train.gpu_memory_gib=8")
    assert service.gpu_budget(cfg, 24.0) == (8 * GIB, "a 8 GiB budget (train.gpu_memory_gib)")
    budget, why = service.gpu_budget(cfg, 4.0)
    assert budget == 4 * GIB and "--gpu-mem" in why
    cpu = demo(tmp_path, "train.device=\"cpu\"")
    assert service.gpu_budget(cpu) == (None, "no GPU here: pass --gpu-mem or set train.gpu_memory_gib")
    assert service.gpu_budget(cfg) == estimate.gpu_budget(cfg)


def test_plan_is_the_planner_verdict_at_the_budget_and_estimate_prints_it(tmp_path):
    cfg = demo(tmp_path, "train.gpu_memory_gib=6", 'train.device="cuda"')
    v = service.plan(cfg)
    assert v.budget == 6 * GIB and v.on_gpu and v.estimate.gpu_mem_bytes == 6 * GIB
    mc = estimate.model_config_for(cfg)
    assert v.model_config == mc
    assert v.plan.to_dict() == estimate.plan(cfg, mc, 6 * GIB).to_dict()
    lines = v.summary_lines()
    assert lines and lines[0] == estimate.plan_summary(v.plan, 6.0)
    # the CPU: no memory planning, no planner lines on the Config screen
    cpu = service.plan(demo(tmp_path, 'train.device="cpu"'))
    assert cpu.budget is None and not cpu.on_gpu and cpu.summary_lines() == []
    assert "CPU: no memory planning" in cpu.plan.reasons
    # `estimate` reads train.gpu_memory_gib through the same verb (no "pass --gpu-mem")
    toml = tmp_path / "c.toml"
    service.save_config(cfg, toml)
    r = subprocess.run([sys.executable, "-m", "engine", "estimate", str(toml), "--json"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-500:]
    out = json.loads(r.stdout)
    assert out["gpu_mem_bytes"] == 6 * GIB and out["plan"] == v.plan.to_dict()


def test_run_listing_state_summary_and_differences(tmp_path):
    runs = tmp_path / "runs"
    done = write_run(runs, "20260101-120000-tiny", steps=30)
    stopped = write_run(runs, "20260102-120000-tiny", steps=30, stop_at=12)
    service.save_config(demo(tmp_path, "lora.r=8"), done / rundir.CONFIG)
    service.save_config(demo(tmp_path, "lora.r=16"), stopped / rundir.CONFIG)
    (runs / "not-a-run").mkdir()
    listed = service.runs(runs)
    assert [r.path for r in listed] == [stopped, done]            # newest first, runs only
    assert [r.state for r in listed] == [service.State.STOPPED, service.State.FINISHED]
    assert service.run_info(done).step == 30 and service.is_run_dir(done)
    assert not service.is_run_dir(runs / "not-a-run")
    assert service.run_config(done).lora.r == 8 and service.run_config(runs / "not-a-run") is None
    s = service.run_summary(stopped)
    assert s.step == 12 and s.stopped and s.state in service.RESUMABLE
    assert len(service.read_events(done)) == len(events.read_events(done / rundir.EVENTS))
    assert ("lora.r", [8, 16]) in service.config_differences([done, stopped])
    assert service.newest_live_run(runs) is None and not service.run_alive(done)


def test_log_tail_verbs_read_only_the_tail(tmp_path):
    run = write_run(tmp_path / "runs", steps=5)
    log = run / rundir.EVENTS
    size = service.log_size(run)
    assert size == log.stat().st_size and service.last_event_is_terminal(run)
    with open(log, "a") as fh:
        fh.write(events.dumps(events.Step(step=6, total_steps=9, loss=1.0)) + "\n")
    assert not service.last_event_is_terminal(run)
    with open(log, "a") as fh:                            # a line still being written: not decided on
        fh.write(events.dumps(events.RunFinished(step=6))[:20])
    assert not service.last_event_is_terminal(run)
    assert service.log_size(tmp_path / "nowhere") == 0
    assert service.last_output_line(run) == "no output"
    (run / rundir.STDOUT).write_text("x" * 200 + "\n" + "filler line\n" * 20_000 + "\nerror: the last line\n\n")
    assert service.last_output_line(run) == "error: the last line"


def _failed_run(tmp_path, hint_overrides, ckpt_step=None):
    run = write_run(tmp_path / "runs", steps=20, finished=False)
    service.save_config(demo(tmp_path, "data.max_length=1024"), run / rundir.CONFIG)
    w = events.JsonlWriter(run / rundir.EVENTS)
    w(events.Hint(rule="oom", severity=events.Severity.ERROR, step=20, overrides=hint_overrides))
    w(events.RunFailed(reason="CUDA out of memory at step 20", kind=events.FailKind.OOM, step=20))
    w.close()
    if ckpt_step:
        ck = run / rundir.CHECKPOINTS / f"checkpoint-{ckpt_step}"
        ck.mkdir(parents=True)
        rundir.mark_complete(ck, ckpt_step)
    return run


def test_resume_offer_splits_frozen_keys_and_says_each_value(tmp_path):
    run = _failed_run(tmp_path, ["data.max_length=512", "train.method=orpo", "lora.r=4"], ckpt_step=10)
    offer = service.resume_offer(service.run_summary(run))
    assert offer.what == "Out of memory" and offer.run_dir == run and offer.from_step == 10
    assert offer.fixes == ["data.max_length=512"]
    assert offer.frozen == ["train.method=orpo", "lora.r=4"]        # a resume keeps method, lora
    assert offer.fix_lines == ["data.max_length 1024 → 512"]
    assert len(offer.frozen_lines) == 2 and "lora.r" in offer.frozen_lines[1]
    assert not offer.no_fix_left and offer.cfg.data.max_length == 1024
    # the same rule as `train --resume`: the frozen keys are refused there
    with pytest.raises(PreflightError, match="train.method"):
        service.resume_config(run, ["train.method=orpo"])
    cfg, changed = service.resume_config(run, offer.fixes)
    assert cfg.data.max_length == 512 and changed == ["data.max_length"]


def test_resume_offer_of_a_stopped_run_resumes_unchanged(tmp_path):
    run = write_run(tmp_path / "runs", steps=30, stop_at=12)
    service.save_config(demo(tmp_path), run / rundir.CONFIG)
    offer = service.resume_offer(service.run_summary(run))
    assert (offer.what, offer.fixes, offer.frozen, offer.from_step) == ("Stopped", [], [], 0)
    assert not offer.no_fix_left


def test_resume_run_refuses_a_finished_run_before_starting_anything(tmp_path):
    run = write_run(tmp_path / "runs", steps=10)
    service.save_config(demo(tmp_path), run / rundir.CONFIG)
    before = service.log_size(run)
    with pytest.raises(PreflightError, match="nothing to resume"):
        service.resume_run(run, [])
    assert service.log_size(run) == before and not (run / rundir.STDOUT).exists()


def test_dataset_verbs_inspect_preview_and_find_a_bad_line(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                     {"role": "assistant", "content": f"answer {i}"}]}) for i in range(6)]
    rows.insert(3, "{not json")
    data.write_text("\n".join(rows) + "\n")
    cfg = demo(tmp_path, f'data.train="{data}"', 'data.format="messages"', "data.eval_fraction=0")
    report = service.inspect_dataset(cfg)
    assert report.rows == 6
    pv = service.preview_row(cfg, 0)
    assert any(trained for _, trained, _, in service.marked_segments(pv))
    assert service.row_at_line(cfg, 5) == 3                 # line 5 is the 4th good row
    with pytest.raises(service.NoRowAtLine):
        service.row_at_line(cfg, 4)
    assert service.raw_line(data, 4) == "{not json"


def test_stop_and_save_are_requests_the_run_reads(tmp_path):
    """The requests a live run polls (its control channel), in the order they were sent. A real
    run started, stopped and resumed through these verbs: tests/screens/test_recovery.py, test_screens.py
    (the TUI's ctrl+r, ctrl+x and resume go through them)."""
    from engine.core import control
    run = write_run(tmp_path / "runs", steps=10, finished=False)
    service.save_run(run)
    service.stop_run(run)
    assert [cmd for _, cmd in control.pending(run)] == ["save", "stop"]
    folded = control.fold(control.pending(run))
    assert folded.stop and folded.save


def test_start_run_refuses_bad_data_in_one_line_and_creates_nothing(tmp_path):
    cfg = demo(tmp_path, f'data.train="{tmp_path / "missing.jsonl"}"')
    with pytest.raises(Exception) as e:
        service.start_run(cfg)
    assert "missing.jsonl" in str(e.value) and "\n" not in str(e.value)
    assert service.runs(tmp_path / "runs") == []


# ---- the TUI reaches the engine through the service ------------------------------------------

# value modules the TUI may import directly: event classes, units, the sanitiser
VALUES = {"engine.service", "engine.core.events", "engine.core.units", "engine.core.safe_text"}
EXCEPTIONS = {
    "tui/cli.py": {"engine.cli", "engine.core.quiet"},     # the command line's front door
    "tui/settings.py": {"engine.core.files"},              # its own settings file: bounded read, atomic write
    "tui/testing.py": {"engine.training.gpu"},             # fixed GPU/host readings for tests and screenshots
}


def _engine_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "engine"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "engine":
            pkg = ROOT.joinpath(*node.module.split("."))       # `from engine.core import files`: the module
            out |= {f"{node.module}.{a.name}" if (pkg / f"{a.name}.py").exists() or (pkg / a.name).is_dir()
                    else node.module
                    for a in node.names}
    return out


def test_the_tui_imports_only_the_service_and_value_modules():
    bad = {}
    for p in sorted((ROOT / "tui").rglob("*.py")):
        rel = p.relative_to(ROOT).as_posix()
        extra = _engine_imports(p) - VALUES - EXCEPTIONS.get(rel, set())
        if extra:
            bad[rel] = sorted(extra)
    assert bad == {}
