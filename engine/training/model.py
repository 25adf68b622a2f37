"""Loading the (4-bit) base onto its device through the ordinary transformers path, and the
checks that need the model's modules (LoRA target modules, the meta-device skeleton).

Where the model comes from, the consent to run its code, the runtime and the tokenizer are
``engine.models``; this module adds what needs bitsandbytes and the trainer.
"""
from __future__ import annotations

from engine.models.consent import _no_consent_message, remote_code_allowed
from engine.models.runtime import Runtime, attn_implementation, torch_dtype
from engine.models.source import ModelError, _first_line, _needs_code, _ships_code, model_path


def load_model(cfg, rt: Runtime, path: str | None = None, modality=None):
    """The base model of ``cfg`` on ``rt``'s device, loaded as its modality says (the run's, else
    the model's own: ``engine.modalities.for_model``): its model class and the modules kept out of 4-bit."""
    import torch
    from transformers import BitsAndBytesConfig

    from engine import modalities
    from engine.core.registry import load
    path = path or model_path(cfg)
    dtype = torch_dtype(rt.dtype)
    if attn_implementation(cfg, rt.device) == "varlen":
        from engine.training import attention
        attention.register()
    kwargs = dict(revision=cfg.model.revision or None, trust_remote_code=remote_code_allowed(cfg),
                  dtype=dtype, attn_implementation=attn_implementation(cfg, rt.device))
    if rt.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.quant_type,
            bnb_4bit_use_double_quant=cfg.quant.double_quant, bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if cfg.distributed.strategy == "fsdp" and cfg.distributed.processes > 1
            else torch.uint8)
    modality = modality or modalities.for_model(cfg, path)
    if modality.quant_skip and rt.load_in_4bit:        # e.g. the vision tower and projector stay 16-bit
        kwargs["quantization_config"].llm_int8_skip_modules = load(modality.quant_skip)()
    fsdp = cfg.distributed.processes > 1 and cfg.distributed.strategy == "fsdp"
    if rt.device == "cuda":
        import os
        local = int(os.environ.get("LOCAL_RANK", "0"))
        # bitsandbytes quantises onto the current CUDA device: without this every rank of a
        # multi-GPU job would put its 4-bit weights on GPU 0 (FSDP then refuses to wrap them)
        torch.cuda.set_device(local)
        if not fsdp:                         # FSDP places (and shards) the weights itself
            kwargs["device_map"] = {"": local}
    if cfg.train.weight_streaming is True:   # loaded on the host; engine.training.streaming moves the rest
        kwargs["device_map"] = {"": "cpu"}
    if cfg.model.rope_scaling:            # checked against config.json in preflight (check_model_skeleton)
        from transformers import AutoConfig

        from engine.models import rope
        hf_config = AutoConfig.from_pretrained(path, revision=cfg.model.revision or None,
                                               trust_remote_code=remote_code_allowed(cfg))
        rope.apply(hf_config, cfg.model.rope_scaling)
        kwargs["config"] = hf_config
    try:
        model = load(modality.model_class).from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelError(f"model.name = {cfg.model.name!r}: cannot load weights ({_first_line(e)})") from None
    model.config.use_cache = False
    return model


def _bnb_4bit_layers(model):
    try:
        from bitsandbytes.nn import Linear4bit
    except Exception:        # no bitsandbytes: no 4-bit layers
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def keep_4bit_trainable(model, rt: Runtime) -> list[str]:
    """Keep every 4-bit layer on bitsandbytes' trainable kernel; plan notes.

    On CPUs with AVX512-bf16, bitsandbytes (0.49+) re-lays a ``Linear4bit``'s weight out for an
    inference-only kernel the first time it runs without gradients (the first eval), and keeps it
    that way: every later training step then runs ``gemv_4bit``, which has no backward (the
    gradients reaching the LoRA layers below are wrong, silently), and the re-layout itself
    fails for widths that are not multiples of its blocks (an MLP of 172, say) and adds biases
    in place (a vision model's run fails). One model serves eval and training here, so that
    layout is turned off for every layer before the first step, and ``restore_trainable_4bit``
    checks it after every eval."""
    if rt.device != "cpu" or not rt.load_in_4bit:
        return []
    layers = _bnb_4bit_layers(model)
    would = [m for m in layers if getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    restore_trainable_4bit(model)
    if not would:
        return []
    return [f"4-bit layers on bitsandbytes' trainable kernel in eval too ({len(would)} layers: its "
            "AVX512-bf16 inference layout has no backward, so it is not used by a run that trains)"]


def restore_trainable_4bit(model) -> int:
    """Put back every 4-bit layer that was switched to bitsandbytes' inference-only CPU layout
    (its own inverse: the same 4-bit codes; the block scales went through bf16 and come back
    through double quantisation, under 1% off); how many were. Called at load and after each eval."""
    n = 0
    for m in _bnb_4bit_layers(model):
        m.support_avx512bf16_for_cpu = False
        qs = getattr(m.weight, "quant_state", None)
        if qs is None or not getattr(qs, "packing_format_for_cpu", False):
            continue
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        m.weight.data, qs = _convert_weight_packed_for_cpu_inverse(m.weight.data, qs)
        m.weight.quant_state = qs
        if getattr(m, "quant_state", None) is not None:
            m.quant_state = qs
        n += 1
    return n


def linear_module_names(model) -> list[str]:
    """Suffix names of the linear layers LoRA can target (lm_head excluded)."""
    import torch
    names = set()
    for full, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            leaf = full.rsplit(".", 1)[-1]
            if leaf != "lm_head":
                names.add(leaf)
    return sorted(names)


def resolve_target_modules(cfg, model):
    target = cfg.lora.target_modules
    if target == "all-linear":
        return "all-linear"
    if isinstance(target, str):
        target = [target]
    have = linear_module_names(model)
    missing = [t for t in target if t not in have]
    if missing:
        raise ModelError(f"lora.target_modules: {', '.join(missing)} not found in the model; "
                         f"its linear modules are: {', '.join(have)} (or use \"all-linear\")")
    return list(target)


def check_model_skeleton(cfg) -> list[str]:
    """Build the model on the meta device (no weights) to check target modules early."""
    import torch
    from transformers import AutoConfig
    path = model_path(cfg)
    try:
        mc = AutoConfig.from_pretrained(path, revision=cfg.model.revision or None,
                                        trust_remote_code=remote_code_allowed(cfg))
    except OSError as e:
        raise ModelError(f"model.name = {cfg.model.name!r}: cannot read its config ({_first_line(e)}); "
                         "check the name, your network/HF_TOKEN, or use a local directory") from None
    except ValueError as e:
        if not remote_code_allowed(cfg) and (_needs_code(e) or _ships_code(path, "config.json")):
            raise ModelError(_no_consent_message(cfg, "architecture")) from None
        raise ModelError(f"model.name = {cfg.model.name!r}: {_first_line(e)}") from None
    if cfg.model.rope_scaling:
        from engine.models import rope
        bad = rope.check(cfg.model.rope_scaling, mc.to_dict(), cfg.data.max_length, cfg.model.name)
        if bad:
            raise ModelError("\n".join(bad))
    from engine import modalities
    from engine.core.registry import load
    modality = modalities.for_model(cfg, path)          # its model class and its LoRA targets' check
    with torch.device("meta"):
        model = load(modality.model_class).from_config(mc, trust_remote_code=remote_code_allowed(cfg))
    load(modality.lora_targets)(cfg, model)
    return linear_module_names(model)
