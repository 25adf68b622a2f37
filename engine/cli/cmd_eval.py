"""Command: ``eval`` (engine/outputs/evaluate.py: base vs fine-tuned on held-out rows)."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "eval", help="did the fine-tune help? loss, perplexity and answers, base vs fine-tuned",
        description="Score the base and the fine-tuned model on held-out rows: loss and perplexity on "
                    "the answer tokens, and exact match / contains-answer on rows that end in an answer. "
                    "Default rows: the run's data.eval file, else the split training held out.")
    p.add_argument("src", metavar="RUN_DIR", help="a run directory (or an adapter directory with --data)")
    p.add_argument("--data", default=None, metavar="FILE", help="held-out rows (.jsonl/.json/.csv/.parquet)")
    p.add_argument("--max-rows", type=int, default=200, metavar="N", help="rows scored for loss (default 200)")
    p.add_argument("--answer-rows", type=int, default=32, metavar="N",
                   help="rows both models answer for exact match / contains (default 32; 0 = none)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="answer length cap (default 64)")
    p.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="also run lm-evaluation-harness tasks when lm-eval is installed: comma-separated task "
                        "YAML files or folders (local tasks: their data files are on this machine) or names "
                        "of lm-eval's tasks (those download their data from the Hub: they need the network)")
    p.add_argument("--lm-eval-limit", type=int, default=None, metavar="N", help="examples per lm-eval task")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from engine.core.safe_text import json_dumps, visible
    from engine.outputs.evaluate import evaluate
    from engine.artifacts import AdapterError
    if args.max_rows < 1 or args.answer_rows < 0 or args.max_new_tokens < 1:
        print("eval failed: --max-rows and --max-new-tokens must be at least 1, --answer-rows at least 0",
              file=sys.stderr)
        return 2
    tasks = [t.strip() for t in (args.lm_eval or "").split(",") if t.strip()]
    try:
        report = evaluate(args.src, data=args.data, max_rows=args.max_rows, answer_rows=args.answer_rows,
                          max_new_tokens=args.max_new_tokens, lm_eval_tasks=tasks or None,
                          lm_eval_limit=args.lm_eval_limit,
                          on_progress=None if args.json else lambda f, m: print(visible(m), file=sys.stderr, flush=True))
    except AdapterError as e:
        print(f"eval failed: {visible(str(e))}", file=sys.stderr)
        return 1
    if args.json:
        print(json_dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(visible(line) for line in report.table()))
    return 0
