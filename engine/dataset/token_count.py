"""Token counts for the dataset inspector: per row ``(tokens, trained tokens, trained tokens
kept within max_length)``, equal to what ``engine.modalities.text.encode_batch`` (the trainer's encoder)
gives, computed faster than building every row's labels.

Three ways, fastest first; a row takes the first that can be sure of it:

``pieces``  Conversational rows with a byte-level BPE tokenizer. Special and other added tokens
            split the text before the tokenizer looks at anything else, so a row is counted
            piece by piece: the text between added tokens is tokenised without offsets
            (``encode_batch_fast``), each distinct piece once per batch (system prompts and
            turn separators repeat on every row), and each added token counts one. A piece in
            which a trained span starts (``assistant\\n`` + the answer) is tokenised whole; its
            first tokens must be exactly the tokens of the part before the span (checked by id
            on every such piece), which with byte-level tokens means the next token starts where
            the span starts. Anything else (a span that ends inside a piece, a token crossing a
            span's start, a tokenizer with a normalizer other than NFC, Metaspace, offset
            trimming, or added tokens that strip spaces) goes to ``offsets``.
``offsets`` One ``encode_batch`` with character offsets; a token is trained when it has width and
            starts inside a span (the trainer's rule), found with char→token look-ups.
``exact``   ``engine.modalities.text.encode_batch`` itself, labels and all.

Some rows of every batch are also counted with ``exact`` and compared; on a disagreement the
counter switches to ``exact`` for the rest of the file and says so in a warning.
"""
from __future__ import annotations

import json
import re

CHECK_FIRST = 256         # rows of the first batch checked against encode_batch
CHECK_EACH = 4            # rows of every later batch checked against encode_batch
SHARED_MAX = 4096         # pieces remembered across batches (those seen twice in one batch)

# pre-tokenizer parts that split the same way wherever the text starts (no prefix space, no
# "first piece only" rules); ByteLevel is required and must not add a prefix space
_POSITION_FREE = {"Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit", "ByteLevel"}
_PROCESSORS = {"TemplateProcessing", "BertProcessing"}


class _Slow(Exception):
    """The faster way cannot be sure for this row: count it a slower way."""


def pieces_refusal(backend) -> str:
    """Why the ``pieces`` way cannot be used with this ``tokenizers.Tokenizer`` ('' if it can)."""
    if backend is None:
        return "no fast tokenizer"
    if backend.normalizer is not None and not _nfc_only(backend):
        return "the tokenizer has a normalizer other than NFC"
    if getattr(backend, "encode_special_tokens", False):
        return "the tokenizer splits special tokens"
    model = backend.model
    if type(model).__name__ != "BPE" or getattr(model, "dropout", None):
        return "the model is not a deterministic BPE"
    pre = backend.pre_tokenizer
    if pre is None:
        return "no pre-tokenizer"
    parts = json.loads(pre.__getstate__())
    parts = parts.get("pretokenizers", [parts]) if parts.get("type") == "Sequence" else [parts]
    if not any(p.get("type") == "ByteLevel" for p in parts):
        return "not a byte-level tokenizer"
    for p in parts:
        if p.get("type") not in _POSITION_FREE or p.get("add_prefix_space"):
            return f"pre-tokenizer {p.get('type')} depends on where the text starts"
    post = backend.post_processor
    if post is not None:
        procs = json.loads(post.__getstate__())
        procs = procs.get("processors", [procs]) if procs.get("type") == "Sequence" else [procs]
        for p in procs:
            if p.get("type") == "ByteLevel" and not p.get("trim_offsets"):
                continue
            if p.get("type") not in _PROCESSORS:
                return f"post-processor {p.get('type')} may move token offsets"
    for t in backend.get_added_tokens_decoder().values():
        if t.lstrip or t.rstrip or t.single_word:
            return f"added token {t.content!r} strips spaces or matches whole words only"
    from tokenizers.pre_tokenizers import ByteLevel
    vocab = backend.get_vocab(with_added_tokens=False)
    if not all(ch in vocab for ch in ByteLevel.alphabet()):
        return "some bytes have no token of their own"
    return ""


def _nfc_only(backend) -> bool:
    """The normalizer is NFC alone (Qwen 2/2.5/3 tokenizers)."""
    if backend.normalizer is None:
        return False
    d = json.loads(backend.normalizer.__getstate__())
    parts = d.get("normalizers", [d]) if d.get("type") == "Sequence" else [d]
    return len(parts) == 1 and parts[0].get("type") == "NFC"


class _Pieces:
    """The ``pieces`` way (see the module doc).

    With an NFC normalizer (applied by the tokenizer to each piece between added tokens, as
    here), a piece is normalised whole on both sides; only where a span starts inside a piece
    could NFC join the head's last character with the answer's first, so there the head must
    end in white space (``assistant\n``), which NFC never joins to what follows."""

    def __init__(self, backend):
        self.backend = backend
        self.nfc = _nfc_only(backend)
        # The tokenizer extracts added tokens in two passes: those matched on the raw text, then
        # (after normalising, a no-op here) those matched on normalised text, in what is left.
        # Each pass is leftmost-longest, as a regex alternation sorted longest first is.
        raw, norm = set(), set()
        for t in backend.get_added_tokens_decoder().values():
            if t.content:
                (norm if t.normalized else raw).add(t.content)
        self.passes = [re.compile("|".join(map(re.escape, sorted(c, key=len, reverse=True)))).finditer
                       for c in (raw, norm) if c]
        self.shared: dict = {}          # piece -> tokens, for pieces that repeat across rows
        self.heads: dict = {}           # text before a span start -> its token ids (None: unusable)

    def _added(self, text: str) -> list:
        """(start, end) of every added token in text, as the tokenizer finds them."""
        if not self.passes:
            return []
        found = [(m.start(), m.end()) for m in self.passes[0](text)]
        if len(self.passes) == 2:
            more, pos = [], 0
            for s, e in found + [(len(text), len(text))]:
                more += [(m.start() + pos, m.end() + pos) for m in self.passes[1](text[pos:s])]
                pos = e
            found = sorted(found + more)
        return found

    def plan(self, text: str, spans) -> list:
        """The row as items ``(piece, mode)``: ``piece`` None is one added token, ``mode`` True
        (trained) / False, or for a piece in which a span starts, the text before the start."""
        items = []
        pos = 0
        for s, e in self._added(text):
            if s > pos:
                items.append(self._piece(text, pos, s, spans))
            items.append((None, any(a <= s < b for a, b in spans)))
            pos = e
        if pos < len(text):
            items.append(self._piece(text, pos, len(text), spans))
        return items

    def _piece(self, text: str, s: int, e: int, spans) -> tuple:
        item = _piece(text, s, e, spans)
        if self.nfc and type(item[1]) is str and not item[1][-1:].isspace():
            raise _Slow
        return item

    def counts(self, plans: list, max_len: int) -> list:
        """(tokens, trained, kept) per plan; ``None`` where the row must be counted another way."""
        todo: dict = {}                 # piece -> whether its ids are needed
        again: set = set()              # pieces met twice in this batch: remembered for the next
        shared = self.shared
        for items in plans:
            for piece, mode in items:
                if piece is None:
                    continue
                if type(mode) is str:
                    todo[piece] = True
                elif piece not in shared:
                    if piece in todo:
                        again.add(piece)
                    else:
                        todo[piece] = False
        keys = list(todo)
        # no offsets needed: encode_batch_fast (tokenizers >= 0.21) skips computing them
        encode = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
        encs = encode(keys, add_special_tokens=False) if keys else []
        local: dict = {}                # piece -> ids (when needed) or token count
        for k, e in zip(keys, encs):
            local[k] = e.ids if todo[k] else len(e)
        out = []
        for items in plans:
            n = trained = kept = 0
            try:
                for piece, mode in items:
                    if piece is None:
                        c, skip = 1, (0 if mode else 1)
                    elif type(mode) is str:
                        ids = local[piece]
                        head = self._head(mode)
                        skip = len(head)
                        if ids[:skip] != head:
                            raise _Slow
                        c = len(ids)
                    else:
                        v = shared.get(piece)
                        if v is None:
                            v = local[piece]
                            if type(v) is not int:
                                v = len(v)
                        c = v
                        skip = 0 if mode else c
                    if skip < c:
                        trained += c - skip
                        lo = n + skip
                        if lo < max_len:
                            kept += min(n + c, max_len) - lo
                    n += c
            except _Slow:
                out.append(None)
                continue
            out.append((n, trained, kept))
        if len(shared) + len(again) > SHARED_MAX:
            shared.clear()
        for piece in again:
            v = local[piece]
            shared[piece] = v if type(v) is int else len(v)
        return out

    def _head(self, text: str) -> list:
        if text not in self.heads:
            if len(self.heads) >= SHARED_MAX:     # a template without added tokens: a head per row
                self.heads.clear()
            enc = self.backend.encode(text, add_special_tokens=False)
            offs = enc.offsets
            # the head's own tokens must tile it exactly, or comparing ids proves nothing
            tiles = bool(offs) and offs[0][0] == 0 and offs[-1][1] == len(text) \
                and all(b > a for a, b in offs) and all(offs[i][1] <= offs[i + 1][0] for i in range(len(offs) - 1))
            if self.nfc:                # the head's tokens are those of its NFC form
                import unicodedata
                tiles = tiles and unicodedata.normalize("NFC", text) == text
            self.heads[text] = enc.ids if tiles else None
        ids = self.heads[text]
        if ids is None:
            raise _Slow
        return ids


def _piece(text: str, s: int, e: int, spans) -> tuple:
    """One piece ``text[s:e]`` (no added token inside) and how the spans cover it."""
    for a, b in spans:
        if b <= s or a >= e:
            continue
        if a <= s and b >= e:
            return text[s:e], True
        if s < a and b >= e:
            return text[s:e], text[s:a]
        raise _Slow                      # a span ends inside the piece
    return text[s:e], False


def fast_counts(enc, spans, text_len: int, max_len: int) -> tuple[int, int, int]:
    """The ``offsets`` way for one ``tokenizers.Encoding``: (tokens, trained, trained within
    max_len) by the same rule as ``engine.modalities.text.labels_for`` (a token is trained when it has width
    and starts inside a span), found with char→token look-ups instead of materialising offsets."""
    n = len(enc)
    z0 = 0
    while z0 < n:
        c = enc.token_to_chars(z0)
        if c is not None and c[1] > c[0]:
            break
        z0 += 1
    z1 = 0
    while z1 < n - z0:
        c = enc.token_to_chars(n - 1 - z1)
        if c is not None and c[1] > c[0]:
            break
        z1 += 1
    nonzero = n - z0 - z1

    def before(ch: int) -> int:       # width tokens starting before char ch
        if ch >= text_len:
            return nonzero
        t = enc.char_to_token(ch)
        k = 0
        while t is None:
            ch += 1
            k += 1
            if ch >= text_len:
                return nonzero
            if k > 256:
                raise _Slow
            t = enc.char_to_token(ch)
        s = enc.token_to_chars(t)[0]
        if s >= ch:
            return t - z0
        u = t + 1
        while u < n - z1 and enc.token_to_chars(u)[0] == s:
            u += 1
        return u - z0

    trained = kept = 0
    prev_end = -1
    for a, b in spans:
        if a < prev_end or b < a:
            raise _Slow
        prev_end = b
        lo = before(a)
        cnt = before(b) - lo
        if cnt < 0:
            raise _Slow
        trained += cnt
        lo += z0
        kept += max(0, min(lo + cnt, max_len) - lo)
    return n, trained, kept


def exact_counts(tok, rows: list[dict], max_len: int) -> list[tuple[int, int, int]]:
    """The ``exact`` way: the trainer's own encoder."""
    from engine.modalities.text import IGNORE, encode_batch
    out = []
    for e in encode_batch(tok, rows):
        lab = e.labels
        out.append((len(lab), sum(1 for x in lab if x != IGNORE),
                    sum(1 for x in lab[:max_len] if x != IGNORE)))
    return out


class Counter:
    """Token counts for batches of rows (see the module doc).

    Parallelism comes from the tokenizers' own (rayon) pool inside each batched encode call;
    that call releases the GIL, so the inspector's main thread (reading, normalising,
    duplicates, PII, and ``render`` of the next batch) runs alongside it. Splitting a batch over
    several Python threads does not help: with tokenizers 0.23 two threads calling
    ``encode_batch`` on one Tokenizer run one after the other (measured), so with
    ``TOKENIZERS_PARALLELISM=false`` tokenising is single-threaded whatever we do here.
    The inspector never sets the variable itself: it runs inside the TUI, whose training
    children copy os.environ (engine/training/runner.py ``_child_env`` only *defaults* it to false),
    and an explicit "true" also turns off the tokenizers' fork guard, which is what keeps a
    process forked after a parallel encode (e.g. a DataLoader worker) off the dead rayon pool.
    Only the one-shot ``inspect`` command line enables it, for its own run."""

    def __init__(self, tok, max_len: int):
        self.tok = tok
        self.max_len = max_len
        self.backend = getattr(tok, "backend_tokenizer", None)
        self.exact_only = self.backend is None
        self.batches = 0
        self.mismatch = ""
        why = pieces_refusal(self.backend)
        self.pieces = _Pieces(self.backend) if not why else None
        self.pieces_refused = why
        self.rows_by_way = {"pieces": 0, "offsets": 0, "exact": 0}

    def render(self, rows: list[dict]) -> list | None:
        """Per row, what ``counts`` needs: ``("pieces", plan, text, spans)``, ``("offsets", text,
        spans, add_special_tokens)`` or ``("exact",)``. The inspector calls it on its main thread, so the
        tokenising thread holds the GIL as little as possible (while it does, the tokenizer's
        pool has nothing to do)."""
        if self.exact_only:
            return None
        from engine.modalities.text import render_spans
        out = []
        for r in rows:
            if "input_ids" in r:
                out.append(("exact",))
                continue
            text, spans, special = render_spans(self.tok, r)
            if self.pieces is not None and not special:
                try:
                    out.append(("pieces", self.pieces.plan(text, spans), text, spans))
                    continue
                except _Slow:
                    pass
            out.append(("offsets", text, spans, special))
        return out

    def counts(self, rows: list[dict], rendered: list | None = None) -> list[tuple[int, int, int]]:
        if self.exact_only:
            self.rows_by_way["exact"] += len(rows)
            return exact_counts(self.tok, rows, self.max_len)
        if rendered is None:
            rendered = self.render(rows)
        out: list = [None] * len(rows)
        slow = [i for i, r in enumerate(rendered) if r[0] == "exact"]
        by_offsets = [i for i, r in enumerate(rendered) if r[0] == "offsets"]
        idx = [i for i, r in enumerate(rendered) if r[0] == "pieces"]
        if idx:
            got = self.pieces.counts([rendered[i][1] for i in idx], self.max_len)
            for i, c in zip(idx, got):
                if c is None:                  # a token crossed a span's start: use offsets
                    _, _, text, spans = rendered[i]
                    rendered[i] = ("offsets", text, spans, False)
                    by_offsets.append(i)
                else:
                    out[i] = c
            self.rows_by_way["pieces"] += len(idx) - sum(1 for c in got if c is None)
        for special in (False, True):
            part = [i for i in by_offsets if rendered[i][3] == special]
            if not part:
                continue
            encs = self.backend.encode_batch([rendered[i][1] for i in part], add_special_tokens=special)
            for i, enc in zip(part, encs):
                _, text, spans, _ = rendered[i]
                try:
                    out[i] = fast_counts(enc, spans, len(text), self.max_len)
                    self.rows_by_way["offsets"] += 1
                except _Slow:
                    slow.append(i)
        if slow:
            self.rows_by_way["exact"] += len(slow)
            for i, c in zip(slow, exact_counts(self.tok, [rows[i] for i in slow], self.max_len)):
                out[i] = c
        check = list(range(min(len(rows), CHECK_FIRST if self.batches == 0 else CHECK_EACH)))
        self.batches += 1
        if check:
            ref = exact_counts(self.tok, [rows[i] for i in check], self.max_len)
            for i, r in zip(check, ref):
                if out[i] != r:
                    self.exact_only = True
                    self.mismatch = (f"fast token count disagreed with the trainer's encoder "
                                     f"({out[i]} vs {r}); counted with the trainer's encoder instead")
                    self.rows_by_way["exact"] += len(rows)
                    return exact_counts(self.tok, rows, self.max_len)
        return out
