"""A small REAL pretrained Llama for loss curves that mean something (issue 13), plus its SFT data.

    python bench/make_real_model.py SRC DST [PAD]

SRC: a folder holding karpathy's llama2.c ``stories260K.bin`` (legacy v0 export, float32) and its
tokenizer ``tok512.bin``. DST (e.g. .h13/realmodel, git-ignored) becomes a transformers model dir:
config.json, model.safetensors (bf16), tokenizer.json (+ a chat template), data/sft.jsonl (chat
rows of real English), data/SOURCES.txt. Then it checks the result on CPU (loss on real text far
below ln(vocab), a greedy story) and prints the figures.

Where the weights come from. The model is Andrej Karpathy's "stories260K" from the llama2.c
project (https://github.com/karpathy/llama2.c, doc/stories260K.md; first published at
huggingface.co/karpathy/tinyllamas/tree/main/stories260K, MIT licence like llama2.c): a
Llama-architecture model (dim 64, 5 layers, 8 query / 4 key-value heads, SwiGLU hidden 172,
vocabulary 512 from a sentencepiece BPE trained on TinyStories) trained on the TinyStories data
set (validation loss 1.297 nats/token). No model hub is reachable here, so the files are read
from a public GitHub repository that commits them unchanged:
    https://github.com/DaveBben/esp32-llm  commit 934dab4d242d259abd88678488ea3b62d4fca601
    data/stories260K.bin  1,056,540 bytes  sha256 b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696
    data/tok512.bin           6,227 bytes  sha256 037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312
(git --git-dir=<mirror> show 934dab4d:data/stories260K.bin > SRC/stories260K.bin, same for tok512.bin).
Larger tinyllamas (stories15M, 58 MB) are committed in some repositories too, but the store we
can read holds no file of 4 MiB or more, so 260K is the largest real Llama reachable offline.

The conversion, exact:
  - q/k projections: llama2.c rotates interleaved pairs, transformers rotates halves: the rows
    of wq/wk are permuted per head (the inverse of llama2.c export.py's permute_reverse);
  - the SwiGLU hidden size is padded from 172 to a multiple of PAD (3rd argument, default 32 ->
    192) with zero rows in gate/up and zero columns in down: silu(0)*0 = 0, so the function is
    unchanged (checked below: max logit difference to the unpadded model 0.0), and every GEMM dim
    is a multiple of 32: what FP8 GEMMs (multiples of 16) and bitsandbytes' packed CPU NF4 kernel
    (out_features % 32) want. Unpadded (PAD 4 keeps 172) the engine still trains on CPU: it says
    "gate_proj (172x64), up_proj (172x64) ... use its generic 4-bit kernel";
  - the classifier is tied to the embedding (llama2.c's shared-weights flag: vocab > 0);
  - 4-bit costs this small model little: loss on the bench's rows 4.98 (bf16) -> 5.16 (NF4).
The tokenizer: tok512.bin holds the sentencepiece pieces and scores (spaces for "▁",
"<0xNN>" byte pieces); merges are rebuilt from the scores (a piece's merge rank is its score
rank), and llama2c_encode() below (llama2.c's own greedy merge loop) checks that the
transformers tokenizer gives the same ids on the data.
"""
import hashlib
import json
import math
import re
import struct
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


# ---------------------------------------------------------------- llama2.c files

def read_llama2c(path):
    """(header dict, {name: float32 tensor}) from a llama2.c legacy (v0) checkpoint."""
    raw = Path(path).read_bytes()
    h = dict(zip(HEADER, struct.unpack("7i", raw[:28])))
    shared = h["vocab_size"] > 0
    h["vocab_size"] = abs(h["vocab_size"])
    d, hid, L, V = h["dim"], h["hidden_dim"], h["n_layers"], h["vocab_size"]
    hs = d // h["n_heads"]
    kv = h["n_kv_heads"] * hs
    flat = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32)
    layout = [("emb", (V, d)), ("rms_att", (L, d)), ("wq", (L, d, d)), ("wk", (L, kv, d)),
              ("wv", (L, kv, d)), ("wo", (L, d, d)), ("rms_ffn", (L, d)), ("w1", (L, hid, d)),
              ("w2", (L, d, hid)), ("w3", (L, hid, d)), ("rms_final", (d,)),
              ("freq", (h["seq_len"], hs))]          # freq_cis real + imag halves: skipped
    if not shared:
        layout.append(("wcls", (V, d)))
    w, at = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        w[name] = flat[at:at + n].view(shape).clone()
        at += n
    if at != flat.numel():
        raise SystemExit(f"{path}: {flat.numel() - at} floats left over: not a llama2.c v0 export of this header")
    h["shared_classifier"] = shared
    return h, w


def read_tok512(path):
    """[(piece, score)] from a llama2.c tokenizer.bin, pieces back in sentencepiece form."""
    raw = Path(path).read_bytes()
    at, out = 4, []
    while at < len(raw):
        score, n = struct.unpack("fi", raw[at:at + 8])
        text = raw[at + 8:at + 8 + n].decode("utf-8")
        at += 8 + n
        out.append((text.strip() if text.strip() in ("<s>", "</s>") else text.replace(" ", "▁"), score))
    return out


def llama2c_encode(text, pieces):
    """llama2.c run.c's encode(): dummy prefix, code points (or bytes+3), best-score merges."""
    ids = {p: i for i, (p, _) in enumerate(pieces)}
    score = [s for _, s in pieces]
    toks = []
    for ch in ("▁" + text.replace(" ", "▁")):
        if ch in ids:
            toks.append(ids[ch])
        else:
            toks.extend(b + 3 for b in ch.encode("utf-8"))
    while True:
        best, at = None, -1
        for i in range(len(toks) - 1):
            j = ids.get(pieces[toks[i]][0] + pieces[toks[i + 1]][0])
            if j is not None and (best is None or score[j] > score[best]):
                best, at = j, i
        if best is None:
            return toks
        toks[at:at + 2] = [best]


def hf_tokenizer(pieces, max_length):
    """transformers' Llama tokenizer (byte fallback, metaspace) with merges rebuilt from scores."""
    from transformers import LlamaTokenizer
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    merges = []
    for i, (p, _) in enumerate(pieces):
        if i < 3 or re.fullmatch(r"<0x[0-9A-F]{2}>", p):
            continue
        merges += [(i, p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
    merges.sort(key=lambda m: (-pieces[m[0]][1], vocab[m[1]], vocab[m[2]]))
    tok = LlamaTokenizer(vocab=vocab, merges=[(a, b) for _, a, b in merges], add_prefix_space=True,
                         pad_token="<unk>", add_bos_token=True)     # llama2.c trained with BOS per story
    tok.chat_template = TEMPLATE
    tok.model_max_length = max_length
    return tok


# ---------------------------------------------------------------- the model

def _rope_rows(w, heads):
    """llama2.c's interleaved rotary pairs -> transformers' rotate-half halves (per head)."""
    out_dim, in_dim = w.shape
    return w.view(heads, out_dim // heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_state(h, w, hidden):
    """The transformers LlamaForCausalLM state dict (float32), SwiGLU padded to ``hidden``."""
    pad = hidden - h["hidden_dim"]
    sd = {"model.embed_tokens.weight": w["emb"], "model.norm.weight": w["rms_final"]}
    for i in range(h["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = w["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
        sd[p + "self_attn.q_proj.weight"] = _rope_rows(w["wq"][i], h["n_heads"])
        sd[p + "self_attn.k_proj.weight"] = _rope_rows(w["wk"][i], h["n_kv_heads"])
        sd[p + "self_attn.v_proj.weight"] = w["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = w["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = torch.nn.functional.pad(w["w1"][i], (0, 0, 0, pad))
        sd[p + "mlp.up_proj.weight"] = torch.nn.functional.pad(w["w3"][i], (0, 0, 0, pad))
        sd[p + "mlp.down_proj.weight"] = torch.nn.functional.pad(w["w2"][i], (0, pad))
    if not h["shared_classifier"]:
        sd["lm_head.weight"] = w["wcls"]
    return sd


def build_model(h, w, hidden):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=h["vocab_size"], hidden_size=h["dim"], intermediate_size=hidden,
                      num_hidden_layers=h["n_layers"], num_attention_heads=h["n_heads"],
                      num_key_value_heads=h["n_kv_heads"], max_position_embeddings=h["seq_len"],
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=h["shared_classifier"],
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(hf_state(h, w, hidden), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


# ---------------------------------------------------------------- the SFT data (real English)

LICENCES = ("GPL-3", "GPL-2", "LGPL-2.1", "Apache-2.0", "MPL-2.0")


def text_sources():
    """Real English available offline: the seed guide, the shared references, the repo's docs and
    the licence texts every Debian/Ubuntu machine has (fixed prose, same on every machine)."""
    seed = Path("/work/shared/seed/qlora-guide.txt")
    refs = sorted(Path("/work/shared/reference").glob("*.md"))
    docs = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    lic = [Path("/usr/share/common-licenses", n) for n in LICENCES]
    return [p for p in [seed, *refs, *docs, *lic] if p.is_file()]


def paragraphs(text):
    """Prose paragraphs: code fences, tables and short lines dropped, whitespace joined."""
    text = re.sub(r"```.*?```", "\n\n", text, flags=re.S)
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [l.strip() for l in block.splitlines() if l.strip() and not l.lstrip().startswith("|")]
        para = re.sub(r"[*`#>]+", "", " ".join(lines)).strip()
        letters = sum(c.isalpha() or c == " " for c in para)
        if len(para) >= 80 and letters >= 0.8 * len(para) and para.isascii():
            out.append(para)
    return out


def chunks(para, limit=480):
    """A paragraph cut at sentence ends into pieces of at most ~``limit`` characters."""
    out, cur = [], ""
    for sent in re.split(r"(?<=[.;!?])\s+", para):
        if cur and len(cur) + len(sent) > limit:
            out.append(cur)
            cur = ""
        cur = f"{cur} {sent}".strip()
    return out + [cur] if cur else out


def sft_rows(paras):
    """One chat row per chunk: the user asks with its first words, the assistant says the chunk."""
    rows = []
    for text in (c for p in paras for c in chunks(p) if len(c) >= 60):
        first = " ".join(text.split()[:8])
        rows.append({"messages": [{"role": "user", "content": f"Tell me more about this: {first}"},
                                  {"role": "assistant", "content": text}]})
    return rows


def write_data(dst, sources):
    paras = [p for src in sources for p in paragraphs(src.read_text(encoding="utf-8"))]
    rows = sft_rows(paras)
    d = Path(dst, "data")
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "sft.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    digest = hashlib.sha256((d / "sft.jsonl").read_bytes()).hexdigest()
    (d / "SOURCES.txt").write_text("".join(f"{s}\n" for s in sources) + f"rows {len(rows)} sha256 {digest}\n")
    return rows


# ---------------------------------------------------------------- checks

SIMPLE = [   # plain sentences of our own, the register TinyStories is written in
    "Tom had a red ball. He liked to kick it in the garden with his dog. One day the ball went over "
    "the fence and Tom was sad. His mom helped him find it and they both laughed.",
    "The sun was hot, so Mia and her brother went to the lake. They swam and ate apples under a big "
    "tree. When it got dark, they walked home and went to bed.",
]


def text_loss(model, tok, texts):
    """Mean next-token loss (nats/token) of ``texts``, each with BOS, at most the model's context."""
    tot, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"][:model.config.max_position_embeddings]])
            out = model(input_ids=ids, labels=ids)
            k = ids.shape[1] - 1
            tot, n = tot + out.loss.item() * k, n + k
    return tot / n


def check(model, plain, tok, pieces, rows, hidden):
    """The figures: tokenizer == llama2.c's, padding exact, loss << ln(V), a sensible greedy story."""
    texts = [r["messages"][1]["content"] for r in rows]
    bad = [t for t in texts[:60] if tok(t, add_special_tokens=False)["input_ids"] != llama2c_encode(t, pieces)]
    if bad:
        raise SystemExit(f"tokenizer differs from llama2.c's encode on {len(bad)} of 60 rows, e.g. {bad[0][:80]!r}")
    ids = torch.tensor([tok(texts[0])["input_ids"][:128]])
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max().item()
    gen = model.generate(**tok("Once upon a time", return_tensors="pt"), max_new_tokens=60, do_sample=False)
    figures = {
        "params": sum(p.numel() for p in model.parameters()), "hidden_padded_to": hidden,
        "padding_max_logit_diff": diff, "ln_vocab": math.log(model.config.vocab_size),
        "loss_simple_english": text_loss(model, tok, SIMPLE),
        "loss_sft_text": text_loss(model, tok, texts), "greedy": tok.decode(gen[0], skip_special_tokens=True),
    }
    return figures


def main(src, dst, pad=32):
    src, dst = Path(src), Path(dst)
    h, w = read_llama2c(src / "stories260K.bin")
    pieces = read_tok512(src / "tok512.bin")
    if len(pieces) != h["vocab_size"]:
        raise SystemExit(f"{src / 'tok512.bin'}: {len(pieces)} pieces for a {h['vocab_size']}-token model")
    hidden = -(-h["hidden_dim"] // pad) * pad
    model = build_model(h, w, hidden).to(torch.bfloat16)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    model.generation_config.save_pretrained(dst)
    tok = hf_tokenizer(pieces, h["seq_len"])
    tok.save_pretrained(dst)
    rows = write_data(dst, text_sources())
    plain = build_model(h, w, h["hidden_dim"]).to(torch.bfloat16)
    figures = check(model, plain, tok, pieces, rows, hidden)
    figures.update(header=h, rows=len(rows), dst=str(dst))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__.split("\n\n")[1])
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
