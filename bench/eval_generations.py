"""Cost of the eval generations (issue 28): a builtin:tiny CPU run with and without them.

`python bench/eval_generations.py [STEPS]`: trains the demo (builtin:tiny, builtin:sample) for
STEPS steps with an eval every 20 steps, once with eval.samples=0 (no generations) and once with
the defaults (2 prompts, 32 new tokens, greedy), and prints the generations' seconds (from their
events) as a share of the run's training wall time.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.core import events


def run(tmp: Path, *sets: str) -> tuple[float, list]:
    out = tmp / f"runs{len(list(tmp.iterdir()))}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engine", "train", "--headless", "examples/demo.toml",
                    "--set", f'output.dir="{out}"', "--set", f"train.max_steps={STEPS}",
                    "--set", "train.eval_steps=20", "--set", "train.save_steps=0", *sum((["--set", s] for s in sets), [])],
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    (run_dir,) = out.iterdir()
    evs = events.read_events(run_dir / "events.jsonl")
    steps = [e for e in evs if isinstance(e, events.Step)]
    train_s = steps[-1].time - steps[0].time
    return train_s, [e for e in evs if isinstance(e, events.Generations)], wall


STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 60
with tempfile.TemporaryDirectory() as d:
    tmp = Path(d)
    base_s, _, base_wall = run(tmp, "eval.samples=0")
    gen_s, gens, gen_wall = run(tmp)
    spent = sum(g.seconds for g in gens)
    print(f"{STEPS} steps, eval every 20: without generations {base_s:.1f} s of steps "
          f"({base_wall:.1f} s wall); with {len(gens)} x {len(gens[0].samples)} prompts x 32 tokens: "
          f"{gen_s:.1f} s of steps ({gen_wall:.1f} s wall); generations {spent:.2f} s = "
          f"{spent / gen_s:.1%} of the training time ({spent / len(gens):.2f} s per eval)")
