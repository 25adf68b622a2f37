"""A multi-GPU run that checkpoints, is killed (-9, the whole process group) after its first
checkpoint, and is resumed: what must hold for FSDP-QLoRA's sharded checkpoints as for one GPU.

    python bench/multi_gpu_resume.py llama1b 2048 8 fsdp     # on 2 GPUs
    python bench/multi_gpu_resume.py tiny 64 2 ddp           # the same on 2 CPU processes (gloo)

Trains 16 steps with a checkpoint every 6; kills the job once step 8 is logged and
checkpoint-6 is complete; resumes with ``qlora-tui train --resume RUN`` and checks: every step
1..16 logged exactly once, ``run_finished``, the adapter loads with plain PEFT
(bench/check_adapter.py). Prints one line ``RESUME {...}`` and appends it to $OUT/resume.jsonl.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))


def main() -> int:
    shape, seq, batch, strategy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    import tomli_w
    from engine.core import events
    from engine.core import rundir
    from engine.core.summary import fold, standing
    out = Path(os.environ.get("OUT", "/tmp/bench-out"))
    runs = out / f"resume-{strategy}"
    runs.mkdir(parents=True, exist_ok=True)
    cfg = {"lora": {"r": 32, "alpha": 64},
           "train": {"max_steps": 16, "batch_size": batch, "grad_accum": 1, "learning_rate": 2e-4,
                     "warmup_ratio": 0.0, "logging_steps": 1, "eval_steps": 0, "save_steps": 6,
                     "save_total_limit": 3},
           "output": {"dir": str(runs)},
           "distributed": {"gpus": 2, "strategy": strategy}}
    if shape == "tiny":                 # CPU processes: builtin model and data
        cfg.update(model={"name": "builtin:tiny"}, data={"train": "builtin:sample", "max_length": seq})
        cfg["train"].update(device="cpu")
    else:
        from vs_plain import data_file, model_dir
        cfg.update(model={"name": model_dir(shape)},
                   data={"train": str(data_file(shape, seq, batch, False)), "max_length": seq,
                         "eval_fraction": 0.0})
        cfg["train"].update(liger_kernel=False, gradient_checkpointing=True)
    path = runs / "config.toml"
    path.write_text(tomli_w.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(out / f"resume-{strategy}.log", "w")
    res = {"shape": shape, "strategy": strategy}

    p = subprocess.Popen([sys.executable, "-m", "engine", "train", str(path), "--headless"], env=env,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir, deadline = None, time.time() + 900
    while time.time() < deadline and p.poll() is None:
        time.sleep(0.5)
        dirs = [d for d in runs.iterdir() if d.is_dir()]
        if not dirs:
            continue
        run_dir = dirs[0]
        steps = [e.step for e in events.read_events(run_dir / rundir.EVENTS) if isinstance(e, events.Step)] \
            if (run_dir / rundir.EVENTS).exists() else []
        if steps and max(steps) >= 8 and rundir.checkpoints(run_dir):
            # the launcher's process group, and every rank: torch's launcher starts each rank
            # in a session of its own, so only their command lines (the run directory) find them
            os.killpg(p.pid, signal.SIGKILL)
            subprocess.run(["pkill", "-9", "-f", str(run_dir)], check=False)
            break
    p.wait()
    if run_dir is None:
        res["error"] = "no run directory"
        return report(out, res)
    res["killed_at_step"] = max([e.step for e in events.read_events(run_dir / rundir.EVENTS)
                                 if isinstance(e, events.Step)] or [0])
    res["checkpoints_before_resume"] = [c.name for c in rundir.checkpoints(run_dir)]
    res["checkpoint_files"] = sorted(x.name for x in rundir.checkpoints(run_dir)[-1].iterdir()) \
        if rundir.checkpoints(run_dir) else []
    time.sleep(2)                                      # let the OS reap the killed ranks
    r = subprocess.run([sys.executable, "-m", "engine", "train", "--resume", str(run_dir), "--headless"],
                       env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    log.close()
    evs = events.read_events(run_dir / rundir.EVENTS)
    done = fold(evs)                                   # past the resume marker: each step once
    steps = [e.step for e in standing(evs) if isinstance(e, events.Step)]
    res.update(resume_rc=r.returncode, steps_logged=steps,
               steps_once=steps == list(range(1, 17)) and [s for s, _ in done.losses] == steps,
               resumed_from=[e.from_step for e in evs if isinstance(e, events.Resumed)],
               final=str(done.state), reason=done.reason)
    chk = subprocess.run([sys.executable, str(HERE / "check_adapter.py"), str(run_dir)], env=env,
                         capture_output=True, text=True)
    line = next((l for l in chk.stdout.splitlines() if l.startswith("ADAPTER ")), None)
    res["adapter"] = json.loads(line[8:]) if line else {"error": (chk.stderr or chk.stdout)[-800:]}
    return report(out, res)


def report(out: Path, res: dict) -> int:
    print("RESUME " + json.dumps(res), flush=True)
    with open(out / "resume.jsonl", "a") as fh:
        fh.write(json.dumps(res) + "\n")
    return 0 if res.get("steps_once") and res.get("final") == "finished" else 1


if __name__ == "__main__":
    raise SystemExit(main())
