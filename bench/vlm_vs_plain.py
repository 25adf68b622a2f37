"""Vision-language QLoRA: qlora-tui's engine vs plain TRL's VLM recipe, same model shape (random
weights), same images and rows, same seed, one invocation (each variant in its own process for a
clean peak-memory figure).

    python bench/vlm_vs_plain.py                 # Qwen2-VL-7B shape on the GPU (the lead's run)
    python bench/vlm_vs_plain.py --tiny          # builtin:tiny-vl's shape on the CPU: a smoke test
    python bench/vlm_vs_plain.py --steps 12 --warm 3 --variants plain,engine_eq   # equal memory

plain   TRL's documented VLM recipe: SFTTrainer(processing_class=processor) on rows of "messages"
        (image parts) + "images" (PIL), LoRA r=32/alpha=64 target_modules="all-linear" (PEFT then
        also adapts the vision tower), the whole model NF4 + double quant (vision tower included),
        gradient checkpointing, bf16, adamw_torch, max_length=None.
engine  `python -m engine train CFG --headless`, the same rows as a JSONL file with image paths,
        the same r/alpha/optimizer/batch; everything else on auto (frozen 16-bit vision tower,
        LoRA on the language model, the fit planner).
engine_eq  the engine told it has plain's measured peak reserved memory (train.gpu_memory_gib =
        the plain variant's peak_reserved_gib from the same invocation, or --eq-gib): the
        equal-memory comparison; engine_NNg: the engine with an NN GiB budget (engine_10g, ...).
Both train STEPS optimizer steps (micro-batch BATCH, no accumulation); tokens/s counts real
(non-pad) tokens, visual tokens included, over the steps after WARM; peak = the child's
torch.cuda.max_memory_reserved(). Prints RESULT lines and appends JSON to $OUT/vlm_vs_plain.jsonl.
Needs no torchvision (the PIL/numpy image processor).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    # Qwen2-VL-7B-Instruct's config.json
    "qwen2vl7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1000000.0),
        vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        pixels=dict(min_pixels=56 * 56, max_pixels=448 * 448), vocab=152064, image_side=448),
}
R, ALPHA = 32, 64


def shape(tiny: bool) -> dict:
    if tiny:
        from engine.models import builtin
        return dict(text=builtin.TINY_VL_TEXT, vision=builtin.TINY_VL_VISION, pixels=builtin.TINY_VL_PIXELS, vocab=None,
                    image_side=64)
    return SHAPES["qwen2vl7b"]


def model_dir(tiny: bool) -> Path:
    from engine.models import builtin
    if tiny:
        return builtin.tiny_vl_model_dir()
    path = Path("/tmp/bench-qwen2vl7b")
    if not (path / "model.safetensors.index.json").exists() and not (path / "model.safetensors").exists():
        import torch
        s = shape(False)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            builtin.build_vl_dir(path, s["text"], s["vision"], s["pixels"], vocab_size=s["vocab"])
    return path


def data_file(tiny: bool, rows: int) -> Path:
    """``rows`` captioned images (deterministic, drawn with PIL) and a ChatML-parts JSONL."""
    import random
    from PIL import Image, ImageDraw
    side = shape(tiny)["image_side"]
    d = Path(f"/tmp/bench-vlm-data-{side}-{rows}")
    p = d / "rows.jsonl"
    if p.exists():
        return p
    d.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(0)
    words = "red green blue circle square bright dark small large left right top bottom shape".split()
    out = []
    for i in range(rows):
        im = Image.new("RGB", (side, side), tuple(rnd.randrange(256) for _ in range(3)))
        dr = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rnd.randrange(side), rnd.randrange(side)
            dr.rectangle((x, y, x + side // 4, y + side // 5), fill=tuple(rnd.randrange(256) for _ in range(3)))
        im.save(d / f"{i:04d}.png")
        answer = " ".join(rnd.choice(words) for _ in range(rnd.randrange(20, 120)))
        out.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"{i:04d}.png"},
                                         {"type": "text", "text": "Describe the picture in detail."}]},
            {"role": "assistant", "content": answer}]})
    p.write_text("".join(json.dumps(r) + "\n" for r in out))
    return p


class Timer:
    """TrainerCallback-compatible: time and non-pad tokens between step WARM and the end."""

    def __init__(self, warm):
        self.warm, self.t0, self.tok0, self.t1, self.tok1 = warm, None, 0, None, 0

    def on_step_end(self, args, state, control, **kw):
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step == self.warm:
            self.t0, self.tok0 = time.perf_counter(), state.num_input_tokens_seen
        self.t1, self.tok1 = time.perf_counter(), state.num_input_tokens_seen


def child_plain(a) -> dict:
    """TRL's VLM recipe, as its docs give it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from engine.models.processor import pretrained_processor
    path = model_dir(a.tiny)
    data = data_file(a.tiny, a.rows)
    proc = pretrained_processor(str(path), None, False)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    ds = Dataset.from_list([{"messages": [{"role": m["role"], "content": (
        [{"type": "image"} if p["type"] == "image" else {"type": "text", "text": p["text"]} for p in m["content"]]
        if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}])} for m in r["messages"]],
        "images": [Image.open(data.parent / p["image"]).convert("RGB") for m in r["messages"]
                   if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]}
        for r in rows])
    cuda = torch.cuda.is_available()
    kw = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if cuda:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
        kw["device_map"] = {"": 0}
    model = AutoModelForImageTextToText.from_pretrained(str(path), **kw)
    timer = Timer(a.warm)
    cb = type("TimerCB", (TrainerCallback,), {"on_step_end": timer.on_step_end})()
    args = SFTConfig(output_dir="/tmp/bench-vlm-plain", per_device_train_batch_size=a.batch,
                     gradient_accumulation_steps=1, max_steps=a.steps, learning_rate=2e-4, optim="adamw_torch",
                     gradient_checkpointing=True, bf16=cuda, use_cpu=not cuda, max_length=None,
                     logging_steps=1, save_strategy="no", report_to=[], seed=42, data_seed=42,
                     include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=proc, callbacks=[cb],
                         peft_config=LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return _result("plain", timer, trainer.state.log_history)


def child_engine(a) -> dict:
    import torch
    from engine.core import config
    from engine.training import runner
    path = model_dir(a.tiny)
    data = data_file(a.tiny, a.rows)
    cfg = config.load(None, [f'model.name="{path}"', f'data.train="{data}"', "data.eval_fraction=0",
                        "data.max_length=4096", f"lora.r={R}", f"lora.alpha={ALPHA}", 'train.optimizer="adamw_torch"',
                        f"train.batch_size={a.batch}", "train.grad_accum=1", f"train.max_steps={a.steps}",
                        "train.logging_steps=1", "train.eval_steps=0", "train.save_steps=0",
                        'output.dir="/tmp/bench-vlm-engine-runs"', "output.keep_checkpoints=false"]
                 + (["train.device=\"cpu\""] if not torch.cuda.is_available() else [])
                 + ([f"train.gpu_memory_gib={a.budget_gib}"] if a.budget_gib else []))
    timer = Timer(a.warm)
    run = runner.Run(cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run.start()
    run.join(timeout=3600)
    from engine.core import events
    if not isinstance(run.result, events.RunFinished):
        raise SystemExit(f"engine run failed: {getattr(run.result, 'reason', run.result)}")
    # tokens/s over the steps after WARM, from the run's own step events (time, tokens_seen)
    from engine.core import rundir
    evs = [e for e in events.read_events(run.run_dir / rundir.EVENTS) if isinstance(e, events.Step)]
    first = next(e for e in evs if e.step == a.warm)
    last = evs[-1]
    timer.t0, timer.t1 = first.time, last.time
    timer.tok0, timer.tok1 = first.tokens_seen, last.tokens_seen
    started = next((e for e in events.read_events(run.run_dir / rundir.EVENTS) if isinstance(e, events.RunStarted)), None)
    return dict(_result("engine", timer, [{"loss": e.loss} for e in evs]), budget_gib=a.budget_gib or None,
                plan=getattr(started, "plan", None))


def _result(name, timer, history) -> dict:
    import torch
    dt = (timer.t1 or 0) - (timer.t0 or 0)
    toks = (timer.tok1 or 0) - (timer.tok0 or 0)
    losses = [h["loss"] for h in history if h.get("loss") is not None]
    return {"variant": name, "tokens_per_s": round(toks / dt, 1) if dt > 0 else None, "tokens": int(toks),
            "seconds": round(dt, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else None,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def variant_child(v: str, a, results: list[dict]) -> tuple[str | None, float | str | None]:
    """(child, engine budget in GiB) for variant ``v``; (None, why) when it cannot run."""
    import re
    if v in ("plain", "engine"):
        return v, None
    m = re.fullmatch(r"engine_(\d+(?:\.\d+)?)g", v)
    if m:
        return "engine", float(m.group(1))
    if v == "engine_eq":
        plain = next((r for r in results if r.get("variant") == "plain" and r.get("peak_reserved_gib")), None)
        budget = a.eq_gib or (plain or {}).get("peak_reserved_gib")
        if not budget:
            return None, ("engine_eq needs plain's measured peak: put plain before it in --variants "
                          "(on a GPU) or pass --eq-gib")
        return "engine", float(budget)
    return None, f"unknown variant {v!r} (plain, engine, engine_eq, engine_NNg)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="builtin:tiny-vl's shape on the CPU (smoke test)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warm", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--variants", default="plain,engine")
    ap.add_argument("--eq-gib", type=float, default=None,
                    help="engine_eq's budget when plain is not run in this call (plain's measured peak, GiB)")
    ap.add_argument("--budget-gib", type=float, default=None, help=argparse.SUPPRESS)   # the engine child's
    ap.add_argument("--child", choices=["plain", "engine"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.steps = a.steps or (4 if a.tiny else 30)
    a.warm = a.warm or (1 if a.tiny else 5)
    a.batch = a.batch or (2 if a.tiny else 4)
    a.rows = a.rows or a.batch * (a.steps + 1)
    if a.child:
        res = child_plain(a) if a.child == "plain" else child_engine(a)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    model_dir(a.tiny)                        # built once, before either child runs
    data_file(a.tiny, a.rows)
    results = []
    for v in a.variants.split(","):
        child, budget = variant_child(v, a, results)
        if child is None:
            results.append({"variant": v, "error": budget})
            continue
        argv = [sys.executable, __file__, "--child", child, "--steps", str(a.steps), "--warm", str(a.warm),
                "--batch", str(a.batch), "--rows", str(a.rows)] + (["--tiny"] if a.tiny else []) \
            + (["--budget-gib", str(budget)] if budget else [])
        p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            print(f"{v}: failed (exit {p.returncode})\n{p.stderr[-3000:]}", file=sys.stderr)
            results.append({"variant": v, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]})
            continue
        results.append(dict(json.loads(line[7:]), variant=v))
    out = Path(os.environ.get("OUT", "/tmp"))
    with open(out / "vlm_vs_plain.jsonl", "a") as fh:
        for r in results:
            fh.write(json.dumps({"shape": "tiny-vl" if a.tiny else "qwen2vl7b", "batch": a.batch,
                                 "steps": a.steps, "warm": a.warm, **r}) + "\n")
    for r in results:
        print("RESULT " + json.dumps(r))
    ok = {r["variant"]: r for r in results if r.get("tokens_per_s")}
    for name, r in ok.items():
        if name != "plain" and "plain" in ok:
            sp = r["tokens_per_s"] / ok["plain"]["tokens_per_s"]
            mem = (f", peak {r['peak_reserved_gib']} vs {ok['plain']['peak_reserved_gib']} GiB"
                   if r["peak_reserved_gib"] is not None else "")
            print(f"{name}/plain tokens/s: {sp:.2f}x{mem}")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
