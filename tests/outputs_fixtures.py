"""Offline fixtures for the after-training tests (merge, generate, serve-cmd).

Builds, without any hub access: a tiny random Llama with a small word-level tokenizer that
carries a ChatML chat template, a PEFT LoRA adapter over it whose ``lora_B`` weights are
non-zero (so the adapter really changes the logits), and a run directory laid out like the
runner's (``config.toml``, ``adapter/``, ``events.jsonl``, an eval .jsonl).

Kept separate from ``engine.models.builtin`` on purpose: the tests must not depend on the cache
that module manages.
"""
from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "the capital of canada is ottawa",
    "the capital of france is paris",
    "what is local ai ? local ai runs on your machine",
    "hello how are you today ? i am fine thank you",
    "you are a helpful assistant for people fine tuning language models",
    "user assistant system the a an of to is what why how",
]

EVAL_ROWS = [
    {"messages": [{"role": "system", "content": "you are a helpful assistant"},
                  {"role": "user", "content": "what is the capital of canada ?"},
                  {"role": "assistant", "content": "the capital of canada is ottawa"}]},
    {"messages": [{"role": "user", "content": "hello how are you ?"},
                  {"role": "assistant", "content": "i am fine thank you"}]},
    {"messages": [{"role": "user", "content": "what is local ai ?"},
                  {"role": "assistant", "content": "local ai runs on your machine"}]},
    {"messages": [{"role": "user", "content": "the capital of france ?"},
                  {"role": "assistant", "content": "paris"}]},
]


def make_tokenizer():
    """A small word-level fast tokenizer with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=specials)
    tok.train_from_iterator(CORPUS + ["user assistant system"], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


def make_tiny_model(model_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random Llama + tokenizer + generation config into ``model_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                      max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    model_dir = Path(model_dir)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def make_adapter(base_dir: Path, adapter_dir: Path, *, r: int = 8, target_modules="all-linear",
                 seed: int = 1, scale: float = 0.5) -> Path:
    """A PEFT LoRA adapter over ``base_dir`` with random non-zero lora_B (changes logits)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r,
                                                 target_modules=target_modules,
                                                 task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    adapter_dir = Path(adapter_dir)
    peft_model.save_pretrained(str(adapter_dir))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(adapter_dir))
    # the runner records the base it trained on; make it an absolute local path
    cfg_path = adapter_dir / "adapter_config.json"
    acfg = json.loads(cfg_path.read_text())
    acfg["base_model_name_or_path"] = str(Path(base_dir).resolve())
    cfg_path.write_text(json.dumps(acfg, indent=2))
    return adapter_dir


def make_run_dir(run_dir: Path, base_dir: Path, *, r: int = 8, target_modules="all-linear",
                 with_eval: bool = True, seed: int = 1) -> Path:
    """A run directory as the runner leaves it: config.toml, adapter/, events.jsonl, data."""
    from engine.core import config

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    make_adapter(base_dir, run_dir / "adapter", r=r, target_modules=target_modules, seed=seed)
    data = run_dir / "data"
    data.mkdir(exist_ok=True)
    rows_file = data / "eval.jsonl"
    rows_file.write_text("".join(json.dumps(row) + "\n" for row in EVAL_ROWS))
    cfg = config.Config()
    cfg.model.name = str(Path(base_dir).resolve())
    cfg.lora.r = r
    if with_eval:
        cfg.data.eval = str(rows_file.resolve())
        cfg.data.train = str(rows_file.resolve())
    else:
        cfg.data.train = str(rows_file.resolve())
    config.save(cfg, run_dir / "config.toml")
    (run_dir / "events.jsonl").write_text(json.dumps({"type": "run_finished", "time": 0.0}) + "\n")
    return run_dir
