"""``train.method = "lora"``: a LoRA adapter over the 16-bit base (PEFT's LoRA path, fp32 adapters).

LoRA's options (``[lora]``: rank, DoRA, LoRA-FA, LoftQ/PiSSA init) belong to every adapter method;
``Method.dora`` and ``Method.init_transient_bytes`` (base.py) are their readers for the planner.
"""
from engine.methods.base import Method

METHOD = Method(name="lora", summary="LoRA over a 16-bit base", quantized=False)


def init_transient_bytes(init: str, out_features: int, in_features: int) -> int:
    """``lora.init``: extra device memory while one weight is initialised (fp32): PiSSA's SVD of the
    weight (the weight, U, S, Vh); LoftQ's original weight, its dequantised 4-bit copy, the error
    and its SVD (engine.training.lora_init does the work)."""
    if init not in ("pissa", "loftq"):
        return 0
    k = min(out_features, in_features)
    svd = out_features * k + k + k * in_features
    full = out_features * in_features
    return 4 * ((2 * full if init == "pissa" else 3 * full) + svd)
