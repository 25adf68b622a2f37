"""User settings (the theme) in ``$XDG_CONFIG_HOME/qlora-tui/settings.toml``."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path


def settings_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "qlora-tui" / "settings.toml"


def load() -> dict:
    from engine.core import files
    try:
        data = tomllib.loads(files.read_text(settings_path()))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def save(data: dict) -> None:
    """Write atomically; a settings file we cannot write is not worth crashing over."""
    import tomli_w
    path = settings_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        from engine.core import files
        files.write_atomic(path, tomli_w.dumps(data))
    except OSError:
        pass


def update(**values) -> None:
    data = load()
    data.update(values)
    save(data)
