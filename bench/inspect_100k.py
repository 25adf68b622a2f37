"""Benchmark: the full `inspect` report of a 100,000-row ChatML JSONL (~300 tokens a row).

Generates the file in a temporary directory (seeded, so every run reads the same data),
then times ``engine.dataset.inspect.inspect`` on it with builtin:tiny's fast tokenizer, and prints
the figure, the time to the first partial report, and the exact command that reproduces it.

    python bench/inspect_100k.py [--rows N] [--keep DIR]
"""
from __future__ import annotations

import json
import os
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_file  # noqa: E402  (bench/data_file.py)

WORDS = ("the model learns to stop when the end of turn token is inside the loss mask and the "
         "learning rate warms up over a few steps before the adapter weights settle on a lower loss "
         "capital city of Canada is Ottawa while batch size and gradient accumulation set the "
         "effective batch for each optimizer step on the GPU").split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    r = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(r.choice(WORDS) for _ in range(k)).capitalize() + "."

    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            msgs = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"Question {i}: " + sentence(r.randint(25, 55))},
                    {"role": "assistant", "content": sentence(r.randint(95, 175))}]
            fh.write(json.dumps({"messages": msgs}) + "\n")


def _busy_s() -> float | None:
    """CPU-seconds all processes of the machine have used so far (/proc/stat), or None."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0)           # idle + iowait
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _cpu_s() -> float:
    """CPU-seconds (user+sys) of this process and its children that have ended (the inspector's
    counting process, once the scan is over)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def main() -> int:
    args, path = data_file.start(__doc__, 100_000, "chatml")
    from engine.core import config
    from engine.dataset import inspect as inspect_mod

    t = time.perf_counter()
    generate(path, args.rows)
    gen_s = time.perf_counter() - t
    cfg = config.load(None, ["model.name=\"builtin:tiny\""])
    inspect_mod.tokenizer_for(cfg)              # load the tokenizer outside the timing (cached by the TUI too)
    first = []
    ru0 = _cpu_s()
    load0 = os.getloadavg()[0]
    busy0 = _busy_s()
    t0 = time.perf_counter()

    def on_partial(rep):
        if not first:
            first.append((time.perf_counter() - t0, rep.rows_read, rep.rows_tokenized))

    rep = inspect_mod.inspect(cfg, path=str(path), on_partial=on_partial)
    total = time.perf_counter() - t0
    ru1 = _cpu_s()
    busy1 = _busy_s()
    cpu = ru1 - ru0
    tokens = int(rep.stats["mean"] * rep.rows_tokenized)
    print(f"rows: {rep.rows} usable / {rep.raw_count}; tokens: {tokens} "
          f"(mean {rep.stats['mean']:.0f}, median {rep.stats['median']:g}, p95 {rep.stats['p95']:g})")
    print(f"generated the file in {gen_s:.1f} s ({path.stat().st_size / 1e6:.0f} MB)")
    if first:
        print(f"first partial report after {first[0][0]:.2f} s "
              f"({first[0][1]} rows read, {first[0][2]} tokenised)")
    print(f"full report: {total:.1f} s on {os.cpu_count()} CPU(s) "
          f"({rep.rows / total:,.0f} rows/s, {tokens / total / 1e6:.2f} M tokens/s)")
    print(f"CPU time: {cpu:.1f} s (user+sys, all threads, the counting process included); load average before: {load0:.2f}, "
          f"after: {os.getloadavg()[0]:.2f}")
    if busy0 is not None and busy1 is not None:
        # the 1-minute load average lags by a minute; this says whether anything else ran *during* the run
        print(f"other processes used {max(0.0, busy1 - busy0 - cpu):.1f} CPU-s during the run "
              f"(of {total * (os.cpu_count() or 1):.0f} available)")
    return data_file.finish("bench/inspect_100k.py", args, 100_000, path)


if __name__ == "__main__":
    raise SystemExit(main())
