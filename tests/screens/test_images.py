"""Pictures in the terminal (tui.images, tui.widgets.thumbnail): the Kitty and Sixel encoders
decoded back, the mode chosen from settings/environment/terminal replies (and a real pty query
that cannot hang), and the Dataset screen's thumbnails for builtin:tiny-vl rows."""
from __future__ import annotations

import base64
import io
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from engine.modalities import vision
from engine.models.builtin import vl_sample_dir
from tui import images
from tui_helpers import anyio_backend, isolated_settings  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
SAMPLE = vl_sample_dir()


def _noise_png(path: Path, size=(300, 200)) -> Path:
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(path)
    return path


# ------------------------------------------------------------------------------ encoders

def test_kitty_payload_decodes_back_to_the_thumbnail_in_4096_byte_chunks(tmp_path):
    src = _noise_png(tmp_path / "noise.png")           # incompressible: several chunks
    pic = images.picture(str(src), {"mode": "kitty", "cell_px": (10, 20)})
    assert not pic.error and (pic.cols, pic.rows) == images.cells(160, 107)
    msgs = re.findall(r"\x1b_G([^;\x1b]*)(?:;([^\x1b]*))?\x1b\\", pic.payload)
    assert "".join(f"\x1b_G{k}" + (f";{p}" if p else "") + "\x1b\\" for k, p in msgs) == pic.payload
    keys = [dict(kv.split("=") for kv in k.split(",")) for k, _ in msgs]
    data = [p for _, p in msgs[:-1]]
    assert len(data) > 2 and all(len(p) <= images.KITTY_CHUNK for p in data)
    assert keys[0]["a"] == "t" and keys[0]["f"] == "100" and keys[0]["i"] == str(pic.image_id)
    assert [k["m"] for k in keys[:-1]] == ["1"] * (len(data) - 1) + ["0"]
    assert keys[-1] == {"a": "p", "U": "1", "q": "2", "i": str(pic.image_id), "c": str(pic.cols), "r": str(pic.rows)}
    png = Image.open(io.BytesIO(base64.b64decode("".join(data))))
    expect = vision.thumbnail_image(str(src), (pic.cols * 10, images.MAX_ROWS * 20))
    assert png.size == expect.size and png.convert("RGB").tobytes() == expect.tobytes()
    rows = images.kitty_placeholder_rows(pic.cols, pic.rows)
    assert len(rows) == pic.rows and all(len(r) == 3 * pic.cols for r in rows)
    assert rows[2][0] == images.PLACEHOLDER and rows[2][1] == chr(images.DIACRITICS[2])
    assert rows[2][3 * 5 + 2] == chr(images.DIACRITICS[5])                  # row 2, column 5


def _decode_sixel(s: str):
    """A small Sixel reader: (width, height, {(x, y): (r, g, b) in percent})."""
    m = re.fullmatch(r'\x1bP0;1;0q"1;1;(\d+);(\d+)(.*)\x1b\\', s, re.S)
    assert m, s[:80]
    w, h, body = int(m.group(1)), int(m.group(2)), m.group(3)
    pal, px, colour, x, band = {}, {}, None, 0, 0
    for tok in re.finditer(r"#(\d+);2;(\d+);(\d+);(\d+)|#(\d+)|!(\d+)(.)|([?-~])|(\$)|(-)", body):
        if tok.group(1):
            pal[int(tok.group(1))] = tuple(int(tok.group(i)) for i in (2, 3, 4))
        elif tok.group(5):
            colour = int(tok.group(5))
        elif tok.group(6) or tok.group(8):
            n, ch = (int(tok.group(6)), tok.group(7)) if tok.group(6) else (1, tok.group(8))
            for _ in range(n):
                for bit in range(6):
                    if (ord(ch) - 63) >> bit & 1:
                        assert (x, band * 6 + bit) not in px, "a pixel drawn twice"
                        px[(x, band * 6 + bit)] = pal[colour]
                x += 1
        elif tok.group(9):
            x = 0
        else:
            x, band = 0, band + 1
    return w, h, px, pal


def test_sixel_decodes_back_to_the_picture_band_by_band():
    im = Image.new("RGB", (30, 20))                    # 20 rows: 3 full bands and a part one
    colours = [(255, 0, 0), (0, 128, 255), (255, 255, 255), (20, 20, 20)]
    for i, c in enumerate(colours):
        im.paste(c, ((i % 2) * 15, (i // 2) * 10, (i % 2) * 15 + 15, (i // 2) * 10 + 10))
    s = images.sixel(im)
    assert s.count("-") == 3 and "!15" in s           # bands and run-length encoding
    w, h, px, pal = _decode_sixel(s)
    assert (w, h) == (30, 20) and len(pal) == 4 and len(px) == 30 * 20
    for (x, y), pct in px.items():
        want = im.getpixel((x, y))
        assert all(abs(p * 255 / 100 - v) <= 1.5 for p, v in zip(pct, want)), ((x, y), pct, want)
    real = images.picture(str(SAMPLE / "00-red-circle.png"), {"mode": "sixel", "cell_px": (8, 16)})
    w, h, px, pal = _decode_sixel(real.payload)
    assert (w, h) == (real.cols * 8, real.cols * 8) and len(px) == w * h and len(pal) <= images.SIXEL_COLOURS


def test_a_broken_or_missing_image_is_a_picture_with_its_problem(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes((SAMPLE / "00-red-circle.png").read_bytes()[:60])
    for path, says in ((bad, "cannot be decoded"), (tmp_path / "nope.png", "does not exist")):
        for mode in ("kitty", "sixel", "halfblock"):
            pic = images.picture(str(path), {"mode": mode})
            assert says in pic.error and not pic.payload and not pic.blocks
    assert images.cells(1000, 10) == (16, 1) and images.cells(10, 1000) == (1, images.MAX_ROWS)


# ------------------------------------------------------------------------------ which mode

@pytest.mark.parametrize("env, settings, ask, mode", [
    ({"QLORA_TUI_IMAGES": "sixel", "TERM": "xterm-kitty"}, {}, None, "sixel"),
    ({"QLORA_TUI_IMAGES": "OFF"}, {"images": "kitty"}, None, "off"),
    ({"TERM": "xterm-256color"}, {"images": "kitty"}, None, "kitty"),
    ({"QLORA_TUI_IMAGES": "png"}, {}, None, "halfblock"),
    ({"TERM": "xterm-kitty"}, {}, None, "kitty"),
    ({"TERM": "xterm-256color", "KITTY_WINDOW_ID": "1"}, {}, None, "kitty"),
    ({"TERM": "xterm-256color", "TERM_PROGRAM": "WezTerm"}, {}, None, "sixel"),
    ({"TERM": "xterm-256color", "TERM_PROGRAM": "iTerm.app"}, {}, None, "sixel"),
    ({"TERM": "foot"}, {}, None, "sixel"),
    ({"TERM": "xterm-kitty", "TMUX": "/tmp/t,1,0"}, {}, None, "halfblock"),
    ({"TERM": "xterm-256color"}, {}, "\x1b_Gi=31;OK\x1b\\\x1b[?62;22c", "kitty"),
    ({"TERM": "xterm-256color"}, {}, "\x1b[6;20;10t\x1b[?63;1;2;4;6;9;15;22c", "sixel"),
    ({"TERM": "xterm-256color"}, {}, "\x1b[?62;1;6;22c", "halfblock"),
    ({"TERM": "xterm-256color"}, {}, "", "halfblock"),
])
def test_mode_from_setting_environment_and_terminal_replies(env, settings, ask, mode):
    asked = []
    probe = None if ask is None else (lambda: asked.append(1) or images.parse_replies(ask))
    got = images.choose(env, settings, probe)
    assert got["mode"] == mode and got["reason"]
    if ask is not None:
        assert asked                                 # no hint: the terminal was asked
    if "4;6" in (ask or ""):
        assert got["cell_px"] == (10, 20)
    if env.get("QLORA_TUI_IMAGES") == "png":
        assert "not one of" in got["reason"]


_PROBE = ("import sys, json; sys.path.insert(0, {repo!r}); from tui import images; "
          "r = images.query_terminal(timeout={t}); print(json.dumps(r), file=sys.stderr)")


def _probe_in_pty(reply: str | None, timeout: float):
    """Run query_terminal in a child whose terminal is a pty we play: answer, or stay silent."""
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", _PROBE.format(repo=str(REPO), t=timeout)], stdin=slave,
                         stdout=slave, stderr=subprocess.PIPE, text=True)
    os.close(slave)
    seen = b""
    while b"\x1b[c" not in seen and select.select([master], [], [], 30)[0]:
        seen += os.read(master, 1024)
    if reply is not None:
        os.write(master, reply.encode())
    err = p.communicate(timeout=60)[1]
    os.close(master)
    return seen.decode("latin-1"), err


def test_terminal_query_in_a_pty_reads_the_reply_and_a_silent_terminal_cannot_hang_it():
    import json
    seen, err = _probe_in_pty("\x1b[6;18;9t\x1b[?62;4;22c", timeout=20)
    assert seen.endswith(images.QUERY)
    got = json.loads(err.strip().splitlines()[-1])
    assert got["sixel"] and got["da1"] and not got["kitty"] and got["cell_px"] == [9, 18]
    t0 = time.monotonic()
    seen, err = _probe_in_pty(None, timeout=0.3)       # a terminal that answers nothing
    assert json.loads(err.strip().splitlines()[-1]) == {"kitty": False, "sixel": False, "cell_px": None, "da1": False}
    assert time.monotonic() - t0 < 30                  # bounded by the timeout, not by a reply


# ------------------------------------------------------------------------------ the Dataset screen

def _rows_file(d: Path) -> Path:
    import json
    import shutil
    d.mkdir(parents=True)
    for name in ("00-red-circle.png", "13-red-square.png"):
        shutil.copy(SAMPLE / name, d / name)
    (d / "corrupt.png").write_bytes((SAMPLE / "01-red-circle.png").read_bytes()[:60])

    def row(img, answer):
        return {"messages": [{"role": "user", "content": "<image>What is it?"},
                             {"role": "assistant", "content": answer}], "images": [img]}
    rows = [row("00-red-circle.png", "A red circle."), row("13-red-square.png", "A red square."),
            row("nope.png", "Missing."), row("corrupt.png", "Broken."), row("00-red-circle.png", "Again.")]
    (d / "vl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "vl.jsonl"


@pytest.mark.anyio
async def test_dataset_screen_draws_thumbnails_by_mode_and_says_what_is_wrong(tmp_path, monkeypatch):
    from textual.containers import Vertical

    from tui.widgets.thumbnail import Thumbnail
    from tui_helpers import demo_cfg, make_app, plain, until
    monkeypatch.setenv(images.ENV, "halfblock")
    monkeypatch.setattr("textual.constants.COLOR_SYSTEM", "truecolor")    # kitty's id is a 24-bit colour
    p = _rows_file(tmp_path / "data")
    app = make_app(demo_cfg(tmp_path, 'model.name="builtin:tiny-vl"', f'data.train="{p}"'))
    async with app.run_test(size=(110, 50)) as pilot:
        await pilot.press("f2")
        await until(pilot, lambda: app.screen.report is not None and app.screen.report.done, timeout=180)
        screen = app.screen
        box = screen.query_one("#row-images", Vertical)

        async def row_shown(key: str, n: int):
            await pilot.press(key)
            await until(pilot, lambda: f"row {n} of" in plain(screen.query_one("#row-header"))
                        and "rendering" not in plain(screen.query_one("#row-header")), timeout=60)
            await pilot.pause()

        await row_shown("3", 1)
        thumb = box.query_one(Thumbnail)
        assert thumb.drawn_as == "halfblock" and thumb.size == (16, 8)
        line = thumb.render_line(4)
        assert line.text == "▀" * 16 and line._segments[8].style.color.triplet.red > 150     # red circle's middle
        assert "00-red-circle.png" in plain(box.query_one(".image-info"))
        monkeypatch.setenv(images.ENV, "kitty")
        await row_shown("n", 2)
        thumb = box.query_one(Thumbnail)
        assert thumb.pic.mode == "kitty" and thumb.pic.payload.startswith("\x1b_Ga=t,f=100")
        assert thumb.drawn_as == "kitty"
        seg = thumb.render_line(0)._segments[0]
        assert seg.text.startswith(images.PLACEHOLDER) and seg.cell_length == thumb.pic.cols
        assert seg.style.color.triplet == images.kitty_colour(thumb.pic.image_id)
        saved, app.console._color_system = app.console._color_system, None   # no truecolour: half-blocks
        assert thumb.drawn_as == "halfblock" and thumb.render_line(0).text == "▀" * 16
        app.console._color_system = saved
        monkeypatch.setenv(images.ENV, "sixel")
        await row_shown("n", 3)
        thumb = box.query_one(Thumbnail)
        strips = thumb.render_lines(thumb.region.reset_offset)
        assert len(strips) == thumb.pic.rows + 1 and strips[-1]._segments[0].text.startswith("\x1b7\x1b[8A\x1bP")
        monkeypatch.setenv(images.ENV, "off")
        (p.parent / "00-red-circle.png").unlink()            # gone since the inspection
        await row_shown("p", 2)
        assert not box.query(Thumbnail) and "13-red-square.png" in plain(box.query_one(".image-info"))
        monkeypatch.setenv(images.ENV, "halfblock")
        await row_shown("p", 1)
        view = plain(screen.query_one("#row-view"))
        assert "cannot render this row" in view and "00-red-circle.png" in view and not box.children
        # the rows whose image is missing or corrupt: their line, and the problem, in the browser
        await pilot.press("2")
        table = screen.query_one("#problems")
        for i, says in ((0, "does not exist"), (1, "corrupt")):
            table.move_cursor(row=i)
            await pilot.press("enter")
            await until(pilot, lambda: "has no row" in plain(screen.query_one("#row-view")), timeout=60)
            view = plain(screen.query_one("#row-view"))
            assert f"Line {3 + i} has no row" in view and says in view and not box.children
            await pilot.press("2")
        await pilot.press("ctrl+q")
