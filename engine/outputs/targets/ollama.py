"""Export target ``ollama``: a GGUF model and the Modelfile that ``ollama create`` reads (the
chat template as Ollama's TEMPLATE, stop tokens, the data's system prompt). Ollama's usual
quantisation (q4_k_m) unless --gguf says otherwise; the GGUF target does the work."""
from __future__ import annotations

from engine.outputs.targets import Option, Target
from engine.outputs.targets.gguf_model import GGUF_TYPE


def run(art, options: dict, emit, out=None, base=None, name=None, force=False) -> dict:
    from engine.outputs.export import export_model
    r = export_model(art, options["gguf"], out=out, base=base, name=name, force=bool(force), emit=emit,
                     target=TARGET.name)
    report = r.to_dict() | {"lines": r.lines()}
    report["commands"] = [c for c in r.commands if c.startswith("ollama ")] + \
                         [c for c in r.commands if not c.startswith("ollama ")]
    return report


TARGET = Target("ollama", "Ollama (GGUF + Modelfile)",
                "a GGUF model (q4_k_m unless --gguf) with the Modelfile for `ollama create`", run,
                (Option(GGUF_TYPE.name, GGUF_TYPE.label, GGUF_TYPE.choices, "q4_k_m", GGUF_TYPE.help,
                        strict=False),), accepts=("adapter", "full"))
