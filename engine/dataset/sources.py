"""Where rows come from beyond one local file: LLaMA-Factory's ``dataset_info.json`` (a dataset
by name, its column mapping honoured), hub datasets by name (``hf:org/name``, offline from the
local datasets cache), and mixtures of several sources (``[[data.sources]]``).

``engine.dataset.data.iter_raw`` reads a ``dataset_info.json#NAME`` or ``hf:org/name`` spec
through ``iter_spec`` here, so the inspector and the trainer read them the one way; records come
out in the shapes ``engine.dataset.data.detect`` knows (a LLaMA-Factory ShareGPT row with custom
tags becomes ``conversations`` with from/value, an Alpaca row with ``history`` becomes
``messages``).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

HUB = "hf:"
INFO = "dataset_info.json"

# LLaMA-Factory's defaults (its docs/data README): column and tag names
_ALPACA_COLS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
                "system": None, "tools": None}
_SHAREGPT_COLS = {"messages": "conversations", "system": None, "tools": None, "images": None}
_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
         "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


def is_spec(path: str) -> bool:
    """A path this module reads (a hub dataset, or a dataset of a dataset_info.json)."""
    return str(path).startswith(HUB) or _info_split(str(path)) is not None


def _info_split(path: str):
    """``(dataset_info.json path, dataset name)`` for ``…/dataset_info.json#NAME``, else None."""
    if "#" not in path:
        return None
    file, _, name = path.rpartition("#")
    return (file, name) if Path(file).name == INFO else None


def iter_spec(path: str):
    from engine.modalities.base import DataError
    if path.startswith(HUB):
        yield from _iter_hub(path)
        return
    info_path, name = _info_split(path)
    p = Path(info_path).expanduser()
    try:
        info = json.loads(p.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"{p}: no such file; check data.train") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: not a readable dataset_info.json ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(info, dict) or name not in info or not isinstance(info[name], dict):
        names = ", ".join(sorted(info)[:12]) if isinstance(info, dict) else ""
        raise DataError(f"{p}: no dataset {name!r} in it" + (f"; it lists {names}" if names else ""))
    entry = info[name]
    where = entry.get("file_name")
    if where:
        source = str((p.parent / where))
    elif entry.get("hf_hub_url"):
        source = HUB + entry["hf_hub_url"] + (f"@{entry['subset']}" if entry.get("subset") else "") \
            + (f":{entry['split']}" if entry.get("split") else "")
    else:
        raise DataError(f"{p}: dataset {name!r} has no file_name (script_url / ms_hub_url / cloud files "
                        "are not read; download it and give file_name)")
    from engine.dataset.data import iter_raw
    mapper = _mapper(entry, p, name)
    for line, rec, err in iter_raw(source):
        yield line, (mapper(rec) if err is None and isinstance(rec, dict) else rec), err


def _mapper(entry: dict, p: Path, name: str):
    from engine.modalities.base import DataError
    fmt = entry.get("formatting", "alpaca")
    if fmt not in ("alpaca", "sharegpt", "openai"):
        raise DataError(f"{p}: dataset {name!r}: formatting {fmt!r} is not known (alpaca or sharegpt)")
    given = entry.get("columns") or {}
    tags = dict(_TAGS)
    if fmt == "openai":              # LLaMA-Factory's openai flavour: role/content messages
        tags.update(role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant",
                    observation_tag="tool", function_tag="function", system_tag="system")
    tags.update({k: v for k, v in (entry.get("tags") or {}).items() if isinstance(v, str)})
    ranking = bool(entry.get("ranking")) or "kto_tag" in given

    if fmt == "alpaca":
        cols = dict(_ALPACA_COLS, **given)

        def alpaca(rec: dict) -> dict:
            out = {k: rec[cols[k]] for k in ("system", "tools") if cols.get(k) and cols[k] in rec}
            ins = rec.get(cols["prompt"]) or ""
            inp = rec.get(cols["query"]) or ""
            hist = rec.get(cols["history"]) if cols.get("history") else None
            if ranking:
                out.update({k: rec[v] for k, v in given.items() if k in ("chosen", "rejected", "kto_tag")
                            and v in rec})
            if cols["response"] not in rec and not hist and not ranking:
                out["text"] = ins          # pre-training rows: columns {prompt: text}
                return out
            if not hist:
                out.update(instruction=ins, input=inp, output=rec.get(cols["response"]))
                return out
            msgs = []
            for pair in hist if isinstance(hist, list) else []:
                if isinstance(pair, (list, tuple)) and len(pair) == 2:
                    msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
            user = ins if not (isinstance(inp, str) and inp.strip()) else f"{ins}\n\n{inp}"
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": rec.get(cols["response"])}]
            out["messages"] = msgs
            return out
        return alpaca

    cols = dict(_SHAREGPT_COLS, **given)
    if fmt == "openai" and "messages" not in given:
        cols["messages"] = "messages"
    roles = {tags["user_tag"]: "human", tags["assistant_tag"]: "gpt", tags["observation_tag"]: "observation",
             tags["function_tag"]: "function_call", tags["system_tag"]: "system"}

    def sharegpt(rec: dict) -> dict:
        out = {k: rec[cols[k]] for k in ("system", "tools", "images") if cols.get(k) and cols[k] in rec}
        if ranking:
            out.update({k: rec[v] for k, v in given.items() if k in ("chosen", "rejected", "kto_tag") and v in rec})
        turns = rec.get(cols["messages"])
        if not isinstance(turns, list):
            out["conversations"] = turns
            return out
        conv = []
        for t in turns:
            if not isinstance(t, dict):
                conv.append(t)
                continue
            who = t.get(tags["role_tag"])
            conv.append({"from": roles.get(who, who), "value": t.get(tags["content_tag"])})
        out["conversations"] = conv
        return out
    return sharegpt


# ---------------------------------------------------------------------------- hub datasets

def parse_hub(spec: str) -> tuple[str, str, str]:
    """``hf:org/name[@subset][:split]`` → (name, subset, split)."""
    body = spec[len(HUB):]
    split = "train"
    if ":" in body:
        body, split = body.rsplit(":", 1)
    subset = ""
    if "@" in body:
        body, subset = body.split("@", 1)
    return body, subset, split or "train"


def _hub_reachable(timeout: float = 1.0) -> bool:
    """Whether the hub answers a TCP connect within ``timeout`` s (DNS included, in a thread so
    a hanging resolver cannot hold us)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
            os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    import socket
    import threading
    ok = []

    def probe():
        try:
            with socket.create_connection(("huggingface.co", 443), timeout=timeout):
                ok.append(True)
        except OSError:
            pass
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.2)
    return bool(ok)


def _datasets_cache() -> Path:
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "datasets"


def _cached(name: str) -> bool:
    """Whether the local datasets cache holds a prepared copy of hub dataset ``name``."""
    return (_datasets_cache() / name.replace("/", "___")).is_dir()


def _iter_hub(spec: str):
    from engine.modalities.base import DataError
    name, subset, split = parse_hub(spec)
    if not name or name.count("/") > 1:
        raise DataError(f"{spec}: a hub dataset is hf:org/name (optionally @subset and :split)")
    cached = _cached(name)
    if not cached and not _hub_reachable():
        raise DataError(f"{spec}: not in the local datasets cache ({_datasets_cache()}) and the hub is "
                        "unreachable; where there is network run datasets.load_dataset("
                        f"{name!r}{', ' + repr(subset) if subset else ''}, split={split!r}).save_to_disk(DIR) "
                        "and set data.train = DIR (a local directory)")
    import datasets
    from datasets.utils import logging as ds_logging
    ds_logging.disable_progress_bar()
    prev, verbosity = datasets.config.HF_HUB_OFFLINE, ds_logging.get_verbosity()
    try:
        if cached:
            datasets.config.HF_HUB_OFFLINE = True       # the cached copy, never the network
        ds_logging.set_verbosity_error()                 # "using the cached version": said by us
        ds = datasets.load_dataset(name, subset or None, split=split, cache_dir=str(_datasets_cache()))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot load it"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{spec}: cannot load it ({first}); check the name, subset and split, or "
                        "save it with save_to_disk and set data.train to that directory") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = prev
        ds_logging.set_verbosity(verbosity)
    for i, rec in enumerate(ds):
        yield i + 1, rec, None


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
