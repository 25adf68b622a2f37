"""``train.method = "cpo"``: Contrastive Preference Optimization (Xu et al. 2024, "Contrastive
Preference Optimization: Pushing the Boundaries of LLM Performance in Machine Translation"):
``trl.experimental.cpo.CPOTrainer`` with the sigmoid preference loss on the policy's own
log-probabilities (no reference model: β = ``preference.beta``) plus the paper's behaviour-cloning
term, the NLL of the chosen answer at weight 1 (``cpo_alpha = 1``). SimPO is the same trainer
with a length-normalised reward and no NLL term."""
from __future__ import annotations

from dataclasses import dataclass

from engine.methods.preference_base import PreferenceMethod


@dataclass(frozen=True)
class CPO(PreferenceMethod):
    def trl_kwargs(self, p) -> dict:
        return {"loss_type": "sigmoid", "beta": p.beta, "cpo_alpha": 1.0}

    def describe(self, p) -> str:
        return f"CPO (β {p.beta:g}, chosen-answer NLL ×1)"


METHOD = CPO(name="cpo", summary="Contrastive Preference Optimization on pairs: a preference loss and the chosen "
             "answer's NLL, no reference (TRL's CPOTrainer)",
             reference=False, pair_inputs=True, trainer="trl.experimental.cpo:CPOTrainer",
             trl_config="trl.experimental.cpo:CPOConfig")
