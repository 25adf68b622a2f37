"""Command: ``export`` (engine/outputs/export.py writes and verifies the GGUF)."""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    from engine.outputs import gguf_write
    p: argparse.ArgumentParser = subparsers.add_parser(
        "export", help="a run as one GGUF file for llama.cpp / Ollama (verified), with a Modelfile",
        description="Merge the run's adapter (reusing merge's verified path), write the merged model as "
                    "GGUF with its tokenizer and chat template, read it back with transformers and compare "
                    "logits, write an Ollama Modelfile and a model card next to it. --adapter-gguf writes "
                    "the LoRA adapter alone (llama.cpp --lora, Ollama ADAPTER).")
    p.add_argument("src", metavar="RUN_DIR|ADAPTER_DIR", help="a run directory or an adapter directory")
    p.add_argument("--gguf", default="f16", metavar="TYPE",
                   help=f"GGUF type: {', '.join(gguf_write.GGUF_TYPES)} (default f16); the other "
                        f"k/i-quants: export f16 and run llama.cpp's llama-quantize")
    p.add_argument("--adapter-gguf", action="store_true", help="write the LoRA adapter alone as a GGUF adapter")
    p.add_argument("--out", "-o", default=None, metavar="FILE|DIR",
                   help="the .gguf file or a directory for it (default: RUN_DIR/export/)")
    p.add_argument("--name", default=None, help="model name (file name, Ollama name; default: the run's)")
    p.add_argument("--base", default=None, metavar="BASE", help="base model instead of the adapter's")
    p.add_argument("--force", action="store_true", help="overwrite an existing .gguf file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from engine.core.safe_text import visible as clean    # the one sanitiser of untrusted text
    from engine.outputs.export import export_adapter, export_model
    from engine.outputs.merge import AdapterError

    def show(fraction: float, message: str) -> None:   # with --json, stdout holds the JSON alone
        print(f"[{fraction * 100:3.0f}%] {clean(message)}", flush=True,
              file=sys.stderr if args.json else sys.stdout)

    fn = export_adapter if args.adapter_gguf else export_model
    try:
        report = fn(args.src, args.gguf, out=args.out, base=args.base, name=args.name, force=args.force,
                    on_progress=show)
    except AdapterError as e:
        print(f"export failed: {clean(str(e))}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(clean(line) for line in report.lines()))
    return 0
