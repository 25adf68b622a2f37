"""Dataset quality checks for the inspector: duplicates, length outliers, PII and secrets.

Everything here works on normalised rows (``engine.dataset.data.Row.data``) in batches and never
keeps or returns a finding's full value: PII comes back masked (``j***@e***.com``,
``**** **** **** 1234``, ``sk-…abcd``).
"""
from __future__ import annotations

import json
import re
import string
from bisect import bisect_right
from dataclasses import dataclass

PII_KINDS = ("email", "phone", "card", "api_key", "private_key")


@dataclass
class PiiFinding:
    line: int
    kind: str        # one of PII_KINDS
    masked: str      # never the full value

    def to_dict(self) -> dict:
        return {"line": self.line, "kind": self.kind, "masked": self.masked}


def _turn_text(m: dict) -> str:
    """A turn's text; an assistant's tool calls are part of it (as JSON)."""
    if m.get("tool_calls"):
        return m["content"] + "".join(json.dumps(c.get("function"), ensure_ascii=False, sort_keys=True)
                                      for c in m["tool_calls"])
    return m["content"]


def row_text(data: dict) -> str:
    """All the human-written text of a normalised row, turns joined by newlines."""
    if "messages" in data:
        return "\n".join(_turn_text(m) for m in data["messages"])
    if "completion" in data:
        return data["prompt"] + "\n" + data["completion"]
    if "input_ids" in data:          # pre-tokenised: no text to scan
        return ""
    return data["text"]


def row_key(data: dict):
    """A hashable exact identity of a normalised row (roles included)."""
    if "messages" in data:
        key = tuple((m["role"], _turn_text(m), m.get("weight", 1)) if len(m) > 2 else (m["role"], m["content"])
                    for m in data["messages"])
        return key + (("\0tools", json.dumps(data["tools"], sort_keys=True)),) if data.get("tools") else key
    if "completion" in data:
        return ("\0prompt", data["prompt"], data["completion"])
    if "input_ids" in data:
        return ("\0ids", tuple(data["input_ids"]), tuple(data.get("labels") or ()))
    return ("\0text", data["text"])


_ASCII_PUNCT = string.punctuation.encode()


_DROP = _ASCII_PUNCT + b" \t\n\r\x0b\x0c"


def near_key(text: str) -> bytes:
    """Text normalised for near-duplicate matching: lower case, with ASCII punctuation and
    all whitespace dropped (one C-speed pass)."""
    return text.lower().encode("utf-8", "surrogatepass").translate(None, _DROP)


# Listing caps (counts are always complete): read at call time, so a test can lower them.
GROUP_LINES_MAX = 1000        # lines listed per duplicate group (its first ones)
LISTED_LINES_MAX = 200_000    # lines listed over all groups of one kind (duplicate / near)

ROW = None                    # numpy dtype of one row's record (set on first use)
PARTS = 256                   # partitions, by the top byte of the near-duplicate hash


def _row_dtype():
    global ROW
    if ROW is None:
        import numpy as np
        ROW = np.dtype([("near", "<i8"), ("exact", "<i8"), ("line", "<i8"), ("tokens", "<i4")])
    return ROW


def row_hashes(datas, texts):
    """(exact, near) 64-bit hashes of a batch of normalised rows, as int64 arrays."""
    import numpy as np
    n = len(datas)
    exact = np.fromiter((hash(row_key(d)) for d in datas), dtype=np.int64, count=n)
    near = np.fromiter((hash(near_key(t)) for t in texts), dtype=np.int64, count=n)
    return exact, near


class Groups:
    """Duplicate groups of one kind: the first ones listed (by first line, each with its first
    ``GROUP_LINES_MAX`` lines, ``LISTED_LINES_MAX`` lines in all, at most ``max_groups`` groups),
    and the complete counts: ``total`` groups, ``rows`` rows repeating an earlier one."""

    def __init__(self, max_groups: int):
        self.max_groups = max_groups
        self.total = 0
        self.rows = 0
        self.items: list = []            # [(first line, lines array)], sorted by first line
        self.capped = False              # some group or some lines were left unlisted
        self.cutoff = None               # no group whose first line is this or later is listed
        self._listed: list | None = None  # listed(), made once: a running scan's reports share it
        self._lines = 0                  # lines in _listed

    def offer(self, lines, order, starts, ends) -> None:
        """Groups ``lines[order[s:e]]`` for each (s, e); lines within a group ascending."""
        import numpy as np
        if not len(starts):
            return
        self._listed = None
        sizes = ends - starts
        self.total += len(starts)
        self.rows += int((sizes - 1).sum())
        first = lines[order[starts]]
        pick = np.nonzero(first < self.cutoff)[0] if self.cutoff is not None else np.arange(len(starts))
        if len(pick) > self.max_groups:
            pick = pick[np.argpartition(first[pick], self.max_groups - 1)[:self.max_groups]]
        self._drop(first, pick)
        per = GROUP_LINES_MAX
        for i in pick.tolist():
            s, e = int(starts[i]), int(ends[i])
            if e - s > per:
                self.capped = True
            self.items.append((int(first[i]), lines[order[s:min(e, s + per)]]))
        self.items.sort(key=lambda it: it[0])
        budget, keep = LISTED_LINES_MAX, 0
        for _, g in self.items[:self.max_groups]:
            if budget < len(g):
                break
            budget -= len(g)
            keep += 1
        if keep < len(self.items):
            self._cut(self.items[keep][0])
            del self.items[keep:]

    def _drop(self, first, pick) -> None:
        """Note the groups of ``first`` not picked: none at or after the first of them is listed."""
        import numpy as np
        if len(pick) < len(first):
            rest = np.ones(len(first), dtype=bool)
            rest[pick] = False
            self._cut(int(first[rest].min()))

    def _cut(self, line: int) -> None:
        self.capped = True
        self.cutoff = line if self.cutoff is None else min(self.cutoff, line)

    def listed(self) -> list[list[int]]:
        """The listed groups as lists of lines (made once per grouping: up to 100,000 groups, which
        every partial report of a large file would otherwise convert again). Read-only."""
        if self._listed is None:
            self._listed = [g.tolist() for _, g in self.items]
            self._lines = sum(map(len, self._listed))
        return self._listed

    def listed_lines(self) -> int:
        """Lines in all listed groups."""
        self.listed()
        return self._lines


class Quality:
    """What the duplicate checks and the outlier list need in the end, from one pass."""

    def __init__(self, exact: Groups, near: Groups, outliers: list, outliers_capped: bool):
        self.exact, self.near, self.outliers, self.outliers_capped = exact, near, outliers, outliers_capped


class Duplicates:
    """Exact and near-duplicate grouping (and the outlier list) in bounded memory.

    Each usable row is a 28-byte record: the 64-bit hashes of ``row_key`` (exact) and of
    ``near_key`` (near), its line and its token count. Records collect in a buffer of
    ``BUFFER_ROWS``; a full buffer is written to an unlinked temporary file (gone when the
    process ends), sorted into ``PARTS`` partitions by the near hash's top byte. Grouping then
    reads one partition at a time: identical rows have identical text, so an exact group never
    spans two partitions. Memory is the buffer plus one partition, not the row count. Two
    different rows share a hash with odds of about n²/2⁶⁵ (3·10⁻⁵ at 30 M rows)."""

    BUFFER_ROWS = 1 << 18

    def __init__(self, buffer_rows: int | None = None):
        import numpy as np
        self._np = np
        self.cap = int(buffer_rows or self.BUFFER_ROWS)
        self.buf = None                 # the buffer (allocated on the first row)
        self.used = 0
        self.blocks: list = []          # spilled blocks: (file offset, partition starts)
        self.fd = None
        self._file = None
        self._n = 0
        self._cached: tuple = (None, None)
        self._when = 0.0
        self._cost = 0.0

    @property
    def rows(self) -> int:
        return self._n

    @property
    def spilled_rows(self) -> int:
        return sum(int(st[-1]) for _, st in self.blocks)

    def add(self, line: int, data: dict, text: str) -> None:
        self.add_batch([line], [data], [text])

    def add_batch(self, lines, datas, texts, tokens=None) -> None:
        exact, near = row_hashes(datas, texts)
        self.add_hashed(lines, exact, near, tokens)

    def add_unhashed(self, lines, tokens) -> None:
        """Rows kept for the outlier list only (image rows): each with hashes of its own."""
        import numpy as np
        ids = np.arange(self._n, self._n + len(lines), dtype=np.int64)
        self.add_hashed(lines, ids, ids, tokens)

    def add_hashed(self, lines, exact, near, tokens=None) -> None:
        np = self._np
        n = len(lines)
        if not n:
            return
        if self.buf is None:
            self.buf = np.zeros(self.cap, dtype=_row_dtype())
        lines = np.asarray(lines, dtype=np.int64)
        at = 0
        while at < n:
            take = min(self.cap - self.used, n - at)
            dst = self.buf[self.used:self.used + take]
            dst["line"] = lines[at:at + take]
            dst["exact"] = exact[at:at + take]
            dst["near"] = near[at:at + take]
            dst["tokens"] = 0 if tokens is None else tokens[at:at + take]
            self.used += take
            at += take
            if self.used == self.cap:
                self._spill()
        self._n += n

    def _part(self, recs):
        return (recs["near"].view(self._np.uint64) >> self._np.uint64(56)).astype(self._np.intp)

    def _spill(self) -> None:
        import os
        import tempfile
        np = self._np
        recs = self.buf[:self.used]
        part = self._part(recs)
        order = np.argsort(part, kind="stable")
        block = recs[order]
        starts = np.concatenate(([0], np.cumsum(np.bincount(part, minlength=PARTS)))).astype(np.int64)
        if self.fd is None:
            self._file = tempfile.TemporaryFile(prefix="qlora-tui-inspect-", buffering=0)
            self.fd = self._file.fileno()
        off = os.lseek(self.fd, 0, os.SEEK_END)
        data = memoryview(block).cast("B")
        done = 0
        while done < len(data):
            done += os.write(self.fd, data[done:])
        self.blocks.append((off, starts))
        self.used = 0

    def _partitions(self):
        """Each non-empty partition's records, in row order."""
        import os
        np = self._np
        dt = _row_dtype()
        recs = self.buf[:self.used] if self.buf is not None else np.zeros(0, dtype=dt)
        part = self._part(recs)
        order = np.argsort(part, kind="stable")
        mem = recs[order]
        mstarts = np.concatenate(([0], np.cumsum(np.bincount(part, minlength=PARTS))))
        for p in range(PARTS):
            pieces = []
            for off, st in self.blocks:
                c = int(st[p + 1] - st[p])
                if c:
                    raw = os.pread(self.fd, c * dt.itemsize, off + int(st[p]) * dt.itemsize)
                    pieces.append(np.frombuffer(raw, dtype=dt))
            if mstarts[p + 1] > mstarts[p]:
                pieces.append(mem[mstarts[p]:mstarts[p + 1]])
            if pieces:
                yield pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def quality(self, max_groups: int, bounds=None, max_outliers: int = 1000, stale_ok: bool = False) -> Quality:
        """Exact and near groups, and (with ``bounds`` = (lo, hi)) the first ``max_outliers``
        rows by line whose token count is below lo or above hi. ``stale_ok``: a running scan's
        snapshot may get a result of a few seconds ago on large files (grouping reads every record)."""
        import time
        np = self._np
        key = (self._n, bounds, max_groups, max_outliers, GROUP_LINES_MAX, LISTED_LINES_MAX)
        if self._cached[0] == key or (stale_ok and self._cached[1] is not None and self._n > 200_000
                                      and time.monotonic() - self._when < max(5.0, 10 * self._cost)):
            return self._cached[1]
        t0 = time.monotonic()
        exact, near = Groups(max_groups), Groups(max_groups)
        out_lines, out_tokens, capped = np.zeros(0, np.int64), np.zeros(0, np.int64), False
        for recs in self._partitions():
            lines = recs["line"]
            order, s, e = _runs(np, recs["exact"])
            exact.offer(lines, order, s, e)
            if len(s):           # only the first row of each exact group takes part in near groups
                mark = np.zeros(len(recs) + 1, dtype=np.int64)
                np.add.at(mark, s + 1, 1)
                np.add.at(mark, e, -1)
                later = order[np.cumsum(mark)[:-1] > 0]
                firsts = np.ones(len(recs), dtype=bool)
                firsts[later] = False
                idx = np.nonzero(firsts)[0]
                o2, s2, e2 = _runs(np, recs["near"][idx])
                near.offer(lines, idx[o2], s2, e2)
            else:
                o2, s2, e2 = _runs(np, recs["near"])
                near.offer(lines, o2, s2, e2)
            if bounds is not None:
                tok = recs["tokens"]
                sel = np.nonzero((tok < bounds[0]) | (tok > bounds[1]))[0]
                if len(sel):
                    out_lines = np.concatenate([out_lines, lines[sel]])
                    out_tokens = np.concatenate([out_tokens, tok[sel].astype(np.int64)])
                    if len(out_lines) > max_outliers:
                        keep = np.argsort(out_lines, kind="stable")[:max_outliers]
                        out_lines, out_tokens, capped = out_lines[keep], out_tokens[keep], True
        keep = np.argsort(out_lines, kind="stable")
        outl = [(int(ln), "short" if n < bounds[0] else "long", int(n))
                for ln, n in zip(out_lines[keep].tolist(), out_tokens[keep].tolist())] if bounds else []
        got = Quality(exact, near, outl, capped)
        self._cost = time.monotonic() - t0
        self._cached = (key, got)
        self._when = time.monotonic()
        return got


def _runs(np, hashes):
    """(stable order of ``hashes``, starts, ends) of each run of 2+ equal hashes in that order."""
    order = np.argsort(hashes, kind="stable")
    if len(order) < 2:
        return order, np.zeros(0, np.int64), np.zeros(0, np.int64)
    h = hashes[order]
    same = h[1:] == h[:-1]
    if not same.any():
        return order, np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.nonzero(np.concatenate(([True], ~same)))[0]
    ends = np.append(starts[1:], len(h))
    many = ends - starts > 1
    return order, starts[many], ends[many]


class Tally:
    """How many times each non-negative integer (a row's token count) was seen: exact
    percentiles, histogram, min, max and sums in memory bounded by the largest value, not by
    how many values there are (dense counts below ``DENSE``, a dict of the rare larger ones)."""

    DENSE = 1 << 16

    def __init__(self):
        import numpy as np
        self._np = np
        self.dense = np.zeros(0, dtype=np.int64)
        self.sparse: dict = {}
        self.n = 0
        self.total = 0

    @classmethod
    def of(cls, values) -> "Tally":
        t = cls()
        t.add(values)
        return t

    def add(self, values) -> None:
        np = self._np
        v = np.asarray(values, dtype=np.int64).ravel()
        if not len(v):
            return
        self.n += len(v)
        self.total += int(v.sum())
        big = v >= self.DENSE
        if big.any():
            for x in v[big].tolist():
                self.sparse[x] = self.sparse.get(x, 0) + 1
            v = v[~big]
        if len(v):
            bc = np.bincount(v)
            if len(bc) > len(self.dense):
                self.dense = np.concatenate([self.dense, np.zeros(len(bc) - len(self.dense), dtype=np.int64)])
            self.dense[:len(bc)] += bc

    def items(self):
        """(values ascending, their counts) as int64 arrays."""
        np = self._np
        nz = np.nonzero(self.dense)[0]
        keys = sorted(self.sparse)
        vals = np.concatenate([nz.astype(np.int64), np.asarray(keys, dtype=np.int64)])
        counts = np.concatenate([self.dense[nz], np.asarray([self.sparse[k] for k in keys], dtype=np.int64)])
        return vals, counts

    def min(self) -> int:
        return int(self.items()[0][0])

    def max(self) -> int:
        return int(self.items()[0][-1])

    def count(self, value: int) -> int:
        if value < len(self.dense):
            return int(self.dense[value])
        return self.sparse.get(value, 0)

    def count_outside(self, lo: float, hi: float) -> int:
        """Values below lo or above hi."""
        vals, counts = self.items()
        return int(counts[(vals < lo) | (vals > hi)].sum())

    def count_above(self, x: float) -> int:
        vals, counts = self.items()
        return int(counts[vals > x].sum())

    def sum_min(self, cap: int) -> int:
        """Σ min(value, cap)."""
        vals, counts = self.items()
        return int((self._np.minimum(vals, cap) * counts).sum())

    def percentiles(self, qs) -> list[float]:
        """``numpy.percentile(values, qs)`` (linear interpolation, the same numbers)."""
        np = self._np
        vals, counts = self.items()
        cum = np.cumsum(counts)
        n = int(cum[-1])
        out = []
        for q in qs:
            pos = (n - 1) * q / 100.0
            k = int(np.floor(pos))
            frac = pos - k
            lo = int(vals[int(np.searchsorted(cum, k, side="right"))])          # sorted[k]
            hi = int(vals[int(np.searchsorted(cum, min(k + 1, n - 1), side="right"))])
            out.append(float(lo + (hi - lo) * frac))
        return out


def percentiles(values, qs) -> list[float]:
    """``numpy.percentile(values, qs)`` (linear interpolation, the same numbers) from the counts of
    each value instead of a sorted copy (``Tally``). ``values``: non-negative integers."""
    return Tally.of(values).percentiles(qs)


def outlier_bounds(tally: Tally, factor: float = 3.0, min_rows: int = 20):
    """(lo, hi): token counts below lo / above hi are outliers; None below ``min_rows`` rows."""
    if tally.n < min_rows:
        return None
    q1, q3 = tally.percentiles([25, 75])
    return q1 / factor, q3 * factor


def outliers(lines, lengths, factor: float = 3.0, min_rows: int = 20) -> list[tuple[int, str, int]]:
    """Rows far from the bulk in token length: ``short`` below Q1/factor, ``long`` above Q3×factor
    (``outlier_bounds``). Returns ``(line, "short"|"long", tokens)`` sorted by line; nothing below
    ``min_rows`` rows (too few to call anything unusual)."""
    import numpy as np
    arr = np.asarray(lengths)
    bounds = outlier_bounds(Tally.of(arr), factor, min_rows) if len(arr) else None
    if bounds is None:
        return []
    lo, hi = bounds
    out = [(int(lines[i]), "short" if arr[i] < lo else "long", int(arr[i]))
           for i in np.nonzero((arr < lo) | (arr > hi))[0]]
    out.sort()
    return out


# ---- PII and secrets ---------------------------------------------------------------------

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9\-]{1,63}(?:\.[A-Za-z0-9\-]{1,63})*\.[A-Za-z]{2,24}\b")
_DIGITS = re.compile(r"\d[\d ().\-]{5,24}\d")   # starts with a digit: the regex engine skips fast
_KEYS = re.compile(
    r"(?P<private_key>-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----)"
    r"|(?P<api_key>\b(?:sk-(?:proj-|ant-|live_|test_)?[A-Za-z0-9_\-]{16,}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{40,}"
    r"|xox[abposr]-[A-Za-z0-9\-]{10,}"
    r"|AIza[0-9A-Za-z_\-]{35}"
    r"|hf_[A-Za-z0-9]{30,}"
    r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}))")
_KEY_HINTS = ("sk-", "sk_", "rk_", "pk_", "AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_",
              "github_pat_", "xox", "AIza", "hf_", "PRIVATE KEY")
_PHONE_SHAPE = re.compile(r"^\+?\d{1,3}[ .\-]?\(?\d{1,4}\)?(?:[ .\-]?\d{2,4}){2,4}$|^\(\d{2,4}\)[ .\-]?\d{3,4}[ .\-]?\d{3,4}$")
_DATE_SHAPE = re.compile(r"^\d{1,4}[./\-]\d{1,2}[./\-]\d{1,4}$")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def mask_email(v: str) -> str:
    local, _, domain = v.partition("@")
    host, _, tld = domain.rpartition(".")
    return f"{local[:1]}***@{host[:1]}***.{tld}"


def mask_digits(v: str, keep: int) -> str:
    """Every digit but the last ``keep`` replaced by ``*``; separators kept."""
    n = sum(c.isdigit() for c in v)
    out, seen = [], 0
    for c in v:
        if c.isdigit():
            seen += 1
            out.append(c if seen > n - keep else "*")
        else:
            out.append(c)
    return "".join(out)


def mask_key(v: str) -> str:
    m = re.match(r"(sk-(?:proj-|ant-)?|(?:sk|rk|pk)_(?:live|test)_|AKIA|ASIA|gh[pousr]_|github_pat_|xox[abposr]-|AIza|hf_)", v)
    prefix = m.group(1) if m else ""
    return f"{prefix}…{v[-4:]}"


def _classify_digits(v: str) -> tuple[str, str] | None:
    digits = "".join(c for c in v if c.isdigit())
    nd = len(digits)
    if 13 <= nd <= 19 and luhn_ok(digits) and re.fullmatch(r"\d{4}(?:[ \-]?\d{2,4}){2,4}|\d{13,19}", v.strip()):
        return "card", mask_digits(v, 4)
    if _DATE_SHAPE.match(v) or not (10 <= nd <= 15):
        return None
    formatted = v.startswith("+") or any(c in v for c in " -.()")
    if formatted and _PHONE_SHAPE.match(v):
        return "phone", mask_digits(v, 2)
    return None


_DIGITS_B = re.compile(rb"\d[\d ().\-]{5,24}\d")
_KEYS_B = re.compile(_KEYS.pattern.encode())
_KEY_HINTS_B = tuple(h.encode() for h in _KEY_HINTS)
_SEP = "\n\0\n"


def _word_byte(b: int) -> bool:
    return 48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122 or b == 95 or b >= 128


def scan_pii(lines: list[int], texts: list[str]) -> list[PiiFinding]:
    """PII and secrets in a batch of rows; one finding per (row, kind, masked value).

    The batch is scanned as one UTF-8 buffer (regexes over bytes, substring pre-checks), so
    the cost is a few passes at C speed per batch, not per row."""
    out: list[PiiFinding] = []
    blob = _SEP.join(texts)
    bb = blob.encode("utf-8", "surrogatepass")
    starts: list[int] = []
    seen = set()

    def row_of(at: int) -> int:
        if not starts:
            pos = 0
            for t in texts:
                starts.append(pos)
                pos += len(t.encode("utf-8", "surrogatepass")) + len(_SEP)
        return bisect_right(starts, at) - 1

    def add(i: int, kind: str, masked: str):
        key = (lines[i], kind, masked)
        if key not in seen:
            seen.add(key)
            out.append(PiiFinding(lines[i], kind, masked))

    n = len(bb)
    for m in _DIGITS_B.finditer(bb):
        a, b = m.span()
        if b < n and _word_byte(bb[b]):
            continue                       # part of a longer word or number
        while a > 0 and bb[a - 1] in b"+(" and a > m.start() - 2:
            a -= 1
        if a > 0 and (_word_byte(bb[a - 1]) or bb[a - 1] == 43):
            continue
        got = _classify_digits(bb[a:b].decode().strip())
        if got:
            add(row_of(a), *got)
    if (b"-" in bb or b"_" in bb or b"AKIA" in bb or b"ASIA" in bb or b"AIza" in bb) \
            and any(h in bb for h in _KEY_HINTS_B):
        for m in _KEYS_B.finditer(bb):
            v = m.group(0).decode()
            if m.group("private_key"):
                add(row_of(m.start()), "private_key", v.strip("-").strip() + " (key body not shown)")
            else:
                add(row_of(m.start()), "api_key", mask_key(v))
    if b"@" in bb:
        for i, t in enumerate(texts):
            if "@" in t:
                for m in _EMAIL.finditer(t):
                    add(i, "email", mask_email(m.group(0)))
    out.sort(key=lambda f: f.line)
    return out
