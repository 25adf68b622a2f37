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
            trimming, or added tokens that strip spaces) goes to ``offsets``. An ASCII piece
            is counted word by word (``_Words``: the pre-tokenizer's split made with Python's
            ``re``, each distinct word tokenised once), the rest by the tokenizer.
``offsets`` One ``encode_batch`` with character offsets; a token is trained when it has width and
            starts inside a span (the trainer's rule), found with char→token look-ups.
``exact``   ``engine.modalities.text.encode_batch`` itself, labels and all.

Some rows of every batch are also counted with ``exact`` and compared; on a disagreement the
counter switches to ``exact`` for the rest of the file and says so in a warning.
"""
from __future__ import annotations

import json
import random
import re

CHECK_FIRST = 256         # rows of the first batch checked against encode_batch
CHECK_EACH = 4            # rows of every later batch checked against encode_batch
SHARED_MAX = 4096         # pieces remembered across batches (those seen twice in one batch)
WORDS_MAX = 200_000       # distinct words remembered with their token counts (the words way)
# the ByteLevel pre-tokenizer's own split (use_regex = true), as the tokenizers library writes it
BYTE_LEVEL_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

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
        self.words = _Words.of(backend)  # ASCII pieces counted word by word (None: not this tokenizer)
        self.heads: dict = {}           # text before a span start -> its token ids (None: unusable)

    def _added(self, text: str) -> list:
        """(start, end) of every added token in text, as the tokenizer finds them."""
        if not self.passes:
            return []
        found = [m.span() for m in self.passes[0](text)]
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
        append = items.append
        piece = self._piece if self.nfc else _piece
        pos = 0
        for s, e in self._added(text):
            if s > pos:
                append(piece(text, pos, s, spans))
            for a, b in spans:                  # the added token is trained when a span holds it
                if a <= s < b:
                    append((None, True))
                    break
            else:
                append((None, False))
            pos = e
        if pos < len(text):
            append(piece(text, pos, len(text), spans))
        return items

    @staticmethod
    def _piece(text: str, s: int, e: int, spans) -> tuple:
        item = _piece(text, s, e, spans)
        if type(item[1]) is str and not item[1][-1:].isspace():     # NFC: see the class doc
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
        local: dict = {}                # piece -> ids (when needed) or token count
        split: dict = {}                # head pieces counted by words -> (words, tokens)
        keys = list(todo)
        if self.words is not None:      # ASCII pieces: counted word by word (see _Words)
            keys = self.words.count(keys, todo, local, split)
        # no offsets needed: encode_batch_fast (tokenizers >= 0.21) skips computing them
        encode = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
        encs = encode(keys, add_special_tokens=False) if keys else []
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
                        if piece in split:      # the span must start where a word starts
                            ws, c = split[piece]
                            skip = self.words.head_tokens(ws, len(mode))
                        else:
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


class _Words:
    """ASCII pieces of the ``pieces`` way counted word by word.

    A byte-level BPE tokenizer splits text with its pre-tokenizer's regular expression first and
    merges bytes only inside each part, so a piece's tokens are the sum of its parts' ("words'")
    tokens. The tokenizers library's own split (Oniguruma) was most of the inspector's time
    (~22 CPU-s for 19 MB, against ~2 s for Python's ``re``), so for an ASCII piece the split is
    done here: on ASCII text the expression means the same with ``re.ASCII`` once ``\\p{L}`` is
    ``A-Za-z`` and ``\\p{N}`` is ``0-9`` (``\\s`` is then ``[ \\t\\n\\r\\f\\v]``, Oniguruma's ASCII
    white space too). That is checked when the counter starts, against the tokenizer's own
    pre-tokenizer on a probe of every ASCII character in many contexts; otherwise (or for a
    pre-tokenizer other than ByteLevel, or Split + ByteLevel without its own expression) there is
    no words way. Each distinct word is tokenised once by the tokenizer itself (and must be one
    part of its pre-tokenizer alone) and remembered (up to WORDS_MAX words). A piece whose words
    do not cover it exactly, or that is not ASCII, goes to the tokenizer as before."""

    def __init__(self, backend, findall):
        self.backend = backend
        self.findall = findall
        self.tokens: dict = {}          # word -> its token count (None: not one part alone)

    @classmethod
    def of(cls, backend):
        pattern = split_pattern(backend)
        if pattern is None:
            return None
        try:
            rx = re.compile(ascii_pattern(pattern), re.ASCII)
        except (re.error, ValueError):
            return None
        probe = ascii_probe()
        want = [o for _, o in backend.pre_tokenizer.pre_tokenize_str(probe)]
        if [m.span() for m in rx.finditer(probe)] != want:
            return None
        return cls(backend, rx.findall)

    def count(self, keys: list, todo: dict, local: dict, split: dict) -> list:
        """Count the ASCII pieces of ``keys`` into ``local`` (piece -> tokens) and, for those
        whose ids ``todo`` needs (a span starts inside), ``split`` (piece -> (its words, its
        tokens)). Returns the pieces left for the tokenizer."""
        rest, pending = [], []
        findall, known = self.findall, self.tokens
        for k in keys:
            if not k.isascii():
                rest.append(k)
                continue
            ws = findall(k)
            try:
                n = sum(map(known.__getitem__, ws))
            except (KeyError, TypeError):
                pending.append((k, ws))
                continue
            self._put(k, ws, n, todo, local, split, rest)
        if pending:
            new = {w for _, ws in pending for w in ws if w not in known}
            if len(known) + len(new) > WORDS_MAX:
                known.clear()
                new = {w for _, ws in pending for w in ws}
            new = list(new)
            encode = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
            one = self.backend.pre_tokenizer.pre_tokenize_str
            for w, e in zip(new, encode(new, add_special_tokens=False) if new else []):
                known[w] = len(e) if len(one(w)) == 1 else None
            for k, ws in pending:
                try:
                    n = sum(map(known.__getitem__, ws))
                except (KeyError, TypeError):
                    rest.append(k)
                    continue
                self._put(k, ws, n, todo, local, split, rest)
        return rest

    def _put(self, k: str, ws: list, n: int, todo: dict, local: dict, split: dict, rest: list) -> None:
        if sum(map(len, ws)) != len(k):         # a part the expression does not match: not sure
            rest.append(k)
        elif todo[k]:
            split[k] = (ws, n)
        else:
            local[k] = n

    def head_tokens(self, ws: list, head: int) -> int:
        """The tokens of the words before character ``head`` of their piece; _Slow unless a word
        ends exactly there (or a word was forgotten since, when the memo was full)."""
        pos = skip = 0
        known = self.tokens
        try:
            for w in ws:
                if pos >= head:
                    break
                pos += len(w)
                skip += known[w]
        except (KeyError, TypeError):
            raise _Slow from None
        if pos != head:
            raise _Slow
        return skip


def split_pattern(backend) -> str | None:
    """The regular expression a byte-level tokenizer's pre-tokenizer splits with (ByteLevel with
    use_regex, or Split(Regex, Isolated) then ByteLevel without), None for any other."""
    pre = getattr(backend, "pre_tokenizer", None)
    if pre is None:
        return None
    d = json.loads(pre.__getstate__())
    parts = d.get("pretokenizers", []) if d.get("type") == "Sequence" else [d]
    if any(p.get("add_prefix_space") for p in parts):
        return None
    if len(parts) == 1 and parts[0].get("type") == "ByteLevel" and parts[0].get("use_regex", True):
        return BYTE_LEVEL_SPLIT
    if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel" \
            and not parts[1].get("use_regex", True) and parts[0].get("behavior") == "Isolated" \
            and not parts[0].get("invert") and "Regex" in (parts[0].get("pattern") or {}):
        return parts[0]["pattern"]["Regex"]
    return None


def ascii_pattern(pattern: str) -> str:
    """``pattern`` for Python's ``re`` on ASCII text: ``\\p{L}`` -> ``A-Za-z``, ``\\p{N}`` -> ``0-9``
    (inside a class or as one); ValueError for any other Unicode property."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            esc = pattern[i:i + 5]
            if esc in ("\\p{L}", "\\p{N}"):
                body = "A-Za-z" if esc[3] == "L" else "0-9"
                out.append(body if in_class else f"[{body}]")
                i += 5
                continue
            if pattern[i + 1:i + 2] in ("p", "P"):
                raise ValueError(f"Unicode property {pattern[i:i + 8]!r}")
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def ascii_probe(n: int = 6000) -> str:
    """Every ASCII character, alone and in runs, between letters, digits, spaces and quotes;
    then ``n`` characters drawn at random (seeded) with contractions and number runs among them."""
    chars = [chr(i) for i in range(128)]
    parts = [f"a{c}b {c}{c} 1{c}2 '{c}s \n{c}\n  {c}  x" for c in chars]
    r = random.Random(0)
    bits = chars + list("abcXYZ 0123456789") * 4 + ["  ", "\n\n", " \n", "\t", "'s", "'T", "'ll", "'VE",
                                                      "'re", "'d", "'M", "1234567", " 'x", "...", "?!"] * 6
    parts.append("".join(r.choice(bits) for _ in range(n)))
    return "".join(parts)


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
    Only the one-shot ``inspect`` command line enables it, for its own run. The words way is
    Python and holds the GIL, so for a large file the inspector also counts batches in a worker
    process with a Counter of its own (``engine.dataset.counting``)."""

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
