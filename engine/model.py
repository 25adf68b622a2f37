"""Loading the tokenizer and the (4-bit) base through the ordinary transformers path.

``model.name`` is a hub id, a local directory or ``builtin:tiny``. Hub tokens come from the
environment (``HF_TOKEN``) or huggingface_hub's standard cache; this module never reads
or writes them itself, so they never reach a config, a log or a run directory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelError(ValueError):
    """The model cannot be loaded as configured (one line, names the field and what to do)."""


@dataclass
class Runtime:
    device: str                  # "cuda" | "cpu"
    dtype: str                   # "bf16" | "fp16" | "fp32"
    load_in_4bit: bool
    notes: list[str] = field(default_factory=list)


def model_path(cfg) -> str:
    """A loadable path or hub id for model.name (builtin:tiny is built/cached on demand)."""
    name = cfg.model.name.strip()
    if name == "builtin:tiny":
        from engine.builtin import tiny_model_dir
        return str(tiny_model_dir())
    if name.startswith("builtin:"):
        raise ModelError(f"model.name = {name!r}: unknown built-in; the only one is builtin:tiny")
    p = Path(cfg.resolve_path(name))
    looks_local = name.startswith((".", "/", "~")) or p.exists()
    if looks_local:
        if not p.is_dir():
            raise ModelError(f"model.name = {name!r}: no such directory ({p}); give a model directory "
                             "or a hub id like meta-llama/Llama-3.2-1B")
        if not (p / "config.json").exists():
            raise ModelError(f"model.name = {name!r}: {p} has no config.json; is it a Hugging Face model directory?")
        return str(p)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name):
        raise ModelError(f"model.name = {name!r}: neither a local directory nor a hub id (owner/name)")
    return name


def runtime(cfg) -> Runtime:
    import torch
    notes = []
    want = cfg.train.device
    has_cuda = torch.cuda.is_available()
    if want == "cuda" and not has_cuda:
        raise ModelError("train.device = 'cuda' but no CUDA GPU is visible; set train.device = 'auto'")
    device = "cuda" if has_cuda and want != "cpu" else "cpu"
    dt = cfg.quant.compute_dtype
    if dt == "auto":
        if device == "cuda":
            dt = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            notes.append(f"compute dtype {dt} ({'bf16 supported' if dt == 'bf16' else 'no bf16 on this GPU'})")
        else:
            dt = "fp32"
            notes.append("compute dtype fp32 (CPU)")
    elif device == "cpu" and dt == "fp16":
        notes.append("fp16 on the CPU is slow and unstable; prefer quant.compute_dtype = auto")
    four = cfg.quant.load_in_4bit
    if four and device == "cpu" and not _bnb_cpu_ok():
        four = False
        notes.append("bitsandbytes cannot run 4-bit on this CPU: plain fp32 LoRA instead")
    return Runtime(device, dt, four, notes)


def train_device(rt) -> str:
    """The torch device string training runs on ("cuda:N" for this process's GPU, or "cpu")."""
    if rt.device != "cuda":
        return "cpu"
    import os
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def _bnb_cpu_ok() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return True
    except Exception:
        return False


def torch_dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_tokenizer(cfg, path: str | None = None):
    """(tokenizer, warnings): chat template override or ChatML fallback, pad token ensured."""
    from transformers import AutoTokenizer
    from engine.chat import prepare_tokenizer
    path = path or model_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision or None,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except OSError as e:
        raise ModelError(f"model.name = {cfg.model.name!r}: cannot load the tokenizer ({_first_line(e)}); "
                         "check the name, your network/HF_TOKEN, or use a local directory") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"model.name = {cfg.model.name!r}: only fast tokenizers are supported "
                         "(the label mask needs character offsets)")
    warnings = prepare_tokenizer(tok, cfg.model.chat_template)
    return tok, warnings


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


def attn_implementation(cfg, device: str) -> str:
    a = cfg.model.attn_implementation
    if a != "auto":
        return a
    if device == "cuda":
        import importlib.util
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def packing_isolated(attn: str) -> tuple[bool, str]:
    """Whether packed rows stay apart in attention with this kernel (no cross-sample leak).

    flash-attention uses the packed sequence lengths. For sdpa/eager, transformers >= 5
    derives a block-diagonal causal mask from position_ids that restart at 0, when no KV cache
    is used (training sets use_cache=False); tests/test_packing.py checks it on a real model.
    """
    if attn == "flash_attention_2":
        return True, "flash-attention keeps packed samples apart"
    try:
        from transformers import masking_utils
        if hasattr(masking_utils, "find_packed_sequence_indices"):
            return True, f"{attn} with a block-diagonal mask from restarting position_ids keeps samples apart"
    except ImportError:
        pass
    return False, f"{attn} in this transformers version would let packed samples attend to each other"


def load_model(cfg, rt: Runtime, path: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    path = path or model_path(cfg)
    dtype = torch_dtype(rt.dtype)
    kwargs = dict(revision=cfg.model.revision or None, trust_remote_code=cfg.model.trust_remote_code,
                  dtype=dtype, attn_implementation=attn_implementation(cfg, rt.device))
    if rt.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.quant_type,
            bnb_4bit_use_double_quant=cfg.quant.double_quant, bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if cfg.distributed.strategy == "fsdp" and cfg.distributed.gpus > 1
            else torch.uint8)
    fsdp = cfg.distributed.gpus > 1 and cfg.distributed.strategy == "fsdp"
    if rt.device == "cuda":
        import os
        local = int(os.environ.get("LOCAL_RANK", "0"))
        # bitsandbytes quantises onto the current CUDA device: without this every rank of a
        # multi-GPU job would put its 4-bit weights on GPU 0 (FSDP then refuses to wrap them)
        torch.cuda.set_device(local)
        if not fsdp:                         # FSDP places (and shards) the weights itself
            kwargs["device_map"] = {"": local}
    if cfg.train.weight_streaming is True:   # loaded on the host; engine.streaming moves the rest
        kwargs["device_map"] = {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelError(f"model.name = {cfg.model.name!r}: cannot load weights ({_first_line(e)})") from None
    model.config.use_cache = False
    return model


def linear_module_names(model) -> list[str]:
    """Suffix names of the linear layers LoRA can target (lm_head excluded)."""
    import torch
    names = set()
    for full, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            leaf = full.rsplit(".", 1)[-1]
            if leaf != "lm_head":
                names.add(leaf)
    return sorted(names)


def resolve_target_modules(cfg, model):
    target = cfg.lora.target_modules
    if target == "all-linear":
        return "all-linear"
    if isinstance(target, str):
        target = [target]
    have = linear_module_names(model)
    missing = [t for t in target if t not in have]
    if missing:
        raise ModelError(f"lora.target_modules: {', '.join(missing)} not found in the model; "
                         f"its linear modules are: {', '.join(have)} (or use \"all-linear\")")
    return list(target)


def check_model_skeleton(cfg) -> list[str]:
    """Build the model on the meta device (no weights) to check target modules early."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    path = model_path(cfg)
    try:
        mc = AutoConfig.from_pretrained(path, revision=cfg.model.revision or None,
                                        trust_remote_code=cfg.model.trust_remote_code)
    except OSError as e:
        raise ModelError(f"model.name = {cfg.model.name!r}: cannot read its config ({_first_line(e)}); "
                         "check the name, your network/HF_TOKEN, or use a local directory") from None
    except ValueError as e:
        raise ModelError(f"model.name = {cfg.model.name!r}: {_first_line(e)}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mc, trust_remote_code=cfg.model.trust_remote_code)
    resolve_target_modules(cfg, model)
    return linear_module_names(model)
