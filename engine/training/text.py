"""The trainer's side of text rows (``engine.modalities.text.MODALITY`` names these): the encoded
train/eval sets TRL takes pre-tokenised, and the collator (packed rows' varlen collator, else
TRL's own)."""
from __future__ import annotations


def training_set(cfg, tok, rows) -> tuple[object, object, list[str]]:
    """(train, eval or None, warnings) of a text run: ``rows`` encoded by ``recipe.load_datasets``."""
    from engine.training.recipe import load_datasets
    train, ev = load_datasets(cfg, tok, rows)
    return train, ev, []


def collator(cfg, rt, tok, args):
    """Packed rows: the collator that keeps their boundaries for this attention; else None (TRL's)."""
    if not cfg.data.packing:
        return None
    from engine.models.runtime import attn_implementation
    from engine.training.trainer import packed_collator
    return packed_collator(tok, attn_implementation(cfg, rt.device))
