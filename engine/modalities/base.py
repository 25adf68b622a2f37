"""What a modality is, and the problems it reports.

A modality owns one kind of row: how it is detected, normalised and checked (bad rows become
``DataProblem``s naming their line), how it is encoded into model inputs with the label mask,
which layers LoRA trains, its terms in the memory estimate and its part of the inspector's
report. ``engine.modalities.text`` (conversations, prompt/completion, plain text) and
``engine.modalities.vision`` (image+text rows) are the two;

The layers: ``engine.models`` < ``engine.modalities`` < ``engine.dataset`` < ``engine.planning``
< ``engine.training``; nothing here imports the data, the planner or the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass

class DataError(ValueError):
    """The data cannot be used at all (missing file, unknown type, no usable rows)."""


@dataclass
class DataProblem:
    line: int
    kind: str          # invalid_json, not_object, missing_field, wrong_type, unknown_role,
                       # role_order, empty_content, non_string_content, no_trained_tokens, mixed_format
    message: str

    def __str__(self):
        return f"line {self.line}: {self.message}"


def json_problem(e: Exception) -> str:
    """A JSON error in full: its message and where (``Invalid control character at column 15``;
    the message alone ends in a dangling "at"). Lines are given by the caller."""
    msg = getattr(e, "msg", None) or str(e)
    col = getattr(e, "colno", None)
    doc, pos = getattr(e, "doc", None), getattr(e, "pos", None)
    if msg.startswith("Invalid control character") and isinstance(doc, str) and isinstance(pos, int) \
            and doc[pos:pos + 1] in ("\n", "\r"):
        msg = "Unterminated string (the line ends inside it) at"   # a JSON string never spans lines
    return f"invalid JSON: {msg}" + (f" column {col}" if col else "")
