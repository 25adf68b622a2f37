"""Vision-language QLoRA: image+text rows, the image checks, the processor-based encoding and
the model hooks (a frozen vision tower kept in 16 bits, LoRA on the language model only).

The path is the generic transformers image-text-to-text one: ``AutoProcessor`` (image processor
+ tokenizer + chat template) and ``AutoModelForImageTextToText``; nothing here is specific to
Qwen2-VL beyond the names of vision modules in ``VISION_MODULES``.

Data (format ``vision``), paths relative to the data file:
- ChatML content parts: ``{"messages": [{"role": "user", "content": [{"type": "image",
  "image": "a.png"}, {"type": "text", "text": "What is it?"}]}, {"role": "assistant", ...}]}``
- LLaMA-Factory / ShareGPT: ``{"messages" | "conversations": [... "<image>What is it?" ...],
  "images": ["a.png"]}``, one ``<image>`` placeholder per image.
Both normalise to ``{"messages": [... content parts with {"type": "image"} ...], "images":
[absolute paths]}``.

Labels: the conversation is rendered with the chat template and masked by the shared rule of
``engine.dataset.chat`` (assistant turns trained); the processor then expands each image placeholder
into its visual tokens, which are never trained.
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.core import files as _files
from engine.dataset.chat import IGNORE

FORMAT = "vision"
PLACEHOLDER = "<image>"
VISION_MODULES = ("visual", "vision_tower", "vision_model", "vision_encoder", "multi_modal_projector",
                  "vision_embed", "image_newline")
PROJECTOR_MODULES = ("merger", "multi_modal_projector", "projector")
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".gif": "GIF",
                  ".bmp": "BMP"}
SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")   # one per token
MAX_IMAGE_PIXELS = 40_000_000       # larger images are refused (decompression bombs, OOM)
MIN_IMAGE_SIDE = 4


# ------------------------------------------------------------------------------ detection

def detect(rec) -> tuple[str, str] | None:
    """("vision", reason) when a record carries images, else None (cheap: no PIL)."""
    if not isinstance(rec, dict):
        return None
    turns = rec.get("messages", rec.get("conversations"))
    if not isinstance(turns, list):
        return None
    if "images" in rec:
        return FORMAT, "'images' with <image> placeholders in the turns (LLaMA-Factory)"
    for t in turns:
        c = t.get("content") if isinstance(t, dict) else None
        if isinstance(c, list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PARTS for p in c):
            return FORMAT, "messages with image content parts (ChatML)"
    return None


IMAGE_PARTS = ("image", "image_url")    # ChatML/OpenAI parts; LLaMA-Factory v1 {"type", "value"}


REASON = "images with their turns (ChatML image parts or LLaMA-Factory 'images')"


# ------------------------------------------------------------------------------ normalising

def _problem(problems, line, kind, message):
    from engine.dataset.data import DataProblem
    problems.append(DataProblem(line, kind, message))


def _parts_of(content, j: int, role: str, line: int, problems) -> tuple[list | None, list[str]]:
    """Content (string or parts) → (parts, image paths named in them)."""
    if isinstance(content, str):
        return ([{"type": "text", "text": content}] if content else []), []
    if not isinstance(content, list):
        _problem(problems, line, "wrong_type", f"turn {j + 1} ({role}) content is "
                 f"{type(content).__name__}, not a string or a list of parts")
        return None, []
    parts, paths = [], []
    for k, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text", p.get("value")), str):
            parts.append({"type": "text", "text": p.get("text", p.get("value"))})
        elif kind in IMAGE_PARTS:
            src = p.get("image", p.get("path", p.get("url", p.get("value", p.get("image_url")))))
            if isinstance(src, dict):           # OpenAI {"image_url": {"url": ...}}
                src = src.get("url")
            if not isinstance(src, str) or not src.strip():
                _problem(problems, line, "missing_field", f"turn {j + 1} part {k + 1}: an image part "
                         "needs \"image\": \"path/to/file.png\"")
                return None, []
            parts.append({"type": "image"})
            paths.append(src)
        else:
            _problem(problems, line, "wrong_type", f"turn {j + 1} part {k + 1}: expected "
                     "{\"type\": \"text\", \"text\": ...} or {\"type\": \"image\", \"image\": ...}")
            return None, []
    return parts, paths


def _split_placeholders(text: str) -> list[dict]:
    out = []
    for i, piece in enumerate(text.split(PLACEHOLDER)):
        if i:
            out.append({"type": "image"})
        if piece:
            out.append({"type": "text", "text": piece})
    return out


def normalise(rec, line: int, problems) -> dict | None:
    """One raw record → ``{"messages": [...parts...], "images": [paths as written]}`` or None."""
    from engine.dataset.data import SHAREGPT_ROLES, check_turns
    if not isinstance(rec, dict):
        _problem(problems, line, "not_object", "row is not a JSON object")
        return None
    turns = rec.get("messages", rec.get("conversations"))
    if not isinstance(turns, list):
        _problem(problems, line, "missing_field", "missing list field 'messages'")
        return None
    listed = rec.get("images")
    if listed is not None and not (isinstance(listed, list) and all(isinstance(p, str) and p for p in listed)):
        _problem(problems, line, "wrong_type", "'images' must be a list of image paths")
        return None
    msgs, paths, texts = [], [], []
    for j, t in enumerate(turns):
        if isinstance(t, dict) and "from" in t and "role" not in t:      # ShareGPT turn
            t = {"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
        if not isinstance(t, dict):
            _problem(problems, line, "wrong_type", f"turn {j + 1} is not an object")
            return None
        content = t.get("content")
        if listed is not None and isinstance(content, str):
            parts, found = _split_placeholders(content), []
        else:
            parts, found = _parts_of(content, j, str(t.get("role")), line, problems)
        if parts is None:
            return None
        paths += found
        msgs.append({"role": t.get("role"), "parts": parts})
        # the text-only view, checked by the shared turn rules (roles, order, empty turns)
        texts.append({"role": t.get("role"), "content": "".join(
            p.get("text", "[image]") for p in parts) if parts else ""})
    if check_turns(texts, line, problems, system=rec.get("system")) is None:
        return None
    n_slots = sum(1 for m in msgs for p in m["parts"] if p["type"] == "image")
    if listed is not None:
        if n_slots != len(listed):
            _problem(problems, line, "image_count", f"{len(listed)} image(s) in 'images' but {n_slots} "
                     f"{PLACEHOLDER} placeholder(s) in the turns; give one {PLACEHOLDER} per image")
            return None
        paths = list(listed)
    if any(p["type"] == "image" for m in msgs if m["role"] == "assistant" for p in m["parts"]):
        _problem(problems, line, "image_in_answer", "an image in an assistant turn: images belong to "
                 "user turns (the model cannot be trained to emit one)")
        return None
    out = []
    for m in msgs:
        parts = m["parts"]
        if m["role"] == "assistant" or all(p["type"] == "text" for p in parts):
            out.append({"role": m["role"], "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": m["role"], "content": parts})
    system = rec.get("system")              # a top-level system column (checked by check_turns)
    if isinstance(system, str) and system.strip() and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system})
    return {"messages": out, "images": paths}


# ------------------------------------------------------------------------------ image checks

def check_image(path: Path) -> tuple[dict | None, str | None]:
    """(info {path, format, width, height, bytes}, None) or (None, what is wrong)."""
    from PIL import Image, UnidentifiedImageError
    if not path.exists():
        return None, f"image {path} does not exist"
    if not path.is_file():
        return None, f"image {path} is not a file"
    try:
        with Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
            if w * h > MAX_IMAGE_PIXELS:
                return None, f"image {path} is {w}x{h}: over {MAX_IMAGE_PIXELS // 1_000_000} Mpixel; resize it"
            im.load()                       # decodes it all: truncated / corrupt files fail here
    except UnidentifiedImageError:
        return None, f"image {path} is not an image PIL can read (corrupt or unknown format)"
    except (OSError, ValueError, SyntaxError) as e:
        return None, f"image {path} cannot be decoded ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})"
    except Image.DecompressionBombError:
        return None, f"image {path} is too large to decode safely; resize it"
    if min(w, h) < MIN_IMAGE_SIDE:
        return None, f"image {path} is {w}x{h}: too small (at least {MIN_IMAGE_SIDE} px a side)"
    return {"path": str(path), "format": fmt, "width": w, "height": h,
            "bytes": path.stat().st_size}, None


def attach_images(ds) -> None:
    """Resolve each row's image paths against the data file and check every image; rows with a
    missing or broken image become problems (with their line) and leave the dataset."""
    from engine.dataset.data import DataProblem, resolve
    base = resolve(ds.path).resolve().parent
    cache: dict[str, tuple] = {}
    kept = []
    for row in ds.rows:
        infos, bad = [], None
        for raw in row.data.get("images", []):
            p = Path(raw).expanduser()
            p = p if p.is_absolute() else base / p
            key = str(p)
            if key not in cache:
                cache[key] = check_image(p)
            info, err = cache[key]
            if err:
                bad = err
                break
            infos.append(info)
        if bad:
            ds.problems.append(DataProblem(row.line, "bad_image", bad))
            continue
        row.data["images"] = [i["path"] for i in infos]
        row.data["image_info"] = infos
        kept.append(row)
    ds.rows = kept
    ds.problems.sort(key=lambda p: p.line)


# ------------------------------------------------------------------------------ model side

def is_vision_config(model_config: dict) -> bool:
    return isinstance(model_config, dict) and isinstance(model_config.get("vision_config"), dict)


def is_vision_model_dir(path: str) -> bool:
    p = Path(path) / "config.json"
    try:
        return p.is_file() and is_vision_config(_files.read_json(p))
    except (OSError, ValueError):
        return False


def is_vision_module(name: str, include_projector: bool = True) -> bool:
    parts = name.split(".")
    if not any(v in parts for v in VISION_MODULES):
        return False
    return include_projector or not any(p in parts for p in PROJECTOR_MODULES)


def quant_skip_modules() -> list[str]:
    """Modules bitsandbytes leaves in 16 bits: the vision tower and projector (small, and
    quantizing their few large matmuls costs image-feature quality) and the LM head."""
    # regexes for transformers' anchored matcher, plain names for the older substring one
    return [rf".*{m}" for m in VISION_MODULES] + list(VISION_MODULES) + ["lm_head"]


def lora_targets(cfg, model) -> list[str]:
    """Full names of the linear layers LoRA trains: the language model's (``all-linear`` or the
    listed leaf names); the vision tower and projector only with model.freeze_vision_tower = false."""
    import torch
    from engine.training.model import ModelError
    want = cfg.lora.target_modules
    if isinstance(want, str) and want != "all-linear":
        want = [want]
    frozen = getattr(cfg.model, "freeze_vision_tower", True)
    out, leaves = [], set()
    for name, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt")):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "lm_head" or (frozen and is_vision_module(name)):
            continue
        leaves.add(leaf)
        if want == "all-linear" or leaf in want or (not frozen and is_vision_module(name)):
            out.append(name)
    if want != "all-linear":
        missing = [t for t in want if t not in leaves]
        if missing:
            raise ModelError(f"lora.target_modules: {', '.join(missing)} not found in the language model; "
                             f"its linear modules are: {', '.join(sorted(leaves))} (or use \"all-linear\")")
    return out


def image_only(cls):
    """``cls`` (a transformers processor class) without its video processor. Without torchvision
    transformers cannot even type-check a video processor, so Qwen2-VL's processor fails to build;
    images need only the image processor and the tokenizer. Same class name: the saved
    processor_config.json stays the model's own."""
    attrs = [a for a in cls.get_attributes() if a != "video_processor"]
    return type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda c: list(attrs)),
                                       "__module__": cls.__module__})


def _processor_class(path: str, trust: bool):
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name
    name = None
    p = Path(path) / "processor_config.json"
    if p.is_file():
        name = _files.read_json(p).get("processor_class")
    if not name:
        mt = AutoConfig.from_pretrained(path, trust_remote_code=trust).model_type
        name = PROCESSOR_MAPPING_NAMES.get(mt)
    cls = processor_class_from_name(name) if name else None
    if cls is None:
        raise ValueError(f"no processor class for {path}")
    return cls


def pretrained_processor(path: str, revision, trust: bool):
    from transformers import AutoProcessor
    try:
        return AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust)
    except (AttributeError, ImportError, OSError, TypeError, ValueError) as first:
        # images need no video processor: without torchvision transformers cannot build one, and
        # with it a directory without video_preprocessor_config.json fails to load (seen on the H200)
        try:
            return image_only(_processor_class(path, trust)).from_pretrained(path, revision=revision,
                                                                             trust_remote_code=trust)
        except (AttributeError, ImportError, OSError, TypeError, ValueError):
            raise first from None


def load_processor(cfg, path: str):
    """The model's processor (image processor + tokenizer + chat template), pad token ensured."""
    from engine.training.model import ModelError
    try:
        proc = pretrained_processor(path, cfg.model.revision or None, cfg.model.trust_remote_code)
    except ImportError as e:
        raise ModelError(f"model.name = {cfg.model.name!r}: its image processor needs a missing package "
                         f"({str(e).splitlines()[0][:160]})") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name = {cfg.model.name!r}: cannot load its processor "
                         f"({str(e).splitlines()[0][:160]})") from None
    tok = getattr(proc, "tokenizer", None)
    if tok is None or not hasattr(proc, "image_processor"):
        raise ModelError(f"model.name = {cfg.model.name!r}: not an image-text model (its processor has "
                         "no image processor and tokenizer)")
    if getattr(proc, "chat_template", None) and not getattr(tok, "chat_template", None):
        tok.chat_template = proc.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return proc


# ------------------------------------------------------------------------------ encoding

def _open_rgb(path: str):
    from PIL import Image
    with Image.open(path) as im:
        return im.convert("RGB")


def image_token_id(proc) -> int | None:
    tid = getattr(proc, "image_token_id", None)
    if tid is None and getattr(proc, "image_token", None):
        tid = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    return tid


def expand_labels(short_ids, short_labels, long_ids, image_id) -> list[int]:
    """Labels for the processor's expanded ids: tokens the expansion inserted (visual tokens,
    image markers) are not trained; the others keep the label of the token they came from."""
    out, j, n = [], 0, len(short_ids)
    for tid in long_ids:
        if j < n and tid == short_ids[j]:
            out.append(short_labels[j] if tid != image_id else IGNORE)
            j += 1
        else:
            out.append(IGNORE)
    return out


def encode_row(proc, row: dict, max_length: int | None = None) -> dict:
    """One row → model inputs (lists/tensors, batch dim 1 dropped) with labels; raises
    ValueError when truncation to ``max_length`` would cut through an image's tokens."""
    from engine.dataset.chat import labels_for, render_spans
    tok = proc.tokenizer
    text, spans, special = render_spans(tok, row)
    enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
    short_ids = enc["input_ids"]
    short_labels = labels_for(short_ids, enc["offset_mapping"], spans)
    images = [_open_rgb(p) for p in row.get("images", [])]
    kw = {"text": [text], "return_tensors": "pt", "add_special_tokens": special}
    if images:
        kw["images"] = images
    out = proc(**kw)
    ids = out["input_ids"][0].tolist()
    labels = expand_labels(short_ids, short_labels, ids, image_token_id(proc))
    item = {k: v[0] for k, v in out.items() if k in SEQ_KEYS}
    for k, v in out.items():            # image tensors: kept whole (rows of patches or images)
        if k not in SEQ_KEYS:
            item[k] = v
    import torch
    item["labels"] = torch.tensor(labels)
    if max_length and len(ids) > max_length:
        img = image_token_id(proc)
        last_img = max((i for i, t in enumerate(ids) if t == img), default=-1)
        if last_img >= max_length:
            raise ValueError(f"{len(ids)} tokens with the images' visual tokens; data.max_length = "
                             f"{max_length} would cut through an image")
        item = {k: (v[:max_length] if k in SEQ_KEYS + ("labels",) else v)
                for k, v in item.items()}
    return item


def visual_token_counts(proc, infos: list[dict]) -> list[int]:
    """Visual tokens per image from the model's own processor (by image size; no pixels)."""
    sizes = [[i["height"], i["width"]] for i in infos]
    if not sizes:
        return []
    try:
        mm = proc._get_num_multimodal_tokens(image_sizes=sizes)
        n = getattr(mm, "num_image_tokens", None)
        if n is None and isinstance(mm, dict):
            n = mm.get("num_image_tokens")
        if n is not None:
            return [int(x) for x in n]
    except Exception:  # noqa: BLE001 - processors without the helper: count by processing
        pass
    out = []
    img = image_token_id(proc)
    ph = getattr(proc, "image_token", None) or ""
    for i in infos:
        r = proc(text=[ph], images=[_open_rgb(i["path"])], return_tensors="pt")
        out.append(int((r["input_ids"][0] == img).sum()))
    return out


def rows_dataset(proc, rows: list[dict], max_length: int | None):
    """A ``datasets.Dataset`` (what TRL takes) whose rows are encoded, images read and processed,
    only when the loader asks (``set_transform``): pixels of a whole dataset never sit in memory."""
    from datasets import Dataset
    ds = Dataset.from_dict({"row": [json.dumps(r) for r in rows]})

    def encode(batch):
        items = [encode_row(proc, json.loads(r), max_length) for r in batch["row"]]
        return {k: [it[k] for it in items] for k in items[0]}
    ds.set_transform(encode)
    return ds


def collate(pad_id: int):
    """Pads ids/labels/mask (right), concatenates image tensors along their first dim."""
    import torch

    def fn(items: list[dict]) -> dict:
        n = max(len(x["input_ids"]) for x in items)
        out = {"input_ids": torch.full((len(items), n), pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(items), n), dtype=torch.long),
               "labels": torch.full((len(items), n), IGNORE, dtype=torch.long)}
        for key in SEQ_KEYS[2:]:        # per-token type ids (M-RoPE needs them): padded with 0
            if key in items[0]:
                out[key] = torch.zeros((len(items), n), dtype=torch.long)
        for b, x in enumerate(items):
            k = len(x["input_ids"])
            out["input_ids"][b, :k] = x["input_ids"]
            out["attention_mask"][b, :k] = 1
            out["labels"][b, :k] = x["labels"]
            for key in SEQ_KEYS[2:]:
                if key in x:
                    out[key][b, :k] = x[key]
        for key in items[0]:
            if key not in out:
                vals = [x[key] for x in items if key in x]
                out[key] = torch.cat(vals, dim=0)
        return out
    return fn


def row_tokens(proc, row: dict) -> dict:
    """Token counts of one row without reading pixels: total (visual tokens included), visual
    tokens per image, trained tokens, and where the last image's tokens end."""
    from engine.dataset.chat import labels_for, render_spans
    tok = proc.tokenizer
    text, spans, special = render_spans(tok, row)
    enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = enc["input_ids"]
    trained = sum(1 for x in labels_for(ids, enc["offset_mapping"], spans) if x != IGNORE)
    vis = visual_token_counts(proc, row.get("image_info", []))
    img = image_token_id(proc)
    places = [i for i, t in enumerate(ids) if t == img]
    extra = sum(vis) - len(places)
    image_end = (places[-1] + 1 + extra) if places else 0
    return {"total": len(ids) + extra, "visual": vis, "trained": trained, "image_end": image_end}


def training_set(proc, rows: list[dict], max_length: int) -> tuple[object, list[int], list[str]]:
    """(dataset, token lengths, warnings): rows whose images would not fit in max_length are left
    out (truncation there would cut an image's tokens), each named in a warning."""
    keep, lengths, warnings = [], [], []
    for i, r in enumerate(rows):
        n = row_tokens(proc, r)
        if n["image_end"] > max_length:
            warnings.append(f"row {i + 1}: its images end at token {n['image_end']}, past data.max_length = "
                            f"{max_length} (row skipped; raise data.max_length or use smaller images)")
            continue
        keep.append(r)
        lengths.append(min(n["total"], max_length))
    return rows_dataset(proc, keep, max_length), lengths, warnings


def longest_row(cfg, fmt: str, rows: list[dict]) -> int | None:
    """The longest image row of ``rows`` (data format ``fmt``) in tokens (visual tokens included,
    at most data.max_length), for the fit planner: image rows are never packed and a batch is
    padded to its longest row, so that row, not data.max_length, sets the peak. None for text
    data or when the processor cannot be loaded (the trainer then says why)."""
    if fmt != FORMAT or not rows:
        return None
    try:
        proc = processor_for(cfg)
        longest = max(row_tokens(proc, r)["total"] for r in rows)
    except Exception:  # noqa: BLE001 - planning advice only; build() reports a bad model
        return None
    return min(int(longest), int(cfg.data.max_length))


def model_is_vision(cfg, path: str) -> bool:
    """Whether the model is image-text (a config.json with a vision_config)."""
    if Path(path).is_dir():
        return is_vision_model_dir(path)
    try:
        from engine.planning.estimate import model_config_for
        return is_vision_config(model_config_for(cfg))
    except Exception:  # noqa: BLE001 - unreadable here: the text path reports the real error
        return False


# ------------------------------------------------------------------------------ builtin:tiny-vl

TINY_VL_VERSION = "v1"
VL_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_VL_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                    rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, rope_theta=10000.0)
TINY_VL_VISION = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
TINY_VL_PIXELS = dict(min_pixels=56 * 56, max_pixels=112 * 112)


def vl_sample_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "vl_sample"


def vl_sample_path() -> Path:
    return vl_sample_dir() / "vl_sample.jsonl"


def tiny_vl_model_dir() -> Path:
    from engine.training.builtin import cached_build
    return cached_build(f"builtin-tiny-vl-{TINY_VL_VERSION}", _build_tiny_vl)


def image_processor_class():
    """Qwen2-VL's image processor that works without torchvision: the PIL backend (newer
    transformers), else the classic numpy/PIL ``Qwen2VLImageProcessor``."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        return Qwen2VLImageProcessorPil
    except ImportError:
        from transformers import Qwen2VLImageProcessor
        return Qwen2VLImageProcessor


def _vl_corpus():
    from engine.training.builtin import corpus
    yield from corpus()
    with open(vl_sample_path(), encoding="utf-8") as fh:
        for line in fh:
            for m in json.loads(line)["messages"]:
                c = m["content"]
                yield c if isinstance(c, str) else " ".join(p.get("text", "") for p in c)


def _build_tiny_vl(out: Path) -> None:
    build_vl_dir(out, TINY_VL_TEXT, TINY_VL_VISION, TINY_VL_PIXELS)


def build_vl_dir(out: Path, text: dict, vision: dict, pixels: dict, vocab_size: int | None = None) -> None:
    """A random-weight Qwen2-VL model directory of the given shape with its processor (our small
    byte-level BPE tokenizer with Qwen2-VL's vision tokens, the PIL/numpy image processor):
    builtin:tiny-vl, and the 7B-shaped model of bench/vlm_vs_plain.py."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers import Qwen2VLProcessor
    from engine.training.builtin import SPECIALS, train_tokenizer
    tok = train_tokenizer(_vl_corpus(), SPECIALS + VL_SPECIALS, VL_TEMPLATE, text["max_position_embeddings"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in VL_SPECIALS}
    proc = image_only(Qwen2VLProcessor)(image_processor=image_processor_class()(**pixels),
                                        tokenizer=tok, chat_template=VL_TEMPLATE)
    proc.save_pretrained(out)
    tok.save_pretrained(out)
    cfg = Qwen2VLConfig(text_config={**text, "vocab_size": vocab_size or len(tok), "bos_token_id": tok.bos_token_id,
                                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
                        vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(0)
    if vocab_size:          # big shapes: random weights in bf16 (half the host memory of fp32)
        torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen2VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out, safe_serialization=True)


# ------------------------------------------------------------------------------ the bundled sample

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "grey": (128, 128, 128)}


def _draw(shape: str, colour, bg, size: int):
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    m = size // 6
    box = (m, m, size - m, size - m)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=colour)
    return im


def write_vl_sample(out_dir: Path) -> int:
    """The bundled sample: 36 small PNGs (3 shapes x 4 colours x 3 backgrounds, 48-64 px) and a
    ChatML-parts jsonl of captions and questions about them. Deterministic; returns the row count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    i = 0
    for shape in SHAPES:
        for cname, colour in COLOURS.items():
            for bname, bg in BACKGROUNDS.items():
                name = f"{i:02d}-{cname}-{shape}.png"
                _draw(shape, colour, bg, 48 + 8 * (i % 3)).save(out_dir / name, optimize=True)
                q, a = [("Describe the picture.", f"A {cname} {shape} on a {bname} background."),
                        ("What shape is this?", f"It is a {shape}."),
                        ("What colour is the shape?", f"The {shape} is {cname}.")][i % 3]
                rows.append({"messages": [
                    {"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": q}]},
                    {"role": "assistant", "content": a}]})
                i += 1
    with open(out_dir / "vl_sample.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return len(rows)


# ------------------------------------------------------------------------------ terminal preview

def thumbnail_image(path: str, box: tuple[int, int]):
    """An RGB PIL image of ``path`` scaled down to fit ``box`` (aspect kept), for the Dataset
    screen's pictures. Untrusted files: the size is checked before any pixel is decoded
    (``MAX_IMAGE_PIXELS``), JPEGs decode at reduced size. Raises ValueError saying what is wrong
    (missing, not an image, corrupt, too large)."""
    if not Path(path).is_file():
        raise ValueError(f"image {path} does not exist" if not Path(path).exists() else f"image {path} is not a file")
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ValueError(f"image {path} is {w}x{h}: over {MAX_IMAGE_PIXELS // 1_000_000} Mpixel")
            im.draft("RGB", box)
            im = im.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"image {path} is not an image PIL can read (corrupt or unknown format)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {path} cannot be decoded ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})") from None
    im.thumbnail(box)
    return im


# ------------------------------------------------------------------------------ inspector

_proc_cache: dict = {}


def processor_for(cfg):
    """The processor of cfg.model, loaded once per model settings (inspector, Dataset screen)."""
    from engine.training import model as model_mod
    key = (cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code, cfg.source)
    if key not in _proc_cache:
        path = model_mod.model_path(cfg)
        if not model_is_vision(cfg, path):
            raise model_mod.ModelError(f"model.name = {cfg.model.name!r} is a text-only model but the data has "
                               "images; use an image-text model (e.g. Qwen2-VL, or builtin:tiny-vl)")
        _proc_cache.clear()
        _proc_cache[key] = load_processor(cfg, path)
    return _proc_cache[key]


def data_is_vision(cfg, path: str) -> bool:
    """Whether the file's rows carry images (data.format = vision, or its first rows say so)."""
    if cfg.data.format == FORMAT:
        return True
    if cfg.data.format != "auto":
        return False
    from engine.dataset.data import iter_raw
    try:
        for i, (_line, rec, err) in enumerate(iter_raw(path)):
            if err is None and detect(rec):
                return True
            if i >= 50:
                break
    except Exception:  # noqa: BLE001 - the text inspector reports unreadable files
        return False
    return False


def inspect_report(cfg, path: str, on_partial=None):
    """The inspector's report for image rows: image problems by line, and token statistics and
    the truncation check with each image's visual tokens (from the model's processor) counted."""
    import numpy as np
    from engine.dataset import inspect
    from engine.dataset import quality
    from engine.dataset.data import DataProblem, load, resolve
    max_len = int(cfg.data.max_length)
    rep = inspect.Report(path=str(resolve(path)), model=cfg.model.name, max_length=max_len)
    ds = load(path, cfg.data.format)
    proc = processor_for(cfg)
    problems, counts, rows = list(ds.problems), [], []
    vis_all, n_images = [], 0
    for row in ds.rows:
        n = row_tokens(proc, row.data)
        vis_all += n["visual"]
        n_images += len(n["visual"])
        if n["image_end"] > max_len:
            problems.append(DataProblem(row.line, "image_tokens", f"its images end at token {n['image_end']} "
                                        f"(visual tokens {sum(n['visual'])}), past data.max_length = {max_len}: "
                                        "the trainer skips this row; raise data.max_length or use smaller images"))
        kept = n["trained"] if n["total"] <= max_len else max(0, n["trained"] - (n["total"] - max_len))
        counts.append((n["total"], n["trained"], kept))
        rows.append(row)
    rep.format, rep.format_reason, rep.raw_count, rep.rows_read = ds.format, ds.reason, ds.raw_count, ds.raw_count
    arr = np.asarray(counts, dtype=np.int64).reshape(len(counts), 3)
    lines = [r.line for r in rows]
    tallied = inspect.Counts()
    found = inspect.problem_log()
    found.extend(problems)
    found.extend(tallied.add(lines, arr, max_len))
    dups = quality.Duplicates()              # no duplicate check for image rows: their lengths only
    dups.add_unhashed(lines, arr[:, 0])
    out = inspect.report_snapshot(cfg, rep, tallied, found, [], dups, inspect.FirstByLine(inspect.MAX_LISTED),
                                  dict(ds.formats_seen), {}, partial=False, rows=len(rows))
    out.images = {"count": n_images, "rows_with_images": sum(1 for r in rows if r.data.get("images")),
                  "visual_tokens_total": int(sum(vis_all)),
                  "visual_tokens_per_image": ({"min": min(vis_all), "median": float(np.median(vis_all)),
                                               "max": max(vis_all)} if vis_all else {}),
                  "bad_images": sum(1 for p in problems if p.kind == "bad_image")}
    if on_partial is not None:
        on_partial(out)
    return out


def preview(cfg, ds_row, row_index: int):
    """The Dataset screen's row preview of an image row: the processor's expanded tokens, image
    tokens shown as one untrained ``[image N: WxH FORMAT, T tokens]`` segment each."""
    from engine.dataset import inspect
    proc = processor_for(cfg)
    data = ds_row.data
    item = encode_row(proc, data, None)
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    img = image_token_id(proc)
    tok = proc.tokenizer
    infos = data.get("image_info", [])
    vis = visual_token_counts(proc, infos)
    segs, text, run, run_tr, k = [], "", [], None, 0

    def flush():
        nonlocal run
        if run:
            segs.append((tok.decode(run), bool(run_tr)))
            run = []
    i = 0
    while i < len(ids):
        if ids[i] == img:
            flush()
            j = i
            while j < len(ids) and ids[j] == img:
                j += 1
            info = infos[k] if k < len(infos) else {}
            segs.append((f"[image {k + 1}: {info.get('width', '?')}x{info.get('height', '?')} "
                         f"{info.get('format', '?')}, {j - i} tokens]", False))
            k += 1
            i = j
            continue
        tr = labels[i] != IGNORE
        if run and tr != run_tr:
            flush()
        run_tr = tr
        run.append(ids[i])
        i += 1
    flush()
    text = "".join(s for s, _ in segs)
    max_len = int(cfg.data.max_length)
    kept = labels[:max_len]
    pv = inspect.Preview(row_index=row_index, line=ds_row.line, segments=segs, n_tokens=len(ids),
                   n_trained=sum(1 for x in kept if x != IGNORE),
                   n_trained_untruncated=sum(1 for x in labels if x != IGNORE),
                   truncated_at=max_len if len(ids) > max_len else None, cut_char=None, text=text,
                   input_ids=ids[:max_len], labels=kept)
    pv.images = [{**info, "tokens": n} for info, n in zip(infos, vis)]
    return pv


# ------------------------------------------------------------------------------ estimate

ASSUMED_IMAGE_PIXELS = 448 * 448     # one image of this size per row unless told otherwise


def vision_shape(model_config: dict) -> dict | None:
    """Vision tower dimensions from config.json (Qwen2-VL / Qwen2.5-VL keys, with the common
    SigLIP/CLIP spellings as fallbacks), or None for a text-only model."""
    vc = model_config.get("vision_config") if isinstance(model_config, dict) else None
    if not isinstance(vc, dict):
        return None
    e = vc.get("embed_dim") or vc.get("hidden_size") or 1024
    inter = vc.get("intermediate_size") or int(e * (vc.get("mlp_ratio") or 4))
    return {"embed": int(e), "inter": int(inter), "depth": int(vc.get("depth") or vc.get("num_hidden_layers") or 24),
            "patch": int(vc.get("patch_size") or 14), "merge": int(vc.get("spatial_merge_size") or 1),
            "temporal": int(vc.get("temporal_patch_size") or 1), "channels": int(vc.get("in_channels") or 3),
            "out": int(vc.get("out_hidden_size") or model_config.get("hidden_size")
                       or (model_config.get("text_config") or {}).get("hidden_size") or e)}


def estimate_terms(model_config: dict, batch: int, d: int, image_pixels: int = ASSUMED_IMAGE_PIXELS) -> dict | None:
    """Bytes for the estimate: the vision tower's 16-bit weights (kept out of 4-bit) and the
    per-image activations of its forward pass (frozen: nothing is saved for backward; the peak
    is one block's working set over the image's patches, plus the merged features kept for the
    language model). Returns None for a text-only model."""
    s = vision_shape(model_config)
    if s is None:
        return None
    e, i, L, m = s["embed"], s["inter"], s["depth"], s["merge"]
    patch_in = s["channels"] * s["temporal"] * s["patch"] ** 2
    block = 4 * e * e + 2 * e * i + 4 * e                     # qkv + proj, two MLP matrices, norms
    merger = (e * m * m) ** 2 + e * m * m * s["out"]          # the projector into the LM's width
    params = patch_in * e + L * block + merger
    patches = max(1, image_pixels // s["patch"] ** 2)
    per_image = patches * (8 * e + 2 * i) * d + (patches // (m * m)) * s["out"] * d
    return {"params": params, "weights": params * d, "activations": batch * per_image,
            "visual_tokens_per_image": patches // (m * m), "patches_per_image": patches}
