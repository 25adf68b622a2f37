"""``model.rope_scaling``: RoPE scaling to train past a model's pretrained length.

The config's own checks (the table's keys, type, factor) are ``engine.core.config._rope_scaling``;
here it is checked against the model's config.json (``check``: one line per bad field), turned into
transformers' ``rope_parameters`` and applied to the model's config when it is loaded (``apply``),
and the rows past the pretrained length without it are named (``length_warning``). No torch.
"""
from __future__ import annotations

import math

KEY = "model.rope_scaling"


def _text_config(mc: dict) -> dict:
    if "max_position_embeddings" not in mc and isinstance(mc.get("text_config"), dict):
        return mc["text_config"]
    return mc


def _own_scaling(mc: dict) -> dict | None:
    """The model's own RoPE scaling (a non-default rope type in config.json), or None."""
    tc = _text_config(mc)
    for k in ("rope_parameters", "rope_scaling"):
        rp = tc.get(k)
        if isinstance(rp, dict):
            kind = rp.get("rope_type") or rp.get("type") or "default"
            if kind != "default":
                return rp
    return None


def pretrained_length(mc: dict) -> int | None:
    """The positions the model was pretrained for (max_position_embeddings), None when it has none."""
    n = _text_config(mc).get("max_position_embeddings")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def original_length(rope: dict, mc: dict) -> int | None:
    """The length the scaling starts from: original_max_position_embeddings, else the model's."""
    return rope.get("original_max_position_embeddings") or pretrained_length(mc)


def scaled_length(rope: dict, mc: dict) -> int | None:
    """Positions the scaled model reaches: factor x the original length (None without scaling)."""
    if not rope:
        return None
    o = original_length(rope, mc)
    return int(o * float(rope["factor"])) if o else None


def check(rope: dict, mc: dict, max_length: int, model: str = "the model") -> list[str]:
    """Problems of ``rope`` for the model of config.json ``mc``: one line per bad field."""
    if not rope:
        return []
    n = pretrained_length(mc)
    if n is None:
        return [f"{KEY}: {model} has no max_position_embeddings in its config.json (no rotary position "
                "embeddings to scale); remove model.rope_scaling"]
    own = _own_scaling(mc)
    if own is not None:
        kind = own.get("rope_type") or own.get("type")
        return [f"{KEY}: {model} already scales its RoPE ({kind}, max_position_embeddings {n}); "
                "replacing the model's own scaling is not supported: remove model.rope_scaling"]
    out = []
    o = rope.get("original_max_position_embeddings")
    if o is not None and o > n:
        out.append(f"{KEY}.original_max_position_embeddings = {o}: more than {model}'s max_position_embeddings "
                   f"({n}), the length it was pretrained for; leave it out or set at most {n}")
    scaled = scaled_length(rope, mc)
    if scaled is not None and max_length > scaled:
        start = original_length(rope, mc)
        out.append(f"{KEY}.factor = {rope['factor']:g}: reaches {scaled} positions ({start} x {rope['factor']:g}), "
                   f"less than data.max_length = {max_length}; set factor to at least "
                   f"{math.ceil(max_length / start * 100) / 100:g}")
    return out


def parameters(rope: dict, mc: dict) -> dict:
    """transformers' ``rope_parameters`` for ``rope`` (the model's rope_theta kept)."""
    tc = _text_config(mc)
    own = tc.get("rope_parameters") if isinstance(tc.get("rope_parameters"), dict) else {}
    theta = own.get("rope_theta", tc.get("rope_theta", 10000.0))
    out = {"rope_type": rope["type"], "factor": float(rope["factor"]), "rope_theta": theta}
    if rope["type"] in ("yarn", "llama3"):
        out["original_max_position_embeddings"] = original_length(rope, mc)
    if rope["type"] == "llama3":
        out["low_freq_factor"] = float(rope.get("low_freq_factor", 1.0))
        out["high_freq_factor"] = float(rope.get("high_freq_factor", 4.0))
    for k in ("partial_rotary_factor",):
        if k in own:
            out[k] = own[k]
    return out


def describe(rope: dict, mc: dict) -> str:
    """The plan's line (and the estimate's note) for ``rope`` on the model of config.json ``mc``."""
    return (f"RoPE scaling {rope['type']} x{float(rope['factor']):g} (model.rope_scaling): positions up to "
            f"{scaled_length(rope, mc)}, pretrained for {original_length(rope, mc)}")


def apply(hf_config, rope: dict) -> None:
    """Set ``rope`` on a transformers config, before the model is built from it."""
    mc = hf_config.to_dict()
    params = parameters(rope, mc)
    scaled = scaled_length(rope, mc)
    hf_config.rope_parameters = params
    if rope["type"] != "dynamic":
        # the scaled model's length; dynamic NTK keeps the pretrained one (it scales past it at run time)
        hf_config.max_position_embeddings = scaled


def length_warning(cfg, mc: dict, longest_row: int) -> str | None:
    """Rows longer than the pretrained length and no model.rope_scaling: one line saying to set it."""
    n = pretrained_length(mc)
    if cfg.model.rope_scaling or n is None or longest_row <= n or _own_scaling(mc) is not None:
        return None
    factor = math.ceil(longest_row / n * 100) / 100
    return (f"rows of up to {longest_row} tokens are longer than {cfg.model.name}'s pretrained length ({n} "
            f"positions): set model.rope_scaling = {{type = \"yarn\", factor = {max(factor, 1.01):g}}} (or linear, "
            "dynamic, llama3) to train past it, or lower data.max_length to " + str(n))
