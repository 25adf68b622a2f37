"""Command: ``serve-cmd`` (engine/outputs/serve.py builds the vLLM command)."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve-cmd", help="print the vllm serve command for one or more adapters (multi-LoRA)",
        description="Print a `vllm serve BASE --enable-lora ... --lora-modules name=path ...` "
                    "command for adapters trained on the same base, and an example request.")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER",
                   help="run directories or adapter directories (same base)")
    p.add_argument("--name", dest="names", action="append", default=[], metavar="N",
                   help="adapter name for requests, one per ADAPTER in order (default: run directory names)")
    p.add_argument("--port", type=int, default=8000, metavar="P", help="server port (default 8000)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from engine.outputs.serve import ServeError, serve_command
    try:
        print(serve_command(args.adapters, args.names or None, args.port))
    except ServeError as e:
        print(f"serve-cmd failed: {e}", file=sys.stderr)
        return 1
    return 0
