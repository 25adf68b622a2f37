"""The model's tokenizer and its chat template: the template override (``model.chat_template``,
text or a file), the model's own, or the ChatML fallback; a pad token ensured (``load_tokenizer``,
``prepare_tokenizer``)."""
from __future__ import annotations

from pathlib import Path

from engine.models.builtin import CHATML_TEMPLATE
from engine.models.consent import _no_consent_message, remote_code_allowed
from engine.models.source import ModelError, _first_line, _needs_code, _ships_code, model_path


def prepare_tokenizer(tok, chat_template: str = "") -> list[str]:
    """Set the chat template (override, own, or ChatML fallback) and a pad token. Returns warnings."""
    warnings = []
    if chat_template:
        tok.chat_template = _template_text(chat_template)
        _check_template(tok, chat_template)
    elif not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
        added = tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}) \
            if "<|im_end|>" not in tok.get_vocab() else 0
        warnings.append("the tokenizer has no chat template: using ChatML (<|im_start|>…<|im_end|>)"
                        + (f"; added {added} special tokens (their embeddings are untrained)" if added else ""))
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
            warnings.append(f"the tokenizer has no pad token: using the EOS token {tok.eos_token!r}")
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
            warnings.append("the tokenizer has no pad or EOS token: added <|pad|>")
    return warnings


def _template_text(chat_template: str) -> str:
    """model.chat_template: a Jinja template, or the path of a file holding one. Text with no
    ``{`` is no template (it would render the same constant for every row): it must be a file."""
    if "{" in chat_template:
        return chat_template
    p = Path(chat_template).expanduser()
    from engine.core import files
    try:
        return files.read_text(p)           # a regular file of sane size
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = "no such file" if isinstance(e, FileNotFoundError) else getattr(e, "strerror", None) or str(e)
        raise ModelError(f"model.chat_template = {chat_template!r}: {why}; give the path of a Jinja "
                         "template file, or the template itself") from None


def _check_template(tok, chat_template: str) -> None:
    """Render a two-turn conversation once: a template error is said now, in one line."""
    try:
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja2 syntax/undefined/raise_exception errors alike
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        msg = (getattr(e, "message", None) or str(e)).strip().splitlines()
        raise ModelError(f"model.chat_template: the template fails{where}: {type(e).__name__}: "
                         f"{msg[0][:200] if msg else ''}; fix the template (it is Jinja)") from None


def load_tokenizer(cfg, path: str | None = None):
    """(tokenizer, warnings): chat template override or ChatML fallback, pad token ensured."""
    from transformers import AutoTokenizer
    path = path or model_path(cfg)
    trust = remote_code_allowed(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision or None, trust_remote_code=trust)
    except OSError as e:
        raise ModelError(f"model.name = {cfg.model.name!r}: cannot load the tokenizer ({_first_line(e)}); "
                         "check the name, your network/HF_TOKEN, or use a local directory") from None
    except (ValueError, ImportError, AttributeError, KeyError) as e:
        if not trust and (_needs_code(e) or _ships_code(path, "tokenizer_config.json")):
            raise ModelError(_no_consent_message(cfg, "tokenizer")) from None
        raise ModelError(f"model.name = {cfg.model.name!r}: cannot load the tokenizer ({_first_line(e)})") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"model.name = {cfg.model.name!r}: only fast tokenizers are supported "
                         "(the label mask needs character offsets)")
    warnings = prepare_tokenizer(tok, cfg.model.chat_template)
    return tok, warnings


