"""Modalities: what one kind of row needs at every stage (see ``engine.modalities.base``).

- ``text``: chat turns checked and normalised, chat-template rendering and the label mask.
- ``vision``: image+text rows, the image checks, processor-based encoding, the vision tower's
  LoRA targets and estimate terms, the inspector's image pieces.

Each module also makes one ``Modality`` (``MODALITY``): what a run asks of its kind of rows
(packing, encoding, collator, LoRA targets, processing class, plan line). The registry names
them as ``"module:attr"`` strings, like ``engine.methods``: ``names()`` imports nothing, ``get``
imports the one asked for; ``for_run`` chooses a run's once. Adding a modality: its file here
(rows + its ``MODALITY``), one line in ``_REGISTRY``, and where it trains differently its
training-side file in ``engine/training/`` named by the ``MODALITY``'s strings.
"""
from __future__ import annotations

from engine.core.registry import Registry

_REGISTRY = {                                   # name -> "module:attr" of its Modality
    "text": "engine.modalities.text:MODALITY",
    "vision": "engine.modalities.vision:MODALITY",
}
DEFAULT = "text"                                # a run's modality when no other claims its model


_MODALITIES = Registry(_REGISTRY, "unknown modality {name!r}; valid: {valid}")
names = _MODALITIES.names       # every modality's name, in registry order (imports none of them)
get = _MODALITIES.get           # the Modality registered as a name; KeyError naming the valid ones


def for_model(cfg, path: str):
    """The modality of the model at ``path``: the first registered one that claims it
    (``Modality.is_model``), else the default (text)."""
    for n in _REGISTRY:
        if n != DEFAULT and get(n).is_model(cfg, path):
            return get(n)
    return get(DEFAULT)


def for_run(cfg, path: str, data_format: str):
    """A run's modality, chosen once: the model's (``for_model``), checked against the rows'
    ``data_format``; rows only another modality trains (images for a text-only model) raise
    ModelError with that modality's one line."""
    from engine.models.source import ModelError
    chosen = for_model(cfg, path)
    for n in _REGISTRY:
        m = get(n)
        if m is not chosen and m.data_format and data_format == m.data_format:
            raise ModelError(m.wrong_model.format(name=cfg.model.name))
    return chosen
