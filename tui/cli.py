"""`qlora-tui`: the TUI (no argument, a CONFIG.toml, or `attach [RUN_DIR]`); else the headless CLI.

Textual is imported only on the TUI branches, so headless commands start fast.
"""
from __future__ import annotations

import sys
from pathlib import Path

USAGE_TUI = "usage: qlora-tui [CONFIG.toml] [--set KEY=VALUE ...] | qlora-tui attach [RUN_DIR]"
HELP_TUI = (USAGE_TUI + "\n\nOpen the TUI on CONFIG.toml (no CONFIG: the offline demo, builtin:tiny on the "
            "bundled sample).\n\n  --set KEY=VALUE  override a config key, e.g. --set "
            "train.learning_rate=1e-4 (repeatable)\n  -h, --help       this help\n\n"
            "In the app: ctrl+p lists every action; F2-F5 switch screens; ctrl+q quits.\n"
            "Headless commands: qlora-tui --help")


def _split_sets(args: list[str]) -> tuple[list[str], list[str]] | None:
    """Positional args and --set overrides, or None if anything else is there."""
    pos, sets, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a == "--set" and i + 1 < len(args):
            sets.append(args[i + 1])
            i += 2
            continue
        if a.startswith("--set="):
            sets.append(a[len("--set="):])
        elif a.startswith("-"):
            return None
        else:
            pos.append(a)
        i += 1
    return pos, sets


def _is_tui_call(argv: list[str]) -> bool:
    if not argv:
        return True
    if argv[0] == "tui":
        return True
    split = _split_sets(argv)
    if split is None:
        return False
    pos, _ = split
    return not pos or (len(pos) == 1 and pos[0].endswith(".toml"))


def _run_app(app) -> int:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        # without a terminal the app would spin on input it never gets (a script, a pipe)
        print("qlora-tui: the TUI needs a terminal (stdin and stdout are not one); from a script use "
              "`qlora-tui runs`, `qlora-tui train CONFIG --headless` or `--detach`", file=sys.stderr)
        return 2
    from engine.core import quiet
    quiet.apply()          # a library's warning or progress bar would draw over the screen
    from tui import images
    images.detect()        # Kitty/Sixel/half-blocks: asks the terminal now, while stdin is ours
    app.run()
    if app.exit_note:
        from engine.core.safe_text import visible
        print(visible(app.exit_note))
    return int(app.return_code or 0)


def main(argv: list[str] | None = None) -> int:
    from engine.cli import pipe_safe
    return pipe_safe(_main, argv)           # `qlora-tui runs | head`: quiet, like the engine's CLI


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "attach":
        return attach(argv[1:])
    if argv and argv[0] == "tui":
        if any(a in ("-h", "--help") for a in argv[1:]):
            print(HELP_TUI)
            return 0
        if _split_sets(argv[1:]) is None:
            print(f"{USAGE_TUI}\nqlora-tui tui: unknown option (see qlora-tui tui --help)",
                  file=sys.stderr)
            return 2
    if not _is_tui_call(argv):
        from engine import cli
        return cli.main(argv)
    if argv and argv[0] == "tui":
        argv = argv[1:]
    pos, sets = _split_sets(argv) or ([], [])
    from engine.core import config
    try:
        if pos:
            cfg = config.load(pos[0], sets)
        else:
            from engine.models.builtin import demo_config
            cfg = demo_config(sets)
    except config.ConfigError as e:
        from engine.core.safe_text import visible
        print(visible(e), file=sys.stderr)
        return 2
    from tui.app import QloraApp
    return _run_app(QloraApp(cfg, pos[0] if pos else None))


def attach(args: list[str]) -> int:
    from engine.core import config
    from engine.core import rundir
    if args and args[0] in ("-h", "--help"):
        print("usage: qlora-tui attach [RUN_DIR]\n\nOpen the TUI on a run (default: the newest live "
              "run under ./runs): its history, then live updates. ctrl+x stops it; quitting never does.")
        return 0
    if args and not args[0].strip():
        print("qlora-tui attach: an empty RUN_DIR; give a run directory (an unset shell variable?)",
              file=sys.stderr)
        return 2
    if args:
        run_dir = Path(args[0])
        if not (run_dir / rundir.EVENTS).exists() and not (run_dir / rundir.RUN_JSON).exists():
            from engine.core.safe_text import visible
            print(visible(f"{run_dir}: not a run directory (no {rundir.EVENTS})"), file=sys.stderr)
            return 2
        cfg = None
        if (run_dir / rundir.CONFIG).exists():
            try:
                cfg = config.load(run_dir / rundir.CONFIG)
            except config.ConfigError:
                cfg = None
    else:
        from engine.models.builtin import demo_config
        cfg = demo_config()            # "no config given": the same demo as plain `qlora-tui`
        run_dir = rundir.newest_live(cfg.resolve_path(cfg.output.dir))
        if run_dir is None:
            print(f"no live run under {cfg.output.dir}/; list them with `qlora-tui runs`",
                  file=sys.stderr)
            return 1
    from tui.app import QloraApp
    return _run_app(QloraApp(cfg, None, attach=run_dir))
