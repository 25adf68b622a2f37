"""User settings (the theme) in ``$XDG_CONFIG_HOME/qlora-tui/settings.toml``."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path


def settings_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "qlora-tui" / "settings.toml"


def load() -> dict:
    try:
        with open(settings_path(), "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def save(data: dict) -> None:
    """Write atomically; a settings file we cannot write is not worth crashing over."""
    import tomli_w
    path = settings_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(tomli_w.dumps(data), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass


def update(**values) -> None:
    data = load()
    data.update(values)
    save(data)
