"""Side by side on one GPU: plain TRL (the seed's recipe) vs qlora-tui's engine, same model
shape, same data, same seed, one device call.

    python bench/vs_plain.py llama8b 2048 8 plain engine_auto engine_24g engine_min plain_chat engine_chat
    python bench/vs_plain.py llama8b 2048 8 plain engine_10g engine_16g engine_24g engine_auto
    python bench/vs_plain.py llama8b 2048 8 plain_chat engine_chat_10g engine_chat_16g engine_chat_24g engine_chat
    python bench/vs_plain.py llama8b 2048 8 plain_chat engine_chat_24g engine_chat_sdpa_24g
    VS_PLAIN_STEPS=60 python bench/vs_plain.py real:.h13/realmodel 256 8 plain engine_auto plain_chat engine_chat

SHAPE: a name of plain_trl_baseline.SHAPES (random weights: speed and memory only), or
real:DIR, a real pretrained model dir made by bench/make_real_model.py (loss curves that mean
something): rows are DIR/data/sft.jsonl's real text in DIR's tokenizer (full rows: the text as
one stream cut into SEQ-token rows; chat rows: one row per conversation), and the plain side
runs the baseline's recipe unchanged on DIR's weights and those rows (PLAIN_WRAPPER's REAL_PRELUDE).
VS_PLAIN_STEPS / VS_PLAIN_WARM: measured and warm-up steps (default 12 and 4).

Variants (each in its own process, for a clean peak-memory figure):
  plain, plain_chat       bench/plain_trl_baseline.py (a verbatim copy of shared/bench's), SHAPE SEQ BATCH
  engine_auto             `python -m engine train CFG --headless`, every knob on auto (the fit planner)
  engine_24g, engine_min  the same, told it has 24 GiB / 10 GiB (train.gpu_memory_gib)
  engine_NNg              the same, told it has NN GiB (any budget: engine_10g, engine_16g, ...)
  engine_chat             variable-length rows (the baseline's chat lengths), auto (packing)
  engine_chat_NNg         chat rows within an NN GiB budget
  engine_nofused_NNg      an NN GiB budget with train.fused_lora = false (A/B of the fused LoRA linear)
  engine_nofp8[_NNg]      train.fp8_base = false (A/B of the FP8 base GEMMs, engine/training/fp8.py)
  engine_fused, engine_fp8  train.fused_lora = true (and train.fp8_base = true): the GPU's numerics
                          where auto turns them off (the CPU runs torch's _scaled_mm with e4m3 operands)
  engine_chat_sdpa[_NNg]  chat rows with model.attn_implementation = sdpa: packed rows kept apart by a
                          block-diagonal mask (the engine before varlen attention; auto now picks
                          varlen for packed rows on the GPU: A/B of engine/training/attention.py)
Each line also holds the per-step losses (plain: from the Trainer's log) and the coefficient of
variation of the measured steps' times (step_cv).
The engine is fed the baseline's exact token ids (pre-tokenised rows) and its optimizer
(adamw_torch) so only the engine's choices differ. Tokens/s counts real (non-pad) tokens
over the measured steps; MFU uses 4*N FLOPs per token (frozen-base LoRA) + attention.
Appends one JSON line per variant to $OUT/vs_plain.jsonl and prints RESULT lines.
"""
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
STEPS, WARM = int(os.environ.get("VS_PLAIN_STEPS", 12)), int(os.environ.get("VS_PLAIN_WARM", 4))
REAL = "real:"
PEAK_TFLOPS = 790e12      # H200 dense bf16 matmul, measured (shared/reference/landscape.md)


def nvml_peak(stop, box):
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        while not stop.is_set():
            box[0] = max(box[0], pynvml.nvmlDeviceGetMemoryInfo(h).used)
            time.sleep(0.1)
    except Exception as e:  # no NVML: report None
        box[1] = str(e)


def run_child(argv, env=None):
    stop, box = threading.Event(), [0, None]
    t = threading.Thread(target=nvml_peak, args=(stop, box), daemon=True)
    t.start()
    t0 = time.time()
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    stop.set()
    t.join()
    return r, box[0] or None, time.time() - t0


def data_file(shape, seq, batch, chat):
    """The baseline's exact rows (same generator, same seeds), as pre-tokenised JSONL."""
    import torch
    from plain_trl_baseline import SHAPES
    tag = re.sub(r"\W", "_", shape) + f"-{STEPS}-{WARM}"     # the row count depends on the steps
    path = Path(f"/tmp/bench-data-{tag}-{seq}-{batch}-{'chat' if chat else 'full'}.jsonl")
    if path.exists():
        return path
    if shape.startswith(REAL):
        return real_rows(model_dir(shape), seq, batch * (STEPS + WARM + 2), chat, path)
    g = torch.Generator().manual_seed(1)
    V = SHAPES[shape]["vocab_size"]
    n = batch * (STEPS + WARM + 2)
    if chat:
        torch.manual_seed(1)
        lens = torch.distributions.LogNormal(5.8, 0.8).sample((n,)).clamp(32, seq).long().tolist()
        ids = [torch.randint(4, V, (k,), generator=g).tolist() for k in lens]
    else:
        ids = torch.randint(4, V, (n, seq), generator=g).tolist()
    with open(path, "w") as fh:
        for row in ids:
            fh.write(json.dumps({"input_ids": row}) + "\n")
    return path


def real_rows(mdir, seq, n, chat, path):
    """``n`` rows of real text in the model's own tokenizer, pre-tokenised JSONL at ``path``:
    full rows cut from the conversations as one stream, chat rows one per conversation (clipped
    to ``seq``). The text is cycled when it is shorter than ``n`` rows (say so: later epochs)."""
    from transformers import AutoTokenizer
    limit = json.loads(Path(mdir, "config.json").read_text()).get("max_position_embeddings", seq)
    if seq > limit:
        raise SystemExit(f"{mdir}: SEQ {seq} is over the model's {limit} positions: give SEQ <= {limit}")
    tok = AutoTokenizer.from_pretrained(mdir)
    convs = [json.loads(l)["messages"] for l in open(Path(mdir, "data", "sft.jsonl"), encoding="utf-8")]
    seqs = [tok(tok.apply_chat_template(m, tokenize=False))["input_ids"] for m in convs]
    if chat:
        rows = [s[:seq] for s in seqs]
    else:
        stream = [t for s in seqs for t in s]
        rows = [stream[i:i + seq] for i in range(0, len(stream) - seq + 1, seq)]
    if len(rows) < n:
        print(f"note: {mdir}: {len(rows)} distinct rows for {n}: the text repeats (epochs > 1)", flush=True)
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"input_ids": rows[i % len(rows)]}) + "\n")
    return path


def shape_dims(shape):
    """hidden/intermediate/layers/heads/vocab of a SHAPES name or a real:DIR's config.json."""
    if shape.startswith(REAL):
        return json.loads(Path(model_dir(shape), "config.json").read_text())
    from plain_trl_baseline import SHAPES
    return SHAPES[shape]


def model_dir(shape):
    if shape.startswith(REAL):
        path = Path(shape[len(REAL):]).expanduser().resolve()
        if not (path / "config.json").is_file() or not (path / "data" / "sft.jsonl").is_file():
            raise SystemExit(f"{shape}: no config.json and data/sft.jsonl there: make it with "
                             "python bench/make_real_model.py SRC DIR")
        return str(path)
    from plain_trl_baseline import make_model, tokenizer
    path = f"/tmp/model-{shape}"
    make_model(shape, path)
    if not Path(path, "tokenizer.json").exists():
        tok = tokenizer()
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        tok.save_pretrained(path)
    return path


def flops_per_token(shape, seq):
    s = shape_dims(shape)
    h, i, L = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    n_linear = L * (h * h * 2 + h * kv * 2 + 3 * h * i) + h * s["vocab_size"]
    attn = L * 2 * 2 * seq * h      # QK^T and AV, causal half, forward+backward (x3) ~ 4*L*s*h
    return 4 * n_linear + attn


def engine_variant(variant, shape, seq, batch, out_dir, extra=None):
    import tomli_w
    chat = "chat" in variant
    cfg = {
        "model": {"name": model_dir(shape)},
        "data": {"train": str(data_file(shape, seq, batch, chat)), "max_length": seq, "eval_fraction": 0.0},
        "lora": {"r": 32, "alpha": 64},
        "train": {"max_steps": STEPS + WARM, "batch_size": batch, "grad_accum": 1, "learning_rate": 2e-4,
                  "warmup_ratio": 0.0, "optimizer": "adamw_torch", "logging_steps": 1, "eval_steps": 0,
                  "save_steps": 0},
        "output": {"dir": str(out_dir), "keep_checkpoints": False},
    }
    if shape.startswith(REAL):            # the run dir's name must match the *-model-* glob below
        cfg["output"]["name"] = "model-real"
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    budget = re.search(r"_(\d+)g$", variant)
    if budget:
        cfg["train"]["gpu_memory_gib"] = float(budget.group(1))
    if variant == "engine_min":
        cfg["train"]["gpu_memory_gib"] = 10.0
    if "_sdpa" in variant:            # A/B: packed rows under sdpa's mask instead of the varlen kernel
        cfg["model"]["attn_implementation"] = "sdpa"
    if "nofused" in variant:          # A/B: PEFT's own LoRA forward instead of engine/training/fused_lora.py
        cfg["train"]["fused_lora"] = False
    if "nofp8" in variant:            # A/B: the fused linear's base GEMMs in bf16
        cfg["train"]["fp8_base"] = False
    if variant.startswith(("engine_fused", "engine_fp8")):     # forced on (e.g. on the CPU)
        cfg["train"]["fused_lora"] = True
        cfg["train"]["fp8_base"] = variant.startswith("engine_fp8")
    p = Path(out_dir) / f"{variant}.toml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(tomli_w.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r, nvml, wall = run_child([sys.executable, "-m", "engine", "train", str(p), "--headless"], env)
    runs = sorted(Path(out_dir).glob("*-model-*"), key=lambda d: d.stat().st_mtime)
    if r.returncode != 0 or not runs:
        text = (r.stderr or "") + (r.stdout or "")
        log = Path(os.environ.get("OUT", out_dir)) / f"{variant}.log"     # the whole output, every rank's
        log.write_text(text[-4_000_000:])
        errs = [l for l in text.splitlines() if "Error" in l or "error" in l or "failed" in l]
        return dict(variant=variant, error=errs[:12] or text[-1500:])
    sys.path.insert(0, str(ROOT))
    from engine.core import events
    from engine.core.summary import standing
    evs = standing(events.read_events(runs[-1] / "events.jsonl"))
    steps = [e for e in evs if isinstance(e, events.Step)]
    started = next(e for e in evs if isinstance(e, events.RunStarted))
    meas = [e for e in steps if e.step > WARM]
    prev = {e.step: e for e in steps}
    dt = sum(e.time - prev[e.step - 1].time for e in meas if e.step - 1 in prev)
    dtok = sum(e.tokens_seen - prev[e.step - 1].tokens_seen for e in meas if e.step - 1 in prev)
    tps = dtok / dt if dt else None
    dts = [e.time - prev[e.step - 1].time for e in meas if e.step - 1 in prev]
    pred = re.search(r"predicted ([\d.]+) GiB", " ".join(started.plan or []))
    # the fast paths' checks (engine/training/probes.py) and the FP8 guard, against 100 steps
    checked = [p for p in started.plan or [] if p.startswith("checked on") or " off: its check" in p]
    probe_s = sum(float(m) for m in re.findall(r"\(([\d.]+) s; relative error", " ".join(checked)))
    guard = next((e for e in standing(evs) if isinstance(e, events.NumericsCheck)), None)
    step_s = statistics.mean(dts) if dts else None
    checks = dict(lines=checked, probe_s=probe_s, guard_s=guard.seconds if guard else 0.0,
                  fp8_relative_difference=guard.relative_difference if guard else None,
                  fp8_kept=guard.kept if guard else None,
                  share_of_100_steps=round((probe_s + (guard.seconds if guard else 0.0)) / (100 * step_s), 5)
                  if step_s else None)
    return dict(checks=checks, variant=variant, shape=shape, seq=seq, batch=batch, tokens_per_s=round(tps) if tps else None,
                step_cv=_cv(dts), predicted_device_gib=float(pred.group(1)) if pred else None,
                peak_reserved_gib=round(max(e.peak_memory_bytes or 0 for e in steps) / 2**30, 2),
                nvml_peak_gib=round(nvml / 2**30, 2) if nvml else None,
                losses=[e.loss for e in steps], plan=started.plan, wall_s=round(wall, 1),
                steps_run=len(steps))


def _cv(xs):
    return round(statistics.pstdev(xs) / statistics.mean(xs), 4) if len(xs) > 1 else None


# the baseline, unchanged, with its per-step losses and step times printed after training
PLAIN_WRAPPER = """
import json, sys
sys.path.insert(0, {here!r})
import plain_trl_baseline as p
times, train = [], p.SFTTrainer.train
end = p.Timer.on_step_end
def on_step_end(self, *a, **k):
    n = len(self.t)
    end(self, *a, **k)
    if len(self.t) > n:
        times.append(self.t[-1])
def tr(self, *a, **k):
    out = train(self, *a, **k)
    print("LOSSES " + json.dumps([h["loss"] for h in self.state.log_history if "loss" in h]), flush=True)
    print("TIMES " + json.dumps(times), flush=True)
    return out
p.Timer.on_step_end, p.SFTTrainer.train = on_step_end, tr
{prelude}
p.run({shape!r}, {seq}, {batch}, {variant!r}, steps={steps}, warm={warm})
"""

# real:DIR: the baseline's recipe untouched, only its inputs swapped: no random model is built,
# from_pretrained (same kwargs: NF4, double quant, bf16, sdpa) reads DIR, and its random rows
# are replaced by the same real rows the engine gets (same count)
REAL_PRELUDE = """
from datasets import Dataset
_auto = p.AutoModelForCausalLM
class _Auto:
    @staticmethod
    def from_pretrained(path, **kw):
        return _auto.from_pretrained({mdir!r}, **kw)
class _Rows:
    @staticmethod
    def from_dict(d):
        rows = [json.loads(l)["input_ids"] for l in open({data!r})][:len(d["input_ids"])]
        return Dataset.from_dict({{"input_ids": rows}})
p.SHAPES[{shape!r}] = dict(vocab_size={vocab})
p.make_model = lambda shape, path: None
p.AutoModelForCausalLM = _Auto
p.Dataset = _Rows
"""


def plain_variant(variant, shape, seq, batch):
    v = "chat" if "chat" in variant else "plain"
    prelude = ""
    if shape.startswith(REAL):
        prelude = REAL_PRELUDE.format(mdir=model_dir(shape), data=str(data_file(shape, seq, batch, v == "chat")),
                                      shape=shape, vocab=shape_dims(shape)["vocab_size"])
    code = PLAIN_WRAPPER.format(here=str(HERE), shape=shape, seq=seq, batch=batch, variant=v,
                                prelude=prelude, steps=STEPS, warm=WARM)
    r, nvml, wall = run_child([sys.executable, "-c", code])
    lines = {l.split(" ", 1)[0]: l.split(" ", 1)[1] for l in r.stdout.splitlines()
             if l.startswith(("RESULT ", "LOSSES ", "TIMES "))}
    if "RESULT" not in lines:
        return dict(variant=variant, error=(r.stderr or r.stdout)[-1500:])
    res = json.loads(lines["RESULT"])
    res.update(variant=variant, nvml_peak_gib=round(nvml / 2**30, 2) if nvml else None, wall_s=round(wall, 1),
               losses=json.loads(lines.get("LOSSES", "null")), step_cv=_cv(json.loads(lines.get("TIMES", "[]"))))
    return res


def main():
    shape, seq, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    out = Path(os.environ.get("OUT", "/tmp/bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir(shape)
    results = []
    for v in sys.argv[4:]:
        t0 = time.time()
        res = plain_variant(v, shape, seq, batch) if v.startswith("plain") else \
            engine_variant(v, shape, seq, batch, Path("/tmp/bench-runs"))   # not under $OUT: few files come back
        if res.get("tokens_per_s"):
            res["mfu"] = round(res["tokens_per_s"] * flops_per_token(shape, seq) / PEAK_TFLOPS, 3)
        res["bench_s"] = round(time.time() - t0, 1)
        results.append(res)
        print("RESULT " + json.dumps(res), flush=True)
        with open(out / "vs_plain.jsonl", "a") as fh:
            fh.write(json.dumps(res) + "\n")
    base = {r["variant"]: r for r in results}
    for r in results:
        ref = base.get("plain_chat" if "chat" in r["variant"] else "plain")
        if ref and r.get("tokens_per_s") and ref.get("tokens_per_s"):
            print(f"RATIO {r['variant']}: {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x plain", flush=True)


if __name__ == "__main__":
    main()
