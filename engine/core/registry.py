"""Named parts listed without importing them (harlequin's adapters, Axolotl's builders): each
entry is a ``"package.module:attr"`` string, so ``names()`` imports nothing and ``get`` imports
only the one asked for. The methods, the modalities and the export targets are registries."""
from __future__ import annotations

import importlib


def load(spec: str):
    """The object named by ``"package.module:attr"`` (imported now)."""
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry:
    """``entries`` (name -> ``"module:attr"``, kept by reference: an entry added to the dict is
    listed); an unknown name raises ``error`` with ``unknown`` formatted (``{name}``, ``{valid}``)."""

    def __init__(self, entries: dict[str, str], unknown: str, error: type[Exception] = KeyError):
        self.entries, self.unknown, self.error = entries, unknown, error

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registry order (imports none of them)."""
        return tuple(self.entries)

    def get(self, name: str):
        spec = self.entries.get(name) if isinstance(name, str) else None
        if spec is None:
            raise self.error(self.unknown.format(name=name, valid=", ".join(self.entries)))
        return load(spec)
