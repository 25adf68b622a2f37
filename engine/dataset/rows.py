"""The rows a run trains and evaluates on: the data (data.train and data.eval, or the mixture of
data.sources) read and checked (bad rows skipped, with warnings), and the eval rows held out of
the train rows when no eval file is given. The trainer, ``eval`` and the inspector's step count
share this one split."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.dataset.data import DataError, Dataset, load, resolve


def split_eval(cfg, train_rows, eval_rows):
    """Hold out ``data.eval_fraction`` of train rows (seeded) when no eval file is given."""
    if eval_rows is not None or cfg.data.eval_fraction <= 0 or len(train_rows) < 10:
        return train_rows, eval_rows
    import random
    idx = list(range(len(train_rows)))
    random.Random(cfg.train.seed).shuffle(idx)
    n = max(1, int(round(len(idx) * cfg.data.eval_fraction)))
    held = set(idx[:n])
    return ([r for i, r in enumerate(train_rows) if i not in held],
            [r for i, r in enumerate(train_rows) if i in held])


@dataclass
class Rows:
    """The rows a run trains and evaluates on (bad ones skipped, with warnings), eval split off."""
    train: list[dict]
    eval: list[dict] | None
    format: str
    warnings: list[str] = field(default_factory=list)


def read_rows(cfg) -> Rows:
    train_ds, eval_ds = load_for_training(cfg)
    warnings = [f"{resolve(train_ds.path).name}:{p.line}: {p.message} (row skipped)"
                for p in (train_ds.problems + (eval_ds.problems if eval_ds else []))[:5]]
    if len(train_ds.problems) > 5:
        warnings.append(f"... {len(train_ds.problems)} problems in all; run `qlora-tui inspect` for the full list")
    train, ev = split_eval(cfg, [r.data for r in train_ds.rows], [r.data for r in eval_ds.rows] if eval_ds else None)
    return Rows(train, ev, train_ds.format, warnings)


def load_for_training(cfg) -> tuple[Dataset, Dataset | None]:
    """Train (and eval) datasets for a config; raises DataError when training cannot proceed.
    With ``data.sources`` the mixture (``engine.dataset.sources.load_mixture``) replaces data.train."""
    from engine.dataset import preference
    if getattr(cfg.data, "sources", None):
        from engine.dataset import sources
        train, ev, _ = sources.load_mixture(cfg)
        preference.check_method(cfg, train.format, "data.sources", "data.sources")
        _require_usable(train, cfg, "data.sources")
        return train, ev
    train = load(cfg.resolve_path(cfg.data.train), cfg.data.format)
    preference.check_method(cfg, train.format, resolve(train.path), "data.train")
    _require_usable(train, cfg, "data.train")
    ev = None
    if cfg.data.eval:
        ev = load(cfg.resolve_path(cfg.data.eval), cfg.data.format)
        preference.check_method(cfg, ev.format, resolve(ev.path), "data.eval")
        _require_usable(ev, cfg, "data.eval")
    return train, ev


def _require_usable(ds: Dataset, cfg, key: str) -> None:
    where = ds.path if ds.path.startswith("mixture") else resolve(ds.path)
    if ds.raw_count == 0:
        raise DataError(f"{where}: the file has no rows ({key}); add training examples")
    if not ds.rows:
        first = ds.problems[0] if ds.problems else None
        raise DataError(f"{where}: none of {ds.raw_count} rows is usable"
                        + (f"; first problem at line {first.line}: {first.message}" if first else ""))
    if cfg.data.strict and ds.problems:
        p = ds.problems[0]
        raise DataError(f"{where}:{p.line}: {p.message} ({len(ds.problems)} problem{'' if len(ds.problems) == 1 else 's'}; data.strict = true "
                        "refuses to train; fix them or set data.strict = false to skip bad rows)")
