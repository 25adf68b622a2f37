"""Build a random-weight Llama model directly in NF4: a pre-quantized checkpoint that
``from_pretrained`` loads 4-bit (the engine and plain TRL alike), without ever holding the
16-bit model (70B in bf16 is 140 GB; the GPU machine's disk is 64 GiB).

    python bench/make_70b.py OUT_DIR            # Llama-3.1-70B shape, quantized on the GPU
    python bench/make_70b.py OUT_DIR --tiny     # a 4-layer toy shape, on the CPU (tests)

Layer by layer: each projection's bf16 weight is drawn (std 0.02) on the device, quantized with
bitsandbytes (NF4, double quant, blocksize 64: what BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_use_double_quant=True) does at load time) and written with its quant state under the
keys bitsandbytes' Linear4bit saves (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``);
norms are ones, embeddings and lm_head bf16 (std 0.02). Shards of a few layers, an index, the
config with its quantization_config, and a word-level tokenizer (the bench feeds token ids).
Peak host memory: one shard (about 4 layers, ~1.8 GB for 70B).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHAPES = {
    "llama70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=131072,
                     rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False,
                 max_position_embeddings=2048, rms_norm_eps=1e-5),
}
LAYERS_PER_SHARD = 4
STD = 0.02


def quant_config():
    import torch
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def projections(s: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder projection, keyed by its module path inside a layer."""
    h, i = s["hidden_size"], s["intermediate_size"]
    hd = h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i)}


def quantized_linear(out_f: int, in_f: int, device, gen) -> dict:
    """Packed NF4 weight + its serialised quant state, as Linear4bit._save_to_state_dict writes."""
    import torch
    import bitsandbytes.functional as F
    w = torch.empty(out_f, in_f, dtype=torch.bfloat16, device=device).normal_(0.0, STD, generator=gen)
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                 quant_storage=torch.uint8)
    out = {"weight": packed.cpu()}
    for k, v in qs.as_dict(packed=True).items():
        out["weight." + k] = v.cpu()
    return out


def layer_tensors(i: int, s: dict, device, gen) -> dict:
    import torch
    pre = f"model.layers.{i}."
    t = {}
    for name, (o, n) in projections(s).items():
        for k, v in quantized_linear(o, n, device, gen).items():
            t[f"{pre}{name}.{k}"] = v
    for norm in ("input_layernorm", "post_attention_layernorm"):
        t[f"{pre}{norm}.weight"] = torch.ones(s["hidden_size"], dtype=torch.bfloat16)
    return t


def dense(rows: int, cols: int, device, gen):
    import torch
    return torch.empty(rows, cols, dtype=torch.bfloat16, device=device).normal_(0.0, STD, generator=gen).cpu()


def write_config(out: Path, s: dict) -> None:
    from transformers import LlamaConfig
    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **s)
    cfg.dtype = "bfloat16"
    d = cfg.to_dict()
    d["quantization_config"] = quant_config().to_dict()
    d["quantization_config"]["quant_method"] = "bitsandbytes"
    (out / "config.json").write_text(json.dumps(d, indent=2))


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(str(out))


def build(out: Path, shape: str = "llama70b", device: str | None = None, seed: int = 0,
          log=print) -> Path:
    """Write the checkpoint to ``out`` (skipped when ``out/COMPLETE`` exists). Returns ``out``."""
    import torch
    from safetensors.torch import save_file
    out = Path(out)
    if (out / "COMPLETE").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    s = SHAPES[shape]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    L, h, V = s["num_hidden_layers"], s["hidden_size"], s["vocab_size"]
    shards: list[dict] = []
    starts = list(range(0, L, LAYERS_PER_SHARD))
    n_shards = len(starts) + 1
    weight_map, total = {}, 0
    t0 = time.time()
    for k, first in enumerate(starts):
        t = {}
        for i in range(first, min(L, first + LAYERS_PER_SHARD)):
            t.update(layer_tensors(i, s, device, gen))
        total += _save_shard(out, k, n_shards, t, weight_map, save_file)
        log(f"make_70b: layers {first}-{min(L, first + LAYERS_PER_SHARD) - 1} written "
            f"({total / 2**30:.1f} GiB, {time.time() - t0:.0f} s)")
        del t
    t = {"model.embed_tokens.weight": dense(V, h, device, gen), "lm_head.weight": dense(V, h, device, gen),
         "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    total += _save_shard(out, len(starts), n_shards, t, weight_map, save_file)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    write_config(out, s)
    write_tokenizer(out)
    (out / "COMPLETE").write_text(json.dumps({"shape": shape, "bytes": total, "seconds": round(time.time() - t0)}))
    log(f"make_70b: {shape} written to {out}: {total / 2**30:.2f} GiB in {time.time() - t0:.0f} s")
    return out


def _save_shard(out: Path, k: int, n: int, tensors: dict, weight_map: dict, save_file) -> int:
    name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    save_file({key: v.contiguous() for key, v in tensors.items()}, str(out / name), metadata={"format": "pt"})
    for key in tensors:
        weight_map[key] = name
    return sum(v.numel() * v.element_size() for v in tensors.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--tiny", action="store_true", help="a 4-layer toy shape, on the CPU")
    p.add_argument("--device", default=None, help="where to quantize (default: cuda when present)")
    a = p.parse_args(argv)
    build(a.out, "tiny" if a.tiny else "llama70b", "cpu" if a.tiny and a.device is None else a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
