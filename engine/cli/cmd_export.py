"""Command: ``export`` (engine/outputs/targets/: one file per target; the GGUF ones write and
verify through engine/outputs/export.py)."""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    from engine.outputs import targets
    every = targets.all_targets()
    p: argparse.ArgumentParser = subparsers.add_parser(
        "export", help="a run as one GGUF file for llama.cpp / Ollama (verified), with a Modelfile; "
                       "or another export target (--target)",
        description="Turn a run's output into a file others load. Targets: "
                    + "; ".join(f"{t.name}: {t.help}" for t in every) + ".")
    p.add_argument("src", metavar="RUN_DIR|ADAPTER_DIR", help="a run directory or an adapter directory")
    p.add_argument("--target", "-t", choices=targets.names(), default=None,
                   help=f"what to export (default {targets.DEFAULT}): "
                        + ", ".join(f"{t.name} = {t.label}" for t in every))
    seen: dict[str, list] = {}
    for t in every:                     # each target's options, as flags (one flag per option name)
        for o in t.options:
            seen.setdefault(o.name, []).append((t, o))
    for name, pairs in seen.items():
        first = pairs[0][1]
        values = list(dict.fromkeys(v for _, o in pairs for v, _ in o.choices))
        defaults = ", ".join(f"{o.default} for {t.name}" for t, o in pairs)
        p.add_argument(f"--{name}", default=None, metavar=first.label.upper().replace(" ", "_"),
                       help=f"{first.label}: {', '.join(values)} (default {defaults})"
                            + (f"; {first.help}" if first.help else ""))
    p.add_argument("--adapter-gguf", action="store_true",
                   help="write the LoRA adapter alone as a GGUF adapter (= --target gguf-adapter)")
    p.add_argument("--out", "-o", default=None, metavar="FILE|DIR",
                   help="the file or a directory for it (default: RUN_DIR/export/)")
    p.add_argument("--name", default=None, help="model name (file name, Ollama name; default: the run's)")
    p.add_argument("--base", default=None, metavar="BASE", help="base model instead of the adapter's")
    p.add_argument("--force", action="store_true", help="overwrite an existing .gguf file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export)


class ExportPrinter:
    """The export's events as lines, like a run's (``train --headless``): progress on stdout
    (stderr with --json, where stdout holds the JSON alone), the failure on stderr."""

    def __init__(self, out, err):
        self.out, self.err = out, err

    def __call__(self, ev) -> None:
        from engine.core import events
        from engine.core.safe_text import visible as clean    # the one sanitiser of untrusted text
        match ev:
            case events.ExportStarted():
                opts = " ".join(f"{k}={v}" for k, v in ev.options.items())
                print(f"export {ev.target}{' ' + opts if opts else ''}: {clean(ev.src)}", file=self.out, flush=True)
            case events.ExportProgress():
                pct = 100 * ev.done / ev.total if ev.total else 0
                print(f"[{pct:3.0f}% {ev.stage}] {clean(ev.message)}", file=self.out, flush=True)
            case events.ExportFailed():
                print(clean(ev.error), file=self.err, flush=True)


def cmd_export(args) -> int:
    from engine.core.safe_text import visible as clean
    from engine.outputs import targets
    if args.adapter_gguf and args.target not in (None, "gguf-adapter"):
        print(f"export failed: --adapter-gguf is --target gguf-adapter, not {args.target}", file=sys.stderr)
        return 1
    name = "gguf-adapter" if args.adapter_gguf else (args.target or targets.DEFAULT)
    target = targets.get(name)
    given = {o.name: getattr(args, o.name, None) for o in target.options}
    others = sorted({o.name for t in targets.all_targets() for o in t.options} - set(given))
    others = [n for n in others if getattr(args, n, None) is not None]
    if others:
        print(f"export failed: --{others[0]} is not an option of --target {name}; it takes "
              f"{', '.join('--' + o.name for o in target.options) or 'none'}", file=sys.stderr)
        return 1
    printer = ExportPrinter(sys.stderr if args.json else sys.stdout, sys.stderr)
    report = targets.run_target(name, args.src, given, printer, out=args.out, base=args.base,
                                name=args.name, force=args.force)
    if report is None:
        return 1
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "lines"}, indent=2))
    else:
        print("\n".join(clean(line) for line in report.get("lines", [])))
    return 0
