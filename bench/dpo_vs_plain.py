"""DPO side by side on one GPU: plain TRL (DPOTrainer + PEFT + bitsandbytes NF4) vs qlora-tui's
engine (train.method = dpo), same model shape, same pairs, same seed, one device call.

    python bench/dpo_vs_plain.py                         # llama8b 2048 8 plain engine_auto engine_24g
    python bench/dpo_vs_plain.py llama8b 2048 8 plain_mb2 plain engine_auto engine_24g
    python bench/dpo_vs_plain.py tiny 64 2 plain engine_auto          # the CPU path (tests/unit/test_bench_dpo_inputs.py)

SHAPE: a name of bench/plain_trl_baseline.SHAPES (random weights, built like bench/vs_plain.py:
speed and memory only). SEQ: tokens per side (prompt SEQ/2 + answer SEQ/2, EOS included; chosen
and rejected each SEQ). PAIRS: the effective batch in pairs. DPO_STEPS / DPO_WARM: measured and
warm-up steps (default 6 and 2).

Variants (each in its own process, for a clean peak-memory figure):
  plain        TRL's DPOTrainer as its docs run QLoRA DPO: NF4 + double quant, bf16, sdpa, LoRA r 32 /
               alpha 64 on all linear layers, gradient checkpointing, adamw_torch; micro-batch = PAIRS
  plain_mbN    the same with micro-batch N x accumulation PAIRS/N (e.g. plain_mb2)
  engine_auto  `python -m engine train CFG --headless` with train.method = "dpo", every knob on auto
  engine_NNg   the same told it has NN GiB (train.gpu_memory_gib; engine_24g = the issue's budget)

The rows are text in a word-level vocabulary ("t17 t4093 ...", one token per word): both sides
tokenise the same strings to exactly the same ids. Tokens/s = PAIRS x 2 x SEQ per step over the
median measured step time (every row is exactly SEQ tokens a side: no padding). Peak memory:
torch's max reserved (the engine's from its step events) and NVML's whole-process peak; the
engine's estimate is its plan's "predicted X GiB" line. One JSON line per variant goes to
$OUT/dpo_vs_plain.jsonl; RESULT / RATIO / ESTIMATE lines are printed.
"""
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
STEPS, WARM = int(os.environ.get("DPO_STEPS", 6)), int(os.environ.get("DPO_WARM", 2))
DEFAULT = ["llama8b", "2048", "8", "plain", "engine_auto", "engine_24g"]


def model_dir(shape: str) -> str:
    """bench/vs_plain.py's random-weight model of SHAPE, with a word-level tokenizer whose words
    are its token ids ("t17" = id 17) and a pass-through chat template."""
    from plain_trl_baseline import SHAPES, make_model
    path = f"/tmp/model-dpo-{shape}"
    make_model(shape, path)
    if not Path(path, "tokenizer.json").exists():
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        V = SHAPES[shape]["vocab_size"]
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, V)}}
        t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<s>",
                                      eos_token="</s>", unk_token="<unk>")
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        tok.save_pretrained(path)
    return path


def data_file(shape: str, seq: int, pairs: int) -> Path:
    """Random pairs: prompt SEQ/2 words, chosen and rejected SEQ/2 - 1 words each (+ EOS = SEQ a side)."""
    import random
    from plain_trl_baseline import SHAPES
    path = Path(f"/tmp/bench-dpo-{shape}-{seq}-{pairs}-{STEPS}-{WARM}.jsonl")
    if path.exists():
        return path
    V = SHAPES[shape]["vocab_size"]
    rng = random.Random(1)
    n = pairs * (STEPS + WARM + 2)
    p, a = seq // 2, seq - seq // 2 - 1

    def words(k):
        return " ".join(f"t{rng.randrange(4, V)}" for _ in range(k))
    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"prompt": words(p), "chosen": " " + words(a), "rejected": " " + words(a)}) + "\n")
    return path


def on_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- plain TRL
PLAIN = r'''
import json, os, statistics, sys, time
import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from trl import DPOConfig, DPOTrainer
path, data, seq, micro, accum, steps = {path!r}, {data!r}, {seq}, {micro}, {accum}, {steps}
gpu = torch.cuda.is_available()
dt = torch.bfloat16 if gpu else torch.float32
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation="sdpa",
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dt))
ds = load_dataset("json", data_files=data, split="train")
times = []
class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if gpu: torch.cuda.synchronize()
        self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        if gpu: torch.cuda.synchronize()
        times.append(time.perf_counter() - self.t0)
args = DPOConfig(output_dir="/tmp/dpo-plain-out", per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
    max_steps=steps, learning_rate=5e-6, logging_steps=1, report_to=[], max_length=seq, bf16=gpu, use_cpu=not gpu,
    save_strategy="no", gradient_checkpointing=True, gradient_checkpointing_kwargs={{"use_reentrant": False}},
    optim="adamw_torch", dataloader_num_workers=0, disable_tqdm=True, beta=0.1, seed=42)
lora = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
tr = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora, callbacks=[Timer()])
tr.train()
losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
print("PLAIN " + json.dumps(dict(times=times, losses=losses,
    peak_reserved=torch.cuda.max_memory_reserved() if gpu else None)), flush=True)
'''


def plain_variant(variant, shape, seq, pairs):
    from vs_plain import run_child
    m = re.search(r"_mb(\d+)$", variant)
    micro = int(m.group(1)) if m else pairs
    if pairs % micro:
        return dict(variant=variant, error=f"micro-batch {micro} does not divide {pairs} pairs")
    code = PLAIN.format(path=model_dir(shape), data=str(data_file(shape, seq, pairs)), seq=seq, micro=micro,
                        accum=pairs // micro, steps=STEPS + WARM)
    r, nvml, wall = run_child([sys.executable, "-c", code], dict(os.environ))
    line = next((x for x in r.stdout.splitlines() if x.startswith("PLAIN ")), None)
    if r.returncode != 0 or line is None:
        text = (r.stderr or "") + (r.stdout or "")
        errs = [x for x in text.splitlines() if "Error" in x or "error" in x]
        return dict(variant=variant, error=errs[-6:] or text[-1500:])
    d = json.loads(line[len("PLAIN "):])
    step = statistics.median(d["times"][WARM:] or d["times"])
    return dict(variant=variant, shape=shape, seq=seq, pairs=pairs, micro_batch=micro, step_s=round(step, 4),
                tokens_per_s=round(pairs * 2 * seq / step),
                peak_reserved_gib=round(d["peak_reserved"] / 2**30, 2) if d["peak_reserved"] else None,
                nvml_peak_gib=round(nvml / 2**30, 2) if nvml else None, losses=d["losses"], wall_s=round(wall, 1))


# ----------------------------------------------------------------------------- the engine
def engine_variant(variant, shape, seq, pairs, out_dir: Path):
    import tomli_w
    from vs_plain import run_child
    cfg = {
        "model": {"name": model_dir(shape)},
        "data": {"train": str(data_file(shape, seq, pairs)), "max_length": seq, "eval_fraction": 0.0},
        "lora": {"r": 32, "alpha": 64},
        "preference": {"beta": 0.1},
        "train": {"method": "dpo", "max_steps": STEPS + WARM, "batch_size": pairs, "grad_accum": 1,
                  "learning_rate": 5e-6, "warmup_ratio": 0.0, "optimizer": "adamw_torch", "logging_steps": 1,
                  "eval_steps": 0, "save_steps": 0},
        "output": {"dir": str(out_dir), "name": f"dpo-{variant}", "keep_checkpoints": False},
    }
    budget = re.search(r"_(\d+)g$", variant)
    if budget:
        cfg["train"]["gpu_memory_gib"] = float(budget.group(1))
    p = out_dir / f"{variant}.toml"
    out_dir.mkdir(parents=True, exist_ok=True)
    p.write_text(tomli_w.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r, nvml, wall = run_child([sys.executable, "-m", "engine", "train", str(p), "--headless"], env)
    runs = sorted(out_dir.glob(f"*-dpo-{variant}"), key=lambda d: d.stat().st_mtime)
    if r.returncode != 0 or not runs:
        text = (r.stderr or "") + (r.stdout or "")
        (Path(os.environ.get("OUT", out_dir)) / f"dpo-{variant}.log").write_text(text[-2_000_000:])
        errs = [x for x in text.splitlines() if "Error" in x or "error" in x or "failed" in x]
        return dict(variant=variant, error=errs[-6:] or text[-1500:])
    sys.path.insert(0, str(ROOT))
    from engine.core import events
    from engine.core.summary import standing
    evs = standing(events.read_events(runs[-1] / "events.jsonl"))
    steps = {e.step: e for e in evs if isinstance(e, events.Step)}
    started = next(e for e in evs if isinstance(e, events.RunStarted))
    dts = [steps[s].time - steps[s - 1].time for s in sorted(steps) if s > WARM and s - 1 in steps]
    step = statistics.median(dts) if dts else None
    pred = re.search(r"predicted ([\d.]+) GiB", " ".join(started.plan or []))
    peak = max((e.peak_memory_bytes or 0) for e in steps.values()) if steps else 0
    prefs = [e for e in evs if isinstance(e, events.Preference)]
    return dict(variant=variant, shape=shape, seq=seq, pairs=pairs, step_s=round(step, 4) if step else None,
                tokens_per_s=round(pairs * 2 * seq / step) if step else None,
                predicted_device_gib=float(pred.group(1)) if pred else None,
                peak_reserved_gib=round(peak / 2**30, 2) if peak else None,
                nvml_peak_gib=round(nvml / 2**30, 2) if nvml else None,
                losses=[steps[s].loss for s in sorted(steps)],
                accuracy=[e.accuracy for e in prefs][-3:], plan=started.plan, wall_s=round(wall, 1))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv) or DEFAULT
    if len(argv) < 4:
        argv = DEFAULT[:3] if not argv else argv
        argv += DEFAULT[3:]
    shape, seq, pairs, variants = argv[0], int(argv[1]), int(argv[2]), argv[3:]
    out = Path(os.environ.get("OUT", "/tmp/bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir(shape)
    data_file(shape, seq, pairs)
    results = []
    for v in variants:
        t0 = time.time()
        res = plain_variant(v, shape, seq, pairs) if v.startswith("plain") else \
            engine_variant(v, shape, seq, pairs, Path("/tmp/bench-dpo-runs"))
        res["bench_s"] = round(time.time() - t0, 1)
        results.append(res)
        print("RESULT " + json.dumps(res), flush=True)
        with open(out / "dpo_vs_plain.jsonl", "a") as fh:
            fh.write(json.dumps(res) + "\n")
    base = next((r for r in results if r["variant"] == "plain" and r.get("tokens_per_s")), None) or \
        next((r for r in results if r["variant"].startswith("plain") and r.get("tokens_per_s")), None)
    for r in results:
        if base and r is not base and r.get("tokens_per_s"):
            print(f"RATIO {r['variant']}: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x {base['variant']}", flush=True)
        if r.get("predicted_device_gib") and r.get("nvml_peak_gib"):
            err = r["predicted_device_gib"] / r["nvml_peak_gib"] - 1
            print(f"ESTIMATE {r['variant']}: predicted {r['predicted_device_gib']:.2f} GiB, NVML peak "
                  f"{r['nvml_peak_gib']:.2f} GiB ({err:+.1%})", flush=True)
    return results


if __name__ == "__main__":
    main()
