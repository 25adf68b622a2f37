"""The multi-process path on the CPU: [distributed] gpus = 2 relaunches the engine as two
processes (gloo here, accelerate + NCCL on GPUs); rank 0 alone writes the run directory, every
rank trains on its share of the rows, and a stop request reaches all ranks on the same step."""
import json
import subprocess
import sys
import time
from pathlib import Path

from engine import control
from engine import rundir as R

REPO = Path(__file__).resolve().parents[1]


def start(tmp_path, *sets, env=None):
    import os
    return subprocess.Popen(
        [sys.executable, "-m", "engine", "train", "examples/demo.toml", "--headless",
         "--set", f"output.dir='{tmp_path}'", "--set", "distributed.gpus=2", *sum((["--set", s] for s in sets), [])],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})))


def test_two_processes_one_event_log_and_adapter(tmp_path):
    p = start(tmp_path, "train.max_steps=4", "train.save_steps=2")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert out.count("step 4/4") == 1                 # rank 0 prints, the other rank does not
    run = R.list_runs(tmp_path)[0]
    assert run.state == "finished"
    evs = [json.loads(line) for line in (run.path / "events.jsonl").read_text().splitlines()]
    steps = [e for e in evs if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]   # one log, no duplicates from rank 1
    # 4 steps x batch 4 x 2 processes = 32 of 285 rows: the epoch counts both ranks' rows
    assert abs(steps[-1]["epoch"] - 32 / 285) < 0.02
    assert (run.path / "adapter" / "adapter_model.safetensors").exists()
    assert R.checkpoints(run.path)


def test_stop_request_reaches_every_rank(tmp_path):
    p = start(tmp_path, "train.max_steps=400", "train.save_steps=0", env={"QLORA_TUI_FAULTS": "slow=0.2"})
    deadline = time.time() + 300
    run_dir = None
    while time.time() < deadline:
        runs = R.list_runs(tmp_path)
        if runs and runs[0].step >= 2:
            run_dir = runs[0].path
            break
        time.sleep(0.5)
    assert run_dir is not None, p.stderr.read()[-3000:] if p.poll() is not None else "no steps"
    control.request(run_dir, "stop")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    ri = R.info(run_dir)
    assert ri.state == "stopped" and ri.step < 400
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
