"""``train.method = "lora"``: a LoRA adapter over the 16-bit base (PEFT's LoRA path, fp32 adapters).

LoRA's options (``[lora]``: rank, DoRA, LoRA-FA, LoftQ/PiSSA init) belong to every adapter method;
``Method.dora`` and ``Method.init_transient_bytes`` (base.py: every adapter method's) are their readers for the planner.
"""
from engine.methods.base import Method

METHOD = Method(name="lora", summary="LoRA over a 16-bit base", quantized=False)
