"""The preference family (``train.method = dpo | orpo | kto | simpo | ...``): a LoRA adapter over
the 4-bit base, trained with one of TRL's preference trainers on chosen/rejected pairs (or KTO's
labelled answers).

What a preference method file gives: its TRL trainer and config classes (``"module:attr"``
strings), ``trl_kwargs`` (its settings from ``[preference]``), ``describe`` (the plan line),
whether it runs a reference pass, and the rows it takes. Everything else (the batch counted in
pairs, the logits TRL's preference trainers keep, the FSDP refusal, continuing an SFT adapter)
is shared here, so engine.training.preference and the planner build any of them the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.methods.base import PAIRS, PREFERENCE, Method


@dataclass(frozen=True)
class PreferenceMethod(Method):
    family: str = PREFERENCE
    rows: tuple[str, ...] = (PAIRS,)
    fsdp: bool = False
    reference: bool = True              # a reference pass: the base with the adapter disabled (or the
                                        # frozen SFT adapter of model.adapter)
    pair_inputs: bool = False           # the trainer's batches hold chosen_/rejected_ ids, no input_ids
                                        # (TRL's ORPO/CPO): the engine counts the tokens seen itself
    trainer: str = "trl:DPOTrainer"
    trl_config: str = "trl:DPOConfig"

    def fsdp_refusal(self) -> str:
        return "preference tuning runs on one GPU or with distributed.strategy = \"ddp\""

    # ------------------------------------------------------------- training side
    def trl_kwargs(self, p) -> dict:
        """The method's own arguments of its TRL config, from the ``[preference]`` section ``p``."""
        raise NotImplementedError

    def describe(self, p) -> str:
        """The plan line's name of the method and its settings (``[preference]`` section ``p``)."""
        raise NotImplementedError

    # ------------------------------------------------------------- planner terms
    def sequences(self, micro_batch: int) -> int:
        """Chosen and rejected of each pair in one forward (KTO: each row and its KL completion)."""
        return 2 * micro_batch

    def batch_note(self, micro_batch: int, seq: int) -> str:
        what = "rows + their KL completions" if self.rows[0] != PAIRS else "pairs (chosen and rejected)"
        return f"{self.name}: {micro_batch} {what} = {self.sequences(micro_batch)} sequences of {seq} tokens per micro-batch"

    def logits_bytes(self, tokens: int, seq: int, vocab: int, d: int) -> int:
        """TRL's preference trainers take the model's full logits (the compute dtype) and their
        gradient, with the log-softmax taken row by row in fp32 (one row's temporaries)."""
        return tokens * vocab * 2 * d + seq * vocab * 8

    def reference_bytes(self, tokens: int, vocab: int, d: int) -> int:
        return tokens * vocab * d if self.reference else 0
