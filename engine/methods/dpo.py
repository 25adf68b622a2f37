"""``train.method = "dpo"``: ``trl.DPOTrainer`` (loss ``preference.loss_type``: sigmoid, ipo, hinge,
robust); the reference is the base with the adapter disabled."""
from __future__ import annotations

from dataclasses import dataclass

from engine.methods.preference_base import PreferenceMethod


@dataclass(frozen=True)
class DPO(PreferenceMethod):
    def trl_kwargs(self, p) -> dict:
        return {"beta": p.beta, "loss_type": [p.loss_type], "label_smoothing": p.label_smoothing}

    def describe(self, p) -> str:
        smooth = f", label smoothing {p.label_smoothing:g}" if p.label_smoothing else ""
        return f"DPO ({p.loss_type} loss, β {p.beta:g}{smooth})"


METHOD = DPO(name="dpo", summary="Direct Preference Optimization on chosen/rejected pairs (TRL's DPOTrainer)")
