"""An image-text model's processor (image processor + tokenizer + chat template), loaded the
generic transformers way, with a fallback that builds it without a video processor."""
from __future__ import annotations

from pathlib import Path

from engine.core import files as _files
from engine.models.builtin import image_only
from engine.models.source import ModelError


def _processor_class(path: str, trust: bool):
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name
    name = None
    p = Path(path) / "processor_config.json"
    if p.is_file():
        name = _files.read_json(p).get("processor_class")
    if not name:
        mt = AutoConfig.from_pretrained(path, trust_remote_code=trust).model_type
        name = PROCESSOR_MAPPING_NAMES.get(mt)
    cls = processor_class_from_name(name) if name else None
    if cls is None:
        raise ValueError(f"no processor class for {path}")
    return cls


def pretrained_processor(path: str, revision, trust: bool):
    from transformers import AutoProcessor
    try:
        return AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust)
    except (AttributeError, ImportError, OSError, TypeError, ValueError) as first:
        # images need no video processor: without torchvision transformers cannot build one, and
        # with it a directory without video_preprocessor_config.json fails to load (seen on the H200)
        try:
            return image_only(_processor_class(path, trust)).from_pretrained(path, revision=revision,
                                                                             trust_remote_code=trust)
        except (AttributeError, ImportError, OSError, TypeError, ValueError):
            raise first from None


def load_processor(cfg, path: str):
    """The model's processor (image processor + tokenizer + chat template), pad token ensured."""
    try:
        proc = pretrained_processor(path, cfg.model.revision or None, cfg.model.trust_remote_code)
    except ImportError as e:
        raise ModelError(f"model.name = {cfg.model.name!r}: its image processor needs a missing package "
                         f"({str(e).splitlines()[0][:160]})") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name = {cfg.model.name!r}: cannot load its processor "
                         f"({str(e).splitlines()[0][:160]})") from None
    tok = getattr(proc, "tokenizer", None)
    if tok is None or not hasattr(proc, "image_processor"):
        raise ModelError(f"model.name = {cfg.model.name!r}: not an image-text model (its processor has "
                         "no image processor and tokenizer)")
    if getattr(proc, "chat_template", None) and not getattr(tok, "chat_template", None):
        tok.chat_template = proc.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return proc


