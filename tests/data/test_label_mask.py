"""The label mask: conversational rows train on assistant tokens only (end-of-turn included),
whatever the tokenizer's template; prompt/completion on the completion; text on everything."""
import pytest

from engine.modalities import text as chat
from engine.models.tokenizer import prepare_tokenizer
from engine.core import config
from engine.models.tokenizer import load_tokenizer

CONV = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "What is 2+2?"},
                     {"role": "assistant", "content": "It is 4."},
                     {"role": "user", "content": "And 3+3?"},
                     {"role": "assistant", "content": "It is 6."}]}

# a Llama-3-like template with no {% generation %} markers
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    t, _ = load_tokenizer(config.Config())
    return t


def trained_text(enc):
    return "".join(piece for piece, t in chat.segments(enc) if t)


def test_assistant_only_mask_chatml(tok):
    enc = chat.encode_batch(tok, [CONV])[0]
    assert trained_text(enc) == "It is 4.<|im_end|>It is 6.<|im_end|>"
    # the mask is per token: every trained label is its token id, everything else is ignored
    assert all(l in (chat.IGNORE, i) for l, i in zip(enc.labels, enc.input_ids))
    assert tok.convert_tokens_to_ids("<|im_end|>") in [l for l in enc.labels if l != chat.IGNORE]
    untrained = "".join(p for p, t in chat.segments(enc) if not t)
    assert "What is 2+2?" in untrained and "Be brief." in untrained and "<|im_start|>assistant" in untrained


def test_mask_with_template_without_generation_markers(tok):
    t, _ = load_tokenizer(config.Config())
    prepare_tokenizer(t, LLAMA3)
    enc = chat.encode_batch(t, [CONV])[0]
    assert trained_text(enc) == "It is 4.<|eot_id|>It is 6.<|eot_id|>"


def test_tokenizer_without_template_gets_chatml_and_pad(tok):
    t, _ = load_tokenizer(config.Config())
    t.chat_template = None
    t.pad_token = None
    warnings = prepare_tokenizer(t)
    assert any("ChatML" in w for w in warnings) and any("pad" in w for w in warnings)
    assert t.pad_token is not None
    assert trained_text(chat.encode_batch(t, [CONV])[0]) == "It is 4.<|im_end|>It is 6.<|im_end|>"


def test_prompt_completion_and_text(tok):
    pc, tx = chat.encode_batch(tok, [{"prompt": "Q: sky colour? A:", "completion": " blue"},
                                     {"text": "all of this"}])
    assert trained_text(pc) == " blue" + tok.eos_token
    assert trained_text(tx) == "all of this" + tok.eos_token


def test_trainer_trains_on_exactly_the_mask(tiny_cfg):
    """The labels SFTTrainer trains on are the ones encode_batch made (same code path)."""
    import threading
    from engine.dataset.rows import split_eval
    from engine.core import events
    cfg = tiny_cfg
    from engine.training import recipe
    prep = recipe.build(recipe.plan_run(cfg), __import__("pathlib").Path(cfg.output.dir) / "x", lambda e: None,
                        threading.Event(), [])
    tds = prep.trainer.train_dataset
    from engine.dataset import data as data_mod
    rows = [r.data for r in data_mod.load(cfg.resolve_path(cfg.data.train)).rows]
    train_rows, _ = split_eval(cfg, rows, None)
    expect = chat.encode_batch(prep.tokenizer, train_rows[:5])
    for i in range(5):
        assert tds[i]["input_ids"] == expect[i].input_ids
        assert tds[i]["labels"] == expect[i].labels
