"""70B QLoRA on one GPU (issue 14): plain TRL vs the engine at the whole GPU, 48 GiB and 24 GiB.

    python bench/seventy_b.py                                  # all four, Llama-3.1-70B shape
    python bench/seventy_b.py --variants plain,engine          # a subset (one device call each)
    python bench/seventy_b.py --tiny                           # the same on the CPU, a toy shape

Builds the model once in NF4 (bench/make_70b.py; under $MODEL_DIR or /tmp/model-llama70b-nf4),
writes pre-tokenised full-length rows (seq 2048, effective batch 8), and runs each variant in
its own process: ``plain`` = the seed's recipe through SFTTrainer (bench/plain_trl_baseline.py's
settings: r=32, alpha 64, all-linear, gradient checkpointing, adamw_torch, micro-batch 8);
``engine`` = `python -m engine train` with every knob on auto; ``engine_48`` / ``engine_24`` =
the same with train.gpu_memory_gib = 48 / 24. Per variant: tokens/s (median measured step),
peak reserved (torch.cuda.max_memory_reserved), the process tree's peak RSS (host RAM; pinned
memory counts), the estimate's predictions for both, and the per-step losses. Prints one
RESULT json line per variant as it finishes (and appends to $OUT/seventy_b.jsonl), then
RATIO / LOSS lines. A variant past its time limit is reported with how far it got.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
GIB = 2 ** 30
BUDGETS = {"engine": None, "engine_48": 48.0, "engine_24": 24.0}
TINY_BUDGETS = {"engine": None, "engine_48": 1.0, "engine_24": 0.00005}   # 52 KB < tiny's 76 KB base


def rss_tree(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            pass
    return total


def run_child(argv, env, timeout, log: Path | None = None):
    """(returncode or None on timeout, stdout+stderr, peak RSS bytes, wall seconds); the child's
    whole output is also written to ``log`` (the bench's $OUT) for a post-mortem."""
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak, out = [0], []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None and time.time() - t0 < timeout:
        peak[0] = max(peak[0], rss_tree(proc.pid))
        time.sleep(0.5)
    rc = proc.poll()
    if rc is None:
        proc.kill()
        proc.wait()
    reader.join(timeout=5)
    if log is not None:
        log.write_text("".join(out))
    return rc, "".join(out), peak[0], time.time() - t0


def data_file(vocab: int, seq: int, rows: int) -> Path:
    import random
    path = Path(f"/tmp/seventy-b-data-{vocab}-{seq}-{rows}.jsonl")
    if not path.exists():
        rng = random.Random(1)
        with open(path, "w") as fh:
            for _ in range(rows):
                fh.write(json.dumps({"input_ids": [rng.randrange(4, vocab) for _ in range(seq)]}) + "\n")
    return path


# ------------------------------------------------------------------ plain TRL (child process)

def plain_child(model_dir: str, data: str, seq: int, batch: int, steps: int, warm: int) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    from plain_trl_baseline import Timer, tokenizer
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 device_map={"": 0} if cuda else {"": "cpu"})
    load_s = time.perf_counter() - t0
    ids = [json.loads(line)["input_ids"] for line in open(data)]
    args = SFTConfig(output_dir="/tmp/seventy-b-plain", per_device_train_batch_size=batch,
                     gradient_accumulation_steps=1, max_steps=steps, learning_rate=2e-4, logging_steps=1,
                     report_to=[], max_length=seq, bf16=cuda, use_cpu=not cuda, save_strategy="no",
                     dataset_num_proc=None, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False}, optim="adamw_torch",
                     dataloader_num_workers=0, padding_free=False, include_num_input_tokens_seen="non_padding",
                     warmup_steps=0, seed=42, data_seed=42)
    timer = Timer(warm)
    timer.real = []
    tr = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids}),
                    processing_class=tokenizer(), callbacks=[timer],
                    peft_config=LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules="all-linear",
                                           task_type="CAUSAL_LM"))
    tr.train()
    step = statistics.median(timer.t) if timer.t else None
    print("RESULT " + json.dumps(dict(
        tokens_per_s=round(batch * seq / step, 1) if step else None, step_s=step, load_s=round(load_s, 1),
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2) if cuda else None,
        losses=[h["loss"] for h in tr.state.log_history if "loss" in h])), flush=True)


def plain_variant(a, model_dir, data) -> dict:
    argv = [sys.executable, __file__, "--child-plain", str(model_dir), str(data), str(a.seq), str(a.batch),
            str(a.steps), str(a.warm)]
    rc, text, rss, wall = run_child(argv, dict(os.environ), a.timeout, a.out / "plain.log")
    line = next((l for l in text.splitlines() if l.startswith("RESULT ")), None)
    res = dict(variant="plain", host_rss_gib=round(rss / GIB, 2), wall_s=round(wall, 1))
    if line is None:
        res["error"] = "timed out" if rc is None else [l for l in text.splitlines() if "Error" in l][-6:] or text[-1500:]
        return res
    res.update(json.loads(line[7:]))
    return res


# ------------------------------------------------------------------ the engine

def engine_config(a, variant, model_dir, data, out_dir) -> Path:
    import tomli_w
    budget = (TINY_BUDGETS if a.tiny else BUDGETS)[variant]
    cfg = {"model": {"name": str(model_dir)},
           "data": {"train": str(data), "max_length": a.seq, "eval_fraction": 0.0},
           "lora": {"r": 32, "alpha": 64},
           "train": {"max_steps": a.steps, "batch_size": a.batch, "grad_accum": 1, "learning_rate": 2e-4,
                     "warmup_ratio": 0.0, "optimizer": "adamw_torch", "logging_steps": 1, "eval_steps": 0,
                     "save_steps": 0, "gpu_memory_gib": budget or 0.0},
           "output": {"dir": str(out_dir / variant), "keep_checkpoints": False}}
    if a.tiny:
        cfg["train"]["device"] = "cpu"
    p = out_dir / f"{variant}.toml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(tomli_w.dumps(cfg))
    return p


def predicted(cfg_path: Path, budget_gib) -> dict:
    """The planner's choice and the estimate's GPU peak and host RAM for this config."""
    from engine.core import config
    from engine.planning import estimate as estimate_mod
    cfg = config.load(cfg_path)
    mc = estimate_mod.model_config_for(cfg)
    gpu = int(budget_gib * GIB) if budget_gib else (estimate_mod.gpu_free_bytes() or None)
    pl = estimate_mod.plan(cfg, mc, gpu)
    est = pl.estimate
    if gpu is None or cfg.train.device == "cpu":   # no planning; the engine streams below the budget
        est = estimate_mod.estimate(cfg, mc, streaming=bool(budget_gib) and estimate_mod.estimate(cfg, mc).breakdown[
            "weights_quantized"] > budget_gib * GIB)
    return dict(pred_peak_reserved_gib=round(est.peak_bytes / GIB, 2), pred_host_gib=round(est.host_bytes / GIB, 2),
                pred_streaming=est.streaming, pred_tokens_per_s_floor=pl.expected_tokens_per_s)


def engine_variant(a, variant, model_dir, data, out_dir) -> dict:
    cfg_path = engine_config(a, variant, model_dir, data, out_dir)
    res = dict(variant=variant, **predicted(cfg_path, (TINY_BUDGETS if a.tiny else BUDGETS)[variant]))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rc, text, rss, wall = run_child([sys.executable, "-m", "engine", "train", str(cfg_path), "--headless"],
                                    env, a.timeout, a.out / f"{variant}.log")
    res.update(host_rss_gib=round(rss / GIB, 2), wall_s=round(wall, 1))
    runs = sorted((out_dir / variant).glob("*/events.jsonl"), key=lambda p: p.stat().st_mtime)
    from engine.core import events
    from engine.core.summary import standing
    evs = standing(events.read_events(runs[-1])) if runs else []
    if runs:
        (a.out / f"{variant}-events.jsonl").write_text(runs[-1].read_text())
    steps = [e for e in evs if isinstance(e, events.Step)]
    started = next((e for e in evs if isinstance(e, events.RunStarted)), None)
    res.update(steps_run=len(steps), plan=started.plan if started else None, losses=[e.loss for e in steps])
    if rc != 0:
        res["error"] = "timed out" if rc is None else ([l for l in text.splitlines() if "rror" in l][-6:]
                                                        or text[-1500:])
    times = {e.step: e.time for e in steps}
    dts = [times[s] - times[s - 1] for s in times if s > a.warm and s - 1 in times]
    if dts:
        res["step_s"] = statistics.median(dts)
        res["tokens_per_s"] = round(a.batch * a.seq / res["step_s"], 1)
    peaks = [e.peak_memory_bytes or 0 for e in steps]
    res["peak_reserved_gib"] = round(max(peaks) / GIB, 2) if any(peaks) else None
    return res


# ------------------------------------------------------------------ main

def summarise(results: list[dict]) -> list[str]:
    by = {r["variant"]: r for r in results}
    lines = []
    plain = by.get("plain", {}).get("tokens_per_s")
    for r in results:
        if plain and r.get("tokens_per_s") and r["variant"] != "plain":
            lines.append(f"RATIO {r['variant']}: {r['tokens_per_s'] / plain:.2f}x plain TRL")
        if r.get("peak_reserved_gib") and r.get("pred_peak_reserved_gib"):
            lines.append(f"PEAK {r['variant']}: estimate {r['pred_peak_reserved_gib']} GiB vs measured "
                         f"{r['peak_reserved_gib']} GiB ({r['pred_peak_reserved_gib'] / r['peak_reserved_gib'] - 1:+.1%})")
        if r.get("host_rss_gib") and r.get("pred_host_gib"):
            lines.append(f"HOST {r['variant']}: estimate {r['pred_host_gib']} GiB vs measured peak RSS "
                         f"{r['host_rss_gib']} GiB ({r['pred_host_gib'] / r['host_rss_gib'] - 1:+.1%})")
    a, b = by.get("engine_24", {}).get("losses"), by.get("engine_48", {}).get("losses")
    if a and b:
        n = min(len(a), len(b))
        diff = max(abs(x - y) / max(abs(y), 1e-9) for x, y in zip(a[:n], b[:n]))
        lines.append(f"LOSS engine_24 vs engine_48: {n} steps, max relative difference {diff:.2e}")
    whole = by.get("engine", {}).get("tokens_per_s")
    if whole and by.get("engine_24", {}).get("tokens_per_s"):
        lines.append(f"RATIO engine_24 / engine (whole GPU): {by['engine_24']['tokens_per_s'] / whole:.2f}")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-plain":
        d, data, seq, batch, steps, warm = argv[1:7]
        plain_child(d, data, int(seq), int(batch), int(steps), int(warm))
        return 0
    p = argparse.ArgumentParser(description="70B QLoRA on one GPU: plain TRL vs the engine at budgets")
    p.add_argument("--tiny", action="store_true", help="toy shape on the CPU (the tests run this)")
    p.add_argument("--variants", default="plain,engine,engine_48,engine_24")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default 3; tiny 3)")
    p.add_argument("--warm", type=int, default=1, help="steps left out of the tokens/s figure")
    p.add_argument("--timeout", type=float, default=420, help="seconds per variant")
    a = p.parse_args(argv)
    a.seq = 64 if a.tiny else 2048
    a.batch = 8
    a.steps = a.steps or 3
    import make_70b
    out = a.out = Path(os.environ.get("OUT", "/tmp/seventy-b-out"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(os.environ.get("MODEL_DIR", "/tmp/model-tiny-nf4" if a.tiny else "/tmp/model-llama70b-nf4"))
    t0 = time.time()
    make_70b.build(model_dir, "tiny" if a.tiny else "llama70b", "cpu" if a.tiny else None)
    print(f"MODEL {model_dir} ready in {time.time() - t0:.0f} s", flush=True)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    data = data_file(vocab, a.seq, a.batch * (a.steps + 1))
    runs = Path(os.environ.get("RUNS_DIR", "/tmp/seventy-b-runs"))   # adapters stay off $OUT (1.6 GB for 70B)
    results = []
    for v in [x.strip() for x in a.variants.split(",") if x.strip()]:
        res = plain_variant(a, model_dir, data) if v == "plain" else engine_variant(a, v, model_dir, data, runs)
        results.append(res)
        print("RESULT " + json.dumps(res), flush=True)
        with open(out / "seventy_b.jsonl", "a") as fh:
            fh.write(json.dumps(res) + "\n")
    for line in summarise(results):
        print(line, flush=True)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
