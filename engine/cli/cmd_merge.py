"""Command: ``merge`` (engine/outputs/merge.py merges and verifies)."""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    from engine.outputs.merge import DTYPES
    p: argparse.ArgumentParser = subparsers.add_parser(
        "merge", help="merge a run's LoRA adapter into its base (16-bit checkpoint, verified)",
        description="Reload the base in 16-bit, apply the adapter, merge_and_unload(), save a "
                    "standard safetensors checkpoint and verify its logits against base + adapter. "
                    "The same merge is the export target `merged` (qlora-tui export RUN_DIR --target "
                    "merged), one of: " + ", ".join(_target_names()) + ".")
    p.add_argument("src", metavar="RUN_DIR|ADAPTER_DIR", help="a run directory or an adapter directory")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="new directory for the merged model")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                   help="dtype of the merged weights (default bf16; auto = bf16/fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--base", default=None, metavar="BASE",
                   help="base model (hub id or directory) instead of the adapter's base_model_name_or_path")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--stream", action="store_true",
                   help="merge shard by shard (automatic for 4-bit bases and bases larger than half "
                        "the host RAM): never holds the whole model")
    p.set_defaults(func=cmd_merge)


def _target_names() -> list[str]:
    from engine.outputs import targets
    return targets.names()


def cmd_merge(args) -> int:
    from engine.outputs.merge import MergeError, merge
    from engine.methods import galore

    def show(fraction: float, message: str) -> None:
        print(f"[{fraction * 100:3.0f}%] {message}", flush=True)

    full = galore.full_checkpoint_dir(args.src)
    if full is not None:        # a GaLore run: already a full checkpoint
        print(galore.merge_message(full))
        return 0
    try:
        report = merge(args.src, args.out, dtype=args.dtype, on_progress=show, base=args.base,
                       stream=True if args.stream else None)
    except MergeError as e:
        print(f"merge failed: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(report.lines()))
    return 0
