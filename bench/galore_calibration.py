"""GaLore's memory estimate against measured peaks: `python -m engine train` with
train.method = "galore", and the same with "lora" (16-bit base) for reference, a few steps each.

    python bench/galore_calibration.py                 # the default grid on CUDA (< 4 min on an H200)
    python bench/galore_calibration.py --grid llama1b:1024:2 llama3b:2048:4 --methods galore
    python bench/galore_calibration.py --tiny          # tiny shape on the CPU: plumbing only

Each run is bench/vs_plain.py's engine variant (its own process, a random-weight Llama of a real
shape, pre-tokenised full-length rows, adamw_torch for LoRA; GaLore on its defaults: rank 128,
8-bit GaLore-AdamW on CUDA) with max_steps = STEPS; step 1 refreshes the projection (the SVD).
predicted = the planner's "predicted X GiB" for the configuration it chose, less the CUDA context
(so it compares with torch.cuda.max_memory_reserved(), the run's own step events); on the CPU
(no plan) the estimate of the run's config. Appends JSON lines to $OUT/galore_calibration.jsonl
and prints one RESULT line per run, then a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

STEPS = 3
GRID = ["llama1b:1024:2", "llama1b:2048:4", "llama3b:1024:4", "llama3b:2048:2"]
TINY_GRID = ["tiny:64:2"]
LLAMA3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0)


def shapes() -> dict:
    """bench/plain_trl_baseline.py's shapes (a verbatim copy of the shared baseline: not edited)
    plus Llama-3.2-3B's, which vs_plain's model_dir/data_file then build like the others."""
    from plain_trl_baseline import SHAPES
    SHAPES.setdefault("llama3b", LLAMA3B)
    return SHAPES


def own_estimate(run_config: dict, shape: str):
    """The estimate of the config the run started with (RunStarted.config), in bytes."""
    from engine.core import config
    from engine.planning.estimate import estimate
    train = dict(run_config.get("train") or {})
    if str(train.get("optimizer", "")).startswith("galore_"):    # the Trainer's name, resolved by the engine
        train["optimizer"] = "auto"                               # GaLore's state follows galore.optimizer
    cfg = config.from_dict(dict(run_config, train=train))
    return estimate(cfg, shapes()[shape])


def run_one(shape: str, seq: int, batch: int, method: str, runs: Path) -> dict:
    import vs_plain
    from engine.planning.estimate import CUDA_CONTEXT, GIB
    tag = f"{method}-{shape}-{seq}-{batch}"
    res = vs_plain.engine_variant(tag, shape, seq, batch, runs / tag,
                                  extra={"train": {"method": method, "max_steps": STEPS}})
    row = dict(method=method, shape=shape, seq=seq, batch=batch)
    if res.get("error"):
        return dict(row, status="failed", error=res["error"])
    started = _run_started(runs / tag)
    est = own_estimate(started.config if started else {}, shape)
    pred = res.get("predicted_device_gib")
    pred = round(pred - CUDA_CONTEXT / GIB, 2) if pred else round(est.peak_bytes / GIB, 4)
    meas = res.get("peak_reserved_gib") or None
    row.update(status="ok", steps_run=res.get("steps_run"), predicted_reserved_gib=pred, measured_reserved_gib=meas,
               error_pct=round(100 * (pred - meas) / meas, 1) if meas else None,
               breakdown_gib={k: round(v / GIB, 3) for k, v in est.breakdown.items() if v},
               losses=res.get("losses"), plan=res.get("plan"), wall_s=res.get("wall_s"))
    return row


def _run_started(out_dir: Path):
    """The run's ``RunStarted`` event (None: no run, or it never started)."""
    from engine.core import events
    runs = sorted(out_dir.glob("*-model-*"), key=lambda d: d.stat().st_mtime)
    evs = events.read_events(runs[-1] / "events.jsonl") if runs else []
    return next((ev for ev in evs if isinstance(ev, events.RunStarted)), None)


def table(rows: list[dict]) -> str:
    out = [f"{'method':<7} {'shape':<8} {'seq':>5} {'batch':>5} {'predicted':>10} {'measured':>9} {'error':>7}"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"{r['method']:<7} {r['shape']:<8} {r['seq']:>5} {r['batch']:>5}  {r['status']}")
            continue
        meas = f"{r['measured_reserved_gib']:.2f}G" if r["measured_reserved_gib"] else "n/a"
        err = f"{r['error_pct']:+.1f}%" if r["error_pct"] is not None else ""
        out.append(f"{r['method']:<7} {r['shape']:<8} {r['seq']:>5} {r['batch']:>5} "
                   f"{r['predicted_reserved_gib']:>9.3f}G {meas:>9} {err:>7}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", nargs="+", default=None, metavar="SHAPE:SEQ:BATCH",
                    help=f"configurations (default {' '.join(GRID)})")
    ap.add_argument("--methods", nargs="+", default=["galore", "lora"], choices=["galore", "lora", "qlora"])
    ap.add_argument("--tiny", action="store_true", help="tiny shape, seq 64, batch 2, on the CPU (plumbing)")
    a = ap.parse_args()
    grid = a.grid or (TINY_GRID if a.tiny else GRID)
    shapes()
    out = Path(os.environ.get("OUT", "/tmp/bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    runs = Path("/tmp/bench-galore-runs")            # not under $OUT: few files come back
    rows, t0 = [], time.time()
    for spec in grid:
        shape, seq, batch = spec.split(":")
        for method in a.methods:
            row = run_one(shape, int(seq), int(batch), method, runs)
            rows.append(row)
            print("RESULT " + json.dumps(row), flush=True)
            with open(out / "galore_calibration.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
    print(table(rows))
    print(f"total {time.time() - t0:.0f} s")
    return 0 if all(r["status"] == "ok" and r.get("steps_run") == STEPS for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
