"""Loading the tokenizer and the (4-bit) base through the ordinary transformers path.

``model.name`` is a hub id, a local directory or ``builtin:tiny``. Hub tokens come from the
environment (``HF_TOKEN``) or huggingface_hub's standard cache; this module never reads
or writes them itself, so they never reach a config, a log or a run directory.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.core import files as _files

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelError(ValueError):
    """The model cannot be loaded as configured (one line, names the field and what to do)."""


@dataclass
class Runtime:
    device: str                  # "cuda" | "cpu"
    dtype: str                   # "bf16" | "fp16" | "fp32"
    load_in_4bit: bool
    notes: list[str] = field(default_factory=list)


# ---- consent to run code shipped with a model (model.trust_remote_code = true) -----------
# On the command line the config's own setting, on a command the user ran, is the consent.
# An interactive app calls ``require_consent()`` when it starts: from then on a model's code
# runs only after ``grant_remote_code(cfg)`` (the user said yes in the app); until then every
# loader here (tokenizer for the Dataset screen, config checks) reads the model without it.
_consent = {"ask": False, "granted": set()}


def require_consent() -> None:
    _consent["ask"] = True


def grant_remote_code(cfg) -> None:
    _consent["granted"].add(_consent_key(cfg))


def _consent_key(cfg) -> tuple:
    try:
        where = model_path(cfg)
    except ModelError:
        where = cfg.model.name
    return (str(where), cfg.model.revision or "")


def remote_code_allowed(cfg) -> bool:
    """Whether code shipped with ``cfg.model`` may be imported now (see above)."""
    if not cfg.model.trust_remote_code:
        return False
    return not _consent["ask"] or _consent_key(cfg) in _consent["granted"]


def _no_consent_message(cfg, what: str) -> str:
    if cfg.model.trust_remote_code:
        how = ("token counts, previews and checks that need it wait until you confirm it runs "
               "(the TUI asks at ctrl+r)")
    else:
        how = "it is not run unless you set model.trust_remote_code = true (only for a repository you trust)"
    return f"model.name = {cfg.model.name!r}: the {what} is Python code shipped with the model; {how}"


def _needs_code(e: BaseException) -> bool:
    s = str(e)
    return "trust_remote_code" in s or "auto_map" in s or "custom code" in s


def _check_model_files(name: str, p: Path) -> None:
    """Every file of a local model folder is a regular file (or a link to one): a FIFO or a device
    among them would hang or exhaust whichever library opens it (transformers, tokenizers)."""
    import stat
    try:
        entries = list(os.scandir(p))
    except OSError as e:
        raise ModelError(f"model.name = {name!r}: cannot list {p} ({e.strerror or e})") from None
    for entry in entries:
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:
            continue                           # a dangling link: the loader says what it misses
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ModelError(f"model.name = {name!r}: {_files.NotRegular(entry.path, _files.kind_of(mode))}")


def model_path(cfg) -> str:
    """A loadable path or hub id for model.name (builtin:tiny is built/cached on demand)."""
    name = cfg.model.name.strip()
    if name == "builtin:tiny":
        from engine.training.builtin import tiny_model_dir
        return str(tiny_model_dir())
    if name == "builtin:tiny-vl":
        from engine.training.vision import tiny_vl_model_dir
        return str(tiny_vl_model_dir())
    if name.startswith("builtin:"):
        raise ModelError(f"model.name = {name!r}: unknown built-in; use builtin:tiny or builtin:tiny-vl")
    p = Path(cfg.resolve_path(name))
    looks_local = name.startswith((".", "/", "~")) or p.exists()
    if looks_local:
        if not p.is_dir():
            raise ModelError(f"model.name = {name!r}: no such directory ({p}); give a model directory "
                             "or a hub id like meta-llama/Llama-3.2-1B")
        if not (p / "config.json").exists():
            raise ModelError(f"model.name = {name!r}: {p} has no config.json; is it a Hugging Face model directory?")
        _check_model_files(name, p)
        return str(p)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name):
        raise ModelError(f"model.name = {name!r}: neither a local directory nor a hub id (owner/name)")
    from engine.core import hub
    try:                    # cached here, or the hub answers: else one line, at once
        hub.check_model_id(name, cfg.model.revision or None)
    except ValueError as e:
        raise ModelError(str(e)) from None
    return name


def runtime(cfg) -> Runtime:
    import torch
    notes = []
    want = cfg.train.device
    has_cuda = torch.cuda.is_available()
    if want == "cuda" and not has_cuda:
        raise ModelError("train.device = 'cuda' but no CUDA GPU is visible; set train.device = 'auto'")
    device = "cuda" if has_cuda and want != "cpu" else "cpu"
    dt = cfg.quant.compute_dtype
    if dt == "auto":
        if device == "cuda":
            dt = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            notes.append(f"compute dtype {dt} ({'bf16 supported' if dt == 'bf16' else 'no bf16 on this GPU'})")
        else:
            dt = "fp32"
            notes.append("compute dtype fp32 (CPU)")
    elif device == "cpu" and dt == "fp16":
        notes.append("fp16 on the CPU is slow and unstable; prefer quant.compute_dtype = auto")
    # train.method: qlora and the preference methods = the 4-bit base of [quant]; lora and galore
    # train over a 16-bit base
    from engine import methods
    four = methods.of(cfg).four_bit(cfg)
    if four and device == "cpu" and not _bnb_cpu_ok():
        four = False
        notes.append("bitsandbytes cannot run 4-bit on this CPU: plain fp32 LoRA instead")
    return Runtime(device, dt, four, notes)


def train_device(rt) -> str:
    """The torch device string training runs on ("cuda:N" for this process's GPU, or "cpu")."""
    if rt.device != "cuda":
        return "cpu"
    import os
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def _bnb_cpu_ok() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return True
    except Exception:
        return False


def torch_dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_tokenizer(cfg, path: str | None = None):
    """(tokenizer, warnings): chat template override or ChatML fallback, pad token ensured."""
    from transformers import AutoTokenizer
    from engine.dataset.chat import prepare_tokenizer
    path = path or model_path(cfg)
    trust = remote_code_allowed(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision or None, trust_remote_code=trust)
    except OSError as e:
        raise ModelError(f"model.name = {cfg.model.name!r}: cannot load the tokenizer ({_first_line(e)}); "
                         "check the name, your network/HF_TOKEN, or use a local directory") from None
    except (ValueError, ImportError, AttributeError, KeyError) as e:
        if not trust and (_needs_code(e) or _ships_code(path, "tokenizer_config.json")):
            raise ModelError(_no_consent_message(cfg, "tokenizer")) from None
        raise ModelError(f"model.name = {cfg.model.name!r}: cannot load the tokenizer ({_first_line(e)})") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"model.name = {cfg.model.name!r}: only fast tokenizers are supported "
                         "(the label mask needs character offsets)")
    warnings = prepare_tokenizer(tok, cfg.model.chat_template)
    return tok, warnings


def _ships_code(path: str, fname: str) -> bool:
    import json
    try:
        data = _files.read_json(Path(path) / fname)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(data.get("auto_map"))


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


def attn_implementation(cfg, device: str) -> str:
    a = cfg.model.attn_implementation
    if a != "auto":
        return a
    if device == "cuda":
        import importlib.util
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def packing_isolated(attn: str) -> tuple[bool, str]:
    """Whether packed rows stay apart in attention with this kernel (no cross-sample leak).

    flash-attention uses the packed sequence lengths. For sdpa/eager, transformers >= 5
    derives a block-diagonal causal mask from position_ids that restart at 0, when no KV cache
    is used (training sets use_cache=False); tests/test_packing.py checks it on a real model.
    """
    if attn == "flash_attention_2":
        return True, "flash-attention keeps packed samples apart"
    if attn == "varlen":
        return True, "varlen attention (torch's variable-length flash kernel) keeps packed samples apart"
    try:
        from transformers import masking_utils
        if hasattr(masking_utils, "find_packed_sequence_indices"):
            return True, f"{attn} with a block-diagonal mask from restarting position_ids keeps samples apart"
    except ImportError:
        pass
    return False, f"{attn} in this transformers version would let packed samples attend to each other"


def load_model(cfg, rt: Runtime, path: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
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
    from engine.training import vision as vision_mod
    vision = vision_mod.model_is_vision(cfg, path)
    if vision and rt.load_in_4bit:        # the vision tower and projector stay 16-bit
        kwargs["quantization_config"].llm_int8_skip_modules = vision_mod.quant_skip_modules()
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

        from engine.training import rope
        hf_config = AutoConfig.from_pretrained(path, revision=cfg.model.revision or None,
                                               trust_remote_code=remote_code_allowed(cfg))
        rope.apply(hf_config, cfg.model.rope_scaling)
        kwargs["config"] = hf_config
    try:
        if vision:
            from transformers import AutoModelForImageTextToText
            model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
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
    from transformers import AutoConfig, AutoModelForCausalLM
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
        from engine.training import rope
        bad = rope.check(cfg.model.rope_scaling, mc.to_dict(), cfg.data.max_length, cfg.model.name)
        if bad:
            raise ModelError("\n".join(bad))
    from engine.training import vision as vision_mod
    if vision_mod.is_vision_config(mc.to_dict()):
        from transformers import AutoModelForImageTextToText
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(mc, trust_remote_code=cfg.model.trust_remote_code)
        vision_mod.lora_targets(cfg, model)
        return linear_module_names(model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mc, trust_remote_code=remote_code_allowed(cfg))
    resolve_target_modules(cfg, model)
    return linear_module_names(model)
