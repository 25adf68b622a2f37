"""Side-by-side generation: the same prompts through the base and through base + adapter.

The model is loaded once: a ``PeftModel`` answers as the tuned model, and inside its
``disable_adapter()`` context as the plain base. On a CUDA GPU the base is loaded in 4-bit
like in training (the run's ``[quant]`` settings); on the CPU in full precision. Prompts are
rendered with the chat template and ``add_generation_prompt``.
"""
from __future__ import annotations

import shutil
import textwrap
import tomllib
from pathlib import Path

from engine.core import files as _files
from engine.artifacts import AdapterError, ArtifactKind, RunArtifact, run_dir_of
from engine.outputs.merge import check_adapter_against_base

BUILTIN_PROMPTS = [
    "Explain in two sentences what fine-tuning a language model does.",
    "What is the capital of Canada?",
    "Write a haiku about the sea.",
]

class GenerateError(AdapterError):
    """Generation cannot run; the message is one line."""


# --------------------------------------------------------------------------- prompts

def _user_turn(row) -> str | None:
    """The first user turn of a data row (ChatML messages, ShareGPT, Alpaca, prompt rows)."""
    if not isinstance(row, dict):
        return None
    for key, role_key, content_key, user in (("messages", "role", "content", "user"),
                                             ("conversations", "from", "value", "human"),
                                             ("prompt", "role", "content", "user")):   # preference rows
        turns = row.get(key)
        if isinstance(turns, list):
            for t in turns:
                if isinstance(t, dict) and t.get(role_key) in (user, "user") \
                        and isinstance(t.get(content_key), str) and t[content_key].strip():
                    return t[content_key].strip()
            return None
    if isinstance(row.get("instruction"), str) and row["instruction"].strip():
        extra = row.get("input")
        return row["instruction"].strip() + (f"\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else "")
    for key in ("prompt", "question"):            # prompt/completion, preference pairs (plain, Axolotl's)
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key].strip()
    return None


def run_data_path(value: str, run_dir: Path) -> Path | None:
    if not value:
        return None
    if value == "builtin:sample":
        from engine.models.builtin import sample_data_path
        p = sample_data_path()
        return p if p.is_file() else None
    if value.startswith("builtin:"):
        return None
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    for cand in (run_dir / p, p):
        if cand.exists():
            return cand
    return None


def read_prompt_rows(path: Path, limit_from_end: bool, n: int) -> list[dict]:
    rows: list = []
    try:
        if path.suffix == ".json":
            data = _files.read_json(path)
            rows = data if isinstance(data, list) else []
        else:
            with _files.open_regular(path) as f:       # never a FIFO or a device
                for raw in f:
                    if not raw.strip():
                        continue
                    try:
                        rows.append(_files.loads_json(raw))
                    except ValueError:
                        continue
    except (OSError, ValueError):
        return []
    return rows[::-1] if limit_from_end else rows


def default_prompts(run_dir: str | Path, n: int = 3) -> list[str]:
    """The user turns of up to ``n`` rows of the run's eval data (``[data] eval``), else of the
    last rows of its train data; the built-in prompts when neither can be read."""
    run_dir = Path(run_dir).expanduser()
    if (run_dir / "adapter_config.json").is_file() and not (run_dir / "config.toml").is_file():
        owner = run_dir_of(run_dir, run_dir)
        run_dir = owner or run_dir
    try:
        data = tomllib.loads(_files.read_text(run_dir / "config.toml")).get("data", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    for key, from_end in (("eval", False), ("train", True)):
        path = run_data_path(str(data.get(key) or ""), run_dir)
        if path is None or not path.is_file():
            continue
        prompts = []
        for row in read_prompt_rows(path, from_end, n):
            text = _user_turn(row)
            if text and text not in prompts:
                prompts.append(text)
            if len(prompts) >= n:
                break
        if prompts:
            return prompts
    return BUILTIN_PROMPTS[:n]


def eval_prompts(cfg, n: int) -> list[str]:
    """The prompts a run answers at each eval: ``eval.prompts``, else the first user turns of up
    to ``n`` rows of its eval file (else the last rows of its train data); [] when none."""
    if cfg.eval.prompts:
        return list(cfg.eval.prompts)
    if n <= 0:
        return []
    for value, from_end in ((cfg.data.eval, False), (cfg.data.train, True)):
        if not value:
            continue
        path = run_data_path(cfg.resolve_path(value), Path.cwd())
        if path is None or not path.is_file():
            continue
        prompts: list[str] = []
        for row in read_prompt_rows(path, from_end, n):
            text = _user_turn(row)
            if text and text not in prompts:
                prompts.append(text)
            if len(prompts) >= n:
                return prompts
        if prompts:
            return prompts
    return []


def greedy_answers(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Each prompt (a user turn, through the chat template) answered greedily by ``model`` as it
    is now: the eval generations during training. The caller puts the model in eval mode."""
    import torch
    device = next(model.parameters()).device
    out = []
    for text in prompts:
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        enc = tok(rendered, return_tensors="pt", add_special_tokens=False)
        ids = enc.input_ids.to(device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=enc.attention_mask.to(device),
                                 max_new_tokens=int(max_new_tokens), do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=tok.pad_token_id, use_cache=True)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


# --------------------------------------------------------------------------- generation

def _load(src, err=GenerateError):
    """(peft model, tokenizer, info) for the adapter of ``src``, loaded once."""
    from engine.methods import galore
    art = RunArtifact.open(src, err)
    if art.kind == ArtifactKind.FULL:                    # a GaLore run: base vs its full checkpoint
        return galore.load_pair(art.output_dir, err)
    adapter_dir, run_dir, revision, trust = art.output_dir, art.run_dir, art.revision, art.trust_remote_code
    settings = art.model_settings
    base = art.resolve_base(None, err)
    check_adapter_against_base(adapter_dir, art.adapter_config, base, revision=revision,
                               trust_remote_code=trust, err=err)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quant = {}
    if run_dir is not None:
        try:
            q = tomllib.loads(_files.read_text(run_dir / "config.toml")).get("quant", {})
            quant = q if isinstance(q, dict) else {}
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            quant = {}
    kw: dict = {"revision": revision or None, "trust_remote_code": trust}
    if torch.cuda.is_available():
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
            quant.get("compute_dtype"),
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        kw["device_map"] = {"": 0}
        kw["dtype"] = compute
        if quant.get("load_in_4bit", True):
            from transformers import BitsAndBytesConfig
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=quant.get("quant_type", "nf4"),
                bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)),
                bnb_4bit_compute_dtype=compute)
        mode = "cuda, 4-bit" if "quantization_config" in kw else f"cuda, {str(compute).split('.')[-1]}"
    else:
        kw["dtype"] = torch.float32
        mode = "cpu, fp32"
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kw)
    except Exception as e:  # noqa: BLE001
        raise err(f"base model {base}: loading failed: {str(e).splitlines()[0][:200]}") from None
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as e:  # noqa: BLE001
        raise err(f"adapter {adapter_dir}: PEFT cannot apply it to {base}: "
                  f"{str(e).splitlines()[0][:200]}") from None
    peft_model.eval()
    tsrc = art.tokenizer_source(base)
    try:
        tok = AutoTokenizer.from_pretrained(tsrc, trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001
        raise err(f"tokenizer of {tsrc}: cannot load: {str(e).splitlines()[0][:200]}") from None
    if not getattr(tok, "chat_template", None) or tok.pad_token is None:
        # the trainer's own rule: the run's template override, else ChatML; a pad token
        from engine.models.tokenizer import prepare_tokenizer
        prepare_tokenizer(tok, "" if getattr(tok, "chat_template", None)
                          else str(settings.get("chat_template") or ""))
    return peft_model, tok, {"base": base, "adapter": str(adapter_dir), "mode": mode}


def _as_messages(prompt) -> tuple[str, list[dict]]:
    if isinstance(prompt, str):
        return prompt, [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return (users[-1] if users else str(prompt[-1].get("content", ""))), prompt
    raise GenerateError(f"prompt {prompt!r}: expected a string or a list of chat messages")


def compare(src: str | Path, prompts=None, max_new_tokens: int = 64, greedy: bool = True,
            on_load=None) -> list[dict]:
    """Generate for each prompt with the base and with base + adapter.

    ``src``: a run dir or an adapter dir. ``prompts``: strings (user turns) or message lists;
    None = ``default_prompts`` of the run. Returns ``[{"prompt", "base", "tuned"}]``.
    ``on_load(info)`` is called once the model is loaded (base, adapter, mode).
    """
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens {max_new_tokens}: must be at least 1")
    if prompts is None:
        prompts = default_prompts(src)
    items = [_as_messages(p) for p in prompts]
    if not items:
        raise GenerateError("no prompts to generate for; pass --prompt TEXT")
    model, tok, info = _load(src)
    if on_load:
        on_load(info)

    import torch

    device = next(model.parameters()).device
    gen_kw = {"max_new_tokens": int(max_new_tokens), "pad_token_id": tok.pad_token_id,
              "do_sample": not greedy}
    if greedy:
        gen_kw.update(temperature=None, top_p=None, top_k=None)
    else:
        gen_kw.update(temperature=0.7, top_p=0.9)

    def run(ids, mask) -> str:
        torch.manual_seed(0)  # the same sampling noise on both sides
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **gen_kw)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    results = []
    for text, messages in items:
        try:
            rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001
            raise GenerateError(f"the chat template failed on prompt {text[:40]!r}: "
                                f"{str(e).splitlines()[0][:160]}") from None
        enc = tok(rendered, return_tensors="pt", add_special_tokens=False)
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        tuned = run(ids, mask)
        with model.disable_adapter():
            base = run(ids, mask)
        results.append({"prompt": text, "base": base, "tuned": tuned})
    return results


# --------------------------------------------------------------------------- text form

def format_text(results: list[dict], width: int | None = None) -> str:
    """Each prompt with BASE and TUNED: side by side when the terminal is wide, else stacked."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    out = []
    for i, r in enumerate(results, 1):
        out.append(f"=== [{i}] {r['prompt']}")
        if width >= 100:
            col = (width - 3) // 2
            left = textwrap.wrap(r["base"] or "(empty)", col) or [""]
            right = textwrap.wrap(r["tuned"] or "(empty)", col) or [""]
            out.append(f"{'BASE':<{col}} | TUNED")
            for k in range(max(len(left), len(right))):
                a = left[k] if k < len(left) else ""
                b = right[k] if k < len(right) else ""
                out.append(f"{a:<{col}} | {b}")
        else:
            out.append("--- BASE")
            out.append(r["base"] or "(empty)")
            out.append("--- TUNED")
            out.append(r["tuned"] or "(empty)")
        out.append("")
    return "\n".join(out)
