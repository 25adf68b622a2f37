"""Export target ``merged``: the adapter merged into its base as a standard safetensors
checkpoint (``engine.outputs.merge``, verified), in RUN_DIR/export/merged unless --out says
where. A full checkpoint (GaLore) is already one: reported as it is."""
from __future__ import annotations

import shlex

from engine.outputs.merge import DTYPES
from engine.outputs.targets import Option, Target

_NOTES = {"auto": "auto (bf16/fp16 on CUDA, fp32 on the CPU)"}


def run(art, options: dict, emit, out=None, base=None, name=None, force=False) -> dict:
    from engine.core.events import ExportStage
    from engine.outputs.export import ExportError, progress_events
    from engine.outputs.merge import MergeError, dir_files, merge
    progress = progress_events(emit, TARGET.name)
    if art.full_dir is not None:
        from engine.methods import galore
        size, files = dir_files(art.full_dir)
        progress(ExportStage.DONE, 1.0, "a full checkpoint: nothing to merge")
        return {"path": str(art.full_dir), "size_bytes": size, "files": files,
                "commands": [f"vllm serve {shlex.quote(str(art.full_dir.resolve()))}"],
                "lines": [galore.merge_message(art.full_dir)]}
    dest = out or art.merged_dir
    try:
        r = merge(str(art.src), dest, dtype=options["dtype"], base=base,
                  on_progress=lambda f, m: progress(ExportStage.DONE if f >= 1 else ExportStage.MERGE, f, m))
    except MergeError as e:
        raise ExportError(str(e)) from None
    path = shlex.quote(str(r.out))
    return r.to_dict() | {"path": r.out, "lines": r.lines(),
                          "commands": [f"vllm serve {path}",
                                       f"python -c \"from transformers import AutoModelForCausalLM; "
                                       f"AutoModelForCausalLM.from_pretrained({r.out!r})\""]}


TARGET = Target("merged", "merged safetensors (16-bit)",
                "the adapter merged into its 16-bit base, verified against base + adapter "
                "(RUN_DIR/export/merged, where the GGUF export reuses it)", run,
                (Option("dtype", "dtype", tuple((d, _NOTES.get(d, d)) for d in DTYPES), "auto"),), accepts=("adapter", "full"))
