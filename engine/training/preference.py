"""Preference tuning (``train.method = dpo | orpo | kto | simpo | ...``): a LoRA adapter over the
4-bit base, trained with TRL's own trainers. Each method is one file of engine/methods/ naming its
TRL trainer and config classes and its settings (``PreferenceMethod``); this module builds any of
them the same way:

- dpo: ``trl.DPOTrainer`` (loss ``preference.loss_type``: sigmoid, ipo, hinge, robust);
- orpo: ``trl.experimental.orpo.ORPOTrainer`` (λ = ``preference.orpo_lambda``; no reference);
- simpo: ``trl.experimental.cpo.CPOTrainer`` with ``loss_type = "simpo"`` and no SFT term
  (``cpo_alpha = 0``, the SimPO paper; no reference);
- kto: ``trl.KTOTrainer`` (unpaired rows; pairs are unpaired first).

The reference model of DPO and KTO is never a second copy: with a fresh adapter TRL computes the
reference log-probabilities with the adapter disabled (the 4-bit base); continuing an SFT run
(``model.adapter``) TRL adds a frozen copy of that adapter ("ref", a few MB), so the reference
is the SFT model. The run's adapter is a normal PEFT adapter: merge, export, generate and push
treat it as an SFT run's.

The trainers are ``engine.training.sft.QLoraTrainerMixin`` over TRL's classes (NaN bookkeeping,
fault injection, committed checkpoints, dtype-keeping resume), built on first use by
``sft.trainer_class`` from the method's ``trainer``: importing TRL loads rich, which no engine
module may load at import time.
"""
from __future__ import annotations

import json
from pathlib import Path

from engine import methods
from engine.core import events
from engine.core.registry import load
from engine.methods.base import PREFERENCE

PARENT_FILE = "parent.json"          # RUN_DIR/parent.json: the SFT run a preference run continues
def is_preference(cfg) -> bool:
    return methods.of(cfg).family == PREFERENCE


def to_config(cfg, common: dict):
    """The method's TRL config: the shared Trainer arguments (``recipe.trainer_args``) plus the
    ``[preference]`` section."""
    m = methods.of(cfg)
    config_class = load(m.trl_config)
    return config_class(**common, max_length=cfg.data.max_length, **m.trl_kwargs(cfg.preference),
                        include_num_input_tokens_seen="non_padding")


def datasets(cfg, rows):
    """(train, eval) ``datasets.Dataset`` of the normalised rows as the method's trainer takes them."""
    from datasets import Dataset
    from engine.dataset import preference as pref_data
    train = Dataset.from_list(pref_data.for_trainer(cfg, rows.train))
    ev = Dataset.from_list(pref_data.for_trainer(cfg, rows.eval)) if rows.eval else None
    return train, ev


def plan_lines(cfg) -> list[str]:
    m = methods.of(cfg)
    what = m.describe(cfg.preference)
    ref = ("no reference model" if not m.reference else
           "reference: the SFT adapter of model.adapter (a frozen copy of it)" if cfg.model.adapter else
           "reference: the base with the adapter disabled (no second copy)")
    return [f"preference tuning: {what}; {ref}"]


# ------------------------------------------------------------------ continuing an SFT run
def adapter_dir(path: str) -> Path:
    """The adapter directory of ``model.adapter`` (a run directory or the adapter itself);
    ValueError with one line when there is none."""
    from engine.core import rundir
    p = Path(path).expanduser()
    for cand in (p, p / rundir.ADAPTER):
        if (cand / "adapter_config.json").is_file():
            return cand
    if (p / "model" / "qlora_tui.json").is_file():
        raise ValueError(f"model.adapter = {path!r} is a GaLore run (a full checkpoint, no adapter); "
                         "point model.adapter at a LoRA/QLoRA run")
    raise ValueError(f"model.adapter = {path!r}: no adapter there (adapter_config.json); point it at a "
                     "finished SFT run directory or its adapter directory")


def parent_run(path: str) -> Path | None:
    """The run directory the adapter of ``model.adapter`` belongs to (None for a bare adapter)."""
    from engine.core import rundir
    a = adapter_dir(path)
    run = a.parent if a.name == rundir.ADAPTER else None
    return run if run is not None and (run / rundir.CONFIG).is_file() else None


def record_parent(cfg, run_dir: Path) -> None:
    """RUN_DIR/parent.json: the SFT run (and adapter) this preference run continues."""
    if not cfg.model.adapter:
        return
    a = adapter_dir(cfg.model.adapter)
    parent = parent_run(cfg.model.adapter)
    data = {"adapter": str(a.resolve()), "run_dir": str(parent.resolve()) if parent else "",
            "method": cfg.train.method}
    tmp = run_dir / (PARENT_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(run_dir / PARENT_FILE)


def read_parent(run_dir: Path) -> dict | None:
    try:
        data = json.loads((Path(run_dir) / PARENT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_adapter(cfg, model, lines: list[str]):
    """The base ``model`` with the SFT adapter of ``model.adapter``, trainable (PEFT)."""
    from peft import PeftModel
    a = adapter_dir(cfg.model.adapter)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PeftModel.from_pretrained(model, str(a), is_trainable=True)
    lc = model.peft_config["default"]
    lines.append(f"continuing the adapter of {a} (r {lc.r}, alpha {lc.lora_alpha:g}: its own LoRA settings)")
    if cfg.train.fused_lora is True and (getattr(lc, "lora_dropout", 0) or getattr(lc, "use_dora", False)):
        cfg.train.fused_lora = False
        lines.append("fused NF4+LoRA linears off (the continued adapter has dropout or DoRA)")
    return model


def check_adapter(cfg) -> None:
    """Preflight: ``model.adapter`` names an adapter, trained on this base. Raises ValueError."""
    if not cfg.model.adapter:
        return
    a = adapter_dir(cfg.model.adapter)
    try:
        base = json.loads((a / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        raise ValueError(f"model.adapter = {cfg.model.adapter!r}: adapter_config.json is not readable JSON") from None
    parent = parent_run(cfg.model.adapter)
    if parent is not None:
        try:
            from engine.core import config as config_mod
            pcfg = config_mod.load(parent / "config.toml")
            if pcfg.model.name != cfg.model.name:
                raise ValueError(f"model.adapter = {cfg.model.adapter!r} was trained on {pcfg.model.name!r}, "
                                 f"not model.name = {cfg.model.name!r}; set model.name to its base")
        except config_mod.ConfigError:
            pass
    elif not base:
        raise ValueError(f"model.adapter = {cfg.model.adapter!r}: adapter_config.json names no base model")


# ------------------------------------------------------------------ metrics -> events
_KEYS = {"rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
         "margin": "rewards/margins", "accuracy": "rewards/accuracies", "kl": "kl",
         "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected"}


def metrics_event(logs: dict, step: int, method: str) -> events.Preference | None:
    """The Preference event of one Trainer log (train or eval), None when it has no preference metric."""
    split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
    pre = "eval_" if split == "eval" else ""
    vals = {name: logs.get(pre + key) for name, key in _KEYS.items()}
    if all(v is None for v in vals.values()):
        return None
    vals = {k: (float(v) if v is not None else None) for k, v in vals.items()}
    return events.Preference(step=step, method=method, split=split,
                             loss=logs.get(pre + "loss"), **vals)


def continue_config(run_dir, cfg, method: str = "dpo"):
    """``cfg`` (a copy) set up to preference-tune the finished SFT run ``run_dir``: its model and
    4-bit settings, ``model.adapter`` = the run, ``train.method`` = ``method``. ``data.train`` is
    kept (point it at preference pairs). ValueError (one line) when the run has no adapter."""
    from engine.core import config as config_mod
    from engine.core import rundir
    run_dir = Path(run_dir)
    adapter_dir(str(run_dir))                              # raises: no adapter, or a GaLore run
    try:
        parent = config_mod.load(run_dir / rundir.CONFIG)
    except config_mod.ConfigError as e:
        raise ValueError(f"{run_dir}: its config cannot be read ({e.one_line()})") from None
    if methods.of(parent).family == PREFERENCE:
        raise ValueError(f"{run_dir} is already a {parent.train.method} run; preference-tune the SFT run it continues")
    out = cfg.copy()
    out.model.name, out.model.revision = parent.model.name, parent.model.revision
    out.model.chat_template, out.model.trust_remote_code = parent.model.chat_template, parent.model.trust_remote_code
    out.quant = parent.quant
    out.model.adapter = str(run_dir.resolve())
    out.train.method = method
    return config_mod.from_dict(out.to_dict(), source=cfg.source)
