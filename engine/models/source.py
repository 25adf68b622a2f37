"""Where a model comes from: ``model.name`` as a hub id, a local directory or a built-in
(``builtin:tiny``, ``builtin:tiny-vl``), resolved to a loadable path (``model_path``), and its
config.json read without any weights (``model_config``).

Hub tokens come from the environment (``HF_TOKEN``) or huggingface_hub's standard cache; this
module never reads or writes them itself, so they never reach a config, a log or a run directory.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from engine.core import files as _files


class ModelError(ValueError):
    """The model cannot be loaded as configured (one line, names the field and what to do)."""


def _check_model_files(name: str, p: Path) -> None:
    """Every file of a local model folder is a regular file (or a link to one): a FIFO or a device
    among them would hang or exhaust whichever library opens it (transformers, tokenizers)."""
    import stat
    try:
        entries = list(os.scandir(p))
    except OSError as e:
        raise ModelError(f"model.name = {name!r}: cannot list {p} ({e.strerror or e})") from None
    for entry in entries:
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:
            continue                           # a dangling link: the loader says what it misses
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ModelError(f"model.name = {name!r}: {_files.NotRegular(entry.path, _files.kind_of(mode))}")


def model_path(cfg) -> str:
    """A loadable path or hub id for model.name (builtin:tiny is built/cached on demand)."""
    name = cfg.model.name.strip()
    if name == "builtin:tiny":
        from engine.models.builtin import tiny_model_dir
        return str(tiny_model_dir())
    if name == "builtin:tiny-vl":
        from engine.models.builtin import tiny_vl_model_dir
        return str(tiny_vl_model_dir())
    if name.startswith("builtin:"):
        raise ModelError(f"model.name = {name!r}: unknown built-in; use builtin:tiny or builtin:tiny-vl")
    p = Path(cfg.resolve_path(name))
    looks_local = name.startswith((".", "/", "~")) or p.exists()
    if looks_local:
        if not p.is_dir():
            raise ModelError(f"model.name = {name!r}: no such directory ({p}); give a model directory "
                             "or a hub id like meta-llama/Llama-3.2-1B")
        if not (p / "config.json").exists():
            raise ModelError(f"model.name = {name!r}: {p} has no config.json; is it a Hugging Face model directory?")
        _check_model_files(name, p)
        return str(p)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name):
        raise ModelError(f"model.name = {name!r}: neither a local directory nor a hub id (owner/name)")
    from engine.core import hub
    try:                    # cached here, or the hub answers: else one line, at once
        hub.check_model_id(name, cfg.model.revision or None)
    except ValueError as e:
        raise ModelError(str(e)) from None
    return name


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


def _needs_code(e: BaseException) -> bool:
    s = str(e)
    return "trust_remote_code" in s or "auto_map" in s or "custom code" in s


def _ships_code(path: str, fname: str) -> bool:
    try:
        data = _files.read_json(Path(path) / fname)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(data.get("auto_map"))


def _hub_config(name: str, repo: str, revision) -> Path:
    """config.json of a hub model: from the local cache, else downloaded (the model source check,
    engine.core.hub, has already said whether the hub answers)."""
    from engine.core import hub
    cached = hub.cached_file(repo, "config.json", revision)
    if cached is not None:
        return Path(cached)
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(repo, "config.json", revision=revision))
    except Exception as e:  # gated, missing repo: one line naming the model, never cut mid-word
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"cannot read config.json of model {name!r} from the hub: "
                         f"{type(e).__name__}: {first}") from None


def model_config(cfg) -> dict:
    """The model's config.json as a dict: local directory, builtin:tiny, or the hub (config only)."""
    name = cfg.model.name.strip()
    where = model_path(cfg)
    p = Path(where)
    if p.is_dir():
        path = p / "config.json"
    else:
        path = _hub_config(name, where, cfg.model.revision or None)
    try:
        return _files.read_json(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path} for model {name!r}: {e}") from None
