"""Merge a LoRA adapter into its base: a standard 16-bit Hugging Face checkpoint, verified.

The base is reloaded in 16-bit (or fp32) — never merged into 4-bit weights — the adapter is
applied with ``PeftModel.from_pretrained`` and folded in with ``merge_and_unload()``. Before
anything heavy is loaded the adapter is checked against the base (the seed guide's "garbage
outputs after merge": target modules that don't exist in the base, or a base of another
architecture / size). After saving, the merged checkpoint is reloaded with plain
``AutoModelForCausalLM`` and its logits are compared with the unmerged base + adapter on a few
prompts; a difference above the dtype's tolerance raises ``MergeError``.

What the run produced (the adapter, its base, revision and tokenizer) is found by
``engine.artifacts.RunArtifact``; the adapter is checked against the base here.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.artifacts import MERGE_INFO, AdapterError, ArtifactKind, RunArtifact, tokenizer_source
from engine.core import files as _files

DTYPES = ("auto", "bf16", "fp16", "fp32")

# verification tolerance on logits: atol + rtol * max|reference logit|
LOGIT_TOLERANCE = {"fp32": (1e-3, 1e-4), "fp16": (2e-2, 1e-2), "bf16": (5e-2, 5e-2)}

CHECK_PROMPTS = [
    "Hello! How are you today?",
    "What is the capital of France?",
    "Write one sentence about the sea.",
]


class MergeError(AdapterError):
    """The merge cannot run or its result failed verification; the message is one line."""


# --------------------------------------------------------------------------- checking an adapter against its base

def _short_list(items, limit: int = 8) -> str:
    items = list(items)
    text = ", ".join(items[:limit])
    if len(items) > limit:
        text += f" (+{len(items) - limit} more)"
    return text


def auto_model_class(config):
    """The transformers Auto class that builds a base of this config (a ``PretrainedConfig``
    or config.json as a dict): image-text where it has a vision part, else causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    d = config if isinstance(config, dict) else config.to_dict()
    return AutoModelForImageTextToText if isinstance(d.get("vision_config"), dict) else AutoModelForCausalLM


def _base_modules(base: str, revision: str, trust_remote_code: bool, err) -> tuple[Any, dict]:
    """The base's config and {module name: (in_features, out_features)}, built on the meta device."""
    import torch
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(base, revision=revision or None,
                                         trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise err(f"base model {base}: cannot read its config.json: {str(e).splitlines()[0][:200]}") from None
    try:
        with torch.device("meta"):
            model = auto_model_class(cfg).from_config(cfg, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise err(f"base model {base}: not a language model transformers can build "
                  f"({str(e).splitlines()[0][:200]})") from None
    shapes: dict[str, tuple[int, int]] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if w is None or getattr(w, "ndim", 0) != 2:
            continue
        if hasattr(mod, "in_features") and hasattr(mod, "out_features"):
            shapes[name] = (int(mod.in_features), int(mod.out_features))
        elif hasattr(mod, "num_embeddings"):
            shapes[name] = (int(mod.num_embeddings), int(mod.embedding_dim))
        elif type(mod).__name__ == "Conv1D":  # GPT-2 style: weight is (in, out)
            shapes[name] = (int(w.shape[0]), int(w.shape[1]))
    return cfg, shapes


def _config_summary(cfg) -> dict:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    get = getattr(cfg, "get_text_config", None)
    text_cfg = get() if callable(get) else cfg
    return {k: getattr(text_cfg, k, getattr(cfg, k, None)) for k in keys}


def check_adapter_against_base(adapter_dir: Path, acfg: dict, base: str, *, revision: str = "",
                               trust_remote_code: bool = False,
                               err: type[Exception] = AdapterError) -> None:
    """Refuse an adapter that does not fit ``base``: another architecture or size, target
    modules the base does not have, or LoRA weights whose shapes differ from the base's layers.
    """
    base_cfg, shapes = _base_modules(base, revision, trust_remote_code, err)
    _refuse_prequantized(base_cfg, base, err)
    _refuse_other_trained_on(acfg, base, base_cfg, trust_remote_code, err)
    missing = _missing_targets(adapter_dir, acfg.get("target_modules"), list(shapes), err)
    mismatched = _check_lora_tensors(adapter_dir, shapes, missing, err)
    if missing:
        linear_leaves = sorted({n.rsplit(".", 1)[-1] for n in shapes if n})
        raise err(f"adapter target modules missing from base {base}: {_short_list(missing)}; the "
                  f"base's layers that LoRA can target are: {_short_list(linear_leaves, 12)} (wrong base or "
                  f"target_modules: pass --base with the model the adapter was trained on)")
    if mismatched:
        raise err(f"mismatched base: adapter layer shapes differ from base {base}: "
                  f"{_short_list(mismatched, 4)}; pass --base with the model the adapter was trained on")


def _refuse_prequantized(base_cfg, base: str, err) -> None:
    qc = getattr(base_cfg, "quantization_config", None)
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise err(f"base model {base} is pre-quantized ({method} quantization_config in its "
                  f"config.json); merging needs the 16-bit original: pass --base with it")


def _refuse_other_trained_on(acfg: dict, base: str, base_cfg, trust_remote_code: bool, err) -> None:
    """The base the adapter was trained on, when it is a different local model: compare sizes."""
    trained_on = str(acfg.get("base_model_name_or_path") or "")
    tp = Path(trained_on).expanduser() if trained_on else None
    if tp is None or not (tp / "config.json").is_file() or tp.resolve() == Path(base).expanduser().resolve():
        return
    from transformers import AutoConfig
    try:
        tcfg = AutoConfig.from_pretrained(str(tp), trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - only a best-effort comparison
        return
    a, b = _config_summary(tcfg), _config_summary(base_cfg)
    diff = [k for k in a if a[k] is not None and b[k] is not None and a[k] != b[k]]
    if diff:
        detail = ", ".join(f"{k} {a[k]} vs {b[k]}" for k in diff)
        raise err(f"mismatched base: the adapter was trained on {trained_on} but base "
                  f"{base} differs ({detail}); pass --base with the model it was trained on")


def _missing_targets(adapter_dir: Path, targets, names: list[str], err) -> list[str]:
    """target_modules (a list of names, or a regular expression) that match no module of the base."""
    import re

    def matches(key: str) -> bool:
        return any(n == key or n.endswith("." + key) for n in names)

    if isinstance(targets, (list, tuple, set)):
        return sorted(str(t) for t in targets if not matches(str(t)))
    if isinstance(targets, str) and targets != "all-linear":
        try:
            if not any(re.fullmatch(targets, n) for n in names):
                return [targets]
        except re.error:
            raise err(f"{adapter_dir / 'adapter_config.json'}: target_modules {targets!r} is "
                      f"not a valid regular expression") from None
    return []


_LORA_KEYS = (r"^(?:base_model\.model\.)?(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?\.weight$",
              r"^(?:base_model\.model\.)?(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$")


def _check_lora_tensors(adapter_dir: Path, shapes: dict, missing: list[str], err) -> list[str]:
    """The saved LoRA tensors against the base's layers: modules the base lacks are added to
    ``missing``; the layers whose shapes differ are returned."""
    import re
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        if not (adapter_dir / "adapter_model.bin").is_file():
            raise err(f"{adapter_dir}: no adapter_model.safetensors; the adapter was not saved completely")
        return []
    from safetensors import safe_open
    mismatched: list[str] = []
    seen: set[str] = set()
    try:
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():
                m = re.match(_LORA_KEYS[0], key) or re.match(_LORA_KEYS[1], key)
                if not m:
                    continue
                module, part = m.group(1), m.group(2)
                if module not in shapes:
                    if module not in seen:
                        missing.append(module)
                        seen.add(module)
                    continue
                bad = _shape_mismatch(module, part, f.get_slice(key).get_shape(), shapes[module])
                if bad:
                    mismatched.append(bad)
    except Exception as e:  # noqa: BLE001
        raise err(f"{weights}: cannot read the adapter weights ({str(e).splitlines()[0][:200]}); "
                  f"the file is damaged, re-save the adapter") from None
    return mismatched


def _shape_mismatch(module: str, part: str, shape, base_shape: tuple[int, int]) -> str | None:
    fan_in, fan_out = base_shape
    if part == "lora_A" and len(shape) == 2 and shape[1] != fan_in:
        return f"{module} (adapter in={shape[1]}, base in={fan_in})"
    if part == "lora_B" and len(shape) == 2 and shape[0] != fan_out:
        return f"{module} (adapter out={shape[0]}, base out={fan_out})"
    return None


def torch_dtype(name: str, device: str):
    """Our dtype name → torch dtype; ``auto`` = bf16 (or fp16) on CUDA, fp32 on the CPU."""
    import torch
    if name == "auto":
        if device == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    return name, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# --------------------------------------------------------------------------- merge

@dataclass
class MergeReport:
    out: str
    base: str
    adapter: str
    dtype: str
    device: str
    max_abs_diff: float          # merged checkpoint vs base + adapter (unmerged), over all logits
    tolerance: float
    top1_agreement: float        # share of positions where both pick the same next token
    adapter_effect: float        # max |logits(base + adapter) - logits(base)|: 0 = adapter does nothing
    prompts: int
    tokens: int
    seconds: float
    size_bytes: int
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [
            f"merged model: {self.out}",
            f"  base:     {self.base}",
            f"  adapter:  {self.adapter}",
            f"  dtype:    {self.dtype} on {self.device}",
            f"  size:     {self.size_bytes / 1e6:.1f} MB ({', '.join(self.files)})",
            f"  verified: max |logit diff| {self.max_abs_diff:.3g} <= tolerance {self.tolerance:.3g} "
            f"over {self.prompts} prompts / {self.tokens} tokens; top-1 agreement "
            f"{self.top1_agreement:.1%}; adapter effect {self.adapter_effect:.3g}",
            f"  load it:  AutoModelForCausalLM.from_pretrained({self.out!r})",
        ]
        out += [f"  warning:  {w}" for w in self.warnings]
        return out


def prompt_texts(tokenizer, check_rows) -> list[str]:
    rows = list(check_rows) if check_rows else list(CHECK_PROMPTS)
    texts = []
    for row in rows[:8]:
        if isinstance(row, str):
            texts.append(row)
            continue
        if isinstance(row, dict):
            msgs = row.get("messages") or row.get("conversations")
            if isinstance(msgs, list) and msgs:
                try:
                    texts.append(tokenizer.apply_chat_template(msgs, tokenize=False))
                    continue
                except Exception:  # noqa: BLE001 - no template: plain concatenation
                    texts.append("\n".join(str(m.get("content", m.get("value", ""))) for m in msgs
                                           if isinstance(m, dict)))
                    continue
            for key in ("text", "prompt", "instruction"):
                if isinstance(row.get(key), str):
                    texts.append(row[key])
                    break
    texts = [t for t in texts if t.strip()]
    return texts or list(CHECK_PROMPTS)


def model_logits(model, encoded: list) -> list:
    import torch
    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for ids in encoded:
            out.append(model(input_ids=ids.to(device)).logits.float().cpu())
    return out


def dir_files(d: Path) -> tuple[int, list[str]]:
    files = sorted(p for p in d.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files), [str(p.relative_to(d)) for p in files]


def compare_logits(ref, got, atol: float, rtol: float) -> tuple[float, float, int, int]:
    """(max |difference|, the bound atol + rtol * max |ref|, top-1 agreements, positions) of two
    lists of logits; merge and export verify with it."""
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    tol = atol + rtol * max(float(a.abs().max()) for a in ref)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, got))
    return diff, tol, agree, sum(int(a.shape[1]) for a in ref)


def merge(src: str | Path, out: str | Path, dtype: str = "bf16",
          on_progress: Callable[[float, str], None] | None = None,
          check_rows=None, base: str | None = None, stream: bool | None = None) -> MergeReport:
    """Merge the adapter of ``src`` (a run dir or an adapter dir) into its base, save the result
    to ``out`` as a standard safetensors checkpoint, and verify it reproduces base + adapter.

    ``dtype``: bf16, fp16, fp32 or auto (bf16/fp16 on CUDA, fp32 on the CPU). ``base`` overrides
    the adapter's ``base_model_name_or_path``. ``stream``: merge shard by shard
    (engine/outputs/merge_stream.py); None = when the base is stored 4-bit or its 16-bit size exceeds half
    the available host RAM (a 70B). Raises ``MergeError`` (one-line message).
    """
    t0 = time.time()
    progress = on_progress or (lambda f, m: None)
    out = _check_out(out, dtype)
    art, base_name = _merge_inputs(src, base, progress)
    adapter_dir, revision, trust = art.output_dir, art.revision, art.trust_remote_code
    from engine.outputs import merge_stream
    if stream is None:
        stream = merge_stream.should_stream(base_name)
    if stream:
        return _merge_streamed(art, base_name, out, dtype, progress, t0)

    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name, tdtype = torch_dtype(dtype, device)
    load_kw: dict[str, Any] = {"dtype": tdtype, "revision": revision or None,
                               "trust_remote_code": trust}
    if device == "cuda":
        load_kw["device_map"] = "auto"
    warnings: list[str] = []
    with staged(out) as tmp:          # a folder of our own beside --out, renamed in when verified
        encoded, ref, effect = _merge_to(tmp, out, base_name, adapter_dir, load_kw, (dtype_name, device),
                                         check_rows, progress)
        import gc
        gc.collect()                      # the base, the PEFT model and the merged one are gone
        if device == "cuda":
            torch.cuda.empty_cache()
        diff, tol, agree, total = _verify_merged(tmp, out, load_kw, encoded, ref, dtype_name, progress)
        if effect == 0.0:
            warnings.append("the adapter does not change the base's logits (all lora_B weights zero? "
                            "an untrained adapter): the merged model equals the base")
        if dtype_name == "fp16" and device == "cpu":
            warnings.append("fp16 on the CPU is slow and less precise; bf16 or fp32 is preferred here")
        info = {"base": base_name, "adapter": str(adapter_dir.resolve()), "dtype": dtype_name,
                "max_abs_diff": diff, "tolerance": tol, "adapter_effect": effect,
                "merged_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _write_card(tmp, out, src, art, dtype_name, warnings)
    size, files = dir_files(out)
    progress(1.0, "done")
    return MergeReport(out=str(out), base=base_name, adapter=str(adapter_dir), dtype=dtype_name,
                       device=device, max_abs_diff=diff, tolerance=tol,
                       top1_agreement=agree / total if total else 1.0, adapter_effect=effect,
                       prompts=len(encoded), tokens=total, seconds=time.time() - t0,
                       size_bytes=size, files=files, warnings=warnings)


def _merge_streamed(art: RunArtifact, base: str, out, dtype: str, progress, t0: float) -> MergeReport:
    """``merge`` for the shard-by-shard path (``engine.outputs.merge_stream``): same output
    layout, same report."""
    from transformers import AutoTokenizer
    from engine.outputs.merge_stream import StreamMergeError, merge_shards
    out = Path(out).expanduser()
    dtype_name, tdtype = torch_dtype(dtype, "cpu")
    progress(0.1, f"merging {base} shard by shard in {dtype_name} (the whole model is never loaded)")
    tol = LOGIT_TOLERANCE["fp32"][0]
    with staged(out) as tmp:       # a folder of our own beside --out, renamed in when verified
        try:
            info = merge_shards(art.output_dir, art.adapter_config, Path(base), tmp, tdtype,
                                lambda f, m: progress(0.1 + 0.8 * f, m))
            AutoTokenizer.from_pretrained(art.tokenizer_source(base)).save_pretrained(str(tmp))
        except StreamMergeError as e:
            raise MergeError(str(e)) from None
        except Exception as e:  # noqa: BLE001
            raise MergeError(f"shard-by-shard merge failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}") from None
        if not info["max_abs_diff"] <= tol:
            raise MergeError(f"verification failed: a merged projection differs from base + adapter by "
                             f"{info['max_abs_diff']:.4g} (> {tol:.4g}); nothing was written to {out}")
        (tmp / MERGE_INFO).write_text(json.dumps(
            {"base": base, "adapter": str(art.output_dir.resolve()), "dtype": dtype_name, "streamed": True,
             **info, "merged_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n", encoding="utf-8")
    size, files = dir_files(out)
    progress(1.0, "done")
    return MergeReport(out=str(out), base=base, adapter=str(art.output_dir), dtype=dtype_name, device="cpu",
                       max_abs_diff=info["max_abs_diff"], tolerance=tol, top1_agreement=1.0,
                       adapter_effect=float("nan"), prompts=0, tokens=0, seconds=time.time() - t0,
                       size_bytes=size, files=files,
                       warnings=[f"merged shard by shard: each of the {info['merged_modules']} merged "
                                 "projections was checked on random inputs in fp32 (not end to end on "
                                 "prompts: the whole model is never loaded)"])


def _check_out(out, dtype: str) -> Path:
    """The dtype is known and --out is new (or an empty directory, not a symlink) and writable."""
    if dtype not in DTYPES:
        raise MergeError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    try:
        return _files.check_output(out)
    except OSError as e:
        raise MergeError(str(e)) from None


@contextlib.contextmanager
def staged(out: Path, err: type[Exception] | None = None):
    """``engine.core.files.staged_dir`` with its refusals as ``err`` (MergeError) one-liners."""
    err = err or MergeError
    try:
        with _files.staged_dir(out) as tmp:
            yield tmp
    except _files.OutputError as e:
        raise err(str(e)) from None
    except OSError as e:
        raise err(f"writing {out} failed: {e.strerror or e}") from None


def _merge_inputs(src, base: str | None, progress) -> tuple[RunArtifact, str]:
    """(the run's artifact, the resolved base), the adapter checked against the base before
    anything heavy is loaded."""
    from engine.methods import galore
    progress(0.0, "checking the adapter")
    art = RunArtifact.open(src, MergeError)
    if art.kind == ArtifactKind.FULL:
        raise MergeError(galore.merge_message(art.output_dir))
    base_name = art.resolve_base(base, MergeError)
    check_adapter_against_base(art.output_dir, art.adapter_config, base_name, revision=art.revision,
                               trust_remote_code=art.trust_remote_code, err=MergeError)
    return art, base_name


def _load_base_and_adapter(base_name: str, adapter_dir: Path, load_kw: dict, where: tuple[str, str], progress):
    """(base model, tokenizer, PEFT model) in eval mode; ``where`` = (dtype name, device)."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoTokenizer
    progress(0.1, f"loading base {base_name} in {where[0]} on {where[1]}")
    try:
        bcfg = AutoConfig.from_pretrained(base_name, revision=load_kw.get("revision"),
                                          trust_remote_code=load_kw["trust_remote_code"])
        model = auto_model_class(bcfg).from_pretrained(base_name, **load_kw)
    except Exception as e:  # noqa: BLE001
        raise MergeError(f"base model {base_name}: loading failed: {str(e).splitlines()[0][:200]}") from None
    model.eval()
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_source(adapter_dir, base_name),
                                            trust_remote_code=load_kw["trust_remote_code"])
    except Exception as e:  # noqa: BLE001
        raise MergeError(f"tokenizer of {tokenizer_source(adapter_dir, base_name)}: cannot load: "
                         f"{str(e).splitlines()[0][:200]}") from None

    progress(0.3, f"applying the adapter {adapter_dir}")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), autocast_adapter_dtype=False)
    except Exception as e:  # noqa: BLE001
        raise MergeError(f"adapter {adapter_dir}: PEFT cannot apply it to {base_name}: "
                         f"{str(e).splitlines()[0][:200]}") from None
    peft_model.eval()
    return model, tok, peft_model


def _merge_to(tmp: Path, out: Path, base_name: str, adapter_dir: Path, load_kw: dict, where: tuple[str, str],
              check_rows, progress) -> tuple[list, list, float]:
    """Load base + adapter, take the reference logits, merge_and_unload() and save into ``tmp``
    (the staging folder of ``out``). Returns (encoded prompts, reference logits, adapter
    effect); the models are freed on return."""
    model, tok, peft_model = _load_base_and_adapter(base_name, adapter_dir, load_kw, where, progress)
    texts = prompt_texts(tok, check_rows)
    encoded = [tok(t, return_tensors="pt", add_special_tokens=True).input_ids[:, :128] for t in texts]
    encoded = [e for e in encoded if e.shape[1] > 0]
    progress(0.4, f"computing reference logits on {len(encoded)} prompts")
    ref = model_logits(peft_model, encoded)
    with peft_model.disable_adapter():
        plain = model_logits(peft_model, encoded)
    effect = max(float((a - b).abs().max()) for a, b in zip(ref, plain))

    progress(0.5, "merging the adapter into the base weights")
    merged = peft_model.merge_and_unload()
    progress(0.6, f"saving to {out}")
    try:
        merged.save_pretrained(str(tmp))
        if auto_model_class(merged.config).__name__ != "AutoModelForCausalLM":   # the base's image processor too
            from engine.models.processor import pretrained_processor
            pretrained_processor(base_name, load_kw.get("revision"),
                                 load_kw["trust_remote_code"]).save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))       # the run's tokenizer (and chat template) over the base's
    except Exception as e:  # noqa: BLE001
        raise MergeError(f"saving the merged model to {out} failed: {str(e).splitlines()[0][:200]}") from None
    del merged, peft_model, model
    return encoded, ref, effect


def _verify_merged(tmp: Path, out: Path, load_kw: dict, encoded: list, ref: list, dtype_name: str,
                   progress) -> tuple[float, float, int, int]:
    """Reload the saved checkpoint with plain transformers and compare its logits with base +
    adapter; on a failure (raised) the staging folder is removed and nothing reaches ``out``."""
    progress(0.75, "reloading the merged checkpoint with plain transformers")
    reload_kw = {k: v for k, v in load_kw.items() if k != "revision"}
    try:
        auto = auto_model_class(json.loads((tmp / "config.json").read_text(encoding="utf-8")))
        reloaded = auto.from_pretrained(str(tmp), **reload_kw)
    except Exception as e:  # noqa: BLE001
        raise MergeError(f"the merged checkpoint does not load with plain transformers: "
                         f"{str(e).splitlines()[0][:200]}") from None
    reloaded.eval()
    progress(0.85, "comparing merged logits with base + adapter")
    got = model_logits(reloaded, encoded)
    del reloaded
    diff, tol, agree, total = compare_logits(ref, got, *LOGIT_TOLERANCE[dtype_name])
    if not diff <= tol:  # also catches NaN
        raise MergeError(f"verification failed: merged logits differ from base + adapter by "
                         f"{diff:.4g} (> tolerance {tol:.4g} for {dtype_name}); nothing was written "
                         f"to {out}; retry with --dtype fp32 and check the adapter's target_modules")
    return diff, tol, agree, total


def _write_card(folder: Path, out: Path, src, art: RunArtifact, dtype_name: str, warnings: list[str]) -> None:
    """The model card (README.md) next to the merged weights (in ``folder``, the staging folder
    of ``out``); a failure is only a warning."""
    try:
        from engine.outputs.modelcard import write_card
        write_card(folder, art.run_dir, art.output_dir, kind="merged",
                   command=f"qlora-tui merge {src} --out {out} --dtype {dtype_name}")
    except (ImportError, OSError, ValueError) as e:
        warnings.append(f"no model card written ({e})")
