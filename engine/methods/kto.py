"""``train.method = "kto"``: ``trl.KTOTrainer`` on unpaired answers labelled good/bad (pairs are
unpaired first: one desirable and one undesirable row each); the reference is the base with the
adapter disabled; its KL estimate pairs each answer with another row of the batch."""
from __future__ import annotations

from dataclasses import dataclass

from engine.methods.base import PAIRS, UNPAIRED
from engine.methods.preference_base import PreferenceMethod


@dataclass(frozen=True)
class KTO(PreferenceMethod):
    def trl_kwargs(self, p) -> dict:
        return {"beta": p.beta, "desirable_weight": p.desirable_weight, "undesirable_weight": p.undesirable_weight}

    def describe(self, p) -> str:
        return f"KTO (β {p.beta:g}, desirable ×{p.desirable_weight:g}, undesirable ×{p.undesirable_weight:g})"

    def batch_refusal(self) -> str:
        return "KTO needs a micro-batch of 2 or more (its KL estimate pairs each answer with another row of the batch)"


METHOD = KTO(name="kto", summary="Kahneman-Tversky Optimization on answers labelled good/bad (TRL's KTOTrainer)",
             rows=(UNPAIRED, PAIRS), min_batch=2, trainer="trl:KTOTrainer", trl_config="trl:KTOConfig")
