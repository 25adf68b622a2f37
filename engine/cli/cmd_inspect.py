"""Command: ``inspect`` (engine/dataset/inspect.py builds the report and its text forms)."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from engine.core.safe_text import json_dumps, write_trusted


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="report on a dataset: format, problems by line, token statistics, "
                        "label-mask preview, duplicates, PII",
        description="Inspect a dataset with the model's tokenizer and chat template. Exit status: "
                    "0, or 1 with --strict when there are problems, 2 when the file or config is unusable.")
    p.add_argument("data", metavar="DATA", nargs="?", default=None,
                   help="data file or datasets directory (default: data.train of the config)")
    p.add_argument("--config", default=None, metavar="CONFIG", help="TOML config (model, max_length, batch settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.format=alpaca (repeatable)")
    p.add_argument("--model", default=None, metavar="M", help="model whose tokenizer and chat template to use")
    p.add_argument("--max-length", type=int, default=None, metavar="N", help="tokens per example (data.max_length)")
    p.add_argument("--json", action="store_true", help="print the whole report as one JSON document")
    p.add_argument("--show", type=int, default=None, metavar="N",
                   help="print usable row N (1-based) with its trained tokens marked ⟦…⟧")
    p.add_argument("--show-line", type=int, default=None, metavar="L",
                   help="like --show, for the row on physical line L of the file")
    p.add_argument("--strict", action="store_true", help="exit 1 when the report lists any problem")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colour the preview's trained tokens (auto: when stdout is a terminal)")
    p.set_defaults(func=cmd_inspect)


def _config(args):
    """The config with DATA, --model and --max-length applied; None after printing why not."""
    from engine.core import config as config_mod
    overrides = list(args.overrides)
    if args.max_length is not None:
        overrides.append(f"data.max_length={args.max_length}")
    try:
        cfg = config_mod.load(args.config, overrides)
    except config_mod.ConfigError as e:
        print(str(e), file=sys.stderr)
        return None
    if args.data:          # relative to the working directory, not to the config file
        cfg.data.train = args.data if args.data.startswith(("builtin:", "hf:")) else \
            str(Path(args.data).expanduser().absolute())
    if args.model:
        cfg.model.name = args.model if args.model.startswith("builtin:") or "/" not in args.model \
            or not Path(args.model).expanduser().exists() else str(Path(args.model).expanduser().absolute())
    return cfg


@contextmanager
def _tokenizers_parallel():
    """This command is one short-lived process that starts no child and forks no DataLoader,
    so it may let the tokenizer use every core even where the environment turned that off
    (TOKENIZERS_PARALLELISM=false, often set just to silence the fork warning). It is set
    for this call only and restored after, in case a caller runs the CLI in-process."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def cmd_inspect(args) -> int:
    from engine.dataset import data as data_mod
    from engine.dataset import inspect as inspect_mod
    from engine.models.source import ModelError
    cfg = _config(args)
    if cfg is None:
        return 2
    try:
        if args.show is not None or args.show_line is not None:
            return _show(cfg, args)
        stderr_tty = sys.stderr.isatty() and not args.json

        def progress(r) -> None:
            write_trusted(sys.stderr, f"\r{r.phase}: {r.rows_read} rows read, {r.rows_tokenized} "
                                      f"tokenised ({r.progress:.0%})")
            sys.stderr.flush()
        with _tokenizers_parallel():
            rep = inspect_mod.inspect(cfg, on_partial=progress if stderr_tty else None)
        if stderr_tty:
            write_trusted(sys.stderr, "\r\033[K")
            sys.stderr.flush()
    except (data_mod.DataError, ModelError) as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.json:
        print(json_dumps(rep.to_dict(), indent=1))
    else:
        print(inspect_mod.format_report(rep))
    if args.strict and rep.n_problems:
        from engine.core.config import plural
        print(f"inspect --strict: {plural(rep.n_problems, 'problem')} in the data (listed in the report); "
              "exit status 1", file=sys.stderr)
        return 1
    return 0


def _show(cfg, args) -> int:
    """--show N / --show-line L: one row rendered with its trained tokens marked."""
    from engine.dataset import inspect as inspect_mod
    try:
        idx = (args.show - 1) if args.show is not None else inspect_mod.row_index_for_line(cfg, args.show_line)
        pv = inspect_mod.preview(cfg, idx)
    except (IndexError, ValueError) as e:
        print(str(e), file=sys.stderr)
        return 2
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty()
                                        and not os.environ.get("NO_COLOR"))
    if args.json:
        print(json_dumps(pv.to_dict(), indent=1))
    else:
        write_trusted(sys.stdout, inspect_mod.format_preview(pv, cfg.data.max_length, colour=colour) + "\n")
    return 0
