"""``train.method = "qlora"``: a LoRA adapter over the 4-bit base of [quant] (the QLoRA paper)."""
from engine.methods.base import Method

METHOD = Method(name="qlora", summary="LoRA over a 4-bit base")
