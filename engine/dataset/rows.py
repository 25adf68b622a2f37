"""The rows a run trains and evaluates on: the data read and checked (bad rows skipped, with
warnings) and the eval rows held out of the train rows when no eval file is given. The trainer,
``eval`` and the inspector's step count share this one split."""
from __future__ import annotations

from dataclasses import dataclass, field

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
    from engine.dataset import data as data_mod
    train_ds, eval_ds = data_mod.load_for_training(cfg)
    warnings = [f"{data_mod.resolve(train_ds.path).name}:{p.line}: {p.message} (row skipped)"
                for p in (train_ds.problems + (eval_ds.problems if eval_ds else []))[:5]]
    if len(train_ds.problems) > 5:
        warnings.append(f"... {len(train_ds.problems)} problems in all; run `qlora-tui inspect` for the full list")
    train, ev = split_eval(cfg, [r.data for r in train_ds.rows], [r.data for r in eval_ds.rows] if eval_ds else None)
    return Rows(train, ev, train_ds.format, warnings)


