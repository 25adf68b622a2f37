"""Export target ``gguf``: the merged model as one GGUF file (llama.cpp, Ollama), verified.

Its ``gguf`` option is the one list of GGUF types (``engine.outputs.gguf_write.TYPES``: what we
write, with each type's verification bound); the CLI's ``--gguf`` and the TUI's type picker read it.
"""
from __future__ import annotations

from engine.outputs import gguf_write
from engine.outputs.targets import Option, Target


def gguf_choices(types=None) -> tuple[tuple[str, str], ...]:
    """(value, label) of the GGUF types written here (all of them, or ``types``)."""
    out = []
    for t in types or gguf_write.GGUF_TYPES:
        note = gguf_write.TYPES[t].note
        out.append((t, f"{t} ({note})" if note else t))
    return tuple(out)


GGUF_TYPE = Option("gguf", "GGUF type", gguf_choices(), "f16", strict=False,
                   help="the other k/i-quants: export f16 and run llama.cpp's llama-quantize")


def run(art, options: dict, emit, out=None, base=None, name=None, force=False) -> dict:
    from engine.outputs.export import export_model
    r = export_model(art, options["gguf"], out=out, base=base, name=name, force=bool(force), emit=emit,
                     target=TARGET.name)
    return r.to_dict() | {"lines": r.lines()}


TARGET = Target("gguf", "GGUF model (llama.cpp / Ollama)",
                "merge the adapter (verified; a full checkpoint is used as it is), write the model as one GGUF file with its tokenizer "
                "and chat template, read it back and compare logits; a Modelfile and a model card beside it",
                run, (GGUF_TYPE,), accepts=("adapter", "full"))
