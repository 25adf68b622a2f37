"""Training methods: one file each, one line each in ``_REGISTRY``.

A method (``engine.methods.base.Method``) says what ``train.method = NAME`` is: its family (SFT or
preference), the rows it trains on, the artifact it leaves (a LoRA adapter or a full checkpoint),
its checks of the config, its terms for the memory planner, and (as lazy ``"module:attr"``
strings) the TRL classes the training side builds it with. The layers below ``training/`` ask the
method instead of testing names.

The registry names each method's module as a string, so reading the names (``names()``, which the
config's ``train.method`` choices use) imports nothing; ``get`` imports the one method asked for.
This package imports nothing from ``engine.training``, ``engine.planning``, ``engine.outputs``,
``engine.cli`` or ``tui``.
"""
from __future__ import annotations

from engine.core.registry import Registry

_REGISTRY = {                                   # name -> "module:attr" of its Method
    "qlora": "engine.methods.qlora:METHOD",
    "lora": "engine.methods.lora:METHOD",
    "galore": "engine.methods.galore:METHOD",
    "dpo": "engine.methods.dpo:METHOD",
    "orpo": "engine.methods.orpo:METHOD",
    "kto": "engine.methods.kto:METHOD",
    "simpo": "engine.methods.simpo:METHOD",
    "cpo": "engine.methods.cpo:METHOD",
}
DEFAULT = "qlora"


class UnknownMethod(ValueError):
    """``train.method`` names no registered method."""


_METHODS = Registry(_REGISTRY, "unknown train.method {name!r}; valid: {valid}", UnknownMethod)
names = _METHODS.names          # every method's name, in registry order (imports none of them)
get = _METHODS.get              # the Method registered as a name; UnknownMethod (one line) otherwise


def of(cfg):
    """The Method of ``cfg.train.method`` (the default method where a config has none)."""
    return get(getattr(getattr(cfg, "train", None), "method", DEFAULT))


def family(name: str) -> tuple[str, ...]:
    """The names of the methods of one family (``"sft"`` or ``"preference"``); imports each method."""
    return tuple(n for n in _REGISTRY if get(n).family == name)
