"""The headless command line: every `qlora-tui` subcommand except the TUI itself.

Each command lives in its own module here (``cmd_*.py``), which exposes ``register(subparsers)``
and sets ``func`` on its parser; ``func(args) -> int`` is the exit status. The argument wiring
lives only here: the library modules (engine/dataset, engine/planning, engine/outputs) expose
plain functions with typed arguments. Modules import torch and transformers only inside
their functions, so ``qlora-tui --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# module that registers each command group, in help order
COMMAND_MODULES = [
    "engine.cli.cmd_train",     # train, init, runs, stop, save
    "engine.cli.cmd_inspect",   # inspect
    "engine.cli.cmd_estimate",  # estimate
    "engine.cli.cmd_merge",     # merge
    "engine.cli.cmd_export",    # export (GGUF)
    "engine.cli.cmd_push",      # push
    "engine.cli.cmd_generate",  # generate
    "engine.cli.cmd_eval",      # eval
    "engine.cli.cmd_serve",     # serve-cmd
    "engine.cli.cmd_axolotl",   # import-axolotl
]


def add_config_args(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    """The CONFIG positional and repeated ``--set section.key=value`` every command takes."""
    if config_required:
        p.add_argument("config", metavar="CONFIG", help="TOML config file")
    else:
        p.add_argument("config", metavar="CONFIG", nargs="?", default=None,
                       help="TOML config file (default: the defaults `qlora-tui init` writes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.learning_rate=1e-4 (repeatable)")


def load_config_or_exit(args):
    """Load CONFIG + --set; on problems print them all (one per line) and exit 2."""
    from engine.core import config as config_mod
    try:
        return config_mod.load(args.config, getattr(args, "overrides", []))
    except config_mod.ConfigError as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(2)


# the TUI forms first: `qlora-tui` alone is the app, so the usage line must say so
USAGE = ("qlora-tui [CONFIG.toml] [--set KEY=VALUE ...]   the TUI (no CONFIG: the offline demo)\n"
         "       qlora-tui attach [RUN_DIR]                      the TUI on a live run\n"
         "       qlora-tui COMMAND ...                           see `qlora-tui COMMAND --help`")


def build_parser(extra_tui_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-tui", usage=USAGE,
        description="Fine-tune LLMs with QLoRA from the terminal. Without a command: open the TUI "
                    "(on CONFIG, or on the offline demo).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", prog="qlora-tui")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for p in sub.choices.values():
        p.add_argument("--verbose", action="store_true",
                       help="also show the libraries' warnings, logging and progress bars")
    if extra_tui_help:
        sub.add_parser("tui", help="open the TUI (the default): qlora-tui [CONFIG]")
        sub.add_parser("attach", help="open the TUI on a live run: qlora-tui attach [RUN_DIR]")
    return parser


def _refuse_empty(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An empty or whitespace-only value where a path, name or value is expected (``--resume ""``,
    an unset ``$RUN``) is refused, never taken as the current folder or a default: every string
    argument of the command that was given, positional or option."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    cmd = sub.choices.get(getattr(args, "command", None)) if sub else None
    for action in (cmd._actions if cmd else []):
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, list) else [value]
        if action.dest == "overrides":
            continue                   # --set KEY=VALUE: checked by the config (KEY= is a value)
        if any(isinstance(v, str) and not v.strip() for v in values):
            name = action.option_strings[-1] if action.option_strings else action.metavar or action.dest
            print(f"qlora-tui {args.command}: {name}: an empty value; give a path or name (an unset "
                  "shell variable?)", file=sys.stderr)
            raise SystemExit(2)


def quiet_broken_pipe() -> int:
    """The reader of our output went away (``| head``, ``| grep -q``): stop quietly. Further
    writes (and the interpreter's final flush) go to /dev/null; the status is 141 (128 +
    SIGPIPE), what a shell reports for a command ended by a closed pipe."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):
        pass
    return 141


def pipe_safe(fn, *args) -> int:
    """``fn(*args)`` with its output flushed before it returns (help text and short listings sit
    in the buffer until then): a closed pipe at any point ends it quietly (``quiet_broken_pipe``)."""
    try:
        try:
            return fn(*args)
        finally:
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        return quiet_broken_pipe()


def main(argv: list[str] | None = None) -> int:
    return pipe_safe(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _refuse_empty(parser, args)
    from engine.core import quiet
    quiet.apply(getattr(args, "verbose", False))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from engine.core import safe_text
    undo = safe_text.install()      # nothing a command prints reaches the terminal raw
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        undo()


if __name__ == "__main__":
    raise SystemExit(main())
