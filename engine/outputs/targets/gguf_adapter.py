"""Export target ``gguf-adapter``: the LoRA adapter alone as a llama.cpp adapter GGUF
(``llama-cli --lora``, Ollama ``ADAPTER``); no merge. k-quants are for whole models."""
from __future__ import annotations

from engine.outputs import gguf_write
from engine.outputs.targets import Option, Target
from engine.outputs.targets.gguf_model import gguf_choices

ADAPTER_TYPES = tuple(t for t in gguf_write.GGUF_TYPES if not gguf_write.TYPES[t].base.endswith("_K"))


def run(art, options: dict, emit, out=None, base=None, name=None, force=False) -> dict:
    from engine.outputs.export import export_adapter
    r = export_adapter(art, options["gguf"], out=out, base=base, name=name, force=bool(force), emit=emit,
                       target=TARGET.name)
    return r.to_dict() | {"lines": r.lines()}


TARGET = Target("gguf-adapter", "LoRA adapter GGUF (llama.cpp --lora)",
                "the LoRA adapter alone as a GGUF adapter (llama.cpp --lora, Ollama ADAPTER)", run,
                (Option("gguf", "GGUF type", gguf_choices(ADAPTER_TYPES), "f16", strict=False),))
