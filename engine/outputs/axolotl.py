"""Import an Axolotl QLoRA/LoRA YAML config into a qlora-tui config.

``convert`` maps every Axolotl key it understands onto our config sections, validates the
result with ``engine.core.config.from_dict``, and reports the rest: ``unmapped`` lists the keys it
could not carry over (each with the reason in ``notes``), ``notes`` also says where Axolotl's
defaults or semantics differ from ours. Nothing is dropped silently.

YAML is read with PyYAML, which our dependencies already bring in (transformers, accelerate,
datasets, peft, trl and huggingface_hub all require ``pyyaml``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from engine.core.units import to_float

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Axolotl dataset `type` → our data.format
_DATASET_TYPES = {
    "chat_template": "messages",
    "chatml": "messages",
    "sharegpt": "sharegpt",
    "alpaca": "alpaca",
    "completion": "text",
}
_OPTIMIZERS = {
    "paged_adamw_8bit": "paged_adamw_8bit", "paged_adamw_32bit": "paged_adamw_32bit",
    "adamw_8bit": "adamw_8bit", "adamw_bnb_8bit": "adamw_8bit", "adamw_torch": "adamw_torch",
    "adamw_torch_fused": "adamw_torch_fused", "adamw_hf": "adamw_torch", "adafactor": "adafactor",
    "sgd": "sgd",
}
_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant",
               "constant_with_warmup": "constant_with_warmup", "cosine_with_min_lr": "cosine"}
# keys with no effect here (their job is done another way); reported in notes, not unmapped
_NO_EFFECT = {
    "strict": "Axolotl's config-merging switch; not needed",
    "model_type": "the model class comes from the checkpoint (AutoModelForCausalLM)",
    "tokenizer_type": "the tokenizer class comes from the checkpoint (AutoTokenizer)",
    "is_llama_derived_model": "architecture is read from the checkpoint",
    "is_mistral_derived_model": "architecture is read from the checkpoint",
    "is_qwen_derived_model": "architecture is read from the checkpoint",
    "dataset_prepared_path": "datasets are tokenized on the fly",
    "debug": "no effect",
    "local_rank": "set by the launcher",
    "eval_sample_packing": "eval follows data.packing",
    "pad_to_sequence_len": "batches are padded dynamically",
    "lora_fan_in_fan_out": "PEFT detects it from the layer type",
    "train_on_inputs": "qlora-tui trains on the assistant turns only (train_on_inputs: false)",
}


class AxolotlError(ValueError):
    """The YAML cannot be read or is not an Axolotl config; the message is one line."""


# values a YAML document may stand for once its aliases are expanded (an Axolotl config has a
# few hundred); a "billion laughs" file (aliases of aliases) would expand beyond any memory
MAX_EXPANDED_NODES = 100_000


def _safe_load_bounded(yaml, text: str, source: str):
    """``yaml.safe_load`` that first counts the values the document stands for with every
    alias expanded (shared nodes counted each time they are used, as a converter walks them):
    over ``MAX_EXPANDED_NODES`` (or an alias of itself) is refused with the alias's line."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}

        def size(n, depth=0) -> int:
            key = id(n)
            if key in sizes:
                if sizes[key] < 0:
                    raise AxolotlError(f"{source}: line {n.start_mark.line + 1}: a YAML alias refers to "
                                       "itself; remove the recursive anchor")
                return sizes[key]
            sizes[key] = -1
            if isinstance(n, yaml.SequenceNode):
                total = 1 + sum(size(c, depth + 1) for c in n.value)
            elif isinstance(n, yaml.MappingNode):
                total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in n.value)
            else:
                total = 1
            if total > MAX_EXPANDED_NODES:
                raise AxolotlError(f"{source}: line {n.start_mark.line + 1}: YAML anchors and aliases "
                                   f"expand to more than {MAX_EXPANDED_NODES:,} values (a 'billion laughs' "
                                   "file?); write the values out or use fewer nested aliases")
            sizes[key] = total
            return total
        size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _load_yaml(yaml_text_or_path) -> tuple[dict, str]:
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml ships with transformers
        raise AxolotlError("PyYAML is not installed; pip install pyyaml") from None
    source = "<text>"
    text = yaml_text_or_path
    if isinstance(yaml_text_or_path, Path) or (
            isinstance(yaml_text_or_path, str) and "\n" not in yaml_text_or_path
            and yaml_text_or_path.strip().lower().endswith((".yml", ".yaml"))):
        p = Path(yaml_text_or_path).expanduser()
        source = str(p)
        from engine.core import files
        try:
            text = files.read_text(p, encoding="utf-8")
        except FileNotFoundError:
            raise AxolotlError(f"{p}: no such file; pass an Axolotl .yml config") from None
        except (files.NotRegular, files.TooLarge) as e:
            raise AxolotlError(str(e)) from None
        except (OSError, UnicodeDecodeError) as e:
            raise AxolotlError(f"{p}: cannot read: {e}") from None
    try:
        data = _safe_load_bounded(yaml, text, source)
    except RecursionError:
        raise AxolotlError(f"{source}: not valid YAML (nested too deeply)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise AxolotlError(f"{source}:{where} not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise AxolotlError(f"{source}: expected a YAML mapping of Axolotl keys (base_model: ..., "
                           f"adapter: qlora, ...), got {type(data).__name__}")
    return data, source


def _int(v) -> int | None:
    n = to_float(v)
    return int(n) if n is not None and n.is_integer() else None


def _bool(v) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    return None


# Axolotl keys that map one to one: (axolotl key, our "section.key", kind), by section.
_SIMPLE = {
    "model": [("revision_of_model", "model.revision", "str"),
              ("trust_remote_code", "model.trust_remote_code", "bool")],
    "lora": [("lora_r", "lora.r", "int"), ("lora_alpha", "lora.alpha", "float"),
             ("lora_dropout", "lora.dropout", "float"), ("peft_use_dora", "lora.use_dora", "bool"),
             ("peft_use_rslora", "lora.use_rslora", "bool")],
    "data": [("sequence_len", "data.max_length", "int")],
    "train": [("micro_batch_size", "train.batch_size", "int"),
              ("gradient_accumulation_steps", "train.grad_accum", "int")],
    "train_lr": [("max_steps", "train.max_steps", "int"),
                 ("learning_rate", "train.learning_rate", "float")],
    "train_opt": [("weight_decay", "train.weight_decay", "float"),
                  ("max_grad_norm", "train.max_grad_norm", "float")],
}
_CONVERTERS = {"int": _int, "float": to_float, "bool": _bool, "str": lambda x: x if isinstance(x, str) else None}
_WANDB_ENV = {"wandb_entity": "WANDB_ENTITY", "wandb_name": "WANDB_NAME", "wandb_run_id": "WANDB_RUN_ID",
              "wandb_watch": "WANDB_WATCH", "wandb_log_model": "WANDB_LOG_MODEL", "wandb_mode": "WANDB_MODE"}


class _Conversion:
    """One YAML's conversion: what was put (and from which key), skipped, noted and consumed."""

    def __init__(self, y: dict):
        self.y = y
        self.cfg: dict[str, dict[str, Any]] = {}
        self.origin: dict[str, str] = {}     # "section.key" → the Axolotl key it came from
        self.unmapped: list[str] = []
        self.notes: list[str] = []
        self.done: set[str] = set()

    def put(self, dotted: str, value, key: str) -> None:
        section, name = dotted.split(".", 1)
        self.cfg.setdefault(section, {})[name] = value
        self.origin[dotted] = key

    def skip(self, key: str, why: str) -> None:
        if key not in self.unmapped:
            self.unmapped.append(key)
        self.notes.append(f"unmapped {key}: {why}")

    def take(self, key: str):
        self.done.add(key)
        return self.y.get(key)

    def simple(self, key: str, dotted: str, kind: str) -> None:
        if key not in self.y:
            return
        v = self.take(key)
        conv = _CONVERTERS[kind](v)
        if conv is None:
            self.skip(key, f"{v!r} is not a {kind}")
        else:
            self.put(dotted, conv, key)

    def simples(self, group: str) -> None:
        for key, dotted, kind in _SIMPLE[group]:
            self.simple(key, dotted, kind)


def convert(yaml_text_or_path) -> tuple[dict, list[str], list[str]]:
    """Map an Axolotl YAML (text, or a path to a .yml/.yaml file) onto a qlora-tui config dict.

    Returns ``(config_dict, unmapped, notes)``: ``config_dict`` holds only the keys Axolotl set
    (plus Axolotl defaults that differ from ours), already validated by ``engine.core.config.from_dict``;
    ``unmapped`` the Axolotl keys that could not be carried over; ``notes`` one line per
    decision or unmapped key.
    """
    y, _source = _load_yaml(yaml_text_or_path)
    c = _Conversion(dict(y))
    for step in (_model, _chat_template, _quant, _dtype, _lora, _datasets, _eval_data,
                 _training, _schedule, _optimizer, _steps_and_distribution, _output, _rl, _leftovers):
        step(c)
    _validate(c)
    return c.cfg, c.unmapped, c.notes


def _model(c: _Conversion) -> None:
    y = c.y
    if "base_model" in y:
        v = c.take("base_model")
        if isinstance(v, str) and v.strip():
            c.put("model.name", v.strip(), "base_model")
        else:
            c.skip("base_model", f"{v!r} is not a model id or path")
    else:
        c.notes.append("no base_model: keeping model.name = builtin:tiny (set it to your model)")
    for key in ("base_model_config", "tokenizer_config"):
        if key in y:
            v = c.take(key)
            if v != y.get("base_model"):
                c.skip(key, f"a separate config/tokenizer ({v}) is not supported; the tokenizer "
                            f"and config come from model.name")
    c.simples("model")
    if c.cfg.get("model", {}).get("trust_remote_code") is True:
        c.notes.append("trust_remote_code: true carried over as model.trust_remote_code = true: the model's "
                       "own Python code will run (the TUI asks first); set it to false unless you trust "
                       "that repository")

    attn = None
    for key, impl in (("flash_attention", "flash_attention_2"), ("sdp_attention", "sdpa"),
                      ("eager_attention", "eager")):
        if key in y:
            v = _bool(c.take(key))
            if v is None:
                c.skip(key, f"{y[key]!r} is not true/false")
            elif v and attn is None:
                attn = impl
                c.put("model.attn_implementation", impl, key)
    for key in ("xformers_attention", "s2_attention", "flex_attention"):
        if key in y and _bool(c.take(key)):
            c.skip(key, "this attention kernel is not supported; model.attn_implementation "
                        "offers auto, sdpa, eager, flash_attention_2, varlen")


def _chat_template(c: _Conversion) -> None:
    y = c.y
    if "chat_template" not in y:
        if "chat_template_jinja" in y:
            v = c.take("chat_template_jinja")
            if isinstance(v, str) and v.strip():
                c.put("model.chat_template", v, "chat_template_jinja")
        return
    v = c.take("chat_template")
    if v in ("tokenizer_default", None, ""):
        c.put("model.chat_template", "", "chat_template")
    elif isinstance(v, str) and v.startswith("tokenizer_default_fallback_"):
        c.put("model.chat_template", "", "chat_template")
        fb = v[len("tokenizer_default_fallback_"):]
        c.notes.append(f"chat_template {v}: using the tokenizer's own template"
                       + ("; qlora-tui falls back to ChatML, not " + fb if fb != "chatml" else
                          ", ChatML when it has none (same as Axolotl)"))
    elif v == "chatml":
        c.put("model.chat_template", CHATML_JINJA, "chat_template")
    elif v == "jinja":
        jinja = c.take("chat_template_jinja")
        if isinstance(jinja, str) and jinja.strip():
            c.put("model.chat_template", jinja, "chat_template_jinja")
        else:
            c.skip("chat_template", "jinja without chat_template_jinja")
    else:
        c.skip("chat_template", f"Axolotl's named template {v!r} has no equivalent; set "
                                f"model.chat_template to its Jinja (or leave it empty to use "
                                f"the tokenizer's own, usually right for instruct models)")


def _quant(c: _Conversion) -> None:
    y = c.y
    adapter = c.take("adapter") if "adapter" in y else None
    l4 = _bool(c.take("load_in_4bit")) if "load_in_4bit" in y else None
    l8 = _bool(c.take("load_in_8bit")) if "load_in_8bit" in y else None
    if adapter is None:
        c.notes.append("no adapter key: Axolotl would run a full fine-tune; this config trains a "
                       "QLoRA adapter instead")
        if l4 is not None:
            c.put("quant.load_in_4bit", l4, "load_in_4bit")
    elif adapter == "qlora":
        if l4 is False:
            c.notes.append("adapter: qlora with load_in_4bit: false; QLoRA needs the 4-bit base, "
                           "so quant.load_in_4bit = true")
        c.put("quant.load_in_4bit", True, "adapter")
    elif adapter == "lora":
        c.put("quant.load_in_4bit", bool(l4), "adapter")
    else:
        c.skip("adapter", f"{adapter!r} is not supported (qlora-tui trains lora or qlora adapters)")
    if l8:
        c.skip("load_in_8bit", "8-bit bases are not supported; the base stays "
                               + ("4-bit" if c.cfg.get("quant", {}).get("load_in_4bit") else "16-bit"))
    if "bnb_config_kwargs" in y:
        _bnb_kwargs(c, c.take("bnb_config_kwargs"))


def _bnb_kwargs(c: _Conversion, kw) -> None:
    if not isinstance(kw, dict):
        c.skip("bnb_config_kwargs", "expected a mapping")
        return
    for k, v in kw.items():
        if k == "bnb_4bit_quant_type" and v in ("nf4", "fp4"):
            c.put("quant.quant_type", v, "bnb_config_kwargs.bnb_4bit_quant_type")
        elif k == "bnb_4bit_use_double_quant" and _bool(v) is not None:
            c.put("quant.double_quant", _bool(v), "bnb_config_kwargs.bnb_4bit_use_double_quant")
        elif k == "llm_int8_has_fp16_weight":
            c.notes.append("bnb_config_kwargs.llm_int8_has_fp16_weight: 8-bit only; ignored")
        else:
            c.skip(f"bnb_config_kwargs.{k}", f"{v!r} is not supported")


def _dtype(c: _Conversion) -> None:
    y = c.y
    bf16 = c.take("bf16") if "bf16" in y else None
    fp16 = c.take("fp16") if "fp16" in y else None
    if bf16 == "auto":
        c.put("quant.compute_dtype", "auto", "bf16")
    elif _bool(bf16):
        c.put("quant.compute_dtype", "bf16", "bf16")
    elif _bool(fp16):
        c.put("quant.compute_dtype", "fp16", "fp16")
    elif _bool(bf16) is False and _bool(fp16) is False:
        c.put("quant.compute_dtype", "fp32", "bf16")
        c.notes.append("bf16: false and fp16: false: compute in fp32 (slow; bf16: auto is usual)")
    elif bf16 is not None and _bool(bf16) is None:
        c.skip("bf16", f"{bf16!r} is not true, false or auto")
    if "tf32" in y and _bool(c.take("tf32")):
        c.skip("tf32", "TF32 matmuls are not configurable here (PyTorch's default applies)")


def _lora(c: _Conversion) -> None:
    y = c.y
    c.simples("lora")
    linear = _bool(c.take("lora_target_linear")) if "lora_target_linear" in y else None
    modules = c.take("lora_target_modules") if "lora_target_modules" in y else None
    if linear:
        c.put("lora.target_modules", "all-linear", "lora_target_linear")
        if modules:
            c.notes.append("lora_target_linear: true already covers lora_target_modules; "
                           "lora.target_modules = all-linear")
    elif modules:
        if isinstance(modules, str):
            modules = [modules]
        if isinstance(modules, list) and all(isinstance(m, str) and m for m in modules):
            c.put("lora.target_modules", list(modules), "lora_target_modules")
        else:
            c.skip("lora_target_modules", f"{modules!r} is not a list of module names")
    else:
        c.notes.append("no lora_target_modules / lora_target_linear: lora.target_modules = "
                       "all-linear (qlora-tui's default)")
    for key in ("lora_modules_to_save", "lora_model_dir", "peft_layers_to_transform",
                "lora_on_cpu", "peft_layer_replication"):
        if key in y and c.take(key) not in (None, False, [], ""):
            reason = {"lora_model_dir": "starting from an existing adapter is not supported here; "
                                        "train anew or resume a qlora-tui run"}.get(
                key, "not supported by qlora-tui's LoRA settings")
            c.skip(key, reason)


def _datasets(c: _Conversion) -> None:
    if "datasets" not in c.y:
        c.notes.append("no datasets: keeping data.train = builtin:sample")
        return
    ds = c.take("datasets")
    if isinstance(ds, dict):
        ds = [ds]
    if not isinstance(ds, list) or not ds or not isinstance(ds[0], dict):
        c.skip("datasets", "expected a list of {path: ..., type: ...}")
        return
    first = dict(ds[0])
    if "type" not in first and isinstance(c.y.get("type"), str):
        # the seed guide's YAML lost its indentation: `type:` sits at the top level
        first["type"] = c.take("type")
        c.notes.append(f"top-level type: {first['type']} read as datasets[0].type "
                       "(the YAML's indentation looks flattened)")
    path = first.pop("path", None)
    if isinstance(path, str) and _source_path(path) != path:    # a hub dataset: subset and split go with it
        name, split = first.pop("name", None), first.pop("split", None)
        path += (f"@{name}" if isinstance(name, str) and name else "") + \
            (f":{split}" if isinstance(split, str) and split else "")
    _dataset_path(c, path)
    _dataset_type(c, first)
    for k in list(first):
        if k in ("message_property_mappings", "roles_to_train", "train_on_eos",
                 "field_messages", "chat_template"):
            c.notes.append(f"datasets[0].{k}: the conversation layout is detected and "
                           "only assistant turns are trained; ignored")
        else:
            c.skip(f"datasets[0].{k}", f"{first[k]!r} is not supported (split/subset/"
                                       "data_files selection: prepare the file first)")
    if len(ds) > 1:
        _sources(c, ds)


def _source_path(path: str) -> str:
    """An Axolotl dataset path as a qlora-tui source path: a hub name becomes hf:org/name."""
    looks_hub = not Path(path).suffix and not path.startswith((".", "/", "~")) and path.count("/") == 1 \
        and not Path(path).exists()
    return "hf:" + path if looks_hub else path


def _sources(c: _Conversion, ds: list) -> None:
    """Several Axolotl datasets: a ``[[data.sources]]`` table each (path, format from type,
    split, subset from name), mixed by concatenation as Axolotl does; data.train/format stand
    for the first only and are dropped."""
    out = []
    for i, d in enumerate(ds):
        if not isinstance(d, dict) or not isinstance(d.get("path"), str) or not d["path"].strip():
            c.skip(f"datasets[{i}]", "expected {path: ..., type: ...}")
            continue
        src = {"path": _source_path(d["path"])}
        t = d.get("type")
        if isinstance(t, str) and t in _DATASET_TYPES and not (
                _DATASET_TYPES[t] == "messages" and d.get("field_messages") not in (None, "messages")):
            src["format"] = _DATASET_TYPES[t]
        elif t is not None:
            c.notes.append(f"datasets[{i}].type {t!r}: format auto (detected from the fields)")
        if isinstance(d.get("split"), str):
            src["split"] = d["split"]
        if isinstance(d.get("name"), str):
            src["subset"] = d["name"]
        for k in d:
            if k not in ("path", "type", "split", "name", "field_messages", "message_property_mappings",
                         "roles_to_train", "train_on_eos", "chat_template"):
                c.skip(f"datasets[{i}].{k}", f"{d[k]!r} is not supported (data_files/shards selection: "
                                             "prepare the file first)")
        out.append(src)
    if out:
        c.cfg.get("data", {}).pop("train", None)
        c.cfg.get("data", {}).pop("format", None)
        c.put("data.sources", out, "datasets")
        c.notes.append(f"datasets: {len(out)} sources in [[data.sources]], concatenated as Axolotl does")


def _dataset_path(c: _Conversion, path) -> None:
    if not (isinstance(path, str) and path.strip()):
        c.skip("datasets[0].path", f"{path!r} is not a path")
        return
    if _source_path(path) != path:
        c.put("data.train", _source_path(path), "datasets[0].path")
        c.notes.append(f"datasets[0].path {path} looks like a hub dataset: data.train = hf:{path} "
                       "(read through the local datasets cache; without network, save it with "
                       "save_to_disk where there is network and point data.train at that directory)")
        return
    c.put("data.train", path, "datasets[0].path")
    if not Path(path).suffix and not path.startswith((".", "/", "~")):
        c.notes.append(f"datasets[0].path {path} looks like a hub dataset; data.train "
                       "needs a local file or a saved datasets directory: download it "
                       "and point data.train at it")
    elif not Path(path).is_absolute():
        c.notes.append(f"data.train {path} is relative: qlora-tui resolves it against "
                       "the TOML file's directory (Axolotl: the working directory)")


def _dataset_type(c: _Conversion, first: dict) -> None:
    dtype_ = first.pop("type", None)
    if dtype_ is None:
        c.notes.append("datasets[0] has no type: data.format = auto (detected from the fields)")
    elif isinstance(dtype_, str) and dtype_ in _DATASET_TYPES:
        fmt = _DATASET_TYPES[dtype_]
        fm = first.pop("field_messages", None)
        if fmt == "messages" and fm not in (None, "messages"):
            fmt = "auto"
            c.notes.append(f"datasets[0].field_messages {fm}: data.format = auto detects "
                           f"the conversation field")
        c.put("data.format", fmt, "datasets[0].type")
    else:
        c.put("data.format", "auto", "datasets[0].type")
        c.skip("datasets[0].type", f"prompt strategy {dtype_!r} has no equivalent; "
                                   "data.format = auto detects messages, sharegpt, alpaca, "
                                   "prompt_completion or text rows")


def _eval_data(c: _Conversion) -> None:
    y = c.y
    if "test_datasets" in y:
        td = c.take("test_datasets")
        if isinstance(td, list) and td and isinstance(td[0], dict) and isinstance(td[0].get("path"), str):
            c.put("data.eval", td[0]["path"], "test_datasets")
            if len(td) > 1:
                c.skip("test_datasets[1:]", "one eval file only")
        else:
            c.skip("test_datasets", "expected a list of {path: ...}")
    if "val_set_size" in y:
        v = to_float(c.take("val_set_size"))
        if v is None:
            c.skip("val_set_size", f"{y['val_set_size']!r} is not a number")
        elif 0 <= v <= 0.5:
            c.put("data.eval_fraction", v, "val_set_size")
        elif v >= 1:
            c.skip("val_set_size", f"{int(v)} rows: qlora-tui holds out a fraction; set "
                                   "data.eval_fraction = rows / dataset size")
        else:
            c.skip("val_set_size", f"{v} is above data.eval_fraction's maximum 0.5")
    else:
        c.notes.append("no val_set_size (Axolotl: no eval split): keeping data.eval_fraction 0.05; "
                       "set it to 0 to train on every row")
    c.simples("data")
    if "sample_packing" in y:
        v = _bool(c.take("sample_packing"))
        if v is None:
            c.skip("sample_packing", f"{y['sample_packing']!r} is not true/false")
        else:
            c.put("data.packing", v, "sample_packing")


def _training(c: _Conversion) -> None:
    c.simples("train")
    if "num_epochs" in c.y:
        c.simple("num_epochs", "train.epochs", "float")
    else:
        c.put("train.epochs", 1.0, "num_epochs")
        c.notes.append("no num_epochs: train.epochs = 1 (Axolotl's default; qlora-tui's is 3)")
    c.simples("train_lr")


def _schedule(c: _Conversion) -> None:
    y = c.y
    if "lr_scheduler" in y:
        v = c.take("lr_scheduler")
        if v in _SCHEDULERS:
            c.put("train.scheduler", _SCHEDULERS[v], "lr_scheduler")
            if v == "cosine_with_min_lr":
                c.notes.append("lr_scheduler cosine_with_min_lr: plain cosine (decays to 0)")
        else:
            c.skip("lr_scheduler", f"{v!r} is not supported; allowed: linear, cosine, constant, "
                                   "constant_with_warmup")
    else:
        c.put("train.scheduler", "cosine", "lr_scheduler")
        c.notes.append("no lr_scheduler: train.scheduler = cosine (Axolotl's default; qlora-tui's is linear)")
    for key in ("lr_scheduler_kwargs", "cosine_min_lr_ratio"):
        if key in y:
            c.take(key)
            c.skip(key, "scheduler parameters are not configurable")
    c.simple("warmup_ratio", "train.warmup_ratio", "float")
    if "warmup_steps" in y:
        _warmup_steps(c)


def _warmup_steps(c: _Conversion) -> None:
    y = c.y
    steps = _int(c.take("warmup_steps"))
    max_steps = _int(y.get("max_steps"))
    if steps is None:
        c.skip("warmup_steps", f"{y['warmup_steps']!r} is not a whole number")
    elif "warmup_ratio" in y:
        c.notes.append("warmup_steps ignored: warmup_ratio is also set and wins")
    elif max_steps and max_steps > 0:
        ratio = min(0.5, steps / max_steps)
        c.put("train.warmup_ratio", round(ratio, 6), "warmup_steps")
        c.notes.append(f"warmup_steps {steps} → train.warmup_ratio {ratio:.4g} ({steps}/{max_steps} max_steps)")
    else:
        c.skip("warmup_steps", f"{steps} steps: qlora-tui sets warmup as a ratio; set "
                               f"train.warmup_ratio = {steps} / total steps")


def _optimizer(c: _Conversion) -> None:
    y = c.y
    if "optimizer" in y:
        v = c.take("optimizer")
        if v in _OPTIMIZERS:
            c.put("train.optimizer", _OPTIMIZERS[v], "optimizer")
            if _OPTIMIZERS[v] != v:
                c.notes.append(f"optimizer {v} → {_OPTIMIZERS[v]} (the same optimizer under its HF name)")
        else:
            c.skip("optimizer", f"{v!r} is not supported; allowed: "
                   + ", ".join(sorted(set(_OPTIMIZERS.values()))))
    c.simples("train_opt")
    if "gradient_checkpointing" in y:
        v = c.take("gradient_checkpointing")
        b = _bool(v)
        if b is not None:
            c.put("train.gradient_checkpointing", b, "gradient_checkpointing")
        elif v == "unsloth":
            c.put("train.gradient_checkpointing", True, "gradient_checkpointing")
            c.notes.append("gradient_checkpointing: unsloth → true (standard checkpointing)")
        else:
            c.skip("gradient_checkpointing", f"{v!r} is not true/false")
    if "gradient_checkpointing_kwargs" in y:
        c.take("gradient_checkpointing_kwargs")
        c.notes.append("gradient_checkpointing_kwargs: qlora-tui chooses them; ignored")
    c.simple("seed", "train.seed", "int")


def _steps_and_distribution(c: _Conversion) -> None:
    y = c.y
    for key, dotted in (("logging_steps", "train.logging_steps"), ("eval_steps", "train.eval_steps"),
                        ("save_steps", "train.save_steps")):
        if key in y:
            v = to_float(y[key])
            if v is not None and 0 < v < 1:
                c.take(key)
                c.skip(key, f"{v} is a fraction of the run; qlora-tui needs a step count")
            else:
                c.simple(key, dotted, "int")
    c.simple("save_total_limit", "train.save_total_limit", "int")
    for key in ("evals_per_epoch", "saves_per_epoch"):
        if key in y:
            c.take(key)
            c.skip(key, f"qlora-tui counts in steps; set train.{key.split('s_per')[0]}_steps instead")
    if "fsdp" in y or "fsdp_config" in y:
        v = c.take("fsdp")
        c.take("fsdp_config")
        if v or y.get("fsdp_config"):
            c.put("distributed.strategy", "fsdp", "fsdp")
            c.notes.append("fsdp → distributed.strategy = fsdp; set distributed.gpus to the GPU "
                           "count (fsdp_config details are chosen by qlora-tui)")
    if "deepspeed" in y and c.take("deepspeed"):
        c.skip("deepspeed", "DeepSpeed is not supported; use distributed.strategy ddp or fsdp")


def _output(c: _Conversion) -> None:
    y = c.y
    if "output_dir" in y:
        v = c.take("output_dir")
        if isinstance(v, str) and v.strip():
            c.put("output.dir", v, "output_dir")
            c.notes.append(f"output_dir {v} → output.dir: each run gets its own sub-directory in it")
        else:
            c.skip("output_dir", f"{v!r} is not a path")
    tracker = None
    if y.get("wandb_project"):
        c.take("wandb_project")
        tracker = "wandb"
        c.put("output.report_to", "wandb", "wandb_project")
        c.notes.append(f"wandb_project → output.report_to = wandb; export WANDB_PROJECT="
                       f"{y['wandb_project']} before training")
    for key, env in _WANDB_ENV.items():
        if key in y:
            v = c.take(key)
            if v not in (None, ""):
                c.notes.append(f"{key}: export {env}={v}")
    if "use_tensorboard" in y and _bool(c.take("use_tensorboard")) and tracker is None:
        c.put("output.report_to", "tensorboard", "use_tensorboard")


# Axolotl's `rl:` → train.method (ipo: DPO with the IPO loss)
_RL = {"dpo": "dpo", "ipo": "dpo", "orpo": "orpo", "kto": "kto", "simpo": "simpo"}


def _rl(c: _Conversion) -> None:
    """``rl: dpo | ipo | orpo | kto | simpo`` and its fields → train.method and [preference].
    Axolotl's preference dataset types (chatml.intel, chat_template.default, ...) need no
    mapping: data.format = auto detects prompt/chosen/rejected, question/chosen/rejected,
    LLaMA-Factory pairs and KTO label rows."""
    y = c.y
    if "rl" not in y:
        return
    rl = c.take("rl")
    rl_key = str(rl).lower() if isinstance(rl, str) else rl
    if rl_key not in _RL:
        c.skip("rl", f"{rl!r}: qlora-tui has dpo, ipo (as dpo), orpo, kto and simpo")
        return
    method = _RL[rl_key]
    c.put("train.method", method, "rl")
    if rl_key == "ipo":
        c.put("preference.loss_type", "ipo", "rl")
    if c.cfg.get("data", {}).get("format") not in (None, "auto"):
        c.put("data.format", "auto", "rl")
        c.notes.append("rl: the datasets' preference type is detected from the fields (data.format = auto)")
    beta = {"dpo": "preference.beta", "kto": "preference.beta", "simpo": "preference.simpo_beta",
            "orpo": "preference.orpo_lambda"}[method]
    if "rl_beta" in y:
        c.simple("rl_beta", beta, "float")
    if method == "orpo" and "orpo_alpha" in y:          # Axolotl's ORPO λ
        c.simple("orpo_alpha", "preference.orpo_lambda", "float")
    for key, dotted in (("dpo_label_smoothing", "preference.label_smoothing"),
                        ("simpo_gamma", "preference.simpo_gamma"),
                        ("kto_desirable_weight", "preference.desirable_weight"),
                        ("kto_undesirable_weight", "preference.undesirable_weight")):
        if key in y:
            c.simple(key, dotted, "float")
    if "cpo_alpha" in y:
        v = to_float(c.take("cpo_alpha"))
        if v:
            c.skip("cpo_alpha", f"{v:g}: SimPO here has no SFT term (cpo_alpha 0, the SimPO paper)")
    for key in ("dpo_use_weighting", "rpo_alpha", "dpo_norm_loss", "dpo_padding_free", "dpo_use_logits_to_keep",
                "use_logits_to_keep"):
        if key in y:
            c.skip(key, f"{y[key]!r}: not supported by train.method = {method}")
            c.take(key)
    if "max_prompt_len" in y:
        c.take("max_prompt_len")
        c.notes.append("max_prompt_len: TRL 1.x truncates prompt + answer to data.max_length; ignored")
    c.notes.append(f"rl: {rl} → train.method = {method} (a LoRA adapter over the 4-bit base; the reference "
                   + ("is the base with the adapter disabled)" if method in ("dpo", "kto") else "is not used)"))


def _leftovers(c: _Conversion) -> None:
    """Known keys with no effect here, then everything left over."""
    y = c.y
    for key, why in _NO_EFFECT.items():
        if key in y and key not in c.done:
            c.take(key)
            if key == "train_on_inputs" and _bool(y[key]):
                c.skip(key, "training on prompt tokens too is not supported; only assistant "
                            "turns are trained")
            else:
                c.notes.append(f"{key}: {why}; ignored")
    for key in y:
        if key not in c.done:
            if key in ("special_tokens", "tokens", "added_tokens_overrides"):
                c.skip(key, "adding or overriding tokenizer tokens is not supported; use a "
                            "tokenizer that already has them")
            else:
                c.skip(key, "no qlora-tui equivalent")


def _validate(c: _Conversion) -> None:
    """Validate; a value our config rejects becomes unmapped with the reason."""
    from engine.core import config as config_mod
    cfg = c.cfg
    for _ in range(len(c.origin) + 1):
        try:
            config_mod.from_dict(copy.deepcopy(cfg))
            return
        except config_mod.ConfigError as e:
            for p in e.problems:
                section, _, name = p.field.partition(".")
                if section in cfg and name in cfg[section]:
                    del cfg[section][name]
                    if not cfg[section]:
                        del cfg[section]
                    c.skip(c.origin.get(p.field, p.field), f"{p.value!r} rejected: {p.message}")
                else:  # a cross-field problem with no single key: report it and stop
                    raise AxolotlError(f"converted config is invalid: {p}") from None


def to_toml_text(config_dict: dict, unmapped: list[str], notes: list[str], source: str = "") -> str:
    """The converted config as TOML with a comment header: source, unmapped keys, notes."""
    import tomli_w

    head = [f"# Imported from the Axolotl config {source}" if source else "# Imported from an Axolotl config",
            "# by `qlora-tui import-axolotl`. Keys not listed use qlora-tui's defaults "
            "(`qlora-tui init` shows them all)."]
    head.append("# Unmapped Axolotl keys: " + (", ".join(unmapped) if unmapped else "none"))
    if notes:
        head.append("# Notes:")
        head += [f"#   - {n}" for n in notes]
    body = tomli_w.dumps(config_dict)
    return "\n".join(head) + "\n\n" + body + ("" if body.endswith("\n") else "\n")
