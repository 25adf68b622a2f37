"""The dataset inspector: format, problems by line, token statistics with the model's own
tokenizer and chat template, the label-mask preview, duplicates, outliers and PII.

``inspect(cfg)`` streams: it reads, normalises and tokenises the file in batches and hands
partial ``Report``s (``done=False``) to ``on_partial`` so a UI can show rows read and a
running histogram at once. ``preview(cfg, i)`` renders one row exactly as the trainer trains
it: both go through ``engine.modalities.text.encode_batch`` (the statistics use faster equivalents from
``engine.dataset.token_count``, checked against it on every batch and replaced by it wherever they
disagree).

The JSON form (``Report.to_dict``, ``qlora-tui inspect --json``) is documented key by key in
docs/INSPECT.md.
"""
from __future__ import annotations

import gc
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from engine.dataset import data as data_mod
from engine.dataset import preference
from engine.dataset import quality
from engine.core.safe_text import describe_controls, has_controls, visible
from engine.dataset.counting import Counting
from engine.dataset.token_count import Counter

SCHEMA_VERSION = 1
BATCH = 2000              # rows tokenised per batch
PARTIAL_EVERY = 0.3       # seconds between on_partial calls (at least)
PARTIAL_SHARE_INV = 10    # ... and at least 10x the time the last one took (reports ≤ ~1/10 of the time)
PARTIAL_MAX_GAP = 3.0     # ... but never more than this apart (the Dataset screen's progress)
MAX_LISTED = 1000         # outliers / PII findings listed (counts are always complete)
MAX_GROUPS = 100_000      # duplicate / near-duplicate groups listed (duplicates_total counts them all)
MAX_PROBLEMS = 10_000     # problems listed, the first by line (problem_counts counts them all)
MAX_FIELDS = data_mod.FIELDS_MAX   # distinct top-level field names counted (fields_seen shows the 30 most common)
SPLIT_EXACT_MAX = 1_000_000   # rows up to which the eval hold-out is drawn as the trainer draws it


@dataclass
class Report:
    path: str = ""
    format: str = ""
    format_reason: str = ""
    formats_seen: dict = field(default_factory=dict)
    fields_seen: dict = field(default_factory=dict)
    rows: int = 0                      # usable rows (normalised without a problem)
    rows_read: int = 0                 # records read so far (valid JSON or not)
    raw_count: int = 0                 # records in the file (known when reading is done)
    splits: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)        # engine.dataset.data.DataProblem (the first MAX_PROBLEMS)
    problems_total: int | None = None                   # all problems (None: len(problems))
    problem_counts: dict | None = None                  # per kind, all problems (None: from problems)
    rows_with_problems: int | None = None               # distinct lines (None: from problems)
    model: str = ""
    max_length: int = 0
    rows_tokenized: int = 0
    stats: dict = field(default_factory=dict)           # min, median, p95, max, mean
    histogram: list = field(default_factory=list)       # [(lo, hi, count)], lo <= n < hi
    truncated_rows: int = 0
    truncated_share: float = 0.0
    trained_tokens_total: int = 0
    tokens_within_max_total: int = 0   # Σ min(tokens, max_length): what the forward processes
    trained_tokens_median: float = 0.0
    trained_tokens_untruncated: int = 0
    zero_trained_rows: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    steps_basis: str = ""
    duplicates: list = field(default_factory=list)      # [[line, line, ...]] (the first MAX_GROUPS)
    near_duplicates: list = field(default_factory=list)
    duplicates_total: int = 0
    near_duplicates_total: int = 0
    duplicate_rows: int = 0                             # rows repeating an earlier one (all groups)
    near_duplicate_rows: int = 0
    outliers: list = field(default_factory=list)        # [(line, "short"|"long", tokens)]
    outliers_total: int = 0
    pii: list = field(default_factory=list)             # engine.dataset.quality.PiiFinding
    pii_total: int = 0
    pii_counts: dict | None = None                      # per kind, all findings (None: from pii)
    warnings: list = field(default_factory=list)
    images: dict = field(default_factory=dict)   # image rows: count, visual tokens, bad images
    sources: list = field(default_factory=list)  # a mixture: per source name, format, rows, share, problems
    # preference data: tokens per side (prompt with its template, chosen, rejected; KTO: completion)
    sides: dict = field(default_factory=dict)    # {side: {min, median, max}}
    labels: dict = field(default_factory=dict)   # KTO rows: {desirable: n, undesirable: m}
    over_max_length: list = field(default_factory=list)   # [(line, tokens of its longer side)] (first MAX_LISTED)
    over_max_length_total: int = 0
    phase: str = "read"                # read | tokenize | done | cancelled
    progress: float = 0.0              # 0..1 of the file
    elapsed_s: float = 0.0
    done: bool = False
    # per usable row, in order, for the first SPLIT_EXACT_MAX rows (not part of the JSON document)
    lines: list = field(default_factory=list, repr=False)

    @property
    def n_problems(self) -> int:
        return len(self.problems) if self.problems_total is None else self.problems_total

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "path": self.path,
            "done": self.done,
            "phase": self.phase,
            "format": {"name": self.format, "reason": self.format_reason,
                       "formats_seen": dict(self.formats_seen), "fields_seen": dict(self.fields_seen)},
            "rows": {"usable": self.rows, "read": self.rows_read, "raw": self.raw_count,
                     "with_problems": (len({p.line for p in self.problems if p.kind != "no_trained_tokens"})
                                       if self.rows_with_problems is None else self.rows_with_problems),
                     "splits": dict(self.splits)},
            "problems": [{"line": p.line, "kind": p.kind, "message": p.message} for p in self.problems],
            "problem_counts": dict(self.problem_counts) if self.problem_counts is not None
            else _count_kinds(self.problems),
            "tokens": {
                "model": self.model, "max_length": self.max_length, "rows": self.rows_tokenized,
                "stats": dict(self.stats),
                "histogram": [{"lo": lo, "hi": hi, "count": c} for lo, hi, c in self.histogram],
                "truncated_rows": self.truncated_rows, "truncated_share": self.truncated_share,
                "trained_tokens_total": self.trained_tokens_total,
                "tokens_within_max_total": self.tokens_within_max_total,
                "trained_tokens_median": self.trained_tokens_median,
                "trained_tokens_untruncated": self.trained_tokens_untruncated,
                "zero_trained_rows": self.zero_trained_rows,
            },
            "training": {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                         "basis": self.steps_basis},
            "quality": {
                "duplicates": [list(g) for g in self.duplicates],
                "near_duplicates": [list(g) for g in self.near_duplicates],
                "duplicates_total": self.duplicates_total,
                "near_duplicates_total": self.near_duplicates_total,
                "duplicate_rows": self.duplicate_rows,
                "near_duplicate_rows": self.near_duplicate_rows,
                "outliers": [{"line": ln, "kind": k, "tokens": n} for ln, k, n in self.outliers],
                "outliers_total": self.outliers_total,
                "pii": [f.to_dict() for f in self.pii],
                "pii_total": self.pii_total,
                "pii_counts": dict(self.pii_counts) if self.pii_counts is not None else _count_kinds(self.pii),
            },
            "warnings": list(self.warnings),
            "elapsed_s": round(self.elapsed_s, 3),
            **({"images": dict(self.images)} if self.images else {}),
            **({"sources": [dict(s) for s in self.sources]} if self.sources else {}),
            **({"preference": {"sides": {k: dict(v) for k, v in self.sides.items()}, "labels": dict(self.labels),
                               "over_max_length": [{"line": ln, "tokens": n} for ln, n in self.over_max_length],
                               "over_max_length_total": self.over_max_length_total}} if self.sides else {}),
        }


def _count_kinds(items) -> dict:
    out: dict[str, int] = {}
    for it in items:
        out[it.kind] = out.get(it.kind, 0) + 1
    return out


@dataclass
class Preview:
    row_index: int                     # 0-based among usable rows
    line: int                          # physical line in the file
    segments: list                     # [(text, trained)] covering the rendered text
    n_tokens: int
    n_trained: int                     # trained tokens the trainer keeps (after max_length)
    n_trained_untruncated: int
    truncated_at: int | None           # token index of the max_length cut, None if it fits
    cut_char: int | None               # character offset of that cut in the rendered text
    text: str = ""
    input_ids: list = field(default_factory=list, repr=False)
    labels: list = field(default_factory=list, repr=False)   # what the trainer trains on (truncated)
    images: list = field(default_factory=list)   # image rows: path, format, width, height, bytes, tokens
    marks: list = field(default_factory=list)    # [(start, end, kind)]: tool calls, tool results, weight 0
    # preference rows: each side as the trainer takes it ({"chosen": Preview, "rejected": Preview}, KTO
    # {"completion": Preview}; this Preview is the chosen side, or the completion), the characters
    # of the rendered prompt the sides share, and a KTO row's label (True: desirable)
    sides: dict = field(default_factory=dict, repr=False)
    prompt_chars: int = 0
    label: bool | None = None

    def to_dict(self) -> dict:
        return {"row_index": self.row_index, "line": self.line, "n_tokens": self.n_tokens,
                "n_trained": self.n_trained, "n_trained_untruncated": self.n_trained_untruncated,
                "truncated_at": self.truncated_at, "cut_char": self.cut_char,
                "segments": [{"text": t, "trained": tr, **({"turn": k} if k else {})}
                             for t, tr, k in marked_segments(self)],
                **({"images": list(self.images)} if self.images else {}),
                **({"sides": {k: v.to_dict() for k, v in self.sides.items()}, "prompt_chars": self.prompt_chars}
                   if self.sides else {}),
                **({"label": self.label} if self.label is not None else {})}


def marked_segments(pv) -> list[tuple[str, bool, str | None]]:
    """The preview's segments cut where a marked turn (``Preview.marks``) starts or ends:
    ``(text, trained, kind)``, kind None outside every mark."""
    marks = getattr(pv, "marks", None) or []
    if not marks:
        return [(t, tr, None) for t, tr in pv.segments]
    cuts = sorted({c for a, b, _ in marks for c in (a, b)})
    out, pos = [], 0
    for text, tr in pv.segments:
        end = pos + len(text)
        at = pos
        for c in [c for c in cuts if pos < c < end] + [end]:
            kind = next((k for a, b, k in marks if a <= at < b), None)
            out.append((text[at - pos:c - pos], tr, kind))
            at = c
        pos = end
    return out


# ---- tokenizer and dataset cache (so the TUI can page through rows fast) ---------------

_cache_lock = threading.Lock()
_tok_cache: dict = {}
_ds_cache: dict = {}


def _model_key(cfg) -> tuple:
    from engine.models.consent import remote_code_allowed
    m = cfg.model
    return (m.name, m.revision, m.chat_template, remote_code_allowed(cfg), cfg.source)


def tokenizer_for(cfg):
    """(tokenizer, warnings) for cfg.model, loaded once per model settings."""
    from engine.models.source import model_path
    from engine.models.tokenizer import load_tokenizer
    key = _model_key(cfg)
    with _cache_lock:
        hit = _tok_cache.get(key)
    if hit is None:
        hit = load_tokenizer(cfg, model_path(cfg))
        with _cache_lock:
            _tok_cache[key] = hit
    return hit


def _file_key(path: str, fmt: str) -> tuple:
    p = data_mod.resolve(path)
    try:
        st = p.stat()
        return (str(p), fmt, st.st_mtime_ns, st.st_size)
    except OSError:
        return (str(p), fmt, None, None)


def dataset_for(path: str, fmt: str = "auto") -> data_mod.Dataset:
    """``engine.dataset.data.load`` once per (file, format, mtime, size)."""
    key = _file_key(path, fmt)
    with _cache_lock:
        ds = _ds_cache.get(key)
    if ds is None:
        ds = data_mod.load(path, fmt)
        with _cache_lock:
            _ds_cache.clear()          # keep only the latest file: datasets can be large
            _ds_cache[key] = ds
    return ds


def _data_path(cfg, path) -> str:
    """The file inspected: ``path``, else data.train, else (with ``data.sources``) the mixture's
    training rows as one file (engine.dataset.sources.mixture_file)."""
    if path is not None:
        return str(path)
    if getattr(cfg.data, "sources", None):
        from engine.dataset import sources
        return sources.mixture_file(cfg)[0]
    return cfg.resolve_path(cfg.data.train)


# ---- the report ---------------------------------------------------------------------

def _nice_width(x: float) -> int:
    if x <= 1:
        return 1
    p = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * p >= x:
            return max(1, int(m * p))
    return int(10 * p)


def bucket_label(lo: int, hi: int) -> str:
    """A histogram bucket as people read it: both ends included (``20–24`` for [20, 25)).
    The CLI and the TUI both print buckets through this."""
    return f"{lo}–{hi - 1}"


def histogram(lengths, max_len: int, bins: int = 20) -> list[tuple[int, int, int]]:
    """[(lo, hi, count)] with round bin widths; max_len is a bin edge when rows exceed it.
    ``lengths``: the values, or their ``engine.dataset.quality.Tally``."""
    import numpy as np
    tally = lengths if isinstance(lengths, quality.Tally) else quality.Tally.of(lengths)
    if tally.n == 0:
        return []
    vals, counts = tally.items()
    lo_v, hi_v = int(vals[0]), int(vals[-1])
    top = hi_v + 1
    w = _nice_width((top - lo_v) / bins)
    first = lo_v // w * w
    edges = list(range(first, top + w, w))
    while edges[-1] < top:
        edges.append(edges[-1] + w)
    if hi_v >= max_len and max_len not in edges:
        edges = sorted(set(edges) | {max_len})
    cum = np.concatenate(([0], np.cumsum(counts)))
    at = cum[np.searchsorted(vals, np.asarray(edges, dtype=np.int64), side="left")]
    return [(int(edges[i]), int(edges[i + 1]), int(at[i + 1] - at[i])) for i in range(len(edges) - 1)]


def _steps(cfg, counts: "Counts", max_len, path_is_train: bool):
    """(train rows, held out, steps per epoch, total steps, basis) the trainer would run with.

    Up to SPLIT_EXACT_MAX rows the eval hold-out is drawn exactly as the trainer draws it, from
    each row's counts; past it the hold-out is taken as a proportional share of the tallies
    (drawing it would cost a list of every row)."""
    from engine.dataset.rows import split_eval
    import numpy as np
    n = counts.n
    exact = counts.exact
    held = 0
    basis = []
    share = 1.0
    lengths = kept = None
    if exact:
        lengths, kept = counts.head_tokens(), counts.head_kept()
    if path_is_train and not cfg.data.eval:
        if exact:
            train_idx, ev = split_eval(cfg, list(range(n)), None)
            sel = np.asarray(train_idx, dtype=np.int64)
            held = len(ev or [])
            lengths, kept = lengths[sel], kept[sel]
        elif cfg.data.eval_fraction > 0 and n >= 10:
            held = max(1, int(round(n * cfg.data.eval_fraction)))
            share = (n - held) / n
        if held:
            basis.append(f"{held} rows held out for eval (data.eval_fraction = {cfg.data.eval_fraction})"
                         + ("" if exact else "; counts below scaled by the share kept for training"))
    n_kept = len(kept) if exact else n
    per_step = cfg.train.batch_size * cfg.distributed.processes
    packing = cfg.data.packing is True
    n_rows = int(round(n_kept * share))
    if packing:
        if exact:
            whole = int(np.minimum(lengths, max_len).sum(dtype=np.int64)) if n_kept else 0
        else:
            whole = counts.tokens.sum_min(max_len) if n_kept else 0
        toks = int(round(whole * share))
        n_train = math.ceil(toks / max_len) if toks else 0
        basis.append(f"packing: about {n_train} sequences of {max_len} tokens")
    else:
        positive = int((kept > 0).sum()) if exact else n - counts.kept.count(0)
        n_train = int(round(positive * share)) if n_kept else 0
        dropped = n_rows - n_train
        if dropped:
            basis.append(f"{dropped} rows with no trained token dropped")
    batches = math.ceil(n_train / per_step) if n_train else 0
    spe = max(1, math.ceil(batches / cfg.train.grad_accum)) if batches else 0
    if cfg.train.max_steps > 0:
        total = cfg.train.max_steps
    else:
        total = math.ceil(cfg.train.epochs * spe)
    basis.insert(0, f"{n_train} training {'sequences' if packing else 'rows'} / (batch_size "
                 f"{cfg.train.batch_size} × {cfg.distributed.processes} GPU) / grad_accum {cfg.train.grad_accum}")
    return n_train, held, spe, total, "; ".join(basis)


class Counts:
    """The token counts of the usable rows in bounded memory: tallies of tokens and of trained
    tokens kept per row (``engine.dataset.quality.Tally``: exact statistics), the trained
    total before truncation, and each row's (line, tokens, kept) for the first SPLIT_EXACT_MAX
    rows only (the trainer's exact eval draw, ``Report.lines``)."""

    def __init__(self):
        self.tokens = quality.Tally()
        self.kept = quality.Tally()
        self.trained_total = 0
        self.n = 0
        self._head: list = []           # per batch: (lines, tokens, kept) int64 arrays
        self._head_n = 0

    @property
    def exact(self) -> bool:
        return self.n <= SPLIT_EXACT_MAX

    def add(self, lines, arr, max_len: int) -> list:
        """One batch: ``arr`` (n, 3) of (tokens, trained, kept). Returns its no_trained_tokens problems."""
        import numpy as np
        lines = np.asarray(lines, dtype=np.int64)
        tokens, trained, kept = arr[:, 0], arr[:, 1], arr[:, 2]
        self.tokens.add(tokens)
        self.kept.add(kept)
        self.trained_total += int(trained.sum())
        self.n += len(arr)
        room = SPLIT_EXACT_MAX - self._head_n
        if room > 0:
            take = min(room, len(arr))
            self._head.append((lines[:take].copy(), tokens[:take].copy(), kept[:take].copy()))
            self._head_n += take
        out = []
        for i in np.nonzero(kept == 0)[0].tolist():
            n, tr = int(tokens[i]), int(trained[i])
            why = ("all its trained tokens lie past max_length = %d (the row has %d tokens)" % (max_len, n)
                   if tr else "the chat template leaves no assistant token to train on")
            out.append(data_mod.DataProblem(int(lines[i]), "no_trained_tokens",
                                            f"no trained tokens: {why}; the trainer drops this row"))
        return out

    def _column(self, k: int):
        import numpy as np
        if len(self._head) > 1:
            self._head = [tuple(np.concatenate([h[j] for h in self._head]) for j in range(3))]
        return self._head[0][k] if self._head else np.zeros(0, dtype=np.int64)

    def head_lines(self):
        return self._column(0)

    def head_tokens(self):
        return self._column(1)

    def head_kept(self):
        return self._column(2)


class FirstByLine:
    """Findings (problems, PII) with a ``line`` and a ``kind``: the first ``cap`` by line kept
    (ties in arrival order), all of them counted, in total and per kind; for problems, the
    distinct lines with one (a bit per line)."""

    def __init__(self, cap: int, lines_of=None):
        self.cap = cap
        self.items: list = []
        self.total = 0
        self.by_kind: dict = {}
        self.lines_of = lines_of          # kinds counted in with_lines: a predicate, or None
        self._bits = bytearray()
        self._with = 0

    def append(self, item) -> None:
        self.total += 1
        self.by_kind[item.kind] = self.by_kind.get(item.kind, 0) + 1
        if self.lines_of is not None and self.lines_of(item):
            self._mark(item.line)
        self.items.append(item)
        if len(self.items) >= 2 * self.cap:
            self.items.sort(key=lambda p: p.line)
            del self.items[self.cap:]

    def extend(self, items) -> None:
        for it in items:
            self.append(it)

    def _mark(self, line: int) -> None:
        i, bit = line >> 3, 1 << (line & 7)
        if i >= len(self._bits):
            self._bits.extend(bytes(max(i + 1 - len(self._bits), len(self._bits) // 2)))
        if not self._bits[i] & bit:
            self._bits[i] |= bit
            self._with += 1

    def marked(self, line: int) -> bool:
        i = line >> 3
        return i < len(self._bits) and bool(self._bits[i] & (1 << (line & 7)))

    @property
    def with_lines(self) -> int:
        return self._with

    def listed(self) -> list:
        return sorted(self.items, key=lambda p: p.line)[:self.cap]

    def clear(self) -> None:
        self.__init__(self.cap, self.lines_of)


def problem_log() -> FirstByLine:
    return FirstByLine(MAX_PROBLEMS, lambda p: p.kind != "no_trained_tokens")


_gc_lock = threading.Lock()
_gc_paused = [0, False]        # inspections running, whether the GC was enabled before the first


@contextmanager
def _gc_paused_while_scanning():
    """Pause CPython's cyclic GC for a scan (nested and concurrent scans share one pause).

    A scan allocates about ten container objects per row and keeps them (rows, duplicate
    keys), so the GC keeps re-walking an ever larger heap and finds nothing: measured, it was
    ~40 % of the read/normalise/duplicate time (1.0 of 2.65 CPU-s per 100k rows). Reference
    counting still frees everything as usual; cycles wait for the next collection after."""
    with _gc_lock:
        if _gc_paused[0] == 0:
            _gc_paused[1] = gc.isenabled()
            gc.disable()
        _gc_paused[0] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_paused[0] -= 1
            if _gc_paused[0] == 0 and _gc_paused[1]:
                gc.enable()


def inspect(cfg, *, path=None, on_partial=None, cancel=None) -> Report:
    """The full dataset report (see the module doc); never raises for bad rows."""
    from engine.modalities import vision
    if vision.data_is_vision(cfg.data.format, data_mod.iter_raw(_data_path(cfg, path))):
        return _image_report(cfg, _data_path(cfg, path), on_partial)   # image rows: visual tokens
    with _gc_paused_while_scanning():
        return _inspect(cfg, path=path, on_partial=on_partial, cancel=cancel)


def _image_report(cfg, path: str, on_partial=None) -> Report:
    """The report for image rows: image problems by line, and token statistics and the truncation
    check with each image's visual tokens counted (``engine.modalities.vision.report_rows``)."""
    import numpy as np
    from engine.modalities import vision
    max_len = int(cfg.data.max_length)
    rep = Report(path=str(data_mod.resolve(path)), model=cfg.model.name, max_length=max_len)
    ds = data_mod.load(path, cfg.data.format)
    got = vision.report_rows(cfg, ds)
    rep.format, rep.format_reason, rep.raw_count, rep.rows_read = ds.format, ds.reason, ds.raw_count, ds.raw_count
    lines = got["lines"]
    arr = np.asarray(got["counts"], dtype=np.int64).reshape(len(lines), 3)
    tallied = Counts()
    found = problem_log()
    found.extend(got["problems"])
    found.extend(tallied.add(lines, arr, max_len))
    dups = quality.Duplicates()              # no duplicate check for image rows: their lengths only
    dups.add_unhashed(lines, arr[:, 0])
    out = report_snapshot(cfg, rep, tallied, found, [], dups, FirstByLine(MAX_LISTED),
                          dict(ds.formats_seen), dict(ds.fields_seen), partial=False, rows=len(lines))
    out.images = got["images"]
    if on_partial is not None:
        on_partial(out)
    return out


def _inspect(cfg, *, path=None, on_partial=None, cancel=None) -> Report:
    shares = None
    if path is None and getattr(cfg.data, "sources", None):
        from engine.dataset import sources
        path, shares = sources.mixture_file(cfg)
    scan = _Scan(cfg, _data_path(cfg, path), on_partial)
    if shares is not None:
        scan.rep.path = f"mixture of {len(shares)} sources"
        total = sum(s.train for s in shares)
        scan.rep.sources = [{"name": s.name, "path": s.path, "format": s.format, "usable": s.usable,
                             "train": s.train, "eval": s.eval, "share": round(s.share(total), 6),
                             "problems": s.problems, "first_problem": s.first_problem, "notes": list(s.notes),
                             "problem_lines": [{"line": p.line, "kind": p.kind, "message": p.message}
                                               for p in s.problem_list]}
                            for s in shares]
    try:
        if not scan.read(cancel):
            scan.drain()
            return scan.snapshot(partial=True, phase="cancelled")
        fmt, reason, mixed = scan.settle_format()
        rep = scan.rep
        rep.format, rep.format_reason, rep.raw_count = fmt, reason, scan.n_raw
        if scan.counting.mismatch:
            rep.warnings.append(scan.counting.mismatch)
        out = scan.snapshot(mixed=mixed)
        if shares is not None:                  # each source's eval rows were held out by itself
            out.splits = {"train": out.splits.get("train", 0), "eval": sum(s.eval for s in shares)}
            out.problems = _with_origins(scan.path, out.problems)
        if on_partial is not None:
            on_partial(out)
        return out
    finally:
        scan.counting.shutdown()


def _file_bytes(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _with_origins(path: str, problems: list) -> list:
    """A mixture's problems (found in its rows' file) naming the source file and line of each."""
    from engine.dataset import sources
    out = []
    for p in problems:
        where = sources.origin(path, p.line)
        out.append(data_mod.DataProblem(p.line, p.kind, f"{p.message} [{where}]") if where else p)
    return out


class _Scan:
    """The running state of one inspection: the records read, the rows normalised with the
    provisional format, their token counts (tokenised in a worker thread, collected in order)
    and the quality findings; ``snapshot`` turns it into a Report at any point."""

    def __init__(self, cfg, path: str, on_partial) -> None:
        self.t0 = time.monotonic()
        self.cfg, self.path, self.on_partial = cfg, path, on_partial
        max_len = int(cfg.data.max_length)
        self.rep = Report(path=str(data_mod.resolve(path)), model=cfg.model.name, max_length=max_len)
        self.tok, tw = tokenizer_for(cfg)
        self.rep.warnings += list(tw)
        self.counter = Counter(self.tok, max_len)
        self.provisional = None if cfg.data.format == "auto" else cfg.data.format
        # Memory is bounded by the longest row, not the row count: records are dropped once
        # normalised and counted; token counts are tallied (Counts), problems and PII findings
        # keep their first MAX_PROBLEMS / MAX_LISTED by line and count the rest, and each usable
        # row's hashes go to quality.Duplicates (a fixed buffer, spilled to a temporary file).
        # Preference data tallies each side's tokens too (quality.Tally per side).
        self.head: list = []              # records read before the provisional format is known
        self.n_raw = 0
        self.first_bad = None             # (line, error) of the first unreadable record
        self.seen: dict = {}
        self.first_line: dict = {}
        self.fields: dict = {}
        self.bad_keys: dict = {}          # line -> a field name holding control characters (until processed)
        self.bad_names: set = set()       # the counted field names that hold control characters
        self.problems = problem_log()     # normalising, control characters, no trained tokens
        self.counts = Counts()
        self.batch_meta: list = []        # per batch in flight: its rows' lines and hashes
        self.usable = 0
        self.dups = quality.Duplicates()
        self.pii = FirstByLine(MAX_LISTED)
        self.pending: list = []           # records read since the last flush
        self.side_tallies: dict = {}      # preference data: side -> quality.Tally of its tokens
        self.over: list = []              # preference data: (line, tokens) over max_length (first MAX_LISTED)
        self.over_total = 0
        self.labels = {"desirable": 0, "undesirable": 0}     # KTO rows
        self.inflight: list = []          # counting jobs, in row order
        self.last_emit = 0.0
        self.emit_every = PARTIAL_EVERY
        self.progress = 0.0
        # Counting runs in a worker thread (and for a large file a worker process) while this
        # thread reads, normalises, renders and runs the quality checks of the next batch.
        self.counting = Counting(self.counter, _file_bytes(path))

    # ---- reading

    def read(self, cancel) -> bool:
        """Read every record; rows are normalised and tokenised in batches as soon as a
        provisional format is known (the majority of the first 200). False when cancelled."""
        rep = self.rep
        rep.phase = "read"
        for line, obj, err in data_mod.iter_raw(self.path, on_bytes=self._on_bytes):
            rec = (line, obj, err, self._note(line, obj, err))      # with its format: detected once
            if self.provisional is None:
                self.head.append(rec)
                if sum(self.seen.values()) < 200 and not self._head_full():
                    if self.n_raw % BATCH == 0:
                        self.emit()
                    continue
                self.provisional = max(self.seen, key=self.seen.get)   # checked against the whole file at the end
                self.pending.extend(self.head)
                self.head.clear()
            else:
                self.pending.append(rec)
            if len(self.pending) >= BATCH:
                rep.phase = "tokenize"
                self.flush()
                self.emit(force=self.usable <= BATCH)
                if cancel is not None and cancel.is_set():
                    return False
        if self.provisional is None and self.seen:
            self.provisional = max(self.seen, key=self.seen.get)
            self.pending.extend(self.head)
        self.head.clear()
        self.flush()
        self.drain()
        return True

    def _head_full(self) -> bool:
        """Too many records read with no provisional format yet: unreadable ones become problems
        at once; once any format is seen, its majority so far is the provisional one."""
        if len(self.head) < 5 * BATCH:
            return False
        if self.seen:
            return True
        keep = []
        for line, rec, err, f in self.head:
            if err is None:
                keep.append((line, rec, err, f))
            else:
                data_mod.normalise_record(line, rec, err, "messages", self.problems)
        self.head = keep[-5 * BATCH:] if len(keep) > 5 * BATCH else keep
        return False

    def _on_bytes(self, done, total) -> None:
        self.progress = done / total if total else 1.0

    def _note(self, line, obj, err):
        """Count one raw record: its format evidence, its field names (and any holding controls).
        Returns its format (None: none detected or unreadable)."""
        self.n_raw += 1
        self.rep.rows_read = self.n_raw
        if err is not None:
            if self.first_bad is None:
                self.first_bad = (line, err)
            return None
        f = data_mod.count_format(obj, line, self.seen, self.first_line)
        if isinstance(obj, dict):
            fields, bad = self.fields, self.bad_names
            for k in obj:
                n = fields.get(k)
                if n is not None:                   # a name seen before: checked for controls then
                    fields[k] = n + 1
                    if k in bad:
                        self.bad_keys[line] = k
                    continue
                if len(fields) < MAX_FIELDS:        # a file of ever new field names stays bounded
                    fields[k] = 1
                if has_controls(k):
                    self.bad_keys[line] = k
                    if k in fields:
                        bad.add(k)
        return f

    # ---- normalising, tokenising, quality checks

    def flush(self) -> None:
        """Normalise and tokenise the raw records read since the last flush."""
        if not self.pending:
            return
        new_rows = []
        for line, rec, err, f in self.pending:
            row = data_mod.normalise_record(line, rec, err, self.provisional, self.problems, f)
            if row is not None:
                new_rows.append(row)
            elif self.bad_keys:
                self.bad_keys.pop(line, None)
        self.pending.clear()
        self.process(new_rows)

    def process(self, new_rows) -> None:
        """Send a batch of rows to the tokenising worker; meanwhile check their quality here."""
        if not new_rows:
            return
        max_len = self.rep.max_length
        datas = [r.data for r in new_rows]
        counter = self.counter
        if self.provisional in preference.FORMATS:
            # each side as the trainer takes it (the prompt untrained, the answer trained); a pair
            # measures as its longer side, which is what max_length must hold
            sides = []
            for side in (("chosen", "rejected") if "chosen" in datas[0] else (None,)):
                views = [preference.side_view(d, side) for d in datas]
                shown, scale = _measurable(views, [quality.row_text(v) for v in views], max_len)
                sides.append((shown, counter.render(shown), scale))
            for d in datas:
                if "label" in d:
                    self.labels["desirable" if d["label"] else "undesirable"] += 1
            datas = [preference.side_view(d) for d in datas]
            texts = [quality.row_text(d) for d in datas]
            self.inflight.append(self.counting.submit("sides", sides))
        else:
            texts = [quality.row_text(d) for d in datas]
            shown, scale = _measurable(datas, texts, max_len)
            self.inflight.append(self.counting.submit("rows", shown, counter.render(shown), scale))
        lines = [r.line for r in new_rows]
        self.usable += len(lines)
        self.batch_meta.append((lines, *quality.row_hashes(datas, texts)))
        self.problems.extend(_control_problems(lines, texts, self.bad_keys))
        if self.bad_keys:
            for ln in lines:
                self.bad_keys.pop(ln, None)
        self.pii.extend(quality.scan_pii(lines, texts))
        self.drain(keep=self.counting.depth)

    def drain(self, keep: int = 0) -> None:
        """Collect counting results (oldest first) until at most ``keep`` are in flight."""
        import numpy as np
        max_len = self.rep.max_length
        while len(self.inflight) > keep:
            got = self.counting.result(self.inflight.pop(0))
            lines, exact, near = self.batch_meta.pop(0)
            if isinstance(got, tuple):            # preference data: also the tokens of each side
                got, per_side = got
                self._add_sides(np.asarray(per_side, dtype=np.int64))
            arr = np.asarray(got, dtype=np.int64).reshape(len(got), 3)
            if self.side_tallies:
                for i in np.nonzero(arr[:, 0] > max_len)[0].tolist():
                    self.over_total += 1
                    if len(self.over) < MAX_LISTED:
                        self.over.append((lines[i], int(arr[i, 0])))
            self.problems.extend(self.counts.add(lines, arr, max_len))
            self.dups.add_hashed(lines, exact, near, arr[:, 0])

    def _add_sides(self, per_side) -> None:
        """Tally the tokens of each side (prompt, chosen, rejected; KTO: prompt, completion)."""
        names = ("prompt", "chosen", "rejected") if per_side.shape[1] == 3 else ("prompt", "completion")
        for k, name in enumerate(names):
            self.side_tallies.setdefault(name, quality.Tally()).add(per_side[:, k])

    def settle_format(self) -> tuple:
        """The format of the whole file (format, reason, mixed-format problems); when it is not
        the provisional one the rows are normalised and counted again with it."""
        try:
            fmt, reason, mixed = data_mod.choose_format(self.path, self.cfg.data.format, self.seen,
                                                        self.first_line, self.n_raw)
        except data_mod.DataError as e:         # name the first bad line, as training's preflight does
            bad = self.first_bad
            raise data_mod.DataError(f"{e}; first problem at line {bad[0]}: {bad[1]}" if bad else str(e)) from None
        if fmt != self.provisional:        # the majority changed after the first rows: read it again
            self.problems.clear(); self.pii.clear()
            self.counts = Counts()
            self.usable = 0
            self.side_tallies = {}; self.over.clear()
            self.over_total = 0
            self.labels = {"desirable": 0, "undesirable": 0}
            self.dups = quality.Duplicates()
            self.provisional = fmt
            chunk = []
            for line, rc, er in data_mod.iter_raw(self.path):
                if er is None and isinstance(rc, dict):
                    for k in rc:
                        if has_controls(k):
                            self.bad_keys[line] = k
                row = data_mod.normalise_record(line, rc, er, fmt, self.problems)
                if row is not None:
                    chunk.append(row)
                if len(chunk) >= BATCH:
                    self.process(chunk)
                    chunk = []
            self.process(chunk)
            self.drain()
        return fmt, reason, mixed

    # ---- reports

    def emit(self, force: bool = False) -> None:
        """A partial report to ``on_partial``, at most every PARTIAL_EVERY seconds unless forced,
        and no more often than keeps the reports under a tenth of the time (up to PARTIAL_MAX_GAP
        apart): a report that regroups the duplicates of a large file costs far more than most."""
        if self.on_partial is None:
            return
        now = time.monotonic()
        if not force and now - self.last_emit < self.emit_every:
            return
        part = self.snapshot(partial=True)
        part.progress = self.progress
        self.on_partial(part)
        self.last_emit = time.monotonic()
        self.emit_every = min(PARTIAL_MAX_GAP, max(PARTIAL_EVERY, PARTIAL_SHARE_INV * (self.last_emit - now)))

    def snapshot(self, *, mixed=(), partial: bool = False, phase: str | None = None) -> Report:
        out = report_snapshot(self.cfg, self.rep, self.counts, self.problems, list(mixed), self.dups, self.pii,
                              self.seen, self.fields, partial=partial, rows=self.usable)
        if phase:
            out.phase = phase
        if self.side_tallies:
            self._preference_stats(out)
        out.elapsed_s = time.monotonic() - self.t0
        return out

    def _preference_stats(self, out: Report) -> None:
        """Tokens per side (min / median / max), the rows over max_length by line, KTO's labels."""
        out.sides = {name: {"min": t.min(), "median": t.percentiles([50])[0], "max": t.max()}
                     for name, t in self.side_tallies.items()}
        out.over_max_length = sorted(self.over)
        out.over_max_length_total = self.over_total
        out.labels = dict(self.labels) if "completion" in self.side_tallies else {}


def long_row_chars(max_len: int) -> int:
    """Rows whose text is longer than this are measured from a prefix (see ``_measurable``)."""
    return max(65536, 64 * max_len)


def _measurable(datas, texts, max_len: int):
    """Rows far beyond max_length are measured without tokenising all of them: each text field
    is cut to ``long_row_chars`` characters (still far more than max_length tokens, so the
    tokens the trainer keeps are exact), and the token counts past that are scaled by
    characters. Returns (rows to count, per-row scale factor; 1.0 when the row is whole)."""
    limit = long_row_chars(max_len)
    shown, scale = [], []
    for d, t in zip(datas, texts):
        if len(t) <= limit:
            shown.append(d)
            scale.append(1.0)
            continue
        cut = _cut_row(d, limit)
        shown.append(cut)
        scale.append(len(t) / max(1, len(quality.row_text(cut))))
    return shown, scale


def _cut_row(d: dict, limit: int) -> dict:
    if "messages" in d:
        return dict(d, messages=[dict(m, content=m["content"][:limit]) for m in d["messages"]])
    return {k: (v[:limit] if isinstance(v, str) else v) for k, v in d.items()}


def _control_problems(lines, texts, bad_keys) -> list:
    """Rows whose text (or a field name) holds control characters, ANSI escape sequences or
    bidi overrides: almost always an accident in training data, sometimes an attack."""
    out = []
    for ln, t in zip(lines, texts):
        what = describe_controls(t) if has_controls(t) else None
        where = "its text"
        if what is None and ln in bad_keys:
            what, where = describe_controls(bad_keys[ln]), f"the field name {visible(repr(bad_keys[ln]))}"
        if what:
            out.append(data_mod.DataProblem(ln, "control_chars", f"{what} in {where} (shown as ␛ / ⟨U+…⟩ here); "
                                     "clean the row unless the model must learn those bytes"))
    return out


def report_snapshot(cfg, rep: Report, counts: Counts, problems: FirstByLine, mixed, dups, pii: FirstByLine,
                    seen, fields, partial: bool, rows: int | None = None) -> Report:
    """A Report snapshot from the running state (cheap enough to call every 0.3 s).

    ``counts``: the token counts (``Counts``); ``problems`` / ``pii``: the findings so far
    (``FirstByLine``); ``mixed``: mixed-format problems; ``dups``: the rows' hashes
    (``engine.dataset.quality.Duplicates``); ``rows``: usable rows (default: those counted)."""
    import copy
    r = copy.copy(rep)
    r.warnings = list(rep.warnings)
    r.formats_seen = dict(seen)
    r.fields_seen = dict(sorted(fields.items(), key=lambda kv: -kv[1])[:30])
    if partial and seen and not r.format:
        r.format = max(seen, key=seen.get)
        r.format_reason = f"so far {seen[r.format]} of {rep.rows_read} rows have " + data_mod.detect_reason(r.format)
    n = counts.n
    r.rows = counts.n if rows is None else rows
    r.rows_tokenized = n
    max_len = rep.max_length
    bounds = None
    if n:
        t, k = counts.tokens, counts.kept
        median, p95 = t.percentiles([50, 95])
        r.stats = {"min": t.min(), "median": median, "p95": p95, "max": t.max(),
                   "mean": round(t.total / n, 2)}
        r.histogram = histogram(t, max_len)
        r.truncated_rows = t.count_above(max_len)
        r.truncated_share = round(r.truncated_rows / n, 6)
        r.trained_tokens_total = k.total
        r.tokens_within_max_total = t.sum_min(max_len)
        r.trained_tokens_median = k.percentiles([50])[0]
        r.zero_trained_rows = k.count(0)
        r.trained_tokens_untruncated = counts.trained_total
        if not partial:
            r.lines = counts.head_lines()
            n_train, held, spe, total, basis = _steps(cfg, counts, max_len, _same_file(cfg, rep.path))
            r.steps_per_epoch, r.total_steps, r.steps_basis = spe, total, basis
            r.splits = {"train": n_train if cfg.data.packing is not True else n - held, "eval": held}
            if _same_file(cfg, rep.path) and cfg.data.eval:
                r.splits["eval_file"] = cfg.data.eval
            bounds = quality.outlier_bounds(t)
            r.outliers_total = t.count_outside(*bounds) if bounds else 0
    mixed = list(mixed)
    listed = sorted(mixed + problems.listed(), key=lambda p: p.line)
    r.problems = listed[:MAX_PROBLEMS]
    r.problems_total = problems.total + len(mixed)
    r.problem_counts = dict(problems.by_kind)
    for p in mixed:
        r.problem_counts[p.kind] = r.problem_counts.get(p.kind, 0) + 1
    r.problem_counts = {k: v for k, v in sorted(r.problem_counts.items(), key=lambda kv: _first_kind(listed, kv[0]))}
    r.rows_with_problems = problems.with_lines + len({p.line for p in mixed if not problems.marked(p.line)})
    q = dups.quality(MAX_GROUPS, bounds, MAX_LISTED, stale_ok=partial)
    r.duplicates_total, r.near_duplicates_total = q.exact.total, q.near.total
    r.duplicate_rows, r.near_duplicate_rows = q.exact.rows, q.near.rows
    r.duplicates, r.near_duplicates = q.exact.listed(), q.near.listed()
    if not partial:
        r.outliers = q.outliers
    r.pii_total = pii.total
    r.pii_counts = dict(pii.by_kind)
    r.pii = pii.listed()[:MAX_LISTED]
    r.warnings += _capped_notes(r, q)
    if not partial:
        r.phase = "done"
        r.done = True
        r.progress = 1.0
        if cfg.data.strict and r.n_problems:
            r.warnings.append(f"data.strict = true: training refuses this file ({r.n_problems} problems)")
        r.warnings[:0] = _method_mismatch(cfg, r.format)     # first: the Dataset screen shows two
    else:
        r.done = False
    return r


def _method_mismatch(cfg, fmt: str | None) -> list[str]:
    """The line training would refuse this file with when the data and ``train.method`` do not go
    together (preference data under an SFT method, or the reverse), so inspect says it first."""
    from engine.dataset import preference
    from engine.modalities.base import DataError
    if not fmt:
        return []
    try:
        preference.check_method(cfg, fmt, "training refuses this file")
    except DataError as e:
        return [str(e)]
    return []


def _first_kind(listed, kind) -> int:
    """Order of problem kinds as they first appear by line (the order _count_kinds gives)."""
    return next((i for i, p in enumerate(listed) if p.kind == kind), len(listed))


def _capped_notes(r: Report, q) -> list[str]:
    """One line per list that holds only its first part (the counts are complete)."""
    out = []
    if r.n_problems > len(r.problems):
        out.append(f"problems: the first {len(r.problems):,} of {r.n_problems:,} are listed (by line; "
                   "problem_counts counts all)")
    for name, g, shown in (("duplicate", q.exact, r.duplicates), ("near-duplicate", q.near, r.near_duplicates)):
        if g.capped:
            lines = g.listed_lines() if len(shown) == len(g.items) else sum(len(x) for x in shown)
            out.append(f"{name} groups: the first {len(shown):,} of {g.total:,} are listed ({lines:,} lines, at most "
                       f"{quality.GROUP_LINES_MAX:,} a group; {g.rows:,} rows repeat an earlier one in all)")
    if r.pii_total > len(r.pii):
        out.append(f"possible PII: the first {len(r.pii):,} of {r.pii_total:,} findings are listed")
    return out


def _same_file(cfg, path: str) -> bool:
    try:
        return data_mod.resolve(cfg.resolve_path(cfg.data.train)).resolve() == Path(path).resolve()
    except OSError:
        return False


# ---- preview ------------------------------------------------------------------------

def preview(cfg, row_index: int, *, path=None) -> Preview:
    """Row ``row_index`` (0-based among usable rows) rendered by the chat template, cut into
    trained / not-trained segments by ``engine.modalities.text.encode_batch`` (the trainer's encoder),
    with what ``max_length`` truncation removes marked."""
    ds = dataset_for(_data_path(cfg, path), cfg.data.format)
    if not 0 <= row_index < len(ds.rows):
        raise IndexError(f"row {row_index + 1} out of range: the file has {len(ds.rows)} usable rows")
    row = ds.rows[row_index]
    if row.data.get("images") is not None:        # an image row: the processor's own tokens
        from engine.modalities import vision
        fields, images = vision.preview_fields(cfg, row)
        pv = Preview(row_index=row_index, line=row.line, **fields)
        pv.images = images
        return pv
    tok, _ = tokenizer_for(cfg)
    if ds.format in preference.FORMATS:      # each side: the prompt and one answer (KTO: the completion)
        names = ("completion",) if "completion" in row.data else ("chosen", "rejected")
        sides = {n: _preview_of(cfg, tok, row, row_index, preference.side_view(row.data, n if n != "completion"
                                                                             else None)) for n in names}
        pv = Preview(**{**sides[names[0]].__dict__, "sides": sides, "label": row.data.get("label")})
        texts = [p.text for p in sides.values()]
        shared = len(texts[0]) if len(texts) == 1 else next(
            (i for i, (a, b) in enumerate(zip(*texts)) if a != b), min(map(len, texts)))
        firsts = [_first_trained_char(p) for p in sides.values()]
        pv.prompt_chars = min([shared] + firsts)
        return pv
    return _preview_of(cfg, tok, row, row_index, row.data)


def _first_trained_char(pv: Preview) -> int:
    pos = 0
    for text, trained in pv.segments:
        if trained:
            return pos
        pos += len(text)
    return pos


def _preview_of(cfg, tok, row, row_index: int, data: dict) -> Preview:
    """``data`` (the row, or one side of a preference row) encoded by the trainer's encoder."""
    from engine.modalities.text import IGNORE, Encoded, encode_batch, segments
    enc = encode_batch(tok, [data])[0]
    if "input_ids" in row.data and not enc.text:      # pre-tokenised row: decode it token by token
        text, offsets = "", []
        for t in enc.input_ids:
            piece = tok.decode([t])
            offsets.append((len(text), len(text) + len(piece)))
            text += piece
        enc = Encoded(enc.input_ids, enc.labels, text, offsets)
    max_len = int(cfg.data.max_length)
    n = len(enc.input_ids)
    labels = list(enc.labels[:max_len])
    truncated_at = max_len if n > max_len else None
    cut_char = None
    if truncated_at is not None:
        cut_char = enc.offsets[max_len][0] if enc.offsets[max_len][1] > enc.offsets[max_len][0] \
            else next((s for s, e in enc.offsets[max_len:] if e > s), len(enc.text))
    shown = Encoded(enc.input_ids, labels + [IGNORE] * (n - len(labels)), enc.text, enc.offsets)
    segs = segments(shown)
    if cut_char is not None:                 # split at the cut so a UI can dim the rest
        out, pos = [], 0
        for text, tr in segs:
            if pos < cut_char < pos + len(text):
                out += [(text[:cut_char - pos], tr), (text[cut_char - pos:], tr)]
            else:
                out.append((text, tr))
            pos += len(text)
        segs = out
    from engine.modalities.text import turn_marks
    return Preview(row_index=row_index, line=row.line, segments=segs, n_tokens=n,
                   marks=turn_marks(tok, data, enc.text) if enc.text else [],
                   n_trained=sum(1 for x in labels if x != IGNORE), n_trained_untruncated=enc.n_trained,
                   truncated_at=truncated_at, cut_char=cut_char, text=enc.text,
                   input_ids=list(enc.input_ids[:max_len]), labels=labels)


class NoRowAtLine(ValueError):
    """A line that is no usable row: ``next_index`` is the first row after it (where "next"
    continues), ``raw`` the line's own text (up to 2,000 characters; "" when not a text file)."""

    def __init__(self, message: str, next_index: int, raw: str) -> None:
        super().__init__(message)
        self.next_index, self.raw = next_index, raw


def raw_line(path, line: int, limit: int = 2000) -> str:
    """Physical line ``line`` of a text data file, as text (undecodable bytes replaced)."""
    p = Path(path)
    if p.suffix.lower() not in (".jsonl", ".json", ".csv", ".txt") or not p.is_file():
        return ""
    with open(p, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            if i == line:
                return raw[:limit * 4].decode("utf-8", "replace").rstrip("\r\n")[:limit]
    return ""


def row_index_for_line(cfg, line: int, *, path=None) -> int:
    """The usable-row index of physical line ``line`` (NoRowAtLine if that line is no usable row)."""
    ds = dataset_for(_data_path(cfg, path), cfg.data.format)
    from bisect import bisect_left
    lines = [r.line for r in ds.rows]
    i = bisect_left(lines, line)
    if i < len(lines) and lines[i] == line:
        return i
    bad = [p for p in ds.problems if p.line == line]
    raise NoRowAtLine(f"line {line} is not a usable row" + (f": {bad[0].message}" if bad else ""),
                      i, raw_line(_data_path(cfg, path), line))


# ---- text forms (the CLI prints these: engine/cli/cmd_inspect.py) ---------------------

def format_preview(pv: Preview, max_len: int, colour: bool = False) -> str:
    if len(pv.sides) > 1:              # a preference pair: each side as the trainer takes it
        return "\n".join(f"{name}: " + format_preview(side, max_len, colour) for name, side in pv.sides.items())
    if pv.label is not None:           # a KTO row: its label first
        return f"label: {'desirable' if pv.label else 'undesirable'}; " + format_preview(
            pv.sides.get("completion", pv), max_len, colour)
    head = (f"row {pv.row_index + 1} (line {pv.line}): {pv.n_tokens} tokens, {pv.n_trained} trained"
            + (f" ({pv.n_trained_untruncated - pv.n_trained} more past max_length)"
               if pv.n_trained_untruncated != pv.n_trained else ""))
    from engine.modalities.text import MARK_LABELS
    legend = ("trained tokens in green" if colour else "trained tokens between ⟦ and ⟧")
    if pv.marks:
        legend += "; turns marked " + ", ".join(f"«{MARK_LABELS[k]}»" for k in dict.fromkeys(k for _, _, k in pv.marks))
    body, pos, kind_before = [], 0, None
    for raw, trained, kind in marked_segments(pv):
        text = visible(raw)           # the row's own escape codes are shown, never run
        if kind != kind_before and kind:
            body.append(f"\033[1;36m«{MARK_LABELS[kind]}»\033[0m" if colour else f"«{MARK_LABELS[kind]}»")
        kind_before = kind
        if pv.cut_char is not None and pos == pv.cut_char:
            body.append(("\033[7m" if colour else "") + f"✂[max_length {max_len}: the rest is cut]"
                        + ("\033[0m" if colour else ""))
        if trained:
            body.append(f"\033[1;32m{text}\033[0m" if colour else f"⟦{text}⟧")
        else:
            body.append(f"\033[2m{text}\033[0m" if colour and pv.cut_char is not None and pos >= pv.cut_char
                        else text)
        pos += len(raw)
    return f"{head}; {legend}\n" + "─" * 60 + "\n" + "".join(body) + "\n" + "─" * 60


def _lines(groups, limit=5) -> str:
    shown = "; ".join(", ".join(map(str, g[:6])) + (" …" if len(g) > 6 else "") for g in groups[:limit])
    return shown + (f"; … {len(groups) - limit} more groups" if len(groups) > limit else "")


def format_report(r: Report, max_problems: int = 50) -> str:
    out = [f"data: {r.path}",
           f"format: {r.format} ({r.format_reason})"]
    if len(r.formats_seen) > 1:
        out.append("  formats seen: " + ", ".join(f"{k} {v}" for k, v in r.formats_seen.items()))
    out.append("  fields: " + ", ".join(f"{k} ({v})" for k, v in list(r.fields_seen.items())[:8]))
    for s in r.sources:
        out.append(f"  {s['name']}: {s['format']}, {s['train']:,} training rows ({s['share']:.0%} of the mix), "
                   f"{s['eval']:,} eval, {s['problems']:,} problems" + (f" (first: {s['first_problem']})"
                                                                       if s['first_problem'] else "")
                   + "".join(f"; {n}" for n in s["notes"]))
        listed = s.get("problem_lines") or []
        for p in listed[:5]:
            out.append(f"    {Path(str(s['path'])).name} line {p['line']}: [{p['kind']}] {p['message']}")
        if s["problems"] > 5:
            out.append(f"    … {s['problems'] - 5:,} more in this source (--json lists "
                       + ("them)" if len(listed) == s["problems"] else f"the first {len(listed):,})"))
    split = ", ".join(f"{k} {v}" for k, v in r.splits.items())
    out.append(f"rows: {r.rows} usable of {r.raw_count} read" + (f" → {split}" if split else ""))
    counts = r.problem_counts if r.problem_counts is not None else _count_kinds(r.problems)
    out.append(f"problems: {r.n_problems}" + (" (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")"
                                                if r.n_problems else ""))
    for p in r.problems[:max_problems]:
        out.append(f"  line {p.line}: [{p.kind}] {p.message}")
    if r.n_problems > max_problems:
        out.append(f"  … {r.n_problems - max_problems} more (--json lists "
                   + ("all)" if len(r.problems) == r.n_problems else f"the first {len(r.problems):,})"))
    if r.stats:
        s = r.stats
        out.append(f"tokens ({r.model}, max_length {r.max_length}): min {s['min']}, median {s['median']:g}, "
                   f"p95 {s['p95']:g}, max {s['max']}, mean {s['mean']:g}")
        peak = max(c for _, _, c in r.histogram) or 1
        for lo, hi, c in r.histogram:
            bar = "█" * max(1 if c else 0, round(30 * c / peak))
            label = bucket_label(lo, hi)
            out.append(f"  {label.split('–')[0]:>7}–{label.split('–')[1]:<7} {bar} {c}")
        out.append(f"truncated at max_length: {r.truncated_rows} rows ({r.truncated_share:.1%})")
        if r.sides:           # preference data: each side's tokens, and the pairs over max_length by line
            out.append("tokens per side: " + "; ".join(f"{k} min {v['min']}, median {v['median']:g}, max {v['max']}"
                                                       for k, v in r.sides.items())
                       + " (prompt: with its chat template; answers: their trained tokens)")
            if r.labels:
                out.append(f"labels: {r.labels.get('desirable', 0)} desirable, "
                           f"{r.labels.get('undesirable', 0)} undesirable")
            what = "pairs" if "chosen" in r.sides else "rows"
            out.append(f"{what} over max_length {r.max_length} (their longer side is truncated): "
                       f"{r.over_max_length_total}")
            for ln, n in r.over_max_length[:max_problems]:
                out.append(f"  line {ln}: {n} tokens")
            if r.over_max_length_total > max_problems:
                out.append(f"  … {r.over_max_length_total - max_problems} more (--json lists "
                           f"{'them' if r.over_max_length_total <= MAX_LISTED else f'the first {MAX_LISTED}'})")
        if r.images:
            v = r.images.get("visual_tokens_per_image") or {}
            out.append(f"images: {r.images['count']} in {r.images['rows_with_images']} rows, "
                       f"{r.images['visual_tokens_total']} visual tokens (per image min {v.get('min', 0)}, "
                       f"median {v.get('median', 0):g}, max {v.get('max', 0)}; counted in the tokens above), "
                       f"{r.images['bad_images']} missing or unreadable")
        out.append(f"trained tokens: {r.trained_tokens_total} in all, median {r.trained_tokens_median:g} per row; "
                   f"{r.zero_trained_rows} rows with none")
        out.append(f"steps per epoch: {r.steps_per_epoch} (total {r.total_steps}): {r.steps_basis}")
    for name, total, groups in (("duplicates", r.duplicates_total, r.duplicates),
                                ("near-duplicates", r.near_duplicates_total, r.near_duplicates)):
        first = f"first {len(groups):,} listed: " if total > len(groups) and groups else ""
        out.append(f"{name}: {total} groups" + (f" ({first}lines {_lines(groups)})" if groups else ""))
    if r.outliers_total:
        shown = ", ".join(f"line {ln} {k} ({n} tokens)" for ln, k, n in r.outliers[:10])
        out.append(f"length outliers: {r.outliers_total}: {shown}" + (" …" if r.outliers_total > 10 else ""))
    else:
        out.append("length outliers: none")
    out.append(f"possible PII / secrets: {r.pii_total}")
    for f in r.pii[:20]:
        out.append(f"  line {f.line}: {f.kind} {f.masked}")
    if r.pii_total > 20:
        out.append(f"  … {r.pii_total - 20} more (--json lists them)")
    for w in r.warnings:
        out.append(f"warning: {w}")
    out.append(f"({r.elapsed_s:.1f} s)")
    return "\n".join(out)
