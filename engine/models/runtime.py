"""Where and how a run computes: the device, the compute dtype, whether the base loads in 4 bits
(``runtime``), the attention kernel (``attn_implementation``) and whether packed rows stay apart
with it (``packing_isolated``). Nothing here loads weights."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.models.source import ModelError

@dataclass
class Runtime:
    device: str                  # "cuda" | "cpu"
    dtype: str                   # "bf16" | "fp16" | "fp32"
    load_in_4bit: bool
    notes: list[str] = field(default_factory=list)


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
    # train.method: qlora and the preference methods = the 4-bit base of [quant]; lora and galore
    # train over a 16-bit base
    from engine import methods
    four = methods.of(cfg).four_bit(cfg)
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
    is used (training sets use_cache=False); tests/training/test_packing_isolation.py checks it on a real model.
    """
    if attn == "flash_attention_2":
        return True, "flash-attention keeps packed samples apart"
    if attn == "varlen":
        return True, "varlen attention (torch's variable-length flash kernel) keeps packed samples apart"
    try:
        from transformers import masking_utils
        if hasattr(masking_utils, "find_packed_sequence_indices"):
            return True, f"{attn} with a block-diagonal mask from restarting position_ids keeps samples apart"
    except ImportError:
        pass
    return False, f"{attn} in this transformers version would let packed samples attend to each other"


