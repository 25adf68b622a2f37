"""Where rows come from beyond one local file: LLaMA-Factory's ``dataset_info.json`` (a dataset
by name, its column mapping honoured) and hub datasets by name (``hf:org/name``, offline from the
local datasets cache). Mixtures of several sources are ``engine.dataset.sources``.

``engine.dataset.data.iter_raw`` reads a ``dataset_info.json#NAME`` or ``hf:org/name`` spec
through ``iter_spec`` here, so the inspector and the trainer read them the one way; records come
out in the shapes ``engine.dataset.data.detect`` knows (a LLaMA-Factory ShareGPT row with custom
tags becomes ``conversations`` with from/value, an Alpaca row with ``history`` becomes
``messages``).
"""
from __future__ import annotations

import json
import os
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


def iter_spec(path: str, read):
    """The records of a spec: a hub dataset's rows, or a dataset_info.json dataset's file read by
    ``read`` (``engine.dataset.data.iter_raw``) with its column mapping applied."""
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
    mapper = _mapper(entry, p, name)
    for line, rec, err in read(source):
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
