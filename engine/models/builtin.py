"""Offline built-ins: ``builtin:sample`` (our ChatML demo data), ``builtin:tiny``, and the
vision pair ``builtin:vl-sample`` / ``builtin:tiny-vl`` (a random-weight Qwen2-VL, below).

``builtin:tiny`` is a tiny random-weight Llama with a byte-level BPE tokenizer trained on
the sample data and a ChatML chat template. It is built on first use (a second or two)
and cached under ``$QLORA_TUI_CACHE`` (default ``~/.cache/qlora-tui``), so the product
works on a fresh machine with no GPU and no network. The directory is an ordinary
Hugging Face model directory: transformers and PEFT load it like any other.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# ChatML with {% generation %} markers: builtin:tiny's template, and the one a tokenizer without a
# chat template gets (engine.models.tokenizer).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_VERSION = "v1"
TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
# The offline demo: builtin:tiny on builtin:sample, a real NF4 QLoRA run of about a minute on a
# CPU. examples/demo.toml holds the same settings (tests/unit/test_config.py keeps them in step).
DEMO_OVERRIDES = [
    'model.name="builtin:tiny"', 'data.train="builtin:sample"', "data.max_length=256",
    "lora.r=16", "lora.alpha=32", "train.max_steps=100", "train.batch_size=4", "train.grad_accum=1",
    "train.learning_rate=2e-3", "train.logging_steps=1", "train.eval_steps=20", "train.save_steps=30",
]


def demo_config(overrides: list[str] | tuple = ()):
    """What "no config given" means in the TUI, wherever it is opened (`qlora-tui`, `qlora-tui
    tui`, `qlora-tui attach`): the offline demo, with ``--set`` overrides applied on top.
    (Headless commands estimate and train real models: there the library defaults stand.)"""
    from engine.core import config
    return config.load(None, DEMO_OVERRIDES + list(overrides))


SPECIALS = ["<|pad|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]


def sample_data_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "sample_chat.jsonl"


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_TUI_CACHE", "~/.cache/qlora-tui")).expanduser()


def tiny_model_dir() -> Path:
    """The cached builtin:tiny model directory, built if missing (atomically)."""
    return cached_build(f"builtin-tiny-{TINY_VERSION}", _build_tiny)


def cached_build(name: str, build) -> Path:
    """``cache_dir()/name``, made by ``build(tmp_dir)`` once and renamed into place atomically."""
    target = cache_dir() / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:          # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def corpus():
    with open(sample_data_path(), encoding="utf-8") as fh:
        for line in fh:
            for m in json.loads(line)["messages"]:
                yield m["content"]
    yield "user assistant system"


def train_tokenizer(texts, specials: list[str], template: str, max_length: int):
    """Our small byte-level BPE tokenizer (1,024 tokens) trained on ``texts``, ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", bos_token="<|begin_of_text|>",
                                  eos_token="<|im_end|>", unk_token="<|unk|>")
    tok.chat_template = template
    tok.model_max_length = max_length
    return tok


def _build_tiny(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(corpus(), SPECIALS, CHATML_TEMPLATE, TINY_SHAPE["max_position_embeddings"])
    tok.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **TINY_SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)


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
    return cached_build(f"builtin-tiny-vl-{TINY_VL_VERSION}", _build_tiny_vl)


def image_only(cls):
    """``cls`` (a transformers processor class) without its video processor. Without torchvision
    transformers cannot even type-check a video processor, so Qwen2-VL's processor fails to build;
    images need only the image processor and the tokenizer. Same class name: the saved
    processor_config.json stays the model's own."""
    attrs = [a for a in cls.get_attributes() if a != "video_processor"]
    return type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda c: list(attrs)),
                                       "__module__": cls.__module__})


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
