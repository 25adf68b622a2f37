"""The vision modality: image+text rows, the image checks, the processor-based encoding, the
model hooks (a frozen vision tower kept in 16 bits, LoRA on the language model only), the
estimate's vision terms and the inspector's image pieces. The trainer's side (the lazily
encoded dataset, the collator) is ``engine.training.vision``; the processor is loaded by
``engine.models.processor``, builtin:tiny-vl built by ``engine.models.builtin``.

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
``engine.modalities.text`` (assistant turns trained); the processor then expands each image placeholder
into its visual tokens, which are never trained.
"""
from __future__ import annotations

from pathlib import Path

from engine.core import files as _files
from engine.modalities.base import DataProblem, Modality
from engine.modalities.text import IGNORE

FORMAT = "vision"
PLACEHOLDER = "<image>"
VISION_MODULES = ("visual", "vision_tower", "vision_model", "vision_encoder", "multi_modal_projector",
                  "vision_embed", "image_newline")
PROJECTOR_MODULES = ("merger", "multi_modal_projector", "projector")
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
    from engine.modalities.text import SHAREGPT_ROLES, canonical_role, check_turns
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
        content, role = t.get("content"), t.get("role")
        role = canonical_role(role)
        if listed is not None and isinstance(content, str):
            parts, found = _split_placeholders(content), []
        else:
            parts, found = _parts_of(content, j, str(role), line, problems)
        if parts is None:
            return None
        paths += found
        msgs.append({"role": role, "parts": parts})
        # the text-only view, checked by the shared turn rules (roles, order, empty turns)
        texts.append({"role": role, "content": "".join(
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


_REMOTE = ("http://", "https://", "s3://", "gs://", "ftp://", "hf://")
INLINE_MAX_BYTES = 40 * 2**20       # a base64 image in the row, decoded


def _local(raw: str, base: Path) -> Path:
    """A relative image path: against the data file's folder, else (when not there) its parent
    folders up to three levels and the working directory, where tools that write paths relative
    to their project root (LLaMA-Factory v1's ``data/…/1.jpg``) put them."""
    p = Path(raw).expanduser()
    if p.is_absolute():
        return p
    for root in (base, *list(base.parents)[:3], Path.cwd()):
        if (root / p).exists():
            return root / p
    return base / p


def _check_source(src: str | Path) -> tuple[dict | None, str | None]:
    """An image as a row names it: a path (resolved by ``_local``), a base64 ``data:`` URI
    (OpenAI's inline images: decoded once into the cache, named by its hash) or a URL (refused:
    nothing is downloaded at run time)."""
    if isinstance(src, Path):
        return check_image(src)
    if src.startswith(_REMOTE):
        return None, (f"image {src[:80]!r} is a URL: nothing is downloaded at run time; download the "
                      "images and give their local paths (relative to the data file)")
    path, err = _inline_image(src)
    return (None, err) if err else check_image(path)


def _inline_image(uri: str) -> tuple[Path | None, str | None]:
    import base64
    import binascii
    import hashlib
    from engine.models.builtin import cache_dir
    head, sep, payload = uri.partition(",")
    kind = head[5:].split(";")[0]
    if not sep or not head.endswith(";base64") or not kind.startswith("image/"):
        return None, (f"inline image {uri[:40]!r}…: expected a base64 data URI "
                      "(data:image/png;base64,…)")
    if len(payload) > INLINE_MAX_BYTES * 4 // 3 + 4:
        return None, f"inline image of {len(payload) * 3 // 4 // 2**20} MB: over {INLINE_MAX_BYTES // 2**20} MB; resize it"
    try:
        data = base64.b64decode(payload.strip(), validate=False)
    except (binascii.Error, ValueError):
        return None, f"inline image {uri[:40]!r}… is not valid base64"
    ext = "".join(c for c in kind[6:] if c.isalnum())[:8] or "img"
    folder = cache_dir() / "images"
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.{ext}"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        _files.write_atomic(path, data)
    return path, None


def attach_images(ds, base: Path) -> None:
    """Resolve each row's image paths against ``base`` (the data file's folder) and check every
    image; rows with a missing or broken image become problems (with their line) and leave the
    dataset."""
    cache: dict[str, tuple] = {}
    kept = []
    for row in ds.rows:
        infos, bad = [], None
        for raw in row.data.get("images", []):
            src = raw if raw.startswith(_REMOTE + ("data:",)) else _local(raw, base)
            key = str(src)
            if key not in cache:
                cache[key] = _check_source(src)
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
    from engine.models.source import ModelError
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
    from engine.modalities.text import labels_for, render_spans
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


def row_tokens(proc, row: dict) -> dict:
    """Token counts of one row without reading pixels: total (visual tokens included), visual
    tokens per image, trained tokens, and where the last image's tokens end."""
    from engine.modalities.text import labels_for, render_spans
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


def model_is_vision(cfg, path: str) -> bool:
    """Whether the model is image-text (a config.json with a vision_config)."""
    if Path(path).is_dir():
        return is_vision_model_dir(path)
    try:
        from engine.models.source import model_config
        return is_vision_config(model_config(cfg))
    except Exception:  # noqa: BLE001 - unreadable here: the text path reports the real error
        return False


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
    from engine.models.processor import load_processor
    from engine.models.source import ModelError, model_path
    key = (cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code, cfg.source)
    if key not in _proc_cache:
        path = model_path(cfg)
        if not model_is_vision(cfg, path):
            raise ModelError(f"model.name = {cfg.model.name!r} is a text-only model but the data has "
                               "images; use an image-text model (e.g. Qwen2-VL, or builtin:tiny-vl)")
        _proc_cache.clear()
        _proc_cache[key] = load_processor(cfg, path)
    return _proc_cache[key]


def data_is_vision(fmt: str, records) -> bool:
    """Whether rows carry images: data.format (``fmt``) is vision, or with ``auto`` the first
    rows of ``records`` (``(line, record, error)``, read lazily) say so."""
    if fmt == FORMAT:
        return True
    if fmt != "auto":
        return False
    try:
        for i, (_line, rec, err) in enumerate(records):
            if err is None and detect(rec):
                return True
            if i >= 50:
                break
    except Exception:  # noqa: BLE001 - the text inspector reports unreadable files
        return False
    return False


def report_rows(cfg, ds) -> dict:
    """The inspector's pieces for a dataset of image rows: the problems (the dataset's, and rows
    whose images end past data.max_length), each row's token counts (total, trained, trained
    after truncation) with each image's visual tokens from the model's processor, the rows'
    lines, and the image statistics."""
    import numpy as np
    max_len = int(cfg.data.max_length)
    proc = processor_for(cfg)
    problems, counts, lines = list(ds.problems), [], []
    vis_all, n_images, with_images = [], 0, 0
    for row in ds.rows:
        n = row_tokens(proc, row.data)
        vis_all += n["visual"]
        n_images += len(n["visual"])
        with_images += bool(row.data.get("images"))
        if n["image_end"] > max_len:
            problems.append(DataProblem(row.line, "image_tokens", f"its images end at token {n['image_end']} "
                                        f"(visual tokens {sum(n['visual'])}), past data.max_length = {max_len}: "
                                        "the trainer skips this row; raise data.max_length or use smaller images"))
        kept = n["trained"] if n["total"] <= max_len else max(0, n["trained"] - (n["total"] - max_len))
        counts.append((n["total"], n["trained"], kept))
        lines.append(row.line)
    images = {"count": n_images, "rows_with_images": with_images,
              "visual_tokens_total": int(sum(vis_all)),
              "visual_tokens_per_image": ({"min": min(vis_all), "median": float(np.median(vis_all)),
                                           "max": max(vis_all)} if vis_all else {}),
              "bad_images": sum(1 for p in problems if p.kind == "bad_image")}
    return {"problems": problems, "counts": counts, "lines": lines, "images": images}


def preview_fields(cfg, ds_row) -> tuple[dict, list[dict]]:
    """The Dataset screen's row preview of an image row: (the preview's fields, its images with
    their token counts). The processor's expanded tokens, image tokens shown as one untrained
    ``[image N: WxH FORMAT, T tokens]`` segment each."""
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
    fields = dict(segments=segs, n_tokens=len(ids), n_trained=sum(1 for x in kept if x != IGNORE),
                  n_trained_untruncated=sum(1 for x in labels if x != IGNORE),
                  truncated_at=max_len if len(ids) > max_len else None, cut_char=None, text=text,
                  input_ids=ids[:max_len], labels=kept)
    return fields, [{**info, "tokens": n} for info, n in zip(infos, vis)]


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


# ------------------------------------------------------------------------------ the run's modality

class _Vision(Modality):
    """Image+text rows: the processor is the processing class, rows are encoded as the loader
    asks and never packed, LoRA skips the vision tower unless model.freeze_vision_tower = false."""

    def is_model(self, cfg, path: str) -> bool:
        return model_is_vision(cfg, path)

    def load_processing(self, cfg, path: str) -> tuple[object, object, list[str]]:
        from engine.models.processor import load_processor
        proc = load_processor(cfg, path)
        return proc, proc.tokenizer, []

    def plan_line(self, cfg, n_targets: int) -> str | None:
        return (f"vision: {'frozen 16-bit vision tower' if cfg.model.freeze_vision_tower else 'LoRA on the vision tower too'}; "
                f"LoRA on {n_targets} language-model layers")


MODALITY = _Vision(
    name="vision",
    summary="image+text rows: the processor's encoding (visual tokens never trained), never packed",
    packs=False,
    no_packing="packing off (image rows: each keeps its own visual tokens)",
    lengths_known=False,
    data_format=FORMAT,
    wrong_model="data.train has images but model.name = {name!r} is a text-only model; "
                "use an image-text model (e.g. Qwen/Qwen2-VL-7B-Instruct, or builtin:tiny-vl)",
    model_class="transformers:AutoModelForImageTextToText",
    quant_skip="engine.modalities.vision:quant_skip_modules",
    training_set="engine.training.vision:training_sets",
    collator="engine.training.vision:collator",
    lora_targets="engine.modalities.vision:lora_targets",
)
