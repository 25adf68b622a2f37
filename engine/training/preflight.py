"""Everything checked before a run directory exists: the data, the model, shipped code, trackers.

``preflight`` raises ``PreflightError`` with one line naming the file, line or field: a bad
config, data file or model path never leaves a half-created run directory.
"""
from __future__ import annotations

from pathlib import Path

from engine.core import files as _files
from engine.core import config
from engine.training.failures import PreflightError


def preflight(cfg: config.Config, check_model: bool = True) -> list[str]:
    """Everything that can be checked before a run directory exists. Raises PreflightError."""
    from engine.dataset import data as data_mod
    from engine.training import model as model_mod
    from engine.models.source import ModelError
    from engine.dataset.rows import load_for_training
    from engine.models.tokenizer import load_tokenizer
    from engine.training import trackers
    try:
        trackers.check_available(cfg.output.report_to)
    except trackers.TrackerError as e:
        raise PreflightError(str(e)) from None
    try:
        train, ev = load_for_training(cfg)
    except data_mod.DataError as e:
        raise PreflightError(_with_first_bad_line(cfg, str(e))) from None
    if cfg.model.adapter:
        from engine.training import preference
        try:
            preference.check_adapter(cfg)
        except ValueError as e:
            raise PreflightError(str(e)) from None
    notes = []
    if train.problems:
        notes.append(f"{config.plural(len(train.problems), 'data problem')}: bad rows are skipped "
                     f"(first: line {train.problems[0].line}: {train.problems[0].message})")
    if check_model:
        note = remote_code_check(cfg)
        if note:
            notes.append(note)
        try:
            model_mod.check_model_skeleton(cfg)
            load_tokenizer(cfg)    # shipped tokenizer code, a broken chat template: said here
        except ModelError as e:
            raise PreflightError(str(e)) from None
    return notes


def quick_preflight(cfg: config.Config) -> None:
    """The cheap part of ``preflight`` (milliseconds: no data parsed, no tokenizer loaded), run
    before ``train --detach`` returns: the tracker, that each data path names a readable file or
    folder, that the model path resolves, that no shipped code would run without consent, that a
    chat template file is readable. A refusal here is exit 2 and one line, as ``--headless``
    says it; the child then runs the whole ``preflight`` and records what only it finds."""
    from engine.core import files
    from engine.dataset import data as data_mod
    from engine.models.source import ModelError, model_path
    from engine.training import trackers
    try:
        trackers.check_available(cfg.output.report_to)
    except trackers.TrackerError as e:
        raise PreflightError(str(e)) from None
    for key in ("train", "eval"):
        value = getattr(cfg.data, key)
        if not value:
            continue
        p = data_mod.resolve(cfg.resolve_path(value))
        if not p.exists():
            raise PreflightError(f"{p}: no such file or directory; check data.{key}")
        if not p.is_dir():
            try:
                files.check_regular(p)
            except files.NotRegular as e:
                raise PreflightError(f"data.{key}: {e}") from None
            except OSError as e:
                raise PreflightError(f"{p}: cannot read it ({e.strerror or e}); check data.{key}") from None
    try:
        model_path(cfg)
    except ModelError as e:
        raise PreflightError(str(e)) from None
    remote_code_check(cfg)
    tpl = cfg.model.chat_template
    if tpl and "{" not in tpl:
        from engine.models.tokenizer import _template_text
        try:
            _template_text(tpl)
        except ModelError as e:
            raise PreflightError(str(e)) from None


def _with_first_bad_line(cfg: config.Config, msg: str) -> str:
    """A data error that names no line gets the first unreadable line of the file it is about."""
    from engine.dataset import data as data_mod
    if "line " in msg:
        return msg
    for key in ("train", "eval"):
        value = getattr(cfg.data, key)
        if not value or str(data_mod.resolve(cfg.resolve_path(value))) not in msg:
            continue
        where = data_mod.resolve(cfg.resolve_path(value))
        n = 0
        try:
            for line, _rec, err in data_mod.iter_raw(cfg.resolve_path(value)):
                n += 1
                if err is not None:
                    return f"{msg}; first problem at line {line}: {err}"
        except (data_mod.DataError, OSError, ValueError):
            return msg
        if n == 0:
            return f"{where}: the file has no rows (data.{key}); add training examples"
    return msg


def remote_code_check(cfg: config.Config) -> str | None:
    """Refuse a local model whose architecture exists only as code shipped with it, unless
    ``model.trust_remote_code`` is set (the TUI asks the user to confirm that first; see
    ``needs_remote_code_confirmation``). Returns a note when the code is present but not needed.
    Hub ids are checked by transformers itself (it refuses without trust_remote_code)."""
    import json
    from engine.models.source import ModelError, model_path
    if cfg.model.trust_remote_code:
        return None
    try:
        path = Path(model_path(cfg))
    except ModelError as e:
        raise PreflightError(str(e)) from None
    if not path.is_dir():
        return None
    shipped = {}
    for fname in ("config.json", "tokenizer_config.json"):
        try:
            data = _files.read_json(path / fname)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            shipped[fname] = data
    if not shipped:
        return None
    model_type = (shipped.get("config.json") or {}).get("model_type")
    if model_type is None:
        try:
            model_type = _files.read_json(path / "config.json").get("model_type")
        except (OSError, ValueError):
            model_type = None
    from transformers import CONFIG_MAPPING
    files = " and ".join(shipped)
    if model_type and model_type in CONFIG_MAPPING:
        return (f"model.name = {cfg.model.name!r} ships its own Python code (auto_map in {files}); it is "
                f"not run: transformers' built-in {model_type!r} is used (model.trust_remote_code = false)")
    raise PreflightError(
        f"model.name = {cfg.model.name!r}: the architecture {model_type!r} exists only as Python code "
        f"shipped with the model (auto_map in {files}); it is not run unless you set "
        "model.trust_remote_code = true (and confirm it in the TUI) — only for a repository you trust")


def needs_remote_code_confirmation(cfg: config.Config) -> bool:
    """True when starting this config would run code shipped with the model: the TUI must ask
    the user to confirm before it starts (or resumes) the run. Headless runs take the config's
    explicit ``model.trust_remote_code = true`` as the consent."""
    return bool(cfg.model.trust_remote_code)
