"""Command: ``generate`` (engine/outputs/generate.py answers with base and base + adapter)."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "generate", help="compare base and fine-tuned answers on the same prompts",
        description="Generate with the base and with base + adapter (loaded once) for the same "
                    "prompts; default prompts are the user turns of the run's eval data.")
    p.add_argument("src", metavar="RUN_DIR", help="a run directory (or an adapter directory)")
    p.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT",
                   help="a user prompt (repeatable; default: up to 3 from the run's eval data)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens per answer (default 64)")
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.7) instead of greedy decoding")
    p.add_argument("--json", action="store_true", help="print [{prompt, base, tuned}] as JSON")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from engine.core.safe_text import json_dumps
    from engine.outputs.generate import compare, format_text
    from engine.artifacts import AdapterError
    prompts = args.prompts or None
    try:
        results = compare(args.src, prompts=prompts, max_new_tokens=args.max_new_tokens,
                          greedy=not args.sample,
                          on_load=None if args.json else
                          lambda info: print(f"base {info['base']} + adapter {info['adapter']} "
                                             f"({info['mode']})", file=sys.stderr, flush=True))
    except AdapterError as e:
        print(f"generate failed: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json_dumps(results, indent=2))
    else:
        print(format_text(results))
    return 0
