"""Command: ``import-axolotl`` (engine/outputs/axolotl.py converts the YAML)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "import-axolotl", help="convert an Axolotl QLoRA YAML into a qlora-tui TOML config",
        description="Map an Axolotl config onto qlora-tui's config; keys that cannot be mapped "
                    "are listed in the TOML's header comment.")
    p.add_argument("config", metavar="CONFIG.yml", help="Axolotl YAML config")
    p.add_argument("-o", "--out", default=None, metavar="OUT.toml", help="write here (default: print)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.toml if it exists")
    p.set_defaults(func=cmd_import)


def cmd_import(args) -> int:
    from engine.outputs.axolotl import AxolotlError, convert, to_toml_text
    try:
        cfg, unmapped, notes = convert(Path(args.config))
    except AxolotlError as e:
        print(f"import-axolotl failed: {e}", file=sys.stderr)
        return 1
    text = to_toml_text(cfg, unmapped, notes, source=str(args.config))
    if not args.out:
        print(text, end="")
        return 0
    out = Path(args.out).expanduser()
    why = _refuse_out(out, Path(args.config), args.force)
    if why:
        print(f"import-axolotl failed: {why}", file=sys.stderr)
        return 1
    from engine.core import files
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(out, text)            # a temporary file of our own, renamed in
    except OSError as e:
        print(f"import-axolotl failed: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {out}" + (f" ({len(unmapped)} unmapped key(s): {', '.join(unmapped)})" if unmapped
                            else " (every key mapped)"))
    return 0


def _refuse_out(out: Path, config: Path, force: bool) -> str:
    """Why -o OUT cannot be written ('' when it can): a directory, the input itself, an existing file."""
    if out.is_symlink():
        return f"-o {out} is a symlink; give a new file name (nothing is written through a link)"
    if out.is_dir():
        return f"{out} is a directory; give a file name, e.g. -o {out / 'qlora.toml'}"
    if out.exists() and out.resolve() == config.expanduser().resolve():
        return (f"-o {out} is the Axolotl config itself; choose another file "
                "(e.g. the same name with .toml)")
    if out.exists() and not force:
        return f"{out} already exists; pass --force to overwrite or choose another -o"
    return ""
