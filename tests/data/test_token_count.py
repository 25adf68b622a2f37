"""engine.dataset.token_count: the inspector's fast token counts equal the trainer's encoder
(engine.modalities.text.encode_batch) row for row, whichever way a row is counted, on tokenizers built here
with `tokenizers` (GPT-2-style and Llama-3-style byte-level BPE, BPE whose merges cross a turn's
header, a tokenizer with a normalizer) and on templates with and without special tokens."""
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.dataset import token_count
from engine.models.builtin import CHATML_TEMPLATE

SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEXTS = ["héllo wörld, how are you?", "🙂🙂 emoji and 日本語のテキスト", "  spaced  out  ", "tabs\tand\nnewlines\n",
         "\n\nstarts with blank lines", "<|im_end|> literal special token", "x" * 120,
         "What is the capital of Canada? Ottawa.", "12345 numbers 678", "'s contraction first", "ciao"]


def make_tok(pre, normalizer=None, corpus=None, template=CHATML_TEMPLATE):
    tk = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tk.pre_tokenizer = pre
    if normalizer is not None:
        tk.normalizer = normalizer
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus or (TEXTS * 20 + ["user assistant system"] * 20), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|im_end|>",
                                  unk_token="<|unk|>")
    tok.chat_template = template
    return tok


def rows(n=120):
    out = []
    for i in range(n):
        a, b, c = TEXTS[i % len(TEXTS)], TEXTS[(i * 3 + 1) % len(TEXTS)], TEXTS[(i * 7 + 2) % len(TEXTS)]
        if i % 3 == 0:
            out.append({"messages": [{"role": "system", "content": "You are terse."},
                                     {"role": "user", "content": a}, {"role": "assistant", "content": b}]})
        elif i % 3 == 1:
            out.append({"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b},
                                     {"role": "user", "content": c}, {"role": "assistant", "content": a + c}]})
        else:
            out.append({"prompt": a, "completion": " " + b})
    return out


def count(tok, data, max_len, batch=50):
    counter = token_count.Counter(tok, max_len)
    got = []
    for i in range(0, len(data), batch):
        part = data[i:i + batch]
        got += counter.counts(part, counter.render(part))
    return counter, got


BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False)
LLAMA3 = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.mark.parametrize("pre", [BYTE_LEVEL, LLAMA3], ids=["gpt2-regex", "llama3-regex"])
@pytest.mark.parametrize("max_len", [16, 4096])
def test_pieces_way_equals_the_trainer(pre, max_len):
    tok = make_tok(pre)
    data = rows()
    counter, got = count(tok, data, max_len)
    assert counter.pieces_refused == ""
    assert got == token_count.exact_counts(tok, data, max_len)
    assert counter.mismatch == ""
    chat = [r for r in data if "messages" in r]
    # an answer starting with white space may share its first token with the header: offsets
    plain = [r for r in chat if not any(m["role"] == "assistant" and m["content"][0].isspace()
                                        for m in r["messages"])]
    assert counter.rows_by_way["pieces"] >= len(plain) > 0
    assert counter.rows_by_way["offsets"] >= len(data) - len(chat)      # prompt/completion rows


def test_token_crossing_a_span_start_is_counted_by_offsets():
    """No pre-tokenizer regex: BPE merges '\\n' into the answer's first word, so the answer's
    first token starts inside the header: those rows must leave the pieces way."""
    corpus = ["assistant\nHello there"] * 200 + TEXTS * 5
    tok = make_tok(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), corpus=corpus)
    piece = tok.backend_tokenizer.encode("assistant\nHello there", add_special_tokens=False)
    assert any(s < len("assistant\n") < e for s, e in piece.offsets), "the corpus must merge across the header"
    data = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}] * 10
    counter, got = count(tok, data, 4096)
    assert got == token_count.exact_counts(tok, data, 4096)
    assert counter.rows_by_way["offsets"] >= 10 and counter.mismatch == ""


def test_template_without_special_tokens_takes_offsets():
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}### Answer: {% generation %}"
                "{{ m['content'] }}{% endgeneration %}\n{% else %}### {{ m['role'] }}: {{ m['content'] }}\n"
                "{% endif %}{% endfor %}")
    tok = make_tok(BYTE_LEVEL, template=template)
    data = [r for r in rows() if "messages" in r]
    counter, got = count(tok, data, 4096)
    assert got == token_count.exact_counts(tok, data, 4096) and counter.mismatch == ""


def test_nfc_normalizer_takes_the_pieces_way():
    """Qwen's tokenizers normalise with NFC: decomposed and composed text, a combining mark
    right at an answer's start, and Hangul jamo all count as the trainer counts them."""
    tok = make_tok(LLAMA3, normalizer=normalizers.NFC())
    assert token_count.pieces_refusal(tok.backend_tokenizer) == ""
    texts = ["cafe\u0301 and café", "\u0301 starts with a combining mark", "\u1100\u1161 jamo",
             "e\u031b\u0301 reordered", "plain answer"]
    data = [{"messages": [{"role": "user", "content": texts[i % 5]},
                          {"role": "assistant", "content": texts[(i + 1) % 5]}]} for i in range(40)]
    counter, got = count(tok, data, 4096)
    assert got == token_count.exact_counts(tok, data, 4096) and counter.mismatch == ""
    assert counter.rows_by_way["pieces"] == 40


def test_normalizer_refuses_the_pieces_way():
    tok = make_tok(BYTE_LEVEL, normalizer=normalizers.Lowercase())
    assert "normalizer" in token_count.pieces_refusal(tok.backend_tokenizer)
    data = rows(60)
    counter, got = count(tok, data, 4096)
    assert got == token_count.exact_counts(tok, data, 4096)
    assert counter.rows_by_way["pieces"] == 0 and counter.mismatch == ""


def test_repeated_pieces_are_tokenised_once():
    tok = make_tok(BYTE_LEVEL)
    data = [r for r in rows() if "messages" in r]
    counter, got = count(tok, data, 4096, batch=20)
    assert "system\nYou are terse." in counter.pieces.shared    # met twice in a batch: kept
    assert got == token_count.exact_counts(tok, data, 4096)
    calls = []
    backend = counter.pieces.backend
    real = backend.encode_batch_fast

    class Spy:
        def __getattr__(self, name):
            return getattr(backend, name)

        def encode_batch_fast(self, texts, **kw):
            calls.extend(texts)
            return real(texts, **kw)
    counter.pieces.backend = Spy()
    counter.counts(data[:20], counter.render(data[:20]))
    assert "system\nYou are terse." not in calls and "\n" not in calls


def test_added_tokens_split_in_the_tokenizers_two_passes():
    """A normalised added token is only looked for in the text between the raw ones."""
    tok = make_tok(BYTE_LEVEL)
    tok.add_tokens(["ll", "o<|im"])            # normalized=True by default for non-special tokens
    data = [r for r in rows() if "messages" in r]
    counter, got = count(tok, data, 4096)
    assert got == token_count.exact_counts(tok, data, 4096) and counter.mismatch == ""
    assert counter.rows_by_way["pieces"] > 0
    assert counter.pieces._added("hello<|im_end|>") == [(2, 4), (5, 15)]      # not "o<|im"


def ascii_rows(n, seed):
    """Chat rows of random ASCII (every character, control characters included, with runs of
    spaces, newlines, digits, quotes and contractions), answers starting with a letter."""
    import random
    r = random.Random(seed)
    bits = [chr(i) for i in range(128)] + ["the ", "Ottawa ", "  ", "\n\n", " \n", "'s ", "'LL ", "1234567 ",
                                           "don't ", "x" * 30, "...", "\t"] * 8

    def text(k):
        return "".join(r.choice(bits) for _ in range(k))
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": text(r.randint(1, 60))},
                {"role": "assistant", "content": r.choice("AbZ") + text(r.randint(0, 60))}]
        if i % 2:
            msgs = [{"role": "system", "content": "Be brief."}] + msgs + [
                {"role": "user", "content": text(20)}, {"role": "assistant", "content": "Q" + text(30)}]
        out.append({"messages": msgs})
    return out


@pytest.mark.parametrize("pre", [BYTE_LEVEL, LLAMA3], ids=["gpt2-regex", "llama3-regex"])
def test_words_way_splits_ascii_as_the_tokenizer_does(pre):
    """The words way's split of ASCII text is the tokenizer's own pre-tokenizer split."""
    tok = make_tok(pre)
    words = token_count._Words.of(tok.backend_tokenizer)
    assert words is not None
    for row in ascii_rows(200, seed=1):
        for m in row["messages"]:
            t = m["content"]
            want = [t[a:b] for _, (a, b) in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(t)]
            assert words.findall(t) == want


@pytest.mark.parametrize("pre", [BYTE_LEVEL, LLAMA3], ids=["gpt2-regex", "llama3-regex"])
@pytest.mark.parametrize("words_max", [200_000, 50])
def test_words_way_equals_the_trainer(pre, words_max, monkeypatch):
    """ASCII rows counted word by word (every row, not a sample) equal the trainer's encoder,
    also with a word memory so small that it is cleared on every batch; non-ASCII rows of the
    same batches are counted by the tokenizer as before."""
    monkeypatch.setattr(token_count, "WORDS_MAX", words_max)
    tok = make_tok(pre)
    data = ascii_rows(160, seed=2) + rows(40)
    for max_len in (24, 4096):
        counter, got = count(tok, data, max_len)
        assert counter.pieces.words is not None and counter.pieces.words.tokens
        assert got == token_count.exact_counts(tok, data, max_len)
        assert counter.mismatch == ""
        assert counter.rows_by_way["pieces"] >= 160


def test_words_way_needs_a_known_split():
    """A pre-tokenizer the words way cannot reproduce (Metaspace-free but Whitespace-split, or
    a Unicode property other than L / N) leaves counting to the tokenizer."""
    assert token_count.split_pattern(make_tok(pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )).backend_tokenizer) is None
    with pytest.raises(ValueError):
        token_count.ascii_pattern(r"\p{Lu}+|\s+")
    assert token_count.ascii_pattern(r"[^\s\p{L}\p{N}]+|\p{L}+") == r"[^\sA-Za-z0-9]+|[A-Za-z]+"


def test_every_format_counts_as_the_trainer_encodes(tmp_path):
    """Rows of every format (generated here, loaded as the trainer loads them: Alpaca, ShareGPT,
    ChatML with a system column, OpenAI tools with tool calls and results, content parts,
    weight 0, prompt/completion, text, preference pairs and KTO rows as the inspector measures
    their sides) counted by the inspector's counter equal the trainer's encoder row for row, with
    builtin:tiny's tokenizer and a template that renders tools."""
    import json
    from engine.core import config
    from engine.dataset import data, preference
    from engine.models.tokenizer import load_tokenizer, prepare_tokenizer
    from test_sft_formats_train import TOOLS_TEMPLATE, WEATHER
    tok, _ = load_tokenizer(config.Config())
    prepare_tokenizer(tok, TOOLS_TEMPLATE)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}
    per_format = {
        "alpaca": [{"instruction": f"Name {i} colours.", "input": "", "output": f"Red and blue {i}."} for i in range(6)],
        "sharegpt": [{"conversations": [{"from": "human", "value": f"Hi {i}?"}, {"from": "gpt", "value": f"Hello {i}!"}],
                      "system": "Be kind."} for i in range(6)],
        "messages": [{"messages": [{"role": "user", "content": [{"type": "text", "text": f"Part {i} "},
                                                               {"type": "text", "text": "two?"}]},
                                   {"role": "assistant", "content": f"No {i}.", "weight": 0},
                                   {"role": "user", "content": "Again?"},
                                   {"role": "assistant", "content": f"Yes {i}, again."}]} for i in range(6)]
        + [{"tools": [{"type": "function", "function": WEATHER}],
            "messages": [{"role": "user", "content": f"Weather in Oslo {i}?"},
                         {"role": "assistant", "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "c1", "content": f"rain, {i} C"},
                         {"role": "assistant", "content": f"Rain and {i} C."}]} for i in range(6)],
        "prompt_completion": [{"prompt": f"2 + {i} =", "completion": f" {2 + i}"} for i in range(6)],
        "text": [{"text": f"Plain text row {i}, with 12 digits 123456789012."} for i in range(6)],
        "preference": [{"prompt": [{"role": "user", "content": f"Pick {i}?"}],
                        "chosen": [{"role": "assistant", "content": f"This one {i}."}],
                        "rejected": [{"role": "assistant", "content": "No."}]} for i in range(6)],
        "kto": [{"prompt": f"Say {i}:", "completion": f" {i} ok", "label": i % 2 == 0} for i in range(6)],
    }
    for fmt, raw in per_format.items():
        ds = data.load(str(_write_jsonl(tmp_path / f"{fmt}.jsonl", raw)))
        assert ds.format == fmt and len(ds.rows) == len(raw) and not ds.problems, (fmt, ds.problems)
        rows = [r.data for r in ds.rows]
        if fmt in preference.FORMATS:
            rows = [preference.side_view(r, side) for r in rows
                    for side in (("chosen", "rejected") if "chosen" in r else (None,))]
        for max_len in (8, 2048):
            counter, got = count(tok, rows, max_len, batch=5)
            assert got == token_count.exact_counts(tok, rows, max_len), fmt
            assert counter.mismatch == "", fmt


def _write_jsonl(path, rows):
    import json
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
