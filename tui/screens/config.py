"""Config: a form built from ``engine.core.config.field_specs()``, validated live by the engine."""
from __future__ import annotations

import asyncio
import copy
import dataclasses
from dataclasses import dataclass

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer, Header, Input, Label, Select, Static

from tui.safe import clean, literal, middle, one_line

from engine.core.units import GIB


# ---- what this screen's workers post to it -------------------------------------------
@dataclass
class EstimateReady(Message):
    text: str
    trainable: int | None


# ---- what the Config screen asks of the app -----------------------------------------------
@dataclass
class FormEdited(Message):
    """The form's values (``data``), validated: ``config`` when valid, else ``problems``."""
    data: dict
    config: object
    problems: list


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _bound(v) -> str:
    """1,048,576, 0 and 0.0001 as a person writes them (never 1.04858e+06 or 0e+00)."""
    if v == 0:
        return "0"
    if float(v) == int(v) and abs(v) >= 1:
        return f"{int(v):,}"
    return f"{v:g}" if abs(v) >= 1e-4 else f"{v:.0e}"


def allowed_text(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("choices"):
        return "one of: " + ", ".join(str(c).lower() if isinstance(c, bool) else str(c)
                                      for c in m["choices"])
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and hi is not None:
        return f"allowed {_bound(lo)} to {_bound(hi)}"
    if lo is not None:
        return f"allowed: at least {_bound(lo)}"
    if hi is not None:
        return f"allowed: at most {_bound(hi)}"
    if isinstance(_default(f), bool):
        return "true or false"
    return ""


def to_text(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def from_text(f: dataclasses.Field, text: str):
    """The form's text → the value the engine validates (bad text stays bad, to be reported)."""
    from engine.service import parse_value
    default = _default(f)
    if f.metadata.get("kind") == "modules":
        t = text.strip()
        if t.startswith("[") or "," in t:
            return [p.strip().strip("'\"") for p in t.strip("[]").split(",") if p.strip()]
        return t
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return parse_value(text.strip()) if text.strip() else text
    return text


def uses_select(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("choices")) or isinstance(_default(f), bool)


class FieldRow(Widget):
    """key | input, then the seed's help and allowed range (or the validation error) below."""


    def __init__(self, section: str, key: str, f: dataclasses.Field, value) -> None:
        super().__init__(id=f"row-{section}-{key}")
        self.section, self.key, self.field, self.value = section, key, f, value
        self._error: str | None = None

    def compose(self) -> ComposeResult:
        f, wid = self.field, f"in-{self.section}-{self.key}"
        yield Label(self.key, classes="name")
        if uses_select(f):
            choices = f.metadata.get("choices") or [True, False]
            opts = [(str(c).lower() if isinstance(c, bool) else str(c), c) for c in choices]
            value = self.value if self.value in choices else _default(f)
            self.input = Select(opts, value=value, allow_blank=False, compact=True, id=wid)
        else:
            self.input = Input(" | ".join(self.value) if isinstance(self.value, list)
                               and self.field.metadata.get("kind") == "prompts" else to_text(self.value), compact=True, id=wid, select_on_focus=False)
        yield self.input
        self.help = Static(self._help_text(), classes="help")
        yield self.help

    def _help_text(self) -> Text:
        f = self.field
        t = Text()
        if self._error:
            t.append("✖ ", style="bold $error")
            t.append(clean(self._error), style="bold $error")
            t.append("\n")
        t.append(clean(f.metadata.get("help", "")))
        allowed = allowed_text(f)
        if allowed and not uses_select(f):
            t.append(f"  ({allowed})", style="italic")
        return t

    def on_descendant_focus(self) -> None:
        self.add_class("-focused")          # its help shows (the CSS), the others' stays hidden

    def on_descendant_blur(self) -> None:
        self.remove_class("-focused")

    def current(self):
        w = self.input
        if isinstance(w, Select):
            return w.value
        return from_text(self.field, w.value)

    def set_error(self, message: str | None) -> None:
        if message == self._error:
            return
        self._error = message
        self.set_class(bool(message), "-invalid")
        self.help.update(self._help_text())


class ConfigScreen(Screen):
    AUTO_FOCUS = ""          # nothing focused at first: "/" finds a field (in a field it is text)
    BINDINGS = [Binding("ctrl+o", "app.load_config", "Load", id="load-config", show=False,
                        tooltip="Load a TOML config file"),
                Binding("ctrl+s", "app.save_config", "Save", id="save-config-here",
                        tooltip="Save the config as TOML (an existing file keeps its comments)"),
                Binding("/", "find", "Find", id="find-field",
                        tooltip="Jump to a field by name (type part of it, enter)"),
                Binding("ctrl+f", "find", "Find field", id="find-field-any", show=False, priority=True,
                        tooltip="Jump to a field by name (type part of it, enter)"),
                Binding("escape", "close_find", "Close find", id="close-find", show=False)]

    form_ready = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="banner")
        yield Input(placeholder="find a field: part of its name (enter jumps, esc closes)",
                    id="field-filter", compact=True)
        yield VerticalScroll(id="form")
        yield Static(id="derived")
        yield Footer(compact=True)

    def _section_widgets(self, section: str, items) -> list:
        from engine.service import SECTION_TITLES
        data = self.app.form_data
        out = [Static(SECTION_TITLES.get(section, section), classes="section", id=f"section-{section}")]
        for key, f in items:
            if not f.metadata.get("form", True):        # TOML-only keys ([[data.sources]]): kept as loaded
                continue
            out.append(FieldRow(section, key, f, data.get(section, {}).get(key, _default(f))))
        return out

    def on_mount(self) -> None:
        self.sub_title = "Config"
        self.rebuild()

    # ---- jump to a field --------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "close_find":
            return self.query_one("#field-filter").has_class("-open")
        return True

    def action_find(self) -> None:
        box = self.query_one("#field-filter", Input)
        box.add_class("-open")
        box.focus()

    def action_close_find(self) -> None:
        box = self.query_one("#field-filter", Input)
        box.value = ""
        box.remove_class("-open")
        self._filter("")

    def matches(self, text: str) -> list[FieldRow]:
        t = text.strip().lower()
        return [r for r in self.rows() if t in f"{r.section}.{r.key}"]

    def _filter(self, text: str) -> None:
        shown = set(map(id, self.matches(text))) if text.strip() else None
        sections = set()
        for r in self.rows():
            r.display = shown is None or id(r) in shown
            if r.display:
                sections.add(r.section)
        for sec in self.query(".section"):
            sec.display = shown is None or sec.id.removeprefix("section-") in sections

    @on(Input.Changed, "#field-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._filter(event.value)

    @on(Input.Submitted, "#field-filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        found = self.matches(event.value)
        if not found:
            self.notify(f"No field matches {one_line(event.value, 40)!r}.", markup=False)
            return
        self.jump_to(found[0].section, found[0].key)

    def jump_to(self, section: str, key: str) -> None:
        """Focus the field ``section.key`` (the finder's enter, the palette's field commands)."""
        box = self.query_one("#field-filter", Input)
        box.value = ""
        box.remove_class("-open")
        self._filter("")
        for r in self.rows():
            if (r.section, r.key) == (section, key):
                r.input.focus(scroll_visible=False)
                # once the rows the filter hid are laid out again: the field at the top
                self.set_timer(0.05, lambda: self.query_one("#form", VerticalScroll)
                               .scroll_to_widget(r, animate=False, top=True))
                return

    def rebuild(self) -> None:
        """(Re)build the form from ``app.form_data`` (at mount, and after a config was loaded)."""
        self._generation = self.app.config_generation
        self._estimate_key = None
        self.run_worker(self.build_form(), group="build-form", exclusive=True)

    async def build_form(self) -> None:
        """Mount the form a section at a time, so the screen shows (and answers keys) at once."""
        from engine.service import field_specs
        self.form_ready = False
        self._rows = None
        form = self.query_one("#form", VerticalScroll)
        await form.remove_children()
        self._validate()                     # the loaded values themselves (no rows yet)
        for section, items in field_specs().items():
            await form.mount_all(self._section_widgets(section, items))
            await asyncio.sleep(0)           # let input and painting in between sections
        self._rows = None
        self.form_ready = True
        self._validate()

    def on_screen_resume(self) -> None:
        if getattr(self, "_generation", None) != self.app.config_generation:
            self.rebuild()                # a config was loaded on another screen
        self._show_banner()

    _rows: list | None = None
    _validate_pending = False

    def rows(self) -> list[FieldRow]:
        """The composed rows (a row still being mounted has no input yet: its value is the
        loaded one in ``app.form_data``)."""
        if self._rows is None or not self.form_ready:
            rows = list(self.query(FieldRow))
            ready = [r for r in rows if hasattr(r, "input")]
            self._rows = ready if len(ready) == len(rows) else None
            return ready
        return self._rows

    def form_dict(self) -> dict:
        out = copy.deepcopy(self.app.form_data)
        if not self.form_ready:
            return out          # a half-built form holds no edits: the loaded values stand
        for row in self.rows():
            out.setdefault(row.section, {})[row.key] = row.current()
        return out

    @on(Input.Changed)
    @on(Select.Changed)
    def _changed(self, event) -> None:
        event.stop()
        if not self.form_ready:
            return       # a row being mounted reports its initial value: not an edit
        if not self._validate_pending:      # one validation per burst of changes
            self._validate_pending = True
            self.call_after_refresh(self._validate)

    _data: dict = {}
    problems: list = []

    def _validate(self) -> None:
        self._validate_pending = False
        self._data = self.form_dict()
        cfg, problems = self.app.validated_config(self._data)
        self.problems = problems
        self.post_message(FormEdited(self._data, cfg, problems))
        by_field: dict[str, list[str]] = {}
        for p in problems:
            got = p.value if isinstance(p.value, str) else repr(p.value)
            by_field.setdefault(p.field, []).append(f"{p.message} (got: {one_line(got, 60)})")
        for row in self.rows():
            msgs = by_field.get(f"{row.section}.{row.key}")
            row.set_error("; ".join(msgs) if msgs else None)
        self._show_banner()
        self._show_derived(cfg)

    def _show_banner(self) -> None:
        """``file PATH   ✔ valid`` (the path shortened in the middle to fit its row, its end kept),
        or ``✖ N problems:`` and the first problem on the rows below, cut at its end (never mid-path
        or mid-sentence by the banner's height)."""
        from tui.widgets.pairs import Pairs
        app = self.app
        n = len(self.problems)
        if n:
            from engine.service import plural
            status = Text(f"✖ {plural(n, 'problem')}:", style="bold $error")
        else:
            status = Text("✔ valid", style="bold $success")
        path = str(app.config_path) if app.config_path else ""

        def first_row(width: int) -> Text:
            t = Text("file ", style="dim")
            room = max(8, width - len(t) - 3 - status.cell_len)
            t.append_text(literal(middle(path, room)) if path else
                          Text(one_line("(demo defaults, not saved: ctrl+s)", room)))
            return t + Text("   ") + status
        out = Pairs().line(first_row)
        if n:
            p = self.problems[0]
            out.line(lambda width: Text(one_line(f"{p.field}: {p.message}", max(20, 2 * width - 8))))
        self.query_one("#banner", Static).update(out)

    def _show_derived(self, cfg) -> None:
        data = self._data
        bad = {p.field for p in self.problems}      # an invalid input computes nothing
        data = {sec: {k: (None if f"{sec}.{k}" in bad else v) for k, v in vals.items()}
                for sec, vals in data.items() if isinstance(vals, dict)}
        t = Text()
        tr, lora, dist = data.get("train", {}), data.get("lora", {}), data.get("distributed", {})
        b, a, g = tr.get("batch_size"), tr.get("grad_accum"), dist.get("gpus")
        t.append("effective batch ", style="dim")
        n = dist.get("nodes", 1)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in (b, a, g, n)):
            from engine.service import effective_batch
            t.append(f"{b} × {a}" + (f" × {g} GPUs" if g != 1 else "") + (f" × {n} nodes" if n != 1 else "")
                     + f" = {effective_batch(b, a, g * n)}",
                     style="bold")
        else:
            t.append("?", style="bold")
        r, alpha = lora.get("r"), lora.get("alpha")
        t.append("   alpha/r ", style="dim")
        if isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r:
            t.append(f"{alpha:g}/{r:g} = {alpha / r:.2f}", style="bold")
            if lora.get("use_rslora") is True:
                t.append(f" (rsLoRA: alpha/√r = {alpha / r ** 0.5:.2f})", style="dim")
        else:
            t.append("?", style="bold")
        t.append("\n")
        t.append_text(self._estimate_text)
        self.query_one("#derived", Static).update(t)
        if cfg is not None:
            key = (cfg.model.name, repr(cfg.to_dict()["lora"]), repr(cfg.to_dict()["quant"]),
                   cfg.data.max_length, repr(cfg.to_dict()["train"]), repr(cfg.to_dict()["galore"]))
            if key != getattr(self, "_estimate_key", None):
                self._estimate_key = key
                self._estimate_text = Text("trainable params: estimating…", style="dim")
                self.set_timer(0.4, lambda c=cfg, k=key: self._maybe_estimate(c, k))

    _estimate_text = Text("trainable params: known once the config is valid", style="dim")

    def _maybe_estimate(self, cfg, key) -> None:
        if key == getattr(self, "_estimate_key", None):   # debounced: only the latest edit
            self._estimate(cfg)

    @work(thread=True, exclusive=True, group="estimate", exit_on_error=False)
    def _estimate(self, cfg) -> None:
        from engine import service
        try:
            verdict = service.plan(cfg)               # the run's own budget and planner
        except ImportError:
            self.post_message(EstimateReady("trainable params: (engine.planning.estimate not installed)", None))
            return
        except Exception as ex:
            self.post_message(EstimateReady(f"estimate unavailable: {one_line(ex, 100)}", None))
            return
        e = verdict.estimate
        fits = {True: "fits", False: "does NOT fit", None: ""}.get(e.fits, "")
        peak = (f"{e.peak_bytes / GIB:.1f} GiB" if e.peak_bytes >= GIB / 10
                else f"{e.peak_bytes / 1024 ** 2:.0f} MiB")
        text = (f"{cfg.train.method}: trainable params {e.trainable_params:,}   peak VRAM ≈ {peak}"
                + (f" ({fits} the GPU)" if fits else ""))
        try:             # the fit planner's choice and why, the fast paths checked on this GPU
            text += "".join("\n" + line for line in verdict.summary_lines())
        except Exception as ex:
            text += f"\nplanner unavailable: {one_line(ex, 100)}"
        try:                                   # time to train (engine.planning.timing)
            text += "\n" + service.time_line(cfg, verdict.model_config)
        except Exception as ex:
            text += f"\ntime to train unavailable: {one_line(ex, 100)}"
        self.post_message(EstimateReady(text, e.trainable_params))

    @on(EstimateReady)
    def _on_estimate(self, msg: EstimateReady) -> None:
        self._estimate_text = Text(msg.text, style="" if msg.trainable is not None else "dim")
        self._show_derived(None)
