"""``train.method = "simpo"``: ``trl.experimental.cpo.CPOTrainer`` with ``loss_type = "simpo"`` and no
SFT term (``cpo_alpha = 0``, the SimPO paper); no reference."""
from __future__ import annotations

from dataclasses import dataclass

from engine.methods.preference_base import PreferenceMethod


@dataclass(frozen=True)
class SimPO(PreferenceMethod):
    def trl_kwargs(self, p) -> dict:
        return {"loss_type": "simpo", "beta": p.simpo_beta, "simpo_gamma": p.simpo_gamma, "cpo_alpha": 0.0}

    def describe(self, p) -> str:
        return f"SimPO (β {p.simpo_beta:g}, γ {p.simpo_gamma:g})"


METHOD = SimPO(name="simpo", summary="Simple Preference Optimization on pairs, no reference (TRL's CPOTrainer)",
               reference=False, pair_inputs=True, trainer="trl.experimental.cpo:CPOTrainer",
               trl_config="trl.experimental.cpo:CPOConfig")
