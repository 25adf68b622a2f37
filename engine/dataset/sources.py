"""Mixtures of several sources (``[[data.sources]]``), each read like data.train (a file, a
``dataset_info.json#NAME`` or a ``hf:org/name`` spec, ``engine.dataset.specs``).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from engine.dataset.specs import HUB, INFO

# ---------------------------------------------------------------------------- mixtures

SOURCE_KEYS = ("path", "format", "split", "subset", "dataset", "weight", "rows", "eval")
PROBLEMS_LISTED = 1000     # problems listed per source (``problems`` counts them all)


@dataclass
class SourceShare:
    """One source of a mixture, as the Dataset screen and ``estimate`` show it."""
    name: str
    path: str
    format: str = ""
    usable: int = 0                  # usable rows of the source
    train: int = 0                   # rows it gives the training mix
    eval: int = 0                    # rows it gives the eval split
    problems: int = 0
    first_problem: str = ""
    notes: list = field(default_factory=list)
    problem_list: list = field(default_factory=list)     # its first PROBLEMS_LISTED DataProblems, by line

    def share(self, total: int) -> float:
        return self.train / total if total else 0.0


def source_spec(cfg, src: dict) -> str:
    """A source's path as ``iter_raw`` reads it (relative to the config, with its dataset name
    or hub subset/split folded in)."""
    path = str(src["path"])
    if path.startswith(HUB):
        if src.get("subset") and "@" not in path:
            path += "@" + src["subset"]
        if src.get("split") and ":" not in path[len(HUB):]:
            path += ":" + src["split"]
        return path
    path = cfg.resolve_path(path)
    if src.get("dataset"):
        path = f"{path}#{src['dataset']}" if Path(path).name == INFO else \
            f"{Path(path) / INFO}#{src['dataset']}"
    return path


def load_mixture(cfg):
    """(train Dataset, eval Dataset or None, [SourceShare]) for ``data.sources``.

    Each source is read with its own format; its eval rows are held out first (its ``eval`` file,
    else ``data.eval_fraction`` of its rows, seeded), then its training rows are taken: ``rows = N``
    draws N (repeating rows when N is more than it has), ``weight = w`` counts each row w times
    (0.5: a random half, 2: each twice). ``data.mix`` = concat keeps sources in order; interleave
    alternates them in proportion to their shares."""
    from engine.dataset import data as data_mod
    rng = random.Random(cfg.train.seed)
    shares, per_source, evals, problems = [], [], [], []
    fmt_seen: dict = {}
    for k, src in enumerate(cfg.data.sources):
        spec = source_spec(cfg, src)
        name = f"source {k + 1} ({Path(str(src['path'])).name if not str(src['path']).startswith(HUB) else src['path']})"
        ds = data_mod.load(spec, src.get("format", "auto"))
        fmt_seen[ds.format] = fmt_seen.get(ds.format, 0) + len(ds.rows)
        sh = SourceShare(name=name, path=spec, format=ds.format, usable=len(ds.rows), problems=len(ds.problems))
        if ds.problems:
            sh.first_problem = f"line {ds.problems[0].line}: {ds.problems[0].message}"
            sh.problem_list = sorted(ds.problems, key=lambda p: p.line)[:PROBLEMS_LISTED]
        for p in ds.problems:
            problems.append(data_mod.DataProblem(p.line, p.kind, f"[{name}] {p.message}"))
        rows = list(ds.rows)
        ev_rows: list = []
        if src.get("eval"):
            ev = data_mod.load(source_spec(cfg, dict(src, path=src["eval"], dataset="")), src.get("format", "auto"))
            ev_rows = list(ev.rows)
        elif cfg.data.eval_fraction > 0 and len(rows) >= 10:
            idx = list(range(len(rows)))
            rng.shuffle(idx)
            n = max(1, int(round(len(idx) * cfg.data.eval_fraction)))
            held = set(idx[:n])
            ev_rows = [r for i, r in enumerate(rows) if i in held]
            rows = [r for i, r in enumerate(rows) if i not in held]
        if not rows:
            raise data_mod.DataError(f"data.sources[{k}] {spec}: no usable rows"
                                     + (f"; first problem {sh.first_problem}" if sh.first_problem else ""))
        want = src.get("rows")
        if want is None:
            want = int(round(len(rows) * float(src.get("weight", 1.0))))
        taken = []
        while len(taken) + len(rows) <= want:          # whole copies first
            taken += rows
        rest = want - len(taken)
        if rest:
            taken += rng.sample(rows, rest)
        if want > len(rows):
            sh.notes.append(f"{want} rows from {len(rows)}: rows repeat")
        sh.train, sh.eval = len(taken), len(ev_rows)
        shares.append(sh)
        per_source.append(taken)
        evals += ev_rows
    if getattr(cfg.data, "mix", "concat") == "interleave":
        train = _interleave(per_source, rng)
    else:
        train = [r for rows in per_source for r in rows]
    source_of = {id(r): k for k, rows in enumerate(per_source) for r in rows}
    fmt = max(fmt_seen, key=fmt_seen.get) if fmt_seen else "messages"
    label = f"mixture of {len(shares)} sources"
    tr = data_mod.Dataset(path=label, format=fmt, reason=", ".join(f"{s.name}: {s.format}" for s in shares),
                          rows=train, problems=problems, raw_count=sum(s.usable + s.problems for s in shares),
                          formats_seen=fmt_seen)
    tr.origins = [(source_of[id(r)], r.line) for r in train]     # each row's source and line there
    ev = data_mod.Dataset(path=label + " (eval)", format=fmt, reason="eval rows of each source", rows=evals,
                          raw_count=len(evals)) if evals else None
    return tr, ev, shares


def _interleave(per_source: list, rng: random.Random) -> list:
    """Rows of every source alternated in proportion to their counts (seeded): at each step a
    source is drawn with probability proportional to the rows it has left."""
    left = [len(r) for r in per_source]
    pos = [0] * len(per_source)
    out = []
    total = sum(left)
    for _ in range(total):
        x = rng.random() * sum(left)
        k = 0
        while x >= left[k]:
            x -= left[k]
            k += 1
        out.append(per_source[k][pos[k]])
        pos[k] += 1
        left[k] -= 1
    return out


def describe(shares: list) -> list[str]:
    """One line per source: its share of the training mix, eval rows and problems."""
    total = sum(s.train for s in shares)
    out = []
    for s in shares:
        line = (f"{s.name}: {s.format}, {s.train:,} training rows ({s.share(total):.0%}), {s.eval:,} eval, "
                f"{s.problems:,} problem{'s' if s.problems != 1 else ''}")
        if s.first_problem:
            line += f" (first: {s.first_problem})"
        for n in s.notes:
            line += f"; {n}"
        out.append(line)
    return out


_MIX_FILES: dict = {}


def mixture_file(cfg) -> tuple[str, list]:
    """The mixture's training rows written once (per sources, their files' sizes and times, seed
    and eval share) as a JSONL of normalised rows, for the inspector and the Dataset screen to
    read like any file; with the per-source shares. Rows keep every field the trainer reads
    (tools, tool calls, weights), so they read back as the same rows."""
    import hashlib
    import tempfile
    from engine.dataset import data as data_mod
    stamp = []
    for src in cfg.data.sources:
        spec = source_spec(cfg, src)
        p = data_mod.resolve(spec.split("#")[0]) if not spec.startswith(HUB) else None
        try:
            st = p.stat() if p is not None else None
        except OSError:
            st = None
        stamp.append([spec, src.get("format"), src.get("weight"), src.get("rows"), src.get("eval"),
                      st.st_mtime_ns if st else None, st.st_size if st else None])
    key = hashlib.sha256(json.dumps([stamp, cfg.train.seed, cfg.data.eval_fraction, cfg.data.mix],
                                    default=str).encode()).hexdigest()[:16]
    if key in _MIX_FILES and Path(_MIX_FILES[key][0]).exists():
        return _MIX_FILES[key]
    train, _, shares = load_mixture(cfg)
    out = Path(tempfile.gettempdir()) / f"qlora-tui-mixture-{os.getuid()}-{key}.jsonl"
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in train.rows:
            fh.write(json.dumps(r.data, ensure_ascii=False) + "\n")
    tmp.replace(out)
    import atexit
    atexit.register(lambda: out.unlink(missing_ok=True))     # this process's copy only
    for old_path, _ in _MIX_FILES.values():
        Path(old_path).unlink(missing_ok=True)
    _MIX_FILES.clear()
    _MIX_FILES[key] = (str(out), shares)
    _ORIGINS.clear()
    _ORIGINS[str(out)] = ([s.name for s in shares], train.origins)
    return _MIX_FILES[key]


_ORIGINS: dict = {}


def origin(path: str, line: int) -> str | None:
    """Where line ``line`` of a mixture's file (``mixture_file``) comes from: "source 2
    (b.jsonl) line 17"; None for any other file."""
    got = _ORIGINS.get(str(path))
    if got is None or not 1 <= line <= len(got[1]):
        return None
    k, src_line = got[1][line - 1]
    return f"{got[0][k]} line {src_line}"
