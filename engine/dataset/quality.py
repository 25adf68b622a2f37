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


class Duplicates:
    """Exact and near-duplicate grouping by line number in bounded memory: each row keeps two
    64-bit hashes (of ``row_key`` and of ``near_key``), 16 bytes whatever its length; groups are
    found by sorting the hashes, a sixteenth of them at a time. Two different rows share a hash
    with odds of about n²/2⁶⁵ (3·10⁻⁵ at 30 M rows)."""

    def __init__(self):
        import numpy as np
        self._np = np
        self._lines: list = []          # per batch: line numbers (int64)
        self._exact: list = []          # per batch: hash of row_key
        self._near: list = []           # per batch: hash of near_key
        self._n = 0
        self._cached: tuple = (-1, [], [])
        self._when = 0.0

    @property
    def rows(self) -> int:
        return self._n

    def lines(self):
        """The line of every row added, in order (one numpy array)."""
        self._consolidate()
        return self._lines[0] if self._lines else self._np.zeros(0, dtype=self._np.int64)

    def _consolidate(self) -> None:
        for parts in (self._lines, self._exact, self._near):     # one array each from now on
            if len(parts) > 1:
                whole = self._np.concatenate(parts)
                parts.clear()
                parts.append(whole)

    def add(self, line: int, data: dict, text: str) -> None:
        self.add_batch([line], [data], [text])

    def add_batch(self, lines, datas, texts) -> None:
        np = self._np
        n = len(lines)
        if not n:
            return
        big = max(lines) >= 2**32
        self._lines.append(np.fromiter(lines, dtype=np.int64 if big else np.uint32, count=n))
        self._exact.append(np.fromiter((hash(row_key(d)) for d in datas), dtype=np.int64, count=n))
        self._near.append(np.fromiter((hash(near_key(t)) for t in texts), dtype=np.int64, count=n))
        self._n += n

    def _groups(self, stale_ok: bool = False) -> tuple[list, list]:
        """(exact groups, near groups). ``stale_ok``: a running scan's snapshot may get the groups
        of a few seconds ago on large files (each grouping sorts every hash)."""
        import time
        if self._cached[0] == self._n or (stale_ok and self._n > 200_000 and time.monotonic() - self._when < 5):
            return self._cached[1], self._cached[2]
        np = self._np
        if not self._n:
            return [], []
        self._consolidate()
        lines, exact, near = self._lines[0], self._exact[0], self._near[0]
        firsts = np.ones(len(lines), dtype=bool)      # first row of its exact group
        exact_groups = _hash_groups(np, exact, lines, None, firsts)
        near_groups = _hash_groups(np, near, lines, firsts, None)
        self._cached = (self._n, exact_groups, near_groups)
        self._when = time.monotonic()
        return exact_groups, near_groups

    def exact_groups(self, stale_ok: bool = False) -> list[list[int]]:
        return [list(g) for g in self._groups(stale_ok)[0]]

    def near_groups(self, stale_ok: bool = False) -> list[list[int]]:
        """Groups of rows that differ only in case, punctuation or spacing (exact copies excluded:
        each group lists the first line of every distinct variant)."""
        return [list(g) for g in self._groups(stale_ok)[1]]


def _hash_groups(np, hashes, lines, only, firsts, parts: int = 16) -> list[list[int]]:
    """Line groups (2+ rows) of equal hashes, each in row order, sorted by first line. ``only``:
    the rows taking part (a bool mask); ``firsts``: cleared for every row but a group's first.
    Sorted a sixteenth at a time (by the hash's top bits), so the temporaries stay small."""
    import sys
    out = []
    # the hash's top 4 bits, read from its most significant byte (1 byte a row, no int64 temporary)
    top = hashes.view(np.uint8).reshape(-1, 8)[:, 7 if sys.byteorder == "little" else 0] >> 4
    for b in range(parts):
        sel = top == b
        if only is not None:
            sel &= only
        idx = np.nonzero(sel)[0]
        del sel
        if len(idx) < 2:
            continue
        h = hashes[idx]
        order = np.argsort(h, kind="stable")
        idx, h = idx[order], h[order]
        del order
        same = h[1:] == h[:-1]
        if not same.any():
            continue
        starts = np.nonzero(np.concatenate(([True], ~same)))[0]
        ends = np.append(starts[1:], len(h))
        for a, e in zip(starts[ends - starts > 1].tolist(), ends[ends - starts > 1].tolist()):
            rows = idx[a:e]
            out.append(lines[rows].tolist())
            if firsts is not None:
                firsts[rows[1:]] = False
    out.sort(key=lambda g: g[0])
    return out


def percentiles(values, qs) -> list[float]:
    """``numpy.percentile(values, qs)`` (linear interpolation, the same numbers) from the counts of
    each value instead of a sorted copy: memory bounded by the largest value (a row's token
    count), not by how many values there are. ``values``: non-negative integers."""
    import numpy as np
    counts = np.bincount(values)
    cum = np.cumsum(counts)
    n = int(cum[-1])
    out = []
    for q in qs:
        pos = (n - 1) * q / 100.0
        k = int(np.floor(pos))
        frac = pos - k
        lo = int(np.searchsorted(cum, k, side="right"))          # the value of sorted[k]
        hi = int(np.searchsorted(cum, min(k + 1, n - 1), side="right"))
        out.append(float(lo + (hi - lo) * frac))
    return out


def outliers(lines, lengths, factor: float = 3.0, min_rows: int = 20) -> list[tuple[int, str, int]]:
    """Rows far from the bulk in token length: ``short`` below Q1/factor, ``long`` above Q3×factor.

    Returns ``(line, "short"|"long", tokens)`` sorted by line; nothing below ``min_rows`` rows
    (too few to call anything unusual)."""
    import numpy as np
    n = len(lengths)
    if n < min_rows:
        return []
    arr = np.asarray(lengths)
    q1, q3 = percentiles(arr, [25, 75])
    lo, hi = q1 / factor, q3 * factor
    out = []
    for i in np.nonzero((arr < lo) | (arr > hi))[0]:
        out.append((int(lines[i]), "short" if arr[i] < lo else "long", int(arr[i])))
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
