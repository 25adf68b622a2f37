"""Real 4-bit QLoRA runs on builtin:tiny: events, run directory, adapter, graceful stop."""
import json
import math
import subprocess
import sys
import threading

import pytest

from engine.core import events
from engine.training import runner
from engine.core import rundir

REQUIRED = {"run_started": set(), "step": {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch"},
            "eval": {"step", "eval_loss"}, "checkpoint": {"step", "path"}, "run_finished": set()}


def run_to_end(cfg):
    run = runner.Run(cfg)
    run.start()
    assert run.join(timeout=300)
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished real run of the tiny_cfg config, shared by the tests that only read it."""
    from reliability_helpers import tiny_config
    return run_to_end(tiny_config(tmp_path_factory.mktemp("tiny")))


def test_run_dir_event_log_and_adapter(tiny_run):
    run = tiny_run
    d = run.run_dir
    assert run.result.type == "run_finished", getattr(run.result, "reason", "")
    assert (d / "config.toml").exists() and (d / "run.json").exists()
    lines = (d / "events.jsonl").read_text().splitlines()
    objs = [json.loads(line) for line in lines]       # one JSON object per line
    types = [o["type"] for o in objs]
    assert all("time" in o and "type" in o for o in objs)
    for t, keys in REQUIRED.items():
        assert t in types, t
        for o in objs:
            if o["type"] == t:
                assert keys <= set(o), (t, keys - set(o))
    steps = [o["step"] for o in objs if o["type"] == "step"]
    assert steps == list(range(1, 13))
    assert types[-1] == "run_finished"
    # a standard PEFT adapter that names a loadable base
    a = d / "adapter"
    assert (a / "adapter_config.json").exists() and (a / "adapter_model.safetensors").exists()
    assert (a / "tokenizer.json").exists() or (a / "tokenizer_config.json").exists()
    # a checkpoint with the COMPLETE marker
    assert rundir.checkpoints(d) and rundir.info(d).state == "finished"


def test_adapter_loads_with_plain_peft_and_changes_logits(tiny_run):
    run = tiny_run
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    a = run.run_dir / "adapter"
    base_path = json.loads((a / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, str(a))
        after = tuned(ids).logits
    assert (after - before).abs().max().item() > 1e-4


def test_graceful_stop_mid_run_saves_adapter(tiny_cfg):
    cfg = tiny_cfg.copy()
    cfg.train.max_steps = 500
    cfg.train.save_steps = 0
    run = runner.Run(cfg)
    seen = []

    def on(ev):
        if ev.type == "step":
            seen.append(ev.step)
            if ev.step == 3:
                run.request_stop("test stop")
    run.bus.subscribe(on)
    run.start()
    assert run.join(timeout=300)
    assert run.result.type == "run_finished" and run.result.stopped
    assert 3 <= run.result.step < 500
    assert (run.run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert rundir.checkpoints(run.run_dir)      # the stop also wrote a checkpoint (for resume)
    assert rundir.info(run.run_dir).state == "stopped"


def test_headless_demo_learns(tmp_path):
    """The README's demo command: a real NF4 QLoRA run whose loss goes down."""
    r = subprocess.run([sys.executable, "-m", "engine", "train", "examples/demo.toml", "--headless",
                        "--set", f"output.dir='{tmp_path}'"], capture_output=True, text=True, timeout=600,
                       cwd=runner.Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("step ")]
    assert len(lines) == 100
    # the README's promise: one line per logging step, and no library noise around them
    ours = ("[", "run ", "  plan: ", "  Time to train: ", "step ", "eval ", "checkpoint ", "hint ", "finished ")
    assert [l for l in r.stdout.splitlines() if not l.startswith(ours)] == []
    for noise in ("Warning", "it/s]", "examples/s]", "Failed to load", "pynvml"):
        assert noise not in r.stderr + r.stdout, (noise, r.stderr[-1500:])
    losses = [float(l.split("loss ")[1].split()[0]) for l in lines]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    run_dir = rundir.list_runs(tmp_path)[0].path
    cfg_model = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg_model["peft_type"] == "LORA"
    assert "Linear4bit" in (run_dir / "stdout.log").read_text() if (run_dir / "stdout.log").exists() else True


def test_headless_failure_exits_nonzero_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "engine", "train", "examples/demo.toml", "--headless",
                        "--set", f"output.dir='{tmp_path}'", "--set", "data.train='/nonexistent.jsonl'"],
                       capture_output=True, text=True, timeout=300, cwd=runner.Path(__file__).resolve().parents[2])
    assert r.returncode != 0
    assert "/nonexistent.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())      # no half-created run directory
