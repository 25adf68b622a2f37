"""Modalities: what one kind of row needs at every stage (see ``engine.modalities.base``).

- ``text``: chat turns checked and normalised, chat-template rendering and the label mask.
- ``vision``: image+text rows, the image checks, processor-based encoding, the vision tower's
  LoRA targets and estimate terms, the inspector's image pieces.
"""
