"""One image's thumbnail (``tui.images.Picture``): Kitty placeholders, Sixel, or half-blocks.

- halfblock: '▀' cells, the top pixel as foreground, the bottom one as background.
- kitty: the picture is sent once through the app's driver (the output queue Textual itself
  writes to, so it never lands inside another sequence) and deleted on unmount; the cells are
  Unicode placeholders coloured with the image id, so layout, scrolling and clipping are Textual's.
  The id rides in a 24-bit colour: without a truecolour console it falls back to half-blocks.
- sixel: the cells are blank; one more (blank) line below them carries the Sixel data as a
  zero-width control segment: save cursor, up to the picture's top-left, draw, restore, so no
  cell of the picture is written over afterwards. Only while the widget is wholly visible (else a
  clipped picture would spill over its neighbours): half-blocks while it is partly scrolled out.
"""
from __future__ import annotations

from rich.color import Color
from rich.segment import ControlType, Segment
from rich.style import Style
from textual.geometry import Region, Size
from textual.strip import Strip
from textual.widget import Widget

from tui import images


class Thumbnail(Widget):
    DEFAULT_CSS = "Thumbnail { width: auto; height: auto; margin: 0 0 0 2; }"

    def __init__(self, pic: images.Picture, **kw) -> None:
        super().__init__(**kw)
        self.pic = pic
        self._sent = False

    @property
    def drawn_as(self) -> str:
        """What the cells show now: the picture's mode, or halfblock where it cannot be used."""
        mode = self.pic.mode
        if mode == "kitty" and self.app.console.color_system != "truecolor":
            return "halfblock"
        return mode

    def get_content_width(self, container: Size, viewport: Size) -> int:
        return self.pic.cols

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return self.pic.rows + (1 if self.pic.mode == "sixel" else 0)

    def on_mount(self) -> None:
        if self.drawn_as == "kitty":
            self._write(self.pic.payload)
            self._sent = True

    def on_unmount(self) -> None:
        if self._sent:
            self._write(f"\x1b_Ga=d,d=I,i={self.pic.image_id},q=2\x1b\\")

    def _write(self, data: str) -> None:
        driver = getattr(self.app, "_driver", None)      # what App.copy_to_clipboard writes to
        if driver is not None:
            driver.write(data)

    def render_lines(self, crop: Region) -> list[Strip]:
        whole = crop == Region(0, 0, self.size.width, self.size.height)
        if self.drawn_as == "sixel" and whole and self.screen.is_active:
            return self._sixel_lines()[crop.y:crop.bottom]
        return [self.render_line(y).crop(crop.x, crop.right) for y in range(crop.y, crop.bottom)]

    def render_line(self, y: int) -> Strip:
        pic = self.pic
        if y >= pic.rows:
            return Strip.blank(self.size.width)
        if self.drawn_as == "kitty":
            style = Style(color=Color.from_rgb(*images.kitty_colour(pic.image_id)))
            return Strip([Segment(images.kitty_placeholder_rows(pic.cols, pic.rows)[y], style)], pic.cols)
        return Strip([Segment("▀", Style(color=Color.from_rgb(*top), bgcolor=Color.from_rgb(*bottom)))
                      for top, bottom in pic.blocks[y]], pic.cols)

    def _sixel_lines(self) -> list[Strip]:
        w, rows = self.size.width, self.pic.rows
        lines = [Strip.blank(w) for _ in range(rows)]
        draw = f"\x1b7\x1b[{rows}A{self.pic.payload}\x1b8"
        lines.append(Strip([Segment(draw, None, ((ControlType.CURSOR_FORWARD, 0),)), Segment(" " * w)], w))
        return lines
