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


@dataclass(frozen=True)
class Modality:
    """One kind of row as a run sees it, chosen once per run (``engine.modalities.for_run``) and
    asked by the training recipe instead of testing which kind it is.

    Plain attributes plus a few hooks with defaults. The training side's builders are named, not
    imported (``"module:attr"`` strings that ``engine.core.registry.load`` imports on first use, as
    ``Method.trainer`` is), so importing a modality never loads torch or ``engine.training``.
    """
    name: str
    summary: str                        # one line: the rows it trains on
    packs: bool = True                  # its encoded rows may be packed into one sequence (data.packing)
    no_packing: str = ""                # the plan line when it never packs (packs = False)
    lengths_known: bool = True          # the encoded set's input_ids can be read up front (the rope
                                        # length warning and the time prediction read them); False when
                                        # rows are encoded as the loader asks (reading them encodes all)
    data_format: str = ""               # the data.format whose rows only this modality trains ("": none)
    wrong_model: str = ""               # the one ModelError line when such rows meet a model of another
                                        # modality; ``{name}`` is model.name
    model_class: str = "transformers:AutoModelForCausalLM"   # "module:attr": what loads its model
    quant_skip: str = ""                # "module:attr": f() -> module names kept out of 4-bit ("": none)
    training_set: str = "engine.training.text:training_set"  # "module:attr": f(cfg, processing_class,
                                        # rows: Rows) -> (train dataset, eval dataset or None, warnings)
    collator: str = "engine.training.text:collator"  # "module:attr": f(cfg, runtime, tokenizer, args) ->
                                        # the data collator set on the trainer, or None (TRL's own)
    lora_targets: str = "engine.training.model:resolve_target_modules"   # "module:attr": f(cfg, model)
                                        # -> LoRA's target_modules

    # ------------------------------------------------------------- hooks
    def is_model(self, cfg, path: str) -> bool:
        """Whether the model at ``path`` is of this modality (the default modality answers False:
        it is what a run gets when no other claims the model)."""
        return False

    def load_processing(self, cfg, path: str) -> tuple[object, object, list[str]]:
        """(processing class the trainer gets and saves, its tokenizer, warnings): the model's
        tokenizer (chat template override or ChatML fallback, pad token ensured)."""
        from engine.models.tokenizer import load_tokenizer
        tok, warnings = load_tokenizer(cfg, path)
        return tok, tok, list(warnings)

    def plan_line(self, cfg, n_targets: int) -> str | None:
        """Its line in the run's plan once LoRA's ``n_targets`` layers are known (None: nothing to say)."""
        return None
