"""Pictures in the terminal: Kitty graphics, Sixel, or half-blocks, for the Dataset screen.

Which one (``mode()``): ``QLORA_TUI_IMAGES=kitty|sixel|halfblock|off`` (or ``images = "..."`` in
settings.toml) forces it; else environment hints (``TERM=xterm-kitty``, ``KITTY_WINDOW_ID``,
``TERM_PROGRAM=WezTerm|iTerm.app|ghostty``, ``TERM=foot``...); else, once before the app starts
(``detect()``), a terminal query with a short timeout: a Kitty graphics query, the cell size in
pixels and Primary Device Attributes (DA1, which every terminal answers, so the wait normally ends
at the reply; a Sixel terminal lists attribute 4). Nothing answers: half-blocks, which any
truecolour terminal shows, over SSH too.

Encoders (no Textual here, so they are testable on their own):
- Kitty: the picture as base64 PNG in APC chunks (``ESC _ G ... ESC \\``, 4096 bytes each) and a
  virtual placement; the cells hold Unicode placeholders (U+10EEEE with row/column diacritics,
  the image id in the foreground colour), so Textual lays them out, scrolls and clips them like
  text.
- Sixel: the picture quantised to a palette of at most 64 colours, in six-pixel bands with
  run-length encoding (DCS ``ESC P 0;1;0 q`` ... ``ESC \\``); the widget injects it after its
  cells only while it is wholly visible, half-blocks otherwise.
Images are untrusted: they are decoded by ``engine.service.thumbnail`` (``engine.modalities.vision.thumbnail_image``; size
checked before decoding); a broken one shows its problem in place of the picture.
"""
from __future__ import annotations

import base64
import io
import itertools
import os
import random
from dataclasses import dataclass, field

MODES = ("kitty", "sixel", "halfblock", "off")
ENV = "QLORA_TUI_IMAGES"
COLS = 16                        # a thumbnail's width in cells (its height follows the aspect)
MAX_ROWS = 12
KITTY_CHUNK = 4096
SIXEL_COLOURS = 64
DEFAULT_CELL_PX = (10, 20)       # VT340's cell, when the terminal does not say

# Kitty's row/column diacritics (rowcolumn-diacritics.txt of the graphics protocol): the n-th
# one encodes row or column n of a placeholder cell. A thumbnail needs at most COLS of them.
DIACRITICS = (0x0305, 0x030D, 0x030E, 0x0310, 0x0312, 0x033D, 0x033E, 0x033F, 0x0346, 0x034A,
              0x034B, 0x034C, 0x0350, 0x0351, 0x0352, 0x0357, 0x035B, 0x0363, 0x0364, 0x0365,
              0x0366, 0x0367, 0x0368, 0x0369)
PLACEHOLDER = "\U0010EEEE"

_SIXEL_TERMS = ("foot", "foot-extra", "mlterm", "yaft-256color", "contour")
_detected: dict | None = None     # detect()'s answer: mode, reason, cell_px


# ------------------------------------------------------------------------------ which mode

def forced(env=None, settings: dict | None = None) -> tuple[str, str] | None:
    """(mode, reason) when QLORA_TUI_IMAGES or the settings' ``images`` name one; an unknown
    value is said and ignored (half-blocks)."""
    env = os.environ if env is None else env
    for where, value in ((ENV, env.get(ENV)), ("settings images", (settings or {}).get("images"))):
        if value:
            v = str(value).strip().lower()
            if v in MODES:
                return v, f"{where}={v}"
            return "halfblock", f"{where}={value!r} is not one of {', '.join(MODES)}: using halfblock"
    return None


def hinted(env=None) -> tuple[str, str] | None:
    """(mode, reason) from what the terminal sets in the environment, or None (ask it)."""
    env = os.environ if env is None else env
    term, prog = env.get("TERM", ""), env.get("TERM_PROGRAM", "")
    if env.get("TMUX") or term.startswith(("screen", "tmux")):
        return "halfblock", "inside tmux/screen (pictures need passthrough)"
    if term in ("", "dumb", "linux"):
        return "halfblock", f"TERM={term or 'unset'}"
    if term == "xterm-kitty" or env.get("KITTY_WINDOW_ID") or prog == "ghostty" or term == "xterm-ghostty":
        return "kitty", f"TERM={term}" if "kitty" in term or "ghostty" in term else (
            "KITTY_WINDOW_ID is set" if env.get("KITTY_WINDOW_ID") else f"TERM_PROGRAM={prog}")
    if prog in ("WezTerm", "iTerm.app"):
        return "sixel", f"TERM_PROGRAM={prog}"
    if term in _SIXEL_TERMS or "sixel" in term:
        return "sixel", f"TERM={term}"
    return None


def parse_replies(data: str) -> dict:
    """What a terminal's answers to ``QUERY`` say: kitty (graphics query OK), sixel (DA1
    attribute 4), cell_px (CSI 16 t), da1 (the DA1 reply arrived: no more is coming)."""
    import re
    out = {"kitty": "\x1b_Gi=31;OK" in data, "sixel": False, "cell_px": None, "da1": False}
    m = re.search(r"\x1b\[\?([\d;]*)c", data)
    if m:
        out["da1"] = True
        out["sixel"] = "4" in m.group(1).split(";")
    m = re.search(r"\x1b\[6;(\d+);(\d+)t", data)
    if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
        out["cell_px"] = (int(m.group(2)), int(m.group(1)))
    return out


QUERY = "\x1b_Gi=31,s=1,v=1,a=q,t=d,f=24;AAAA\x1b\\" + "\x1b[16t" + "\x1b[c"


def query_terminal(timeout: float = 0.4) -> dict:
    """Ask the terminal (before Textual owns stdin): at most ``timeout`` seconds, usually one
    round trip since DA1 is always answered. {} when stdin/stdout are not a terminal."""
    import select
    import sys
    import termios
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return {}
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    new = termios.tcgetattr(fd)
    new[3] &= ~(termios.ICANON | termios.ECHO)
    data = ""
    try:
        termios.tcsetattr(fd, termios.TCSANOW, new)
        sys.stdout.write(QUERY)
        sys.stdout.flush()
        import time
        deadline = time.monotonic() + timeout
        while not parse_replies(data)["da1"]:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            data += os.read(fd, 1024).decode("latin-1")
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, old)      # a late reply is dropped, not typed
    return parse_replies(data)


def cell_px_from_tty() -> tuple[int, int] | None:
    """The cell size in pixels from the tty's window size (0 where the terminal does not fill it)."""
    import fcntl
    import struct
    import sys
    import termios
    try:
        rows, cols, xpx, ypx = struct.unpack("HHHH", fcntl.ioctl(sys.stdout.fileno(), termios.TIOCGWINSZ, b"\0" * 8))
    except (OSError, ValueError):
        return None
    return (xpx // cols, ypx // rows) if rows and cols and xpx and ypx else None


def choose(env=None, settings: dict | None = None, ask=None) -> dict:
    """{mode, reason, cell_px}: forced, else hinted, else ``ask()`` (a terminal query's parsed
    answer), else half-blocks."""
    found = forced(env, settings) or hinted(env)
    if found:
        return {"mode": found[0], "reason": found[1], "cell_px": None}
    answer = ask() if ask is not None else {}
    cell = answer.get("cell_px")
    if answer.get("kitty"):
        return {"mode": "kitty", "reason": "the terminal answered the Kitty graphics query", "cell_px": cell}
    if answer.get("sixel"):
        return {"mode": "sixel", "reason": "the terminal's device attributes list Sixel", "cell_px": cell}
    why = "the terminal lists neither Kitty graphics nor Sixel" if answer else "no terminal to ask"
    return {"mode": "halfblock", "reason": why, "cell_px": cell}


def detect() -> dict:
    """Decide once, before the app starts (the terminal query needs stdin)."""
    global _detected
    from tui import settings
    _detected = choose(settings=settings.load(), ask=query_terminal)
    if _detected["mode"] == "sixel" and not _detected["cell_px"]:
        _detected["cell_px"] = cell_px_from_tty()
    return _detected


def mode() -> dict:
    """detect()'s answer, or (no detection ran: tests, an embedded app) the setting and the
    environment's hints alone."""
    if _detected is not None:
        return _detected
    from tui import settings
    return choose(settings=settings.load())


# ------------------------------------------------------------------------------ encoders

def kitty_transmit(png: bytes, image_id: int, cols: int, rows: int) -> str:
    """APC sequences that store ``png`` as image ``image_id`` (quietly: q=2, no replies) and
    place it virtually over cols x rows cells, for Unicode placeholders (U=1)."""
    data = base64.standard_b64encode(png).decode("ascii")
    chunks = [data[i:i + KITTY_CHUNK] for i in range(0, len(data), KITTY_CHUNK)] or [""]
    out = []
    for n, chunk in enumerate(chunks):
        more = 1 if n < len(chunks) - 1 else 0
        keys = f"a=t,f=100,q=2,i={image_id},m={more}" if n == 0 else f"m={more},q=2"
        out.append(f"\x1b_G{keys};{chunk}\x1b\\")
    out.append(f"\x1b_Ga=p,U=1,q=2,i={image_id},c={cols},r={rows}\x1b\\")
    return "".join(out)


def kitty_placeholder_rows(cols: int, rows: int) -> list[str]:
    """The cells' text: each cell is U+10EEEE + its row's and column's diacritic (the image id
    travels in the cells' foreground colour)."""
    return ["".join(PLACEHOLDER + chr(DIACRITICS[r]) + chr(DIACRITICS[c]) for c in range(cols))
            for r in range(rows)]


def kitty_colour(image_id: int) -> tuple[int, int, int]:
    return (image_id >> 16) & 255, (image_id >> 8) & 255, image_id & 255


def sixel(im, colours: int = SIXEL_COLOURS) -> str:
    """``im`` (RGB) as a Sixel image: raster attributes, a palette of at most ``colours``
    entries (0-100 percent RGB), then six-pixel bands, each colour's run of a band after ``#n``,
    ``$`` back to the band's start, ``-`` to the next band; runs of 4+ are ``!count``."""
    import numpy as np
    q = im.convert("RGB").quantize(colors=max(2, min(256, colours)), dither=0)
    w, h = q.size
    pal = q.getpalette()[: 3 * 256]
    idx = np.asarray(q, dtype=np.int32).reshape(h, w)
    out = [f"\x1bP0;1;0q\"1;1;{w};{h}"]
    out += [f"#{c};2;{round(pal[3 * c] * 100 / 255)};{round(pal[3 * c + 1] * 100 / 255)};"
            f"{round(pal[3 * c + 2] * 100 / 255)}" for c in np.unique(idx).tolist()]
    bands = ["$".join(_sixel_colour(idx[top:top + 6], c) for c in np.unique(idx[top:top + 6]).tolist())
             for top in range(0, h, 6)]
    out.append("-".join(bands))
    out.append("\x1b\\")
    return "".join(out)


def _sixel_colour(band, c: int) -> str:
    """One colour's row of a band: a character per column (63 + the bits of its six pixels that
    have colour c), runs of four or more as !count."""
    import numpy as np
    weights = (1 << np.arange(band.shape[0], dtype=np.int32))[:, None]
    chars = ((band == c) * weights).sum(axis=0) + 63
    runs = []
    for code, grp in itertools.groupby(chars.tolist()):
        n = len(list(grp))
        runs.append(f"!{n}{chr(code)}" if n >= 4 else chr(code) * n)
    return f"#{c}" + "".join(runs)


def cells(width: int, height: int, cols: int = COLS, max_rows: int = MAX_ROWS) -> tuple[int, int]:
    """The (cols, rows) a width x height picture takes: a cell is about twice as tall as wide."""
    cols = max(1, min(cols, width))
    rows = max(1, round(cols * height / width / 2))
    if rows > max_rows:
        cols, rows = max(1, round(max_rows * 2 * width / height)), max_rows
    return cols, rows


def half_blocks(im, cols: int, rows: int) -> list[list[tuple[tuple, tuple]]]:
    """rows x cols of (top RGB, bottom RGB) for '▀' cells: two pixel rows per text row."""
    px = im.resize((cols, 2 * rows)).load()
    return [[(px[x, 2 * y], px[x, 2 * y + 1]) for x in range(cols)] for y in range(rows)]


# ------------------------------------------------------------------------------ one picture

_ids = itertools.count(random.randint(1 << 16, 1 << 23))    # kitty ids: 24 bits, unlikely to clash


@dataclass
class Picture:
    """One thumbnail ready to draw: its cells, the half-block fallback, and the escape payload
    of its mode (kitty: transmit + placement; sixel: the DCS string); or the problem."""
    path: str
    mode: str
    cols: int = 0
    rows: int = 0
    blocks: list = field(default_factory=list)
    payload: str = ""
    image_id: int = 0
    error: str = ""


def picture(path: str, how: dict | None = None, cols: int = COLS) -> Picture:
    """Decode ``path`` safely and encode it for ``how`` (``mode()``'s answer). Never raises for
    a bad image: the Picture carries the problem instead."""
    from engine.service import thumbnail as thumbnail_image
    how = how or mode()
    pic = Picture(path=path, mode=how["mode"])
    if pic.mode == "off":
        return pic
    cw, ch = how.get("cell_px") or DEFAULT_CELL_PX
    try:
        im = thumbnail_image(path, (cols * cw, MAX_ROWS * ch))
    except ValueError as e:
        pic.error = str(e)
        return pic
    pic.cols, pic.rows = cells(im.width, im.height, cols)
    pic.blocks = half_blocks(im, pic.cols, pic.rows)
    if pic.mode == "kitty":
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        pic.image_id = next(_ids)
        pic.payload = kitty_transmit(buf.getvalue(), pic.image_id, pic.cols, pic.rows)
    elif pic.mode == "sixel":
        f = min(pic.cols * cw / im.width, pic.rows * ch / im.height)     # fill the cells
        pic.payload = sixel(im.resize((max(1, int(im.width * f)), max(1, int(im.height * f)))))
    return pic
