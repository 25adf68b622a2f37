"""Modal dialogs: quit during a live run, a path prompt for load/save, resume a failed run with
the fix applied, and the confirmation that a model's own Python code may run."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static

from tui.safe import clean, one_line


class QuitDialog(ModalScreen[str]):
    """Quitting while a run is live: stop it (adapter saved), detach (it keeps going), or cancel."""

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


class ResumeFixDialog(ModalScreen[bool]):
    """A run ended (OOM, NaN, stopped, crashed): resume it, with every change its hint named?
    Says "restart from step 0" when no complete checkpoint exists, since that is what happens."""

    BINDINGS = [
        Binding("r", "choose(True)", "Resume with the fix"),
        Binding("escape", "choose(False)", "Dismiss"),
    ]

    def __init__(self, run_name: str, reason: str, offer) -> None:
        """``offer``: ``engine.service.ResumeOffer`` (its fixes, frozen keys and their values in
        words, the checkpoint it resumes from)."""
        super().__init__()
        self.run_name = run_name
        self.what = offer.what
        self.reason = reason
        self.offer = offer
        self.fixes = list(offer.fixes)
        self.from_step = offer.from_step

    def _heading(self) -> str:
        where = (f"Resume from the checkpoint at step {self.from_step}" if self.from_step
                 else "No checkpoint yet: restart from step 0")
        return where + (" with these changes:" if self.fixes else " (config unchanged).")

    def _fixes_text(self) -> Text:
        f = Text()
        for i, line in enumerate(self.offer.fix_lines):
            f.append("\n" if i else "")
            f.append("  • ")
            f.append(one_line(line, 120), style="bold")
        if self.fixes:
            f.append("\n  ")
            f.append(one_line(" ".join(f"--set {x}" for x in self.fixes), 200), style="dim")
        for line in self.offer.frozen_lines:
            f.append("\n  • ")
            f.append(one_line(line, 100))
            f.append("  (needs a new run: a resume keeps model, quant and lora)", style="dim")
        return f

    def compose(self) -> ComposeResult:
        with Vertical():
            t = Text()
            t.append(f"{self.what}: ", style="bold $error")
            t.append(clean(self.run_name), style="bold")
            t.append("\n")
            t.append(one_line(self.reason, 300))
            t.append("\n\n" + self._heading(), style="bold")
            yield Static(t)
            yield Static(self._fixes_text(), id="fixes")
            verb = "Resume" if self.from_step else "Restart"
            with Horizontal(id="buttons"):
                yield Button(f"{verb}{' with fix' if self.fixes else ''} (r)", id="resume",
                             variant="primary")
                yield Button("Dismiss (esc)", id="dismiss")

    def on_mount(self) -> None:
        self.query_one("#resume", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "resume")

    def action_choose(self, yes: bool) -> None:
        self.dismiss(bool(yes))


class RemoteCodeDialog(ModalScreen[bool]):
    """model.trust_remote_code = true: only an explicit yes runs the repository's code."""

    BINDINGS = [
        Binding("y", "choose(True)", "Yes, run its code"),
        Binding("n,escape", "choose(False)", "No"),
    ]

    def __init__(self, model_name: str, action: str = "Starting this run") -> None:
        super().__init__()
        self.model_name = model_name
        self.action = action

    def compose(self) -> ComposeResult:
        with Vertical():
            t = Text()
            t.append("Run code from the model repository?\n\n", style="bold")
            t.append("model  ", style="dim")
            t.append(clean(self.model_name), style="bold")
            t.append("\n\n")
            t.append(f"{self.action} will run Python code from the model repository "
                     "(model.trust_remote_code = true). That code can do anything your user "
                     "account can. Only say yes for a repository you trust.")
            yield Static(t)
            with Horizontal(id="buttons"):
                yield Button("Yes, run it (y)", id="yes", variant="warning")
                yield Button("No (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_choose(self, yes: bool) -> None:
        self.dismiss(bool(yes))
