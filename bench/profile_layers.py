"""Where a QLoRA training step's time goes, per decoder layer, and whether regional
torch.compile of the decoder layer (bitsandbytes NF4 + PEFT LoRA) helps.

    python bench/profile_layers.py [LAYERS] [BATCH] [SEQ] [MODE...]   (default 4 8 2048 peft compile)

MODE: peft (PEFT's own LoRA forward), fused (engine/training/fused_lora.py), fp8 (the fused
linear with FP8 base GEMMs, engine/training/fp8.py), compile (peft with each layer compiled).

A Llama-3.1-8B-shaped model cut to LAYERS decoder layers (random weights), NF4 + double quant,
bf16, LoRA r=32 alpha=64 on every projection (PEFT), Liger's RMSNorm/SwiGLU/RoPE when installed,
sdpa. Times forward+backward of the decoder stack alone (hidden states in, sum of outputs as the
loss), with and without per-layer checkpointing, eager and with each layer compiled, and prints
the CUDA time per kernel group from torch.profiler for the eager run. One JSON line per
measurement (PROFILE ...), for bench/RESULTS.md.
"""
import json
import sys
import time

import torch


def build(layers, path="/tmp/model-prof"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=1024,
                      rope_theta=500000.0, max_position_embeddings=8192)
    with torch.device("cuda"):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    torch.cuda.empty_cache()
    m = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(model=m, rope=True, rms_norm=True, swiglu=True,
                                    fused_linear_cross_entropy=False, cross_entropy=False)
        liger = True
    except Exception:
        liger = False
    from peft import LoraConfig, get_peft_model
    m = get_peft_model(m, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules="all-linear",
                                     task_type="CAUSAL_LM"))
    for p in m.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return m, liger


def step_fn(m, b, s, ckpt):
    inner = m.base_model.model.model
    x = torch.randn(b, s, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(s, device="cuda")[None].expand(b, s)
    pe = inner.rotary_emb(x, pos)

    def step():
        h = x
        for layer in inner.layers:
            if ckpt:
                h = torch.utils.checkpoint.checkpoint(layer, h, position_embeddings=pe, position_ids=pos,
                                                      attention_mask=None, use_reentrant=False)
            else:
                h = layer(h, position_embeddings=pe, position_ids=pos, attention_mask=None)
            h = h[0] if isinstance(h, tuple) else h
        h.float().pow(2).mean().backward()
    return step


def timed(step, n=5, warm=2):
    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2], ts


GROUPS = [("fp8 row quantisation (engine)", ("rowwise_e4m3",)),
          ("nf4 dequant (bitsandbytes)", ("dequant", "kDequantize")),
          ("attention (sdpa)", ("flash", "fmha", "attention", "efficient")),
          ("GEMM", ("gemm", "sm90", "cutlass", "cublas", "nvjet", "xmma")),
          ("Liger / triton", ("triton", "liger", "_rms", "swiglu", "rope")),
          ("copies, casts, elementwise", ("copy", "elementwise", "vectorized", "reduce", "fill", "cat"))]


def profile(step):
    from torch.profiler import ProfilerActivity, profile as prof
    step()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        step()
        torch.cuda.synchronize()
    out = {}
    for ev in p.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if not t or ev.key.startswith(("ProfilerStep", "aten::")) and "kernel" not in ev.key.lower():
            continue
        name = ev.key.lower()
        g = next((g for g, keys in GROUPS if any(k in name for k in keys)), "other")
        out[g] = out.get(g, 0) + t / 1000
    top = sorted(((getattr(e, "device_time_total", 0) / 1000, e.key[:90]) for e in p.key_averages()),
                 reverse=True)[:15]
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}, top


def set_mode(m, mode):
    """PEFT's own forward, or the engine's fused linear (bf16 or FP8 base GEMMs)."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    from engine.training import fused_lora
    fused_lora.patch(m)
    for mod in m.modules():
        if hasattr(mod, "_peft_forward"):
            if mode == "peft":
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = __import__("types").MethodType(fused_lora._forward, mod)
                mod._fp8 = mode == "fp8"


def measure(m, mode, layers, b, s, liger):
    # forward + input-gradient GEMMs: the base is frozen, so no weight-gradient GEMM (LoRA ignored)
    flops = 2 * 2 * b * s * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336) * layers
    set_mode(m, mode)
    for ckpt in (False, True):
        med, ts = timed(step_fn(m, b, s, ckpt))
        print("PROFILE " + json.dumps(dict(what=mode, ckpt=ckpt, layers=layers, batch=b, seq=s, liger=liger,
                                           ms_per_layer=round(med / layers * 1000, 2),
                                           tflops=round(flops * (3 / 2 if ckpt else 1) / med / 1e12),
                                           times=[round(t, 4) for t in ts])), flush=True)
    groups, top = profile(step_fn(m, b, s, False))
    print("PROFILE " + json.dumps(dict(what=f"{mode}: kernel groups, ms per step", layers=layers, groups=groups)),
          flush=True)
    for t, k in top:
        print(f"TOP {mode} {t:9.1f} ms  {k}", flush=True)


def main():
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    b = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    s = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
    modes = sys.argv[4:] or ["peft", "compile"]
    m, liger = build(layers)
    m.train()
    for mode in modes:
        if mode != "compile":
            measure(m, mode, layers, b, s, liger)
    if "compile" not in modes:
        return
    set_mode(m, "peft")
    inner = m.base_model.model.model
    try:
        t0 = time.perf_counter()
        for layer in inner.layers:
            layer.compile()
        med, ts = timed(step_fn(m, b, s, False), warm=3)
        print("PROFILE " + json.dumps(dict(what="compiled layers", ckpt=False, layers=layers,
                                           ms_per_layer=round(med / layers * 1000, 2),
                                           compile_and_warm_s=round(time.perf_counter() - t0 - sum(ts), 1),
                                           times=[round(t, 4) for t in ts])), flush=True)
    except Exception as e:
        print("PROFILE " + json.dumps(dict(what="compiled layers", error=f"{type(e).__name__}: {str(e)[:400]}")),
              flush=True)


if __name__ == "__main__":
    main()
