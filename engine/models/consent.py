"""Consent to run code shipped with a model (``model.trust_remote_code = true``).

On the command line the config's own setting, on a command the user ran, is the consent.
An interactive app calls ``require_consent()`` when it starts: from then on a model's code
runs only after ``grant_remote_code(cfg)`` (the user said yes in the app); until then every
loader (tokenizer for the Dataset screen, config checks) reads the model without it.
"""
from __future__ import annotations

from engine.models.source import ModelError, model_path

_consent = {"ask": False, "granted": set()}


def require_consent() -> None:
    _consent["ask"] = True


def grant_remote_code(cfg) -> None:
    _consent["granted"].add(_consent_key(cfg))


def _consent_key(cfg) -> tuple:
    try:
        where = model_path(cfg)
    except ModelError:
        where = cfg.model.name
    return (str(where), cfg.model.revision or "")


def remote_code_allowed(cfg) -> bool:
    """Whether code shipped with ``cfg.model`` may be imported now (see above)."""
    if not cfg.model.trust_remote_code:
        return False
    return not _consent["ask"] or _consent_key(cfg) in _consent["granted"]


def _no_consent_message(cfg, what: str) -> str:
    if cfg.model.trust_remote_code:
        how = ("token counts, previews and checks that need it wait until you confirm it runs "
               "(the TUI asks at ctrl+r)")
    else:
        how = "it is not run unless you set model.trust_remote_code = true (only for a repository you trust)"
    return f"model.name = {cfg.model.name!r}: the {what} is Python code shipped with the model; {how}"


