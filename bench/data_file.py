"""What the inspector benchmarks share: the ``--rows N`` / ``--keep DIR`` command line, the
generated data file's place (a temporary directory unless kept), and the closing lines (the
command that reproduces the figure, then removing the file).

    args, path = data_file.start(__doc__, 100_000, "chatml")
    ...
    return data_file.finish("bench/inspect_100k.py", args, 100_000, path)
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def start(doc: str, default_rows: int, stem: str, argv=None):
    """(parsed arguments, the data file's path) for a benchmark whose docstring is ``doc``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rows", type=int, default=default_rows)
    ap.add_argument("--keep", default=None, help="write the data file here and keep it")
    args = ap.parse_args(argv)
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix=f"{stem}-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    return args, tmp / f"{stem}_{args.rows}.jsonl"


def finish(script: str, args, default_rows: int, path: Path) -> int:
    """Print the reproducing command; remove the generated file (and its directory) unless kept."""
    print(f"command: python {script}" + (f" --rows {args.rows}" if args.rows != default_rows else ""))
    if not args.keep:
        path.unlink(missing_ok=True)
        path.parent.rmdir()
    return 0
