"""A run's weight streaming decided and checked before any weight is loaded: ``train.weight_streaming
= auto`` resolved (``resolve``) and the host RAM it needs checked (``check_host_ram``), from the
estimate (``engine.planning.estimate``) and the streaming arithmetic (``engine.planning.streaming_plan``)."""
from __future__ import annotations

from engine.core.units import GIB
from engine.planning.streaming_plan import (budget_bytes, env_host_ram_override, host_needed, host_ram_available,
                                            host_ram_problem)


def resolve(cfg, rt) -> list[str]:
    """Decide ``train.weight_streaming`` where still auto, check the combination; mutates ``cfg``.

    On the GPU the fit planner decides (engine.planning.estimate.plan). On the CPU, a
    ``train.gpu_memory_gib`` smaller than the 4-bit base turns streaming on with the CPU as the
    stand-in device (the same hooks and evictions; tests use it). Raises ValueError (one line)
    for settings that cannot stream."""
    from engine.planning import estimate as estimate_mod
    t = cfg.train
    reasons = []
    if t.weight_streaming == "auto":
        t.weight_streaming = False
        budget = budget_bytes(cfg)
        if rt.device == "cpu" and budget and rt.load_in_4bit:
            try:
                est = estimate_mod.estimate(cfg, estimate_mod.model_config_for(cfg), streaming=True)
            except estimate_mod.EstimateError:
                return reasons
            if est.base_quantized_bytes > budget:
                t.weight_streaming = True
                reasons.append(f"weight streaming on (CPU stand-in for a GPU: the 4-bit base, "
                               f"{est.base_quantized_bytes / GIB:.4f} GiB, exceeds train.gpu_memory_gib "
                               f"= {t.gpu_memory_gib:g})")
    if t.weight_streaming is not True:
        return reasons
    if not rt.load_in_4bit:
        raise ValueError("train.weight_streaming = true needs a 4-bit base (quant.load_in_4bit = true "
                         "and bitsandbytes)")
    if cfg.distributed.processes > 1:
        raise ValueError("train.weight_streaming = true runs on one GPU; set distributed.gpus = 1 "
                         "(FSDP shards the weights instead)")
    if t.gradient_checkpointing is False:
        raise ValueError("train.weight_streaming = true needs train.gradient_checkpointing = true or "
                         "auto (the backward reuses each layer's recompute copy)")
    t.gradient_checkpointing = True
    return reasons


def check_host_ram(cfg) -> None:
    """Refuse (ValueError, one line with the numbers) a run whose host RAM need exceeds what the
    machine has; before any weight is loaded."""
    if cfg.train.weight_streaming is not True:
        return
    from engine.planning import estimate as estimate_mod
    try:
        est = estimate_mod.estimate(cfg, estimate_mod.model_config_for(cfg), streaming=True)
    except estimate_mod.EstimateError:
        return
    avail, total = host_ram_available()
    override = env_host_ram_override()
    if override is not None:
        avail = total = override
    problem = host_ram_problem(host_needed(est.host_breakdown), avail, total)
    if problem:
        raise ValueError(problem)


