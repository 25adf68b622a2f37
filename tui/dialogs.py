"""Modal dialogs: quit during a live run, and a path prompt for load/save."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static

from tui.safe import clean


class QuitDialog(ModalScreen[str]):
    """Quitting while a run is live: stop it (adapter saved), detach (it keeps going), or cancel."""

    DEFAULT_CSS = """
    QuitDialog { align: center middle; }
    QuitDialog > Vertical { width: 64; height: auto; border: thick $warning; background: $surface;
                            padding: 1 2; }
    QuitDialog #buttons { height: auto; margin-top: 1; }
    QuitDialog Button { margin-right: 1; min-width: 12; }
    """
    BINDINGS = [
        Binding("s", "choose('stop')", "Stop run & quit"),
        Binding("d", "choose('detach')", "Detach & quit"),
        Binding("escape,c", "choose('cancel')", "Cancel"),
    ]

    def __init__(self, run_name: str) -> None:
        super().__init__()
        self.run_name = run_name

    def compose(self) -> ComposeResult:
        with Vertical():
            t = Text()
            t.append("A run is live: ", style="bold")
            t.append(clean(self.run_name))
            t.append("\n\n")
            t.append("Stop", style="bold")
            t.append(": stop it gracefully (the adapter is saved), then quit.\n")
            t.append("Detach", style="bold")
            t.append(": quit and leave it training; re-attach with `qlora-tui attach`.\n")
            t.append("Cancel", style="bold")
            t.append(": keep watching.")
            yield Static(t)
            with Horizontal(id="buttons"):
                yield Button("Stop (s)", id="stop", variant="error")
                yield Button("Detach (d)", id="detach", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#detach", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id)

    def action_choose(self, what: str) -> None:
        self.dismiss(what)


class PathPrompt(ModalScreen[str | None]):
    DEFAULT_CSS = """
    PathPrompt { align: center middle; }
    PathPrompt > Vertical { width: 70; height: auto; border: thick $primary; background: $surface;
                            padding: 1 2; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(self.title_text, style="bold"))
            yield Input(value=self.value, placeholder="path/to/config.toml", id="path")
            yield Static(Text("enter: ok   esc: cancel", style="dim"))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)
