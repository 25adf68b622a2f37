"""Chat: talk to a finished or stopped run (its adapter or any checkpoint), token by token.

The engine does the work (``engine.outputs.chat``: loading, the chat template, streaming,
stopping, the transcript in RUN_DIR/chat.jsonl); this screen only shows it. The model loads in
a worker thread with progress; each answer streams from another worker and can be stopped
(ctrl+k). ctrl+t answers the same history with the base model (the adapter disabled) or the
tuned one. Every message is untrusted text and is shown literally.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, ProgressBar, Select, Static

from tui.safe import literal, middle, one_line

PIECE_INTERVAL = 0.05        # seconds between two redraws of an answer being streamed


# ---- what this screen's workers post to it -------------------------------------------
@dataclass
class ChatLoading(Message):
    src: Path
    fraction: float
    message: str


@dataclass
class ChatLoaded(Message):
    src: Path
    model: object
    error: str = ""


@dataclass
class ChatPiece(Message):
    """The answer so far (the newest replaces a waiting one)."""
    text: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, ChatPiece)


@dataclass
class ChatAnswered(Message):
    text: str
    stopped: bool
    error: str = ""


@dataclass
class ChatPicked(Message):
    """The run the Chat screen opens when none was picked (found by a worker)."""
    src: Path | None


def speaker(role: str, model: str = "") -> Text:
    if role == "user":
        return Text("you ", style="bold $accent")
    return Text(f"{model or 'tuned'} ", style="bold $success" if model != "base" else "bold $warning")


class ChatScreen(Screen):
    BINDINGS = [Binding("ctrl+t", "toggle_model", "Base/Tuned", id="chat-toggle", priority=True,
                        tooltip="Answer with the base model (adapter off) or the fine-tuned one; same history"),
                Binding("ctrl+k", "stop_answer", "Stop", id="chat-stop", priority=True,
                        tooltip="Stop the answer being generated (what was said so far is kept)"),
                Binding("ctrl+n", "new_chat", "New", id="chat-new", priority=True,
                        tooltip="Start a new conversation (the transcript keeps the old one)")]

    def __init__(self) -> None:
        super().__init__()
        self.src: Path | None = None          # the adapter directory answering
        self.run_dir: Path | None = None
        self.model = None                     # engine.service.chat_model(src), once loaded
        self.tuned = True
        self.answering = False
        self.history: list[dict] = []
        self._stop = threading.Event()
        self._answer: Static | None = None
        self._choices: list[Path] = []

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="chat-top"):
            yield Select([], prompt="no run", allow_blank=True, compact=True, id="chat-source")
            yield Label("temp", classes="chat-label")
            yield Input("0.7", id="chat-temp", compact=True, restrict=r"[0-9.]*", max_length=5)
            yield Label("top-p", classes="chat-label")
            yield Input("0.9", id="chat-top-p", compact=True, restrict=r"[0-9.]*", max_length=5)
            yield Label("max", classes="chat-label")
            yield Input("128", id="chat-max", compact=True, restrict=r"[0-9]*", max_length=5)
        with Horizontal(id="chat-system-row"):
            yield Label("system", classes="chat-label")
            yield Input(placeholder="system prompt (optional)", id="chat-system", compact=True)
        with Horizontal(id="chat-status-row"):
            yield Static(id="chat-status")
            yield ProgressBar(total=100, show_eta=False, show_percentage=False, id="chat-progress")
        with VerticalScroll(id="chat-log"):
            yield Static(Text("Pick a run on the Runs screen (F5, then c) or wait: the newest "
                              "finished run opens here.", style="dim"), classes="chat-empty")
        yield Input(placeholder="message (enter sends)", id="chat-input", compact=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "Chat"
        self.query_one("#chat-progress").display = False
        self.query_one("#chat-input", Input).focus()
        if self.src is None:
            self._pick(self.app.runs_dir())

    @work(thread=True, exclusive=True, group="chat-pick", exit_on_error=False)
    def _pick(self, runs_dir: Path) -> None:
        from engine import service
        self.post_message(ChatPicked(service.latest_chat_run(runs_dir)))

    @on(ChatPicked)
    def _on_picked(self, msg: ChatPicked) -> None:
        if self.src is not None:
            return                              # a run was picked meanwhile
        if msg.src is None:
            self._status(Text("No finished run with an adapter under ", style="dim")
                         + literal(middle(self.app.runs_dir(), 40))
                         + Text(": train one first (F4, ctrl+r).", style="dim"))
            return
        self.open(msg.src)

    # ---- which run / adapter -------------------------------------------------------------
    def open(self, src: str | Path) -> None:
        """Chat with ``src``: a run (its final adapter, else its newest checkpoint) or one of
        its checkpoints / adapter directories."""
        from engine import service
        src = Path(src)
        run_dir = service.chat_owning_run(src)
        choices = service.chat_sources(run_dir)
        if (src / "adapter_config.json").is_file() and src not in choices:
            choices.insert(0, src)
        if not choices:
            self.notify(f"{run_dir.name} has no adapter or checkpoint to chat with yet.",
                        severity="warning", markup=False)
            return
        pick = src if src in choices else choices[0]
        self.run_dir, self._choices = run_dir, choices
        select = self.query_one("#chat-source", Select)
        with select.prevent(Select.Changed):
            select.set_options([(middle(c.name if c.parent == run_dir else
                                        f"{c.parent.name}/{c.name}", 20), str(c)) for c in choices])
            select.value = str(pick)
        self.history = service.chat_history(run_dir)
        self._show_history()
        self._load(pick)

    @on(Select.Changed, "#chat-source")
    def _source_changed(self, event: Select.Changed) -> None:
        if event.value is Select.BLANK or self.src is None or Path(str(event.value)) == self.src:
            return
        self._load(Path(str(event.value)))

    def _load(self, src: Path) -> None:
        if self.answering:
            self.action_stop_answer()
        self.src, self.model = src, None
        self.sub_title = f"Chat · {self.run_dir.name if self.run_dir else src.name}"
        bar = self.query_one("#chat-progress", ProgressBar)
        bar.display = True
        bar.update(progress=0)
        self._status(Text("loading ", style="dim") + literal(middle(src, 50)) + Text("…", style="dim"))
        self._load_model(src)

    @work(thread=True, exclusive=True, group="chat-load", exit_on_error=False)
    def _load_model(self, src: Path) -> None:
        from engine import service
        model = service.chat_model(src)
        try:
            model.load(lambda f, m: self.post_message(ChatLoading(src, f, m)))
        except service.ChatError as e:
            self.post_message(ChatLoaded(src, None, str(e)))
            return
        self.post_message(ChatLoaded(src, model))

    @on(ChatLoading)
    def _on_loading(self, msg: ChatLoading) -> None:
        if msg.src != self.src:
            return
        self.query_one("#chat-progress", ProgressBar).update(progress=round(msg.fraction * 100))
        self._status(Text("loading: ", style="dim") + literal(middle(msg.message, 60)))

    @on(ChatLoaded)
    def _on_loaded(self, msg: ChatLoaded) -> None:
        if msg.src != self.src:
            return                             # another adapter was picked meanwhile
        self.query_one("#chat-progress").display = False
        if msg.error:
            self._status(literal(one_line(msg.error, 300), style="bold $error"))
            return
        self.model = msg.model
        self._show_model()

    def _show_model(self) -> None:
        if self.model is None or self.src is None:
            return
        t = Text()
        t.append("tuned" if self.tuned else "base", style="bold $success" if self.tuned else "bold $warning")
        t.append("  ")
        t.append_text(literal(middle(f"{self.run_dir.name}/{self.src.name}" if self.run_dir
                                     and self.src.parent == self.run_dir else self.src, 44)))
        t.append(f"  {self.model.info.get('mode', '')}", style="dim")
        self._status(t)

    def _status(self, text: Text) -> None:
        self.query_one("#chat-status", Static).update(text)

    # ---- the transcript --------------------------------------------------------------------
    def _show_history(self) -> None:
        log = self.query_one("#chat-log", VerticalScroll)
        log.remove_children()
        if not self.history:
            log.mount(Static(Text("Type a message below; enter sends it.", style="dim"), classes="chat-empty"))
        for m in self.history:
            log.mount(Static(self._line(m["role"], m["content"], m.get("model", ""), m.get("stopped", False)),
                             classes="chat-msg"))
        log.scroll_end(animate=False)

    @staticmethod
    def _line(role: str, content: str, model: str = "", stopped: bool = False) -> Text:
        t = speaker(role, model)
        t.append_text(literal(content))          # model output is untrusted: never markup
        if stopped:
            t.append(" [stopped]", style="dim italic")
        return t

    def transcript_text(self) -> str:
        """What the transcript shows, as plain text (tests, copy)."""
        return "\n".join(str(w.render()) for w in self.query(".chat-msg"))

    # ---- sending, streaming, stopping ----------------------------------------------------------
    def _sampling(self):
        from engine.service import ChatError, chat_sampling
        try:
            s = chat_sampling(temperature=float(self.query_one("#chat-temp", Input).value or 0),
                              top_p=float(self.query_one("#chat-top-p", Input).value or 1),
                              max_new_tokens=int(self.query_one("#chat-max", Input).value or 0))
            s.check()
        except (ValueError, ChatError) as e:
            self.notify(f"Sampling: {one_line(e, 150)}", severity="error", markup=False)
            return None
        return s

    @on(Input.Submitted, "#chat-input")
    def _send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.answering:
            self.notify("Still answering: wait, or stop it (ctrl+k).", markup=False)
            return
        if self.model is None:
            self.notify("The model is not loaded yet." if self.src else "No run to chat with.",
                        markup=False)
            return
        sampling = self._sampling()
        if sampling is None:
            return
        from engine import service
        event.input.value = ""
        turn = {"role": "user", "content": text}
        self.history.append(turn)
        service.append_chat_turn(self.src, "user", text, adapter=str(self.src))
        log = self.query_one("#chat-log", VerticalScroll)
        for w in log.query(".chat-empty"):
            w.remove()
        log.mount(Static(self._line("user", text), classes="chat-msg"))
        self._answer = Static(speaker("assistant", self.who()) + Text("…", style="dim"),
                              classes="chat-msg")
        log.mount(self._answer)
        log.scroll_end(animate=False)
        self.answering = True
        self._stop = threading.Event()
        system = self.query_one("#chat-system", Input).value
        self._generate([{"role": m["role"], "content": m["content"]} for m in self.history],
                       sampling, system, self.tuned, self._stop)
        self.refresh_bindings()

    def who(self) -> str:
        return "tuned" if self.tuned else "base"

    @work(thread=True, exclusive=True, group="chat-answer", exit_on_error=False)
    def _generate(self, history, sampling, system: str, tuned: bool, stop: threading.Event) -> None:
        from engine.service import ChatError
        text, last = "", 0.0
        try:
            for piece in self.model.stream(history, sampling, system=system, tuned=tuned, stop=stop):
                text += piece
                if time.monotonic() - last >= PIECE_INTERVAL:
                    last = time.monotonic()
                    self.post_message(ChatPiece(text))
        except ChatError as e:
            self.post_message(ChatAnswered(text, stop.is_set(), str(e)))
            return
        self.post_message(ChatAnswered(text, stop.is_set()))

    @on(ChatPiece)
    def _on_piece(self, msg: ChatPiece) -> None:
        if self._answer is not None and self.answering:
            self._answer.update(self._line("assistant", msg.text, self.who()))
            self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    @on(ChatAnswered)
    def _on_answered(self, msg: ChatAnswered) -> None:
        from engine import service
        self.answering = False
        self.refresh_bindings()
        if self._answer is not None:
            self._answer.update(self._line("assistant", msg.text, self.who(), msg.stopped))
        if msg.error:
            self.notify(one_line(msg.error, 300), title="Chat", severity="error", markup=False)
        if msg.text or not msg.error:
            rec = {"role": "assistant", "content": msg.text, "model": self.who()}
            if msg.stopped:
                rec["stopped"] = True
            self.history.append(rec)
            if self.src is not None:
                service.append_chat_turn(self.src, "assistant", msg.text, model=self.who(),
                                 adapter=str(self.src), stopped=msg.stopped)
        self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "stop_answer":
            return self.answering
        return True

    def action_stop_answer(self) -> None:
        self._stop.set()

    def action_toggle_model(self) -> None:
        self.tuned = not self.tuned
        self._show_model()
        self.notify(f"Next answers: {'fine-tuned (adapter on)' if self.tuned else 'base model (adapter off)'}; "
                    f"same history.", markup=False)

    def action_new_chat(self) -> None:
        if self.answering:
            self.action_stop_answer()
        if self.run_dir is not None:
            from engine import service
            service.clear_chat(self.run_dir)
        self.history = []
        self._show_history()
