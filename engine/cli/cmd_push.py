"""Command: ``push`` (engine/outputs/modelcard.py writes the card and uploads)."""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    from engine.outputs.modelcard import WHAT
    p = subparsers.add_parser("push", help="upload the adapter, merged model or GGUF to the Hugging Face Hub",
                              description="Upload through huggingface_hub with the token from HF_TOKEN or "
                                          "`hf auth login`; a model card (README.md) is written first if the "
                                          "folder has none.")
    p.add_argument("src", metavar="RUN_DIR", help="a run directory (or an adapter directory)")
    p.add_argument("repo_id", metavar="REPO_ID", help="USER/NAME on the Hub (created if missing)")
    p.add_argument("--what", choices=list(WHAT), default="adapter", help="what to upload (default adapter)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; upload nothing")
    p.set_defaults(func=cmd_push)


def cmd_push(args) -> int:
    from engine.core.safe_text import visible as printable
    from engine.artifacts import AdapterError
    from engine.outputs.modelcard import PushError, push
    try:
        plan = push(args.src, args.repo_id, what=args.what, private=args.private, dry_run=args.dry_run)
    except (PushError, AdapterError) as e:
        print(f"push failed: {printable(e)}", file=sys.stderr)
        return 1
    head = "would upload" if args.dry_run else "uploaded"
    print(printable(f"{head} {len(plan['files'])} files from {plan['folder']} to {plan['repo_id']}"
                    f"{' (private)' if plan['private'] else ''}"))
    for f in plan["files"]:
        print(printable(f"  {f}"))
    if plan["url"]:
        print(printable(plan["url"]))
    return 0
