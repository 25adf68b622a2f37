"""Merging an adapter into a base too large to hold: shard by shard, never the whole model.

``engine.outputs.merge.merge`` reloads the whole base in 16 bits (140 GB for a 70B) and verifies the
merged model end to end; this path is for bases whose 16-bit size exceeds half the host RAM
(pre-quantized bases stay refused by ``check_adapter_against_base``: the merge wants the 16-bit
original). Per base shard: read its tensors, fold ``scale * B @ A`` into every targeted weight
(in fp32), check each merged projection on a random input against base + adapter computed
apart, write the shard in the output dtype. Peak memory: one shard in fp32 (~10 GB for a 70B's
5 GB bf16 shards), never the model.

Only the shard mechanics live here; ``engine.outputs.merge`` stages, records and reports the
result like its whole-model merge (this module imports nothing of it).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.core import files as _files

class StreamMergeError(ValueError):
    """One line: why this adapter/base cannot be merged shard by shard."""


def base_16bit_bytes(base_dir: Path) -> int:
    """Size of the base in 16 bits, from config.json (engine.planning.estimate's parameter count)."""
    from engine.planning.estimate import shape_of
    s = shape_of(_files.read_json(Path(base_dir) / "config.json"))
    per_layer = sum(a * o for a, o in s.module_dims().values())
    return 2 * (s.layers * per_layer + s.vocab * s.hidden * (1 if s.tied else 2))


def adapter_deltas(adapter_dir: Path, acfg: dict) -> dict[str, tuple]:
    """{base weight key: (A, B, scale)} from a PEFT LoRA adapter (plain LoRA only)."""
    from safetensors.torch import load_file
    if acfg.get("use_dora"):
        raise StreamMergeError("DoRA adapters are not merged shard by shard; merge them with a base "
                               "that fits in RAM (qlora-tui merge loads it whole)")
    r = int(acfg.get("r", 8))
    alpha = float(acfg.get("lora_alpha", r))
    scale = alpha / (r ** 0.5) if acfg.get("use_rslora") else alpha / r
    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    pairs: dict[str, dict] = {}
    for k, v in state.items():
        if ".lora_A." in k or ".lora_B." in k:
            mod, ab = (k.split(".lora_A.")[0], "A") if ".lora_A." in k else (k.split(".lora_B.")[0], "B")
            pairs.setdefault(mod, {})[ab] = v
        else:
            raise StreamMergeError(f"adapter tensor {k} is not a LoRA matrix (trained embeddings?); "
                                   "the shard-by-shard merge handles LoRA projections only")
    out = {}
    for mod, ab in pairs.items():
        key = mod.removeprefix("base_model.model.") + ".weight"
        out[key] = (ab["A"], ab["B"], scale)
    return out


def merge_shards(adapter_dir: Path, acfg: dict, base_dir: Path, out: Path, dtype, progress=None) -> dict:
    """Write the merged checkpoint to ``out`` shard by shard; returns a summary dict."""
    import torch
    from safetensors.torch import load_file, save_file
    base_dir, out = Path(base_dir), Path(out)
    deltas = adapter_deltas(adapter_dir, acfg)
    index = base_dir / "model.safetensors.index.json"
    shards = sorted(set(_files.read_json(index)["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    out.mkdir(parents=True, exist_ok=True)
    weight_map, merged, worst, total = {}, 0, 0.0, 0
    for n, name in enumerate(shards):
        t = load_file(str(base_dir / name))
        res = {}
        for k, v in t.items():
            w = v.float()
            if k in deltas:
                w, err = _fold(w, *deltas.pop(k))
                worst, merged = max(worst, err), merged + 1
            res[k] = w.to(dtype).contiguous()
        save_file(res, str(out / name), metadata={"format": "pt"})
        total += sum(x.numel() * x.element_size() for x in res.values())
        weight_map.update({k: name for k in res})
        if progress:
            progress((n + 1) / len(shards), f"merged shard {n + 1}/{len(shards)}")
        del t, res
    if deltas:
        raise StreamMergeError(f"{len(deltas)} adapter module(s) have no weight in the base, e.g. "
                               f"{next(iter(deltas))}; is this the adapter's base?")
    if index.exists():
        (out / index.name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = _files.read_json(base_dir / "config.json")
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for extra in ("generation_config.json",):
        if (base_dir / extra).exists():
            shutil.copy(base_dir / extra, out / extra)
    return {"merged_modules": merged, "max_abs_diff": worst, "bytes": total, "shards": len(shards)}


def _fold(w, A, B, scale):
    """W + scale * B @ A (fp32), and the largest difference on a random input between the merged
    projection and base + adapter computed separately (the per-module verification)."""
    import torch
    A, B = A.float(), B.float()
    merged = w + scale * (B @ A)
    x = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(0))
    err = float((x @ merged.T - (x @ w.T + scale * (x @ A.T) @ B.T)).abs().max())
    return merged, err


def should_stream(base: str) -> bool:
    """A local base whose 16-bit size exceeds half the available host RAM (QLORA_TUI_HOST_RAM_GIB
    overrides what is available, as for training)."""
    d = Path(base)
    if not (d / "config.json").is_file():
        return False
    from engine.planning.streaming_plan import env_host_ram_override, host_ram_available
    avail = env_host_ram_override() or host_ram_available()[0]
    try:
        return avail is not None and base_16bit_bytes(d) > avail / 2
    except Exception:
        return False
