"""Check engine.planning.estimate against measured peaks: one fresh process per configuration.

Same setup as /work/shared/bench/plain_trl_baseline.py (the runs the estimate was calibrated
on): random-weight Llama of a real shape, NF4 + double quant, bf16, sdpa, LoRA r=32
alpha=64 all-linear, adamw_torch, non-reentrant gradient checkpointing, full-length
pre-tokenized rows, TRL SFTTrainer. Each configuration runs ~4 optimizer steps in its own
subprocess (a clean peak), records torch.cuda.max_memory_reserved()/allocated() and the
estimate's prediction, and appends one JSON line to $OUT/estimate_calibration.jsonl
(or ./estimate_calibration.jsonl without $OUT).

usage:
  python bench/estimate_calibration.py                      # the default grid (GPU)
  python bench/estimate_calibration.py --shapes llama1b --seqs 512 2048 --batches 1 8
  python bench/estimate_calibration.py --liger              # Liger variants too
  python bench/estimate_calibration.py --smoke              # tiny shape, CPU ok (plumbing test)
Configurations predicted above --max-gib (130) are skipped (logged as skipped).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.core.config import load  # noqa: E402
from engine.planning.estimate import GIB, estimate  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False),
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                    tie_word_embeddings=True, rope_theta=500000.0),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                    tie_word_embeddings=False, rope_theta=500000.0),
}
STEPS = 4


def run_config(spec: dict) -> dict:
    """Train STEPS steps in this process; return the result row (peak memory and prediction)."""
    cfg = load(None, [f"data.max_length={spec['seq']}", f"train.batch_size={spec['batch']}",
                      "train.grad_accum=1", "lora.r=32", "lora.alpha=64", 'lora.target_modules="all-linear"',
                      'quant.compute_dtype="bf16"', 'train.optimizer="adamw_torch"', 'train.device="cuda"',
                      f"train.gradient_checkpointing={str(spec['gc']).lower()}",
                      f"train.liger_kernel={str(spec['liger']).lower()}"])
    est = estimate(cfg, SHAPES[spec["shape"]])

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM,
                              PreTrainedTokenizerFast)
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    path = f"/tmp/model-{spec['shape']}"
    if not os.path.exists(os.path.join(path, "config.json")):
        mc = LlamaConfig(max_position_embeddings=8192, **SHAPES[spec["shape"]])
        with torch.device("cuda" if cuda else "cpu"):
            torch.manual_seed(0)
            m = LlamaForCausalLM(mc).to(torch.bfloat16)
        m.save_pretrained(path, safe_serialization=True)
        del m
        if cuda:
            torch.cuda.empty_cache()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="sdpa",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    V = SHAPES[spec["shape"]]["vocab_size"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, V, (spec["batch"] * (STEPS + 1), spec["seq"]), generator=g).tolist()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    args = SFTConfig(
        output_dir="/tmp/estimate-calibration-out", per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, max_steps=STEPS, learning_rate=2e-4, logging_steps=1,
        report_to=[], max_length=spec["seq"], bf16=cuda, use_cpu=not cuda, save_strategy="no",
        dataset_num_proc=None, gradient_checkpointing=spec["gc"],
        gradient_checkpointing_kwargs={"use_reentrant": False}, use_liger_kernel=spec["liger"],
        optim="adamw_torch", dataloader_num_workers=0, padding_free=False)
    lora = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    tr = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids}),
                    processing_class=tok, peft_config=lora)
    tr.train()
    reserved = torch.cuda.max_memory_reserved() if cuda else None
    allocated = torch.cuda.max_memory_allocated() if cuda else None
    row = dict(spec, status="ok", steps=STEPS, train_s=round(time.perf_counter() - t0, 1),
               measured_reserved_gib=None if reserved is None else round(reserved / GIB, 3),
               measured_allocated_gib=None if allocated is None else round(allocated / GIB, 3),
               predicted_reserved_gib=round(est.peak_bytes / GIB, 3),
               predicted_allocated_gib=round(est.allocated_bytes / GIB, 3),
               breakdown_gib={k: round(v / GIB, 3) for k, v in est.breakdown.items()},
               versions=dict(torch=torch.__version__, trl=__import__("trl").__version__,
                             peft=__import__("peft").__version__,
                             transformers=__import__("transformers").__version__,
                             bitsandbytes=__import__("bitsandbytes").__version__),
               device=torch.cuda.get_device_name(0) if cuda else "cpu")
    if reserved:
        row["error_reserved_pct"] = round(100 * (est.peak_bytes - reserved) / reserved, 1)
        row["error_allocated_pct"] = round(100 * (est.allocated_bytes - allocated) / allocated, 1)
    return row


def grid(a) -> list[dict]:
    out = []
    for shape in a.shapes:
        for seq in a.seqs:
            for gc in (True, False):
                for liger in ((False, True) if a.liger else (False,)):
                    for batch in a.batches:
                        out.append(dict(shape=shape, seq=seq, batch=batch, gc=gc, liger=liger))
    return out


def append(path: str, row: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print("RESULT " + json.dumps(row), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["llama1b", "llama8b"], choices=list(SHAPES))
    ap.add_argument("--seqs", nargs="+", type=int, default=[512, 2048, 4096])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--liger", action="store_true", help="also run use_liger_kernel variants")
    ap.add_argument("--max-gib", type=float, default=130.0, help="skip configs predicted above this")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, seq 64, batch 2 (CPU ok)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one JSON spec in this process
    a = ap.parse_args()
    if a.one:
        print("ROW " + json.dumps(run_config(json.loads(a.one))), flush=True)
        return 0
    if a.smoke:
        a.shapes, a.seqs, a.batches = ["tiny"], [64], [2]
    out = os.path.join(os.environ.get("OUT", "."), "estimate_calibration.jsonl")
    specs = grid(a)
    print(f"{len(specs)} configurations -> {out}", flush=True)
    for spec in specs:
        cfg = load(None, [f"data.max_length={spec['seq']}", f"train.batch_size={spec['batch']}",
                          'train.optimizer="adamw_torch"', 'quant.compute_dtype="bf16"'])
        pred = estimate(cfg, SHAPES[spec["shape"]], gradient_checkpointing=spec["gc"],
                        liger=spec["liger"]).peak_bytes / GIB
        if pred > a.max_gib:
            append(out, dict(spec, status="skipped", predicted_reserved_gib=round(pred, 2),
                             reason=f"predicted above {a.max_gib} GiB"))
            continue
        try:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)],
                               capture_output=True, text=True, timeout=a.timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            append(out, dict(spec, status="timeout", predicted_reserved_gib=round(pred, 2)))
            continue
        rows = [ln[4:] for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
        if p.returncode == 0 and rows:
            append(out, json.loads(rows[-1]))
        else:
            tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
            oom = "OutOfMemoryError" in (p.stderr or "") or "out of memory" in (p.stderr or "")
            append(out, dict(spec, status="oom" if oom else "failed", rc=p.returncode,
                             predicted_reserved_gib=round(pred, 2), error_tail=tail))
    return 0


if __name__ == "__main__":
    sys.exit(main())
