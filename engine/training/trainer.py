"""The pieces the training recipe (``engine.training.recipe``) assembles: every ``auto`` resolved
(``resolve_auto``), packing and its collator, the speed tools, and the FSDP adapter gather.

Data is tokenised with ``engine.modalities.text.encode_dataset`` (the code path the inspector's
preview uses) and handed to TRL pre-tokenised as ``input_ids`` + ``labels``; TRL then
truncates to ``max_length``, drops rows with no trained token, and packs if asked.
"""
from __future__ import annotations

from pathlib import Path


def resolve_auto(cfg, rt, emit, longest: int | None = None) -> tuple[object, list[str]]:
    """Replace every ``auto`` with a concrete choice and say why (the fit planner on GPU).

    ``data.packing = auto`` stays auto here: it depends on the rows' lengths (``decide_packing``).
    ``longest``: the longest row where rows are not packed (image rows): the planner plans for it.
    """
    cfg = cfg.copy()
    reasons = list(rt.notes)
    packing_auto = cfg.data.packing == "auto"
    tr = cfg.train
    from engine import methods
    from engine.core.registry import load
    from engine.methods.base import PREFERENCE
    method = methods.of(cfg)
    if method.optimizer:        # the method's own optimizer (GaLore's: named in its plan line)
        tr.optimizer = load(method.optimizer)(cfg, rt.device)[0]
    if method.family == PREFERENCE:     # TRL's preference trainers: no packing; Liger's fused
        if cfg.data.packing == "auto":      # preference losses are not wired here
            cfg.data.packing = False
            packing_auto = False
        if tr.liger_kernel == "auto":
            tr.liger_kernel = False
            reasons.append(f"Liger kernels off ({tr.method}: its fused preference loss is not used by this engine)")
    if tr.optimizer == "auto":
        tr.optimizer = "paged_adamw_8bit" if rt.device == "cuda" else "adamw_torch"
        reasons.append(f"optimizer {tr.optimizer} ({'GPU: paged 8-bit AdamW' if rt.device == 'cuda' else 'CPU: bitsandbytes paged optimizers need CUDA'})")
    if rt.device == "cuda" and "auto" in (tr.gradient_checkpointing, tr.liger_kernel, cfg.data.packing,
                                          tr.activation_offload, tr.weight_streaming):
        try:
            from engine.planning import estimate as est
            mc = est.model_config_for(cfg)
            free, why = est.gpu_budget(cfg)
            if tr.gpu_memory_gib:
                reasons.append(f"planning for {why}")
            p = est.plan(_planned_rows(cfg, longest, reasons), mc, free)
            cfg = est.apply_plan(cfg, p)
            tr = cfg.train
            reasons += [r for r in p.reasons if not r.startswith(("packing", "attention"))]   # decided from the data
        except Exception as e:     # the planner is advice: never a reason to fail the run
            reasons.append(f"fit planner skipped ({str(e).splitlines()[0][:200]})")
    if tr.batch_size < method.min_batch:        # the planner went below the method's minimum (KTO: 2)
        eff = tr.batch_size * tr.grad_accum
        tr.batch_size, tr.grad_accum = method.min_batch, max(1, eff // method.min_batch)
        reasons.append(f"micro-batch {tr.batch_size} x accumulation {tr.grad_accum} ({method.batch_refusal()})")
    if tr.gradient_checkpointing == "auto":
        tr.gradient_checkpointing = True
        reasons.append("gradient checkpointing on (default: least memory)")
    if tr.activation_offload == "auto":
        tr.activation_offload = False
        reasons.append("activation offload off (" + ("CPU: no GPU memory to save" if rt.device != "cuda"
                                                     else "not needed") + ")")
    _resolve_fused_lora(cfg, rt, reasons)
    _resolve_fp8(cfg, rt, reasons)
    if tr.liger_kernel == "auto":
        import importlib.util
        tr.liger_kernel = rt.device == "cuda" and importlib.util.find_spec("liger_kernel") is not None
        reasons.append("Liger kernels " + ("on (installed, CUDA)" if tr.liger_kernel else
                                           "off (" + ("CPU" if rt.device != "cuda" else "liger-kernel not installed") + ")"))
    if packing_auto:
        cfg.data.packing = "auto"
    return cfg, reasons


def _planned_rows(cfg, longest: int | None, reasons: list[str]):
    """cfg as the planner should see it: rows of the longest row's length where that is known
    and shorter than data.max_length (unpacked image rows are padded to it, never beyond)."""
    if not longest or longest >= cfg.data.max_length:
        return cfg
    out = cfg.copy()
    out.data.max_length = longest
    reasons.append(f"planning for the longest image row, {longest:,} tokens (data.max_length = "
                   f"{cfg.data.max_length:,}; image rows are not packed, a batch pads to its longest row)")
    return out


def _resolve_fused_lora(cfg, rt, reasons: list[str]) -> None:
    """``train.fused_lora = auto``: on for one-process or DDP GPU runs where it applies."""
    from engine.training.fused_lora import eligible_reason
    tr = cfg.train
    why_not = eligible_reason(cfg)
    if tr.fused_lora == "auto":
        if rt.device != "cuda":
            why_not = "CPU: measured on the GPU only"
        elif cfg.distributed.processes > 1 and cfg.distributed.strategy == "fsdp":
            why_not = "FSDP shards the 4-bit weights"
        tr.fused_lora = why_not is None
        reasons.append("fused NF4+LoRA linears " + ("on (LoRA accumulated inside the base GEMM)" if tr.fused_lora
                                                    else f"off ({why_not})"))
    elif tr.fused_lora and why_not:
        reasons.append(f"fused NF4+LoRA linears: {why_not} on every call (train.fused_lora = true)")


def _resolve_fp8(cfg, rt, reasons: list[str]) -> None:
    """``train.fp8_base``: the fused linear's base GEMMs in FP8 (engine.training.fp8); auto = on
    where the GPU runs FP8 GEMMs. Needs the fused linear (it is the code that runs them)."""
    from engine.training.fp8 import unsupported_reason
    tr = cfg.train
    why_not = None if tr.fused_lora is True else "needs the fused NF4+LoRA linear (train.fused_lora)"
    if why_not is None:
        why_not = unsupported_reason(rt.device)
    if tr.fp8_base == "auto":
        if why_not is None and rt.device != "cuda":
            why_not = "CPU: no FP8 speed to gain"
        tr.fp8_base = why_not is None
        reasons.append("FP8 base GEMMs " + ("on (e4m3, per-row scales; LoRA stays bf16)" if tr.fp8_base
                                            else f"off ({why_not})"))
    elif tr.fp8_base is True:
        tr.fp8_base = why_not is None
        reasons.append("FP8 base GEMMs on (train.fp8_base = true)" if why_not is None else
                       f"FP8 base GEMMs off although train.fp8_base = true: {why_not}")


PACKING_MIN_WASTE = 0.15   # pack when padding would waste at least this share of the compute


def padding_efficiency(lengths: list[int], batch: int, max_length: int, seed: int = 0) -> float:
    """Real tokens / padded tokens when shuffled rows are padded per micro-batch (the plain recipe)."""
    import random
    ls = [min(n, max_length) for n in lengths]
    random.Random(seed).shuffle(ls)
    real = padded = 0
    for i in range(0, len(ls), batch):
        b = ls[i:i + batch]
        real += sum(b)
        padded += max(b) * len(b)
    return real / padded if padded else 1.0


def decide_packing(cfg, rt, lengths: list[int]) -> tuple[bool, str]:
    """``data.packing = auto``: pack on GPU when padding would waste compute and attention keeps
    packed samples apart; never on the CPU."""
    from engine.models.runtime import attn_implementation, packing_isolated
    if rt.device != "cuda":
        return False, "packing off (CPU: no padding cost worth removing)"
    eff = padding_efficiency(lengths, cfg.train.batch_size, cfg.data.max_length, cfg.train.seed)
    if eff > 1 - PACKING_MIN_WASTE:
        return False, f"packing off (rows are {eff:.0%} real tokens when padded per batch: little to gain)"
    ok, why = packing_isolated(attn_implementation(cfg, rt.device))
    if not ok:
        return False, f"packing off ({why})"
    return True, f"packing on (padding would waste {1 - eff:.0%}; {why})"


def packed_collator(tok, attn: str):
    """For sdpa/eager: packed rows stay one batch row each, position_ids restart per sample and no
    attention_mask is passed, so transformers builds a per-row block-diagonal causal mask. (TRL's
    padding-free collator flattens the whole batch into one row, which flash-attention handles but
    which gives sdpa one huge (batch*len)^2 mask.) flash-attention and varlen keep TRL's own
    (padding-free) collator: no pad tokens, the samples' lengths computed on the CPU."""
    if attn in ("flash_attention_2", "varlen"):
        return None
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    class PackedRows(DataCollatorForLanguageModeling):
        def torch_call(self, examples):
            out = super().torch_call(examples)
            out.pop("attention_mask", None)
            out["labels"][out["position_ids"] == 0] = -100   # a sample's first token is not
            return out                                        # predicted from the previous sample
    return PackedRows(pad_token_id=tok.pad_token_id, padding_free=False, return_position_ids=True)


def install_speed_tools(trainer, cfg, plan: list[str]) -> None:
    """The fused NF4+LoRA linear (engine.training.fused_lora) and selective / offloaded checkpointing
    (engine.training.offload) over the Trainer's own checkpointing; both applied when training starts."""
    tr = cfg.train
    if tr.fused_lora is True and not (cfg.distributed.processes > 1 and cfg.distributed.strategy == "fsdp"):
        from engine.training.fused_lora import FusedLoRACallback
        trainer.add_callback(FusedLoRACallback(fp8=tr.fp8_base is True))
    if not tr.gradient_checkpointing or (tr.checkpoint_layers < 0 and tr.activation_offload is not True):
        return
    from engine.training import offload
    cp = offload.CheckpointPlan(layers=tr.checkpoint_layers if tr.checkpoint_layers >= 0 else None,
                                offload=tr.activation_offload is True)
    trainer.add_callback(offload.CheckpointingCallback(cp))
    plan.append("checkpointing: " + cp.describe())


def save_fsdp_adapter(trainer, out_dir: Path, with_embeddings: bool) -> bool:
    """FSDP-QLoRA: gather the sharded adapter and write it in PEFT's format (every rank calls
    this; rank 0 writes). Returns True on the process that wrote it.

    Neither the Trainer nor PEFT does this today: ``save_model`` writes no weights with a
    sharded state dict, and with a full one PEFT 0.21 picks the adapter's keys by walking the
    model's modules, whose names under FSDP carry ``_fsdp_wrapped_module.`` while the gathered
    keys do not, so it writes an empty file (both seen on 2 H200s). The keys written here are
    PEFT's: the adapter name dropped (``…q_proj.lora_A.weight``), DoRA magnitudes without
    ``.weight``, and the embedding matrices when the tokenizer grew (PEFT's "auto" rule)."""
    import copy
    from safetensors.torch import save_file
    acc = trainer.accelerator
    full = acc.get_state_dict(trainer.model)          # a collective; the whole dict on rank 0 only
    if not acc.is_main_process:
        return False
    peft_model = acc.unwrap_model(trainer.model)
    name = peft_model.active_adapter
    out = {}
    for k, v in full.items():
        if f".{name}." in k and ".lora_" in k:
            k = k.replace(f".{name}.", ".")
            if k.endswith("lora_magnitude_vector.weight"):
                k = k[: -len(".weight")]
        elif not (with_embeddings and k.endswith(("embed_tokens.weight", "lm_head.weight"))):
            continue
        out[k] = v.detach().to("cpu").contiguous()
    if not any(".lora_" in k for k in out):
        raise RuntimeError("the gathered model state has no LoRA weights; nothing to save")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = copy.deepcopy(peft_model.peft_config[name])
    cfg.inference_mode = True
    cfg.save_pretrained(str(out_dir))
    return True
