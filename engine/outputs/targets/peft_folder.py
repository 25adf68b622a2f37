"""Export target ``peft``: the LoRA adapter as a folder to hand on: the adapter's weights and
``adapter_config.json``, the tokenizer it trained with and a model card (README.md with the loss
curve and the config), in RUN_DIR/export/peft unless --out says where. Checked before it is
committed: PEFT reads the config back, and every tensor of the copy equals the run's."""
from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from engine.outputs.targets import Target

CARD = "README.md"          # the run's PEFT placeholder card is replaced by ours


def _check(folder: Path, src: Path) -> None:
    """PEFT's own reader accepts the folder, and the weights are the adapter's, bit for bit."""
    from peft import PeftConfig
    from safetensors.torch import load_file
    from engine.outputs.export import ExportError
    PeftConfig.from_pretrained(str(folder))
    for f in sorted(src.glob("*.safetensors")):
        got, want = load_file(str(folder / f.name)), load_file(str(f))
        if got.keys() != want.keys() or any(not got[k].equal(want[k]) for k in want):
            raise ExportError(f"{folder / f.name}: the copy differs from {f}; nothing was written")


def run(art, options: dict, emit, out=None, base=None, name=None, force=False) -> dict:
    from engine.core import files
    from engine.core.events import ExportStage
    from engine.outputs import modelcard
    from engine.outputs.export import ExportError, progress_events
    progress = progress_events(emit, TARGET.name)
    src = art.output_dir
    dest = Path(out).expanduser() if out else art.exports_dir / "peft"
    if force and dest.is_dir() and not dest.is_symlink() and (dest / "adapter_config.json").is_file():
        shutil.rmtree(dest)                    # our own earlier export of this kind, replaced
    try:
        files.check_output(dest, what="export")
    except OSError as e:
        raise ExportError(f"{e} (or pass --force to replace an earlier peft export)") from None
    progress(ExportStage.CHECK, 0.05, f"copying {src}")
    with files.staged_dir(dest) as tmp:
        entries = [p for p in sorted(src.iterdir()) if p.is_file() and not p.is_symlink() and p.name != CARD]
        for i, p in enumerate(entries, 1):
            shutil.copyfile(p, tmp / p.name)
            progress(ExportStage.FILES, 0.05 + 0.6 * i / len(entries), f"copied {p.name}")
        progress(ExportStage.VERIFY, 0.7, "reading the copy back through PEFT")
        _check(tmp, src)
        modelcard.write_card(tmp, art.run_dir, src, "adapter")
        progress(ExportStage.FILES, 0.9, "model card written")
    size, listed = sum(p.stat().st_size for p in dest.iterdir() if p.is_file()), sorted(p.name for p in dest.iterdir())
    progress(ExportStage.DONE, 1.0, f"{dest}")
    path = str(dest.resolve())
    load = (f"python -c \"from peft import AutoPeftModelForCausalLM; "
            f"AutoPeftModelForCausalLM.from_pretrained({path!r})\"")
    return {"path": path, "size_bytes": size, "files": listed,
            "commands": [load, f"huggingface-cli upload REPO_ID {shlex.quote(path)}"],
            "lines": [f"PEFT adapter folder: {path} ({len(listed)} files, model card included)"]}


TARGET = Target("peft", "PEFT adapter folder (+ tokenizer, model card)",
                "the LoRA adapter as a folder PEFT loads, with its tokenizer and a model card "
                "(RUN_DIR/export/peft)", run)
