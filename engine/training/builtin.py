"""Offline built-ins: ``builtin:sample`` (our ChatML demo data) and ``builtin:tiny``.

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

from engine.dataset.chat import CHATML_TEMPLATE

TINY_VERSION = "v1"
TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
# The offline demo: builtin:tiny on builtin:sample, a real NF4 QLoRA run of about a minute on a
# CPU. examples/demo.toml holds the same settings (tests/test_config.py keeps them in step).
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
