"""Write GGUF files (llama.cpp / Ollama) from a Hugging Face checkpoint or a PEFT LoRA adapter.

We write the tensors and metadata ourselves with the maintained ``gguf`` package (the one
llama.cpp's own converter uses): its tensor-name map, its quantizers (``gguf.quants``) and its
writer; the k-quants with ``engine.outputs.kquants``. Architectures: Llama, Mistral and
Mistral-Nemo (llama.cpp reads Mistral as ``llama``), Qwen2, Qwen3, Gemma-2, Gemma-3 (text),
Phi-3; anything else is refused with the list of what is supported. Tokenizers: byte-level BPE
(GPT-2 style: Llama 3, Qwen2/3, Mistral-Nemo's tekken, builtin:tiny) and sentencepiece-style BPE
(Llama 2, Mistral v0.1, Phi-3, Gemma); a tokenizer that cannot be expressed as a GGUF vocabulary
is refused.

Everything here raises ``GGUFError`` with a one-line message; nothing imports textual or rich.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.outputs.merge import LOGIT_TOLERANCE

# --------------------------------------------------------------------------- what we support

# HF architecture -> (llama.cpp architecture, q/k rows permuted to GGML's rope layout)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
    "Gemma2ForCausalLM": ("gemma2", False),
    "Gemma3ForCausalLM": ("gemma3", False),
    "Phi3ForCausalLM": ("phi3", False),
}
# architectures people ask for that we name in the refusal (what to do instead)
_REFUSED = {
    "Gemma3ForConditionalGeneration": "Gemma-3 with its vision tower needs llama.cpp's mmproj file; "
                                      "export a text-only Gemma3ForCausalLM checkpoint",
}
_GEMMA = ("gemma2", "gemma3")        # RMSNorm scales (1 + w): llama.cpp stores w + 1

@dataclass(frozen=True)
class GGUFType:
    """One ``--gguf`` type: its general.file_type, the ggml type of its 2-D weights (None: only
    llama.cpp's ``llama-quantize`` writes it) and how tensors are mixed:
    ``""`` every 2-D weight in ``base`` (4/5-bit legacy types keep embeddings and output at q8_0);
    ``"pure"`` every 2-D weight in ``base`` (llama-quantize --pure);
    ``"k"``, ``"k_m"``, ``"k_s"`` llama.cpp's per-tensor rules (llama_tensor_get_type) for Q6_K,
    Q4_K_M/Q5_K_M and Q4_K_S/Q5_K_S: output head at Q6_K, and for _M attn_v/ffn_down at Q6_K in the
    layers llama.cpp's use_more_bits picks.
    ``tolerance``: the export's bound on the logits read back, atol + rtol * max|reference logit|
    (f32/f16/bf16: the merge's own tolerances; the quantized bounds were measured on builtin:tiny
    and Llama-shaped random weights, with margin). ``note``: what the type is for, in pickers."""
    file_type: str
    base: str | None
    mix: str = ""
    tolerance: tuple[float, float] | None = None
    note: str = ""


_F32, _F16, _BF16 = LOGIT_TOLERANCE["fp32"], LOGIT_TOLERANCE["fp16"], LOGIT_TOLERANCE["bf16"]

# the one list of GGUF types: what we write (with its bound), and what we name but leave to
# llama-quantize. The export targets (engine/outputs/targets/), the CLI and the TUI read it.
TYPES = {
    "f32": GGUFType("ALL_F32", "F32", tolerance=_F32, note="largest, exact"),
    "f16": GGUFType("MOSTLY_F16", "F16", tolerance=_F16, note="full quality"),
    "bf16": GGUFType("MOSTLY_BF16", "BF16", tolerance=_BF16),
    "q8_0": GGUFType("MOSTLY_Q8_0", "Q8_0", tolerance=(0.1, 0.05), note="half the size"),
    "q6_k": GGUFType("MOSTLY_Q6_K", "Q6_K", "k", tolerance=(0.1, 0.05)),
    "q5_k_m": GGUFType("MOSTLY_Q5_K_M", "Q5_K", "k_m", tolerance=(0.3, 0.1)),
    "q5_k_s": GGUFType("MOSTLY_Q5_K_S", "Q5_K", "k_s", tolerance=(0.3, 0.1)),
    "q5_k": GGUFType("MOSTLY_Q5_K_S", "Q5_K", "pure", tolerance=(0.3, 0.1)),
    "q5_1": GGUFType("MOSTLY_Q5_1", "Q5_1", tolerance=(0.5, 0.15)),
    "q5_0": GGUFType("MOSTLY_Q5_0", "Q5_0", tolerance=(0.5, 0.15)),
    "q4_k_m": GGUFType("MOSTLY_Q4_K_M", "Q4_K", "k_m", tolerance=(0.5, 0.2), note="Ollama's usual"),
    "q4_k_s": GGUFType("MOSTLY_Q4_K_S", "Q4_K", "k_s", tolerance=(0.5, 0.2)),
    "q4_k": GGUFType("MOSTLY_Q4_K_S", "Q4_K", "pure", tolerance=(0.5, 0.2)),
    "q4_1": GGUFType("MOSTLY_Q4_1", "Q4_1", tolerance=(1.0, 0.3)),
    "q4_0": GGUFType("MOSTLY_Q4_0", "Q4_0", tolerance=(1.0, 0.3), note="smallest"),
    **{t: GGUFType("MOSTLY_" + t.upper(), None) for t in (
        "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "iq4_xs", "iq4_nl", "iq3_s", "iq3_xxs", "iq2_xs", "iq2_xxs")},
}
GGUF_TYPES = tuple(t for t, v in TYPES.items() if v.base)          # the ones we write
# a k-quant whose row length is not a multiple of 256 falls back as llama.cpp does, then to f16
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# pre-tokenizer split regexes llama.cpp knows by name (tokenizer.ggml.pre)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2", _TEKKEN_SPLIT: "tekken"}

# token types (gguf.TokenType values)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class GGUFError(ValueError):
    """The model, adapter or tokenizer cannot be written as GGUF; the message is one line."""


def check_type(gguf_type: str) -> str:
    t = (gguf_type or "").lower()
    if t in GGUF_TYPES:
        return t
    if t in TYPES:
        raise GGUFError(f"--gguf {gguf_type}: we do not write {t}; export f16 and run llama.cpp's "
                        f"`llama-quantize FILE-f16.gguf OUT.gguf {t.upper()}`, "
                        f"or pick one of {', '.join(GGUF_TYPES)}")
    raise GGUFError(f"--gguf {gguf_type!r} is not a GGUF type we write; use one of {', '.join(GGUF_TYPES)}")


def check_adapter_type(gguf_type: str) -> str:
    """An adapter GGUF takes the non-k types (llama.cpp's convert_lora_to_gguf writes f32/f16/
    bf16/q8_0; the LoRA B matrices' rows are the rank, never a multiple of 256)."""
    t = check_type(gguf_type)
    if TYPES[t].base.endswith("_K"):
        raise GGUFError(f"--adapter-gguf --gguf {gguf_type}: k-quants are for whole models; write the "
                        f"adapter as f16 or q8_0 (or export the merged model as {t})")
    return t


def architecture_of(cfg: dict, where: str) -> tuple[str, bool]:
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    got = ", ".join(archs) or cfg.get("model_type") or "unknown"
    why = next((_REFUSED[a] for a in archs if _REFUSED.get(a)), "")
    if why:
        raise GGUFError(f"{where}: architecture {got} cannot be exported as GGUF here: {why}")
    raise GGUFError(f"{where}: architecture {got} is not supported for GGUF export; supported: "
                    f"{', '.join(ARCHITECTURES)}")


# --------------------------------------------------------------------------- tokenizer

@dataclass
class Vocab:
    model: str                      # tokenizer.ggml.model: gpt2 | llama
    pre: str                        # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None
    special_ids: dict[str, int]     # bos / eos / unk / pad / eot
    add_bos: bool
    add_eos: bool
    chat_template: str = ""
    add_space_prefix: bool = True   # sentencepiece-style: a leading "▁" (Llama 2); Gemma: none
    stop_tokens: list[str] = field(default_factory=list)


def _pre_tokenizer_kind(tj: dict, where: str) -> tuple[str, str]:
    """(tokenizer.ggml.model, tokenizer.ggml.pre) for a tokenizer.json, or a refusal."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFError(f"{where}: a {model.get('type') or 'unknown'} tokenizer cannot be written as a "
                        f"GGUF vocabulary here; only BPE tokenizers (byte-level like Llama 3/Qwen2, or "
                        f"sentencepiece-style like Llama 2/Mistral) are supported")
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space"):
        return "gpt2", "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex", "")
        if pattern in _SPLITS:
            return "gpt2", _SPLITS[pattern]
        raise GGUFError(f"{where}: the byte-level pre-tokenizer's split pattern is not one llama.cpp "
                        f"knows by name (llama-bpe, qwen2, gpt-2); it cannot be written as GGUF")
    if model.get("byte_fallback") and ("Metaspace" in kinds or _metaspace_normalizer(tj)):
        return "llama", "default"
    raise GGUFError(f"{where}: pre-tokenizer {'+'.join(k or '?' for k in kinds) or 'none'} cannot be "
                    f"expressed in GGUF; supported: byte-level BPE and sentencepiece-style BPE")


def _adds_space_prefix(tj: dict) -> bool:
    """Whether a sentencepiece-style tokenizer puts "▁" before the text (Metaspace with a
    prepend scheme, or a Prepend normalizer); Gemma's only replaces spaces."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in parts):
        return True
    return '"Prepend"' in json.dumps(tj.get("normalizer") or {})


def _metaspace_normalizer(tj: dict) -> bool:
    text = json.dumps(tj.get("normalizer") or {})
    return "\u2581" in text or "\\u2581" in text


def read_vocab(tok, n_vocab: int, where: str) -> Vocab:
    """The tokenizer of a transformers ``PreTrainedTokenizerFast`` as a GGUF vocabulary."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise GGUFError(f"{where}: only fast (tokenizer.json) tokenizers can be written as GGUF")
    tj = json.loads(backend.to_str())
    ggml_model, pre = _pre_tokenizer_kind(tj, where)
    vocab = dict(tj["model"]["vocab"])
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    size = max(n_vocab, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        if text in added:
            types[i] = CONTROL if added[text].get("special") else USER_DEFINED
        elif ggml_model == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types[i] = BYTE
        else:
            types[i] = NORMAL
    if tok.unk_token_id is not None:
        types[tok.unk_token_id] = UNKNOWN
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    scores = None
    if ggml_model == "llama":
        scores = [0.0 if types[i] != NORMAL else -float(i) for i in range(size)]
    probe = tok("a", add_special_tokens=True).input_ids
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id,
           "pad": tok.pad_token_id}
    stops = _stop_tokens(tok, vocab)
    eot = next((vocab[s] for s in stops if s != tok.eos_token and s in vocab), None)
    if eot is not None:
        ids["eot"] = eot
    return Vocab(model=ggml_model, pre=pre, tokens=tokens, types=types, merges=merges, scores=scores,
                 add_space_prefix=_adds_space_prefix(tj),
                 special_ids={k: v for k, v in ids.items() if v is not None},
                 add_bos=bool(probe) and probe[0] == tok.bos_token_id and tok.bos_token_id is not None,
                 add_eos=bool(probe) and probe[-1] == tok.eos_token_id and tok.eos_token_id is not None,
                 chat_template=_template_text(tok), stop_tokens=stops)


_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def _stop_tokens(tok, vocab: dict) -> list[str]:
    """The eos token and the end-of-turn tokens the chat template writes."""
    stops = [tok.eos_token] if tok.eos_token else []
    template = _template_text(tok)
    for t in _END_OF_TURN:
        if t in vocab and t in template and t not in stops:
            stops.append(t)
    return stops


def _template_text(tok) -> str:
    t = getattr(tok, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default") or next(iter(t.values()), "")
    return t if isinstance(t, str) else ""


def add_file_type(w, gguf_type: str) -> None:
    """general.file_type and the quantization version, for a model or an adapter file."""
    import gguf
    w.add_file_type(int(getattr(gguf.LlamaFileType, TYPES[gguf_type].file_type)))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_vocab(w, v: Vocab) -> None:
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.model == "llama":
        w.add_add_space_prefix(v.add_space_prefix)
    if v.merges:
        w.add_token_merges(v.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
              "pad": w.add_pad_token_id, "eot": w.add_eot_token_id}
    for name, token_id in v.special_ids.items():
        adders[name](token_id)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


# --------------------------------------------------------------------------- hyperparameters

def text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg


def _rope(c: dict) -> dict:
    """The rope parameters of the full-attention layers (Gemma-3 keeps one dict per layer type)."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]
    return rope


def add_hparams(w, cfg: dict, arch: str, where: str) -> None:
    c = text_config(cfg)
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
    w.add_context_length(int(c.get("max_position_embeddings") or 4096))
    if arch in _GEMMA:
        scalar = c.get("query_pre_attn_scalar")
        big = int(c["num_hidden_layers"]) in (46, 62)       # Gemma-2/3 27B: llama.cpp scales by hidden / heads
        if scalar is not None and float(scalar) != head_dim and not (big and float(scalar) == int(c["hidden_size"]) // heads):
            raise GGUFError(f"{where}: query_pre_attn_scalar {scalar} differs from head_dim {head_dim}; llama.cpp "
                            f"derives Gemma's attention scale from head_dim, so this model cannot be exported as GGUF")
        if c.get("sliding_window"):
            w.add_sliding_window(int(c["sliding_window"]))
        for key, add in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                         ("final_logit_softcapping", w.add_final_logit_softcapping)):
            if c.get(key) is not None:
                add(float(c[key]))
    if arch == "phi3":
        rope = _rope(c)
        if (rope.get("rope_type") or rope.get("type") or "default") not in ("default",):
            raise GGUFError(f"{where}: Phi-3 with {rope.get('rope_type') or rope.get('type')} rope scaling "
                            f"(the 128k models) is not supported for GGUF export here; the 4k models are")
        w.add_rope_scaling_orig_ctx_len(int(c.get("original_max_position_embeddings")
                                            or c.get("max_position_embeddings") or 4096))
        if c.get("sliding_window"):
            w.add_sliding_window(int(c["sliding_window"]))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(c.get("num_key_value_heads") or heads))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    w.add_rope_dimension_count(int(head_dim * float(c.get("partial_rotary_factor") or 1.0)))
    if head_dim != int(c["hidden_size"]) // heads or arch in _GEMMA:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(int(c["vocab_size"]))
    rope = _rope(c)
    w.add_rope_freq_base(float(rope.get("rope_theta") or c.get("rope_theta") or 10000.0))
    kind = (rope.get("rope_type") or rope.get("type") or "default").lower()
    if kind == "linear":
        import gguf
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in ("default", "llama3"):
        raise GGUFError(f"{where}: rope scaling {kind!r} is not supported for GGUF export here "
                        f"(supported: none, linear, llama3)")


def llama3_rope_freqs(cfg: dict):
    """llama.cpp's ``rope_freqs.weight`` for Llama 3.1+ rope scaling (None when not used)."""
    import numpy as np
    c = text_config(cfg)
    rope = _rope(c)
    if (rope.get("rope_type") or rope.get("type") or "").lower() != "llama3":
        return None
    base = float(rope.get("rope_theta") or c.get("rope_theta") or 10000.0)
    dim = int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# --------------------------------------------------------------------------- tensors

def permute_rows(w, n_head: int):
    """HF's rotate-half q/k rows -> GGML's interleaved rope layout (llama.cpp's converter)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _k_mix(name: str, nx: int, t: GGUFType, n_layer: int, has_output: bool) -> str:
    """llama.cpp's llama_tensor_get_type for Q6_K, Q4_K_M/Q5_K_M and Q4_K_S/Q5_K_S (dense models).
    The layer is the tensor's blk index (llama.cpp counts attn_v/ffn_down in file order: the same
    for one of each per layer)."""
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        return "Q8_0" if nx % 256 else "Q6_K"
    m = re.match(r"blk\.(\d+)\.", name)
    layer = int(m.group(1)) if m else 0
    if "attn_v.weight" in name:
        if t.mix == "k_m" and _use_more_bits(layer, n_layer):
            return "Q6_K"
        if t.mix == "k_s" and t.base == "Q4_K" and layer < 4:
            return "Q5_K"
    elif "ffn_down" in name:
        if t.mix == "k_m" and _use_more_bits(layer, n_layer):
            return "Q6_K"
        if t.mix == "k_s" and t.base == "Q4_K" and layer < n_layer // 8:
            return "Q5_K"
    elif "attn_qkv.weight" in name and t.mix == "k_m":
        return {"Q4_K": "Q5_K", "Q5_K": "Q6_K"}[t.base]
    return t.base


def tensor_type(name: str, shape: tuple, gguf_type: str, n_layer: int = 1, has_output: bool = True):
    """The ggml type a tensor is written in: 1-D tensors stay f32; the k-quant mixes follow
    llama.cpp's per-tensor rules (``_k_mix``); with 4/5-bit legacy types the embeddings and the
    output head are kept at q8_0. Rows whose length is not a multiple of the type's block fall
    back as llama.cpp does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), then to f16."""
    import gguf
    Q = gguf.GGMLQuantizationType
    t = TYPES[gguf_type]
    if len(shape) < 2 or gguf_type == "f32":
        return Q.F32
    nx = shape[-1]
    want = t.base
    if t.mix in ("k", "k_m", "k_s"):
        want = _k_mix(name, nx, t, n_layer, has_output)
    elif not t.mix and gguf_type.startswith(("q4", "q5")) and name in ("token_embd.weight", "output.weight"):
        want = "Q8_0"
    if nx % gguf.GGML_QUANT_SIZES[Q[want]][0] and want in _K_FALLBACK:
        want = _K_FALLBACK[want]
    if nx % gguf.GGML_QUANT_SIZES[Q[want]][0]:
        return Q.F16
    return Q[want]


def encode(data, qtype):
    """numpy float32 -> bytes/array in ``qtype`` (gguf.quants)."""
    import gguf
    import numpy as np
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    from engine.outputs import kquants
    if qtype.name in kquants.QUANTIZERS:
        return kquants.QUANTIZERS[qtype.name](data)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


@dataclass
class PlannedTensor:
    name: str                   # GGUF name
    load: Callable              # () -> numpy float32 array, already in GGUF layout
    shape: tuple
    qtype: object


class Progress:
    """Tensors written, bytes and ETA for a progress callback ``(fraction, message)``."""

    def __init__(self, callback, total_bytes: int, start: float, span: float, layers: int):
        self.cb, self.total, self.start, self.span, self.layers = callback, max(total_bytes, 1), start, span, layers
        self.done = 0
        self.t0 = time.time()
        self._last = ""

    def tick(self, nbytes: int, name: str) -> None:
        self.done += nbytes
        frac = self.done / self.total
        elapsed = time.time() - self.t0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        m = re.match(r"blk\.(\d+)\.", name)
        layer = f"layer {int(m.group(1)) + 1}/{self.layers}" if m else name
        if layer == self._last and self.done < self.total:
            return                  # one line per layer (and per non-layer tensor)
        self._last = layer
        self.cb(self.start + self.span * frac,
                f"writing {layer}: {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB, ETA {eta:.0f}s")


def write_gguf(path: Path, arch: str, kv: Callable, tensors: list[PlannedTensor],
               progress: Progress | None = None) -> int:
    """Write ``tensors`` (streamed one at a time) to ``path`` atomically; returns its size."""
    import gguf
    import tempfile
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)                 # a file of our own beside the target: removed on failure
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        kv(w)
        for t in tensors:
            nbytes = tensor_nbytes(t.shape, t.qtype)
            w.add_tensor_info(t.name, _byte_shape(t.shape, t.qtype), _np_dtype(t.qtype), nbytes,
                              raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            data = encode(t.load(), t.qtype)
            w.write_tensor_data(data)
            if progress:
                progress.tick(data.nbytes, t.name)
        w.close()
    except GGUFError:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    except OSError as e:
        w.close()
        tmp.unlink(missing_ok=True)
        raise GGUFError(f"writing {path} failed: {e}") from None
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    from engine.core import files
    os.chmod(tmp, 0o666 & ~files.current_umask())
    tmp.replace(path)
    return path.stat().st_size


def tensor_nbytes(shape: tuple, qtype) -> int:
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    return n // block * size


def _byte_shape(shape: tuple, qtype):
    import gguf
    Q = gguf.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        return shape
    return gguf.quant_shape_to_byte_shape(shape, qtype)


def _np_dtype(qtype):
    import gguf
    import numpy as np
    Q = gguf.GGMLQuantizationType
    return {Q.F32: np.float32, Q.F16: np.float16}.get(qtype, np.uint8)


# --------------------------------------------------------------------------- model / adapter plans

def _gguf_arch(arch: str):
    import gguf
    return {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
            "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3,
            "phi3": gguf.MODEL_ARCH.PHI3}[arch]


def _safetensors_files(d: Path, where: str) -> list[Path]:
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise GGUFError(f"{where}: no .safetensors weights in {d}; GGUF export reads safetensors checkpoints")
    return files


def _loader(file: Path, key: str, fix: Callable | None = None) -> Callable:
    def load():
        from safetensors import safe_open
        with safe_open(str(file), "pt") as f:
            arr = f.get_tensor(key).float().numpy()
        return fix(arr) if fix else arr
    return load


def _plus_one(a):
    return a + 1.0


def plan_model(model_dir: Path, cfg: dict, arch: str, permute: bool, gguf_type: str) -> list[PlannedTensor]:
    """Every tensor of the checkpoint in ``model_dir`` under its GGUF name, in file order."""
    import gguf
    from safetensors import safe_open
    c = text_config(cfg)
    heads = int(c["num_attention_heads"])
    kv_heads = int(c.get("num_key_value_heads") or heads)
    names = gguf.get_tensor_name_map(_gguf_arch(arch), int(c["num_hidden_layers"]))
    out: list[PlannedTensor] = []
    for file in _safetensors_files(model_dir, str(model_dir)):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise GGUFError(f"{file}: tensor {key} has no GGUF name for architecture {arch}; "
                                    f"this checkpoint cannot be exported")
                shape = tuple(f.get_slice(key).get_shape())
                fix = None
                if permute and key.endswith(("q_proj.weight", "k_proj.weight")):
                    n = heads if key.endswith("q_proj.weight") else kv_heads
                    fix = (lambda n_: lambda a: permute_rows(a, n_))(n)
                elif arch in _GEMMA and key.endswith("norm.weight"):
                    fix = _plus_one
                out.append(PlannedTensor(name, _loader(file, key, fix), shape, None))
    has_output = any(t.name == "output.weight" for t in out)
    n_layer = int(c["num_hidden_layers"])
    for t in out:
        t.qtype = tensor_type(t.name, t.shape, gguf_type, n_layer, has_output)
    freqs = llama3_rope_freqs(cfg)
    if freqs is not None:
        out.append(PlannedTensor("rope_freqs.weight", lambda: freqs, freqs.shape, tensor_type("", freqs.shape, "f32")))
    return out


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|"
                       r"lora_embedding_B|lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?$")


def lora_scale_alpha(acfg: dict, where: str) -> float:
    """The alpha llama.cpp needs: it scales by alpha / r, so rsLoRA's alpha / sqrt(r) becomes
    alpha * sqrt(r); per-module ranks or alphas cannot be expressed in one alpha."""
    if acfg.get("use_dora"):
        raise GGUFError(f"{where}: DoRA adapters cannot be written as a llama.cpp LoRA adapter; merge "
                        f"it and export the merged model (qlora-tui export RUN_DIR --gguf f16)")
    if acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
        raise GGUFError(f"{where}: per-module rank_pattern/alpha_pattern cannot be expressed in a GGUF "
                        f"adapter (one alpha for all); export the merged model instead")
    r, alpha = float(acfg.get("r") or 8), float(acfg.get("lora_alpha") or 8)
    return alpha * math.sqrt(r) if acfg.get("use_rslora") else alpha


def plan_adapter(adapter_dir: Path, acfg: dict, cfg: dict, arch: str, permute: bool,
                 gguf_type: str) -> list[PlannedTensor]:
    """The LoRA A/B pairs as llama.cpp's ``blk.N.<tensor>.weight.lora_a`` / ``.lora_b``."""
    import gguf
    from safetensors import safe_open
    c = text_config(cfg)
    heads = int(c["num_attention_heads"])
    kv_heads = int(c.get("num_key_value_heads") or heads)
    names = gguf.get_tensor_name_map(_gguf_arch(arch), int(c["num_hidden_layers"]))
    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        raise GGUFError(f"{adapter_dir}: no adapter_model.safetensors; GGUF export reads safetensors adapters")
    out: list[PlannedTensor] = []
    with safe_open(str(file), "pt") as f:
        for key in sorted(f.keys()):
            m = _LORA_KEY.match(key)
            if not m:
                raise GGUFError(f"{file}: tensor {key} is not a LoRA A/B weight (modules_to_save or "
                                f"trained biases cannot go into a GGUF adapter); export the merged model")
            if m["part"] not in ("lora_A", "lora_B"):
                raise GGUFError(f"{file}: {m['part']} weights cannot go into a llama.cpp LoRA adapter; "
                                f"export the merged model instead")
            base = names.get_name(m["module"] + ".weight", try_suffixes=(".weight",))
            if base is None:
                raise GGUFError(f"{file}: module {m['module']} has no GGUF name for architecture {arch}")
            shape = tuple(f.get_slice(key).get_shape())
            fix = None
            if permute and m["part"] == "lora_B" and m["module"].endswith(("q_proj", "k_proj")):
                n = heads if m["module"].endswith("q_proj") else kv_heads
                fix = (lambda n_: lambda a: permute_rows(a, n_))(n)
            name = f"{base}.lora_{'a' if m['part'] == 'lora_A' else 'b'}"
            qtype = tensor_type(name, shape, gguf_type)
            out.append(PlannedTensor(name, _loader(file, key, fix), shape, qtype))
    if not out:
        raise GGUFError(f"{file}: the adapter has no LoRA weights")
    return out
