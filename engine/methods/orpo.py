"""``train.method = "orpo"``: ``trl.experimental.orpo.ORPOTrainer`` (λ = ``preference.orpo_lambda``;
an SFT term on the chosen answer, no reference)."""
from __future__ import annotations

from dataclasses import dataclass

from engine.methods.preference_base import PreferenceMethod


@dataclass(frozen=True)
class ORPO(PreferenceMethod):
    def trl_kwargs(self, p) -> dict:
        return {"beta": p.orpo_lambda}

    def describe(self, p) -> str:
        return f"ORPO (λ {p.orpo_lambda:g})"


METHOD = ORPO(name="orpo", summary="Odds Ratio Preference Optimization on pairs, no reference (TRL's ORPOTrainer)",
              reference=False, pair_inputs=True, trainer="trl.experimental.orpo:ORPOTrainer",
              trl_config="trl.experimental.orpo:ORPOConfig")
