"""The one sanitiser for untrusted text: dataset rows and keys, paths, model output, messages
that quote any of them.

Untrusted text never reaches a terminal raw: a row holding ``ESC ] 0 ; title BEL`` would set
the window title, ``ESC [ 2 J`` would clear the screen, a bidi override (U+202E) would show
text in another order than it is stored. ``visible`` makes every such character visible
instead:

- C0 controls (except newline and tab) → the Unicode "control pictures" (ESC → ␛, BEL → ␇,
  CR → ␍), DEL → ␡;
- C1 controls (U+0080-U+009F, e.g. the 8-bit CSI U+009B) → ``⟨U+009B⟩``;
- bidi embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069) and the invisible
  direction marks (U+200E, U+200F, U+061C) → ``⟨U+202E⟩``;
- lone surrogates (bytes that were not UTF-8, decoded with ``surrogateescape``) → U+FFFD.

The command line (``engine.cli.main``) wraps stdout and stderr in ``SafeStream`` so every
line any command prints passes through it; the few escape sequences the CLI itself emits
(colours of ``inspect --show``, the progress line) go through ``write_trusted``. The TUI
shows the same glyphs (``tui/safe.py`` uses this table) and renders text literally.
"""
from __future__ import annotations

import re

_C0 = {c: 0x2400 + c for c in range(0x20) if c not in (0x09, 0x0A)}
_C0[0x1B] = 0x241B
_C0[0x7F] = 0x2421
_C1 = {c: f"⟨U+{c:04X}⟩" for c in range(0x80, 0xA0)}
BIDI = (0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069, 0x200E, 0x200F, 0x061C)
_BIDI = {c: f"⟨U+{c:04X}⟩" for c in BIDI}
_SURROGATES = {c: 0xFFFD for c in range(0xD800, 0xE000)}

TABLE: dict[int, int | str] = {**_C0, **_C1, **_BIDI}

# what the inspector reports as a problem: any control (but tab/newline/CR), ANSI, bidi
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")
_ANSI_RE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])|\x9b")
_BIDI_RE = re.compile("[\u202a-\u202e\u2066-\u2069]")


def visible(value: object) -> str:
    """``str(value)`` with every control, bidi and surrogate character made visible
    (newline and tab are kept)."""
    s = str(value)
    if s.isprintable() or not _needs(s):
        return s
    return s.translate(TABLE).translate(_SURROGATES) if _has_surrogate(s) else s.translate(TABLE)


def _needs(s: str) -> bool:
    return any(ord(ch) in TABLE or 0xD800 <= ord(ch) < 0xE000 for ch in s)


def _has_surrogate(s: str) -> bool:
    return any(0xD800 <= ord(ch) < 0xE000 for ch in s)


def describe_controls(text: str) -> str | None:
    """What hostile or accidental control characters ``text`` holds ("ANSI escape sequence",
    "bidi override", "control character U+0007"), or None."""
    found = []
    if _ANSI_RE.search(text):
        found.append("ANSI escape sequence")
    if _BIDI_RE.search(text):
        found.append("bidi override")
    if not found:
        m = _CONTROL_RE.search(text)
        if m is None:
            return None
        found.append(f"control character U+{ord(m.group()):04X}")
    return " and ".join(found)


def has_controls(text: str) -> bool:
    return _CONTROL_RE.search(text) is not None


def json_dumps(obj, **kw) -> str:
    """``json.dumps(obj, ensure_ascii=False)`` with C1, bidi and surrogate characters written as
    ``\\uXXXX`` escapes (JSON escapes C0 itself): exact, valid JSON that shows nothing raw."""
    import json
    s = json.dumps(obj, ensure_ascii=False, **kw)
    if not _needs(s):
        return s
    return "".join(f"\\u{ord(ch):04x}" if (ord(ch) in TABLE or 0xD800 <= ord(ch) < 0xE000) else ch
                   for ch in s)


class SafeStream:
    """A text stream that writes everything through ``visible``; ``write_trusted`` writes the
    program's own escape sequences as they are. Other attributes are the wrapped stream's."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, s: str) -> int:
        self._stream.write(visible(s))
        return len(s)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def write_trusted(self, s: str) -> int:
        return self._stream.write(s)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def write_trusted(stream, s: str) -> None:
    """Write ``s`` (the program's own escape codes around already sanitised text) unchanged."""
    getattr(stream, "write_trusted", stream.write)(s)


def install(streams=("stdout", "stderr")):
    """Wrap ``sys.stdout``/``sys.stderr`` in ``SafeStream`` (idempotent); returns an undo."""
    import sys
    saved = {name: getattr(sys, name) for name in streams}
    for name, s in saved.items():
        if s is not None and not isinstance(s, SafeStream):
            setattr(sys, name, SafeStream(s))

    def undo():
        for name, s in saved.items():
            setattr(sys, name, s)
    return undo
