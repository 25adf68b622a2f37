"""Benchmark: the inspector's peak memory on many short rows (issue 26: bounded by the longest
row, not the row count).

Generates a JSONL of N short chat rows (seeded; ~1 in 50 an exact copy of an earlier row and
~1 in 50 a near copy, so the duplicate checks have work), then runs the full
``engine.dataset.inspect.inspect`` report on it in a fresh child process with builtin:tiny and
prints the child's peak RSS (ru_maxrss), its time and token rate, and the RSS of a child that only
loaded the tokenizer (the floor any inspection starts from).

    python bench/inspect_memory.py [--rows 1000000] [--keep DIR] [--low-caps]

``--low-caps`` lowers the listing caps (100,000 → 1,000 duplicate groups; per-row counts for the
first 100,000 rows instead of 1 M), so every capped structure is full early and the RSS samples
show what still grows with the row count.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_file  # noqa: E402  (bench/data_file.py)

WORDS = ("sun rain snow wind cloud river stone tree bird fish road town ship lamp door key "
         "red blue green old new big small fast slow warm cold").split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """N short chat rows: a question numbered by its row (so rows differ) made of 2-5 words and an
    answer of 2-6 words, each drawn from pools of 4,096 phrases; ~2 % of rows an exact copy of a
    recent row and ~2 % a copy that differs only in case. Formatting from pools (not json.dumps
    and a random word at a time) writes ~10x faster, which a 30 M-row file needs."""
    r = random.Random(seed)

    def phrase(lo: int, hi: int) -> str:
        return " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))
    qs = [phrase(2, 5) for _ in range(4096)]
    ans = [phrase(2, 6) for _ in range(4096)]
    row = '{{"messages": [{{"role": "user", "content": "Q{} {}?"}}, {{"role": "assistant", "content": "{}."}}]}}'
    rnd, bits = r.random, r.getrandbits
    recent: list[str] = []
    with open(path, "w", encoding="utf-8") as fh:
        buf = []
        for i in range(rows):
            roll = rnd()
            if roll < 0.02 and recent:
                line = recent[bits(10) % len(recent)]                   # an exact copy
            elif roll < 0.04 and recent:
                line = recent[bits(10) % len(recent)].replace('"Q', '"q', 1)   # differs only in case
            else:
                line = row.format(i, qs[bits(12)], ans[bits(12)])
                if len(recent) < 1000:
                    recent.append(line)
                else:
                    recent[bits(10) % 1000] = line
            buf.append(line)
            if len(buf) >= 100_000:
                fh.write("\n".join(buf) + "\n")
                buf.clear()
        if buf:
            fh.write("\n".join(buf) + "\n")


CHILD = r"""
import json, os, resource, sys, threading, time
sys.path.insert(0, {root!r})
from engine.core import config
from engine.dataset import inspect as inspect_mod
cfg = config.load(None, ['model.name="builtin:tiny"'])
if {low_caps!r}:      # every capped structure full early: what still grows is per-row state no cap covers
    inspect_mod.MAX_GROUPS, inspect_mod.SPLIT_EXACT_MAX = 1000, 100_000
inspect_mod.tokenizer_for(cfg)
floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
samples = []          # (seconds, rows read, RSS in KiB) every 2 s: the growth per row

def rss_kib():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

if {path!r}:
    read = [0]
    stop = threading.Event()

    def sample():
        while not stop.wait(2.0):
            samples.append((round(time.perf_counter() - t0, 1), read[0], rss_kib()))

    def on_partial(rep):
        read[0] = rep.rows_read
    t0 = time.perf_counter()
    threading.Thread(target=sample, daemon=True).start()
    rep = inspect_mod.inspect(cfg, path={path!r}, on_partial=on_partial)
    stop.set()
    s = time.perf_counter() - t0
    tokens = int(rep.stats["mean"] * rep.rows_tokenized)
    print(json.dumps({{"rows": rep.rows, "raw": rep.raw_count, "seconds": s, "tokens": tokens,
                      "dup_groups": rep.duplicates_total, "near_groups": rep.near_duplicates_total,
                      "problems": len(rep.problems), "floor_kib": floor, "samples": samples,
                      "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
else:
    print(json.dumps({{"floor_kib": floor}}))
"""


def run_child(path: str, low_caps: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), path=path, low_caps=low_caps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    low_caps = "--low-caps" in sys.argv
    args, path = data_file.start(__doc__, 1_000_000, "short", [a for a in sys.argv[1:] if a != "--low-caps"])
    if not path.exists():
        t = time.perf_counter()
        generate(path, args.rows)
        print(f"generated {args.rows:,} rows in {time.perf_counter() - t:.1f} s "
              f"({path.stat().st_size / 1e6:.0f} MB)")
    got = run_child(str(path), low_caps)
    print(f"rows: {got['rows']:,} usable of {got['raw']:,}; {got['tokens']:,} tokens; "
          f"{got['dup_groups']:,} duplicate groups, {got['near_groups']:,} near-duplicate groups")
    print(f"peak RSS: {got['peak_kib'] / 2**20:.2f} GiB (after loading the tokenizer: "
          f"{got['floor_kib'] / 2**20:.2f} GiB); {got['seconds']:.1f} s, "
          f"{got['rows'] / got['seconds']:,.0f} rows/s, {got['tokens'] / got['seconds'] / 1e6:.2f} M tokens/s "
          f"on {os.cpu_count()} CPU(s)")
    pts = [p for p in got["samples"] if p[1]]
    if len(pts) >= 4:              # RSS against rows read, at each tenth of the way
        marks = [pts[min(len(pts) - 1, len(pts) * k // 10)] for k in range(1, 10)] + [pts[-1]]
        print("RSS while reading: " + ", ".join(f"{r:,} rows {kib / 2**20:.3f} GiB" for _, r, kib in marks))
        (_, r0, k0), (_, r1, k1) = marks[0], marks[-1]
        if r1 > r0:
            print(f"growth from {r0:,} to {r1:,} rows: {(k1 - k0) * 1024 / (r1 - r0):.1f} bytes a row")
    return data_file.finish("bench/inspect_memory.py" + (" --low-caps" if low_caps else ""), args, 1_000_000, path)


if __name__ == "__main__":
    raise SystemExit(main())
