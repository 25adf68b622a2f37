"""The qlora-tui Textual app: four screens (modes) over one config and at most one followed run.

The followed run (launch, resume, follow, detach, stop, its state) belongs to
``tui.controller.RunController``; the app forwards the run's messages to it and the requests
that the screens post (``AttachRun``, ``ResumeRun``, ``FormEdited``...) to their owner. The
Train screen polls NVML in its own worker. Only messages cross into the UI thread; widgets
are touched there only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from textual import on
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import ModalScreen, Screen
from textual.widgets import Static
from textual.worker import Worker, WorkerState

from engine.models.builtin import DEMO_OVERRIDES, demo_config  # noqa: F401 (the offline demo)
from themes.qlora import DEFAULT_THEME, THEMES
from tui import settings
from tui.controller import RunController
from tui.dialogs import PathPrompt, QuitDialog
from tui.messages import FollowEnded, LaunchFailed, ResumeFailed, RunEvents, RunLaunched
from tui.runstate import RunState
from tui.safe import one_line
from tui.style import rich_theme
from tui.screens.chat import ChatScreen
from tui.screens.config import ConfigScreen, FormEdited, LoadConfig
from tui.screens.dataset import DatasetScreen
from tui.screens.runs import (AttachRun, ChatWith, CompareRuns, ExportRun, OpenRun, PreferenceTune, ResumeRun,
                              RunAction, RUN_ACTIONS, RunDetailScreen, RunsScreen)
from tui.screens.train import TrainScreen

# `qlora-tui` with no argument: the fast offline demo (same values as examples/demo.toml)

SCREEN_KEYS = [("dataset", "f2", "Dataset"), ("config", "f3", "Config"), ("train", "f4", "Train"),
               ("runs", "f5", "Runs"), ("chat", "f6", "Chat")]


class QloraApp(App):
    TITLE = "qlora-tui"
    CSS_PATH = "app.tcss"
    MODES = {"dataset": DatasetScreen, "config": ConfigScreen, "train": TrainScreen,
             "runs": RunsScreen, "chat": ChatScreen}
    BINDINGS = [
        Binding("f2", "show('dataset')", "Dataset", id="show-dataset",
                tooltip="Dataset: detected format, problems, token lengths, row browser"),
        Binding("f3", "show('config')", "Config", id="show-config",
                tooltip="Config: every field with help, range and live validation"),
        Binding("f4", "show('train')", "Train", id="show-train",
                tooltip="Train: progress, loss curves, GPU gauges, hints"),
        Binding("f5", "show('runs')", "Runs", id="show-runs", tooltip="Runs: past and live runs"),
        Binding("f6", "show('chat')", "Chat", id="show-chat",
                tooltip="Chat: talk to a finished run (base or fine-tuned), token by token"),
        Binding("ctrl+r", "start_training", "Start", id="start-training", priority=True,
                tooltip="Start training with the current config"),
        Binding("ctrl+x", "stop_training", "Stop", id="stop-training", priority=True,
                tooltip="Stop the live run gracefully (the adapter is saved)"),
        Binding("ctrl+d", "detach_run", "Detach", id="detach-run", priority=True,
                tooltip="Stop following the live run; it keeps training"),
        Binding("ctrl+s", "save_config", "Save", id="save-config", show=False,
                tooltip="Save the config as TOML"),    # shown in the Config screen's footer
        Binding("ctrl+q", "quit", "Quit", id="quit", priority=True,
                tooltip="Quit (asks first while a run is live)"),
        Binding("ctrl+o", "load_config", "Load", id="load-config-any", show=False,
                tooltip="Load a TOML config file"),
    ]
    # palette titles of the app's bindings (any binding without one is listed by its description)
    PALETTE = {"start-training": ("Start training", "Start a run with the current config"),
               "stop-training": ("Stop training", "Graceful stop; the adapter is saved"),
               "detach-run": ("Detach from run", "Stop following; the run keeps training"),
               "save-config": ("Save config", "Write the config as TOML"),
               "load-config-any": ("Load config", "Read a TOML config file into the form")}

    def __init__(self, config=None, config_path: str | Path | None = None, *,
                 attach: str | Path | None = None, start_mode: str = "train",
                 samplers=None, readings_interval: float = 1.0) -> None:
        from engine.models.consent import require_consent
        require_consent()     # a model's own code runs only after a yes in this app
        self.config = config if config is not None else demo_config()
        self.config_path = Path(config_path) if config_path else None
        self.form_data: dict = self.config.to_dict()
        self.form_problems: list = []
        self.start_mode = "train" if attach else start_mode
        self.attach_dir = Path(attach) if attach else None
        self.readings_interval = readings_interval
        self.exit_note = ""
        self._samplers = samplers
        super().__init__()
        self.controller = RunController(self, changed=self._render_run)
        for theme in THEMES:
            self.register_theme(theme)
        wanted = settings.load().get("theme", DEFAULT_THEME)
        self.theme = wanted if wanted in self.available_themes else DEFAULT_THEME

    # ---- start-up ------------------------------------------------------------------------
    def on_mount(self) -> None:
        self._install_styles()
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        self.switch_mode(self.start_mode)
        if self.attach_dir is not None:
            self.controller.follow(self.attach_dir)

    def _install_styles(self) -> None:
        """The Rich Text styles (``"bold $error"``...) in the current theme's colours."""
        if getattr(self, "_styles_installed", False):
            self.console.pop_theme()
        self.console.push_theme(rich_theme(self.get_css_variables()))
        self._styles_installed = True

    def _theme_changed(self, theme) -> None:
        settings.update(theme=theme.name)
        self._install_styles()
        # text already drawn takes the new colours, on every screen of every mode (Textual
        # keeps them in _screen_stacks; screen_stack is the current mode's alone)
        stacks = getattr(self, "_screen_stacks", {}).values() or [self.screen_stack]
        for screen in {id(s): s for stack in stacks for s in stack}.values():
            for static in screen.query(Static):
                static.update(static.content)

    def make_samplers(self):
        """(gpu_sampler, host_sampler, reason): called on the readings thread."""
        if self._samplers is not None:
            return self._samplers
        try:
            from engine.training.gpu import GpuSampler, HostSampler
        except ImportError as e:
            return None, None, f"engine.training.gpu unavailable: {e}"
        gpu = GpuSampler()
        return gpu, HostSampler(), gpu.reason

    # ---- config --------------------------------------------------------------------------
    def validated_config(self, data: dict | None = None):
        """(Config, []) from the form's values (``data``, by default the last ones), or
        (None, problems)."""
        from engine.core import config as config_mod
        try:
            return config_mod.from_dict(self.form_data if data is None else data,
                                        source=self.config.source), []
        except config_mod.ConfigError as e:
            return None, e.problems

    def runs_dir(self) -> Path:
        cfg = self.config
        return Path(cfg.resolve_path(cfg.output.dir)).expanduser()

    config_generation = 0        # bumped by every load: the Config screen rebuilds its form

    def set_config(self, cfg, path: str | Path | None) -> None:
        self.config = cfg
        self.config_path = Path(path) if path else self.config_path
        self.form_data = cfg.to_dict()
        self.form_problems = []
        self.config_generation += 1

    def action_load_config(self) -> None:
        """ctrl+o from any screen: a path prompt, then the file replaces the form."""
        if isinstance(self.screen, ModalScreen):
            return

        def done(path: str | None) -> None:
            if path:
                self.call_later(self.load_config_file, path)
        self.push_screen(PathPrompt("Load config (TOML)", str(self.config_path or "")), done)

    def load_config_file(self, path: str) -> bool:
        from engine.core import config as config_mod
        try:
            cfg = config_mod.load(path)
        except config_mod.ConfigError as e:
            self.notify(one_line(e.one_line(), 400), title="Cannot load", severity="error",
                        markup=False, timeout=10)
            return False
        self.set_config(cfg, path)
        if isinstance(self.screen, ConfigScreen):
            self.screen.rebuild()
        self.notify(f"Loaded {path}", markup=False)
        return True
    # ---- actions -------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """The footer fits 80 columns by showing what applies now: no key for the screen you
        are on, Start while no run is live, Stop and Detach while one is. (A hidden key does
        nothing there anyway; the palette lists every action.)"""
        if action == "show" and parameters and parameters[0] == self.current_mode:
            return False
        live = self.controller.live
        if action == "start_training":
            return not live and self.current_mode not in ("runs", "chat")   # Runs: its footer has Resume
        if action in ("stop_training", "detach_run"):
            return live
        return True

    def action_show(self, mode: str) -> None:
        if self.current_mode != mode:
            self.switch_mode(mode)

    def action_start_training(self) -> None:
        if isinstance(self.screen, ModalScreen):
            return                        # a dialog is open: it is answered first
        if self.controller.busy():
            return
        cfg, problems = self.validated_config()
        if cfg is None:
            from engine.core.config import plural
            self.notify(f"Fix the config first: {plural(len(problems), 'problem')}, e.g. "
                        f"{one_line(problems[0], 120)}", severity="error", markup=False)
            self.action_show("config")
            return
        self.config = cfg
        self.controller.start(cfg)

    # ---- the run: the controller owns it, the app forwards its messages ------------------------
    @property
    def run_state(self) -> RunState | None:
        """The followed run's state (read-only: the controller owns it)."""
        return self.controller.state

    @on(RunLaunched)
    def _on_launched(self, msg: RunLaunched) -> None:
        self.controller.launched(msg)

    @on(LaunchFailed)
    def _on_launch_failed(self, msg: LaunchFailed) -> None:
        self.controller.launch_failed(msg)

    @on(ResumeFailed)
    def _on_resume_failed(self, msg: ResumeFailed) -> None:
        self.controller.resume_failed(msg)

    @on(RunEvents)
    def _on_run_events(self, msg: RunEvents) -> None:
        self.controller.events(msg)

    @on(FollowEnded)
    def _on_follow_ended(self, msg: FollowEnded) -> None:
        self.controller.follow_ended(msg)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one place a background task that raised is reported (one line, no traceback);
        a follow worker that died also ends the following of its run."""
        worker = event.worker
        if event.state != WorkerState.ERROR:
            return
        if worker.group == "follow":
            self.controller.follow_failed(worker.error)
        elif worker.group == "launch":
            self.controller.launch_failed(LaunchFailed(f"{type(worker.error).__name__}: {worker.error}"))
            return
        self.notify(one_line(f"{worker.name or worker.group}: {type(worker.error).__name__}: "
                             f"{worker.error}", 300), title="Background task failed",
                    severity="error", markup=False, timeout=10)

    def action_stop_training(self) -> None:
        self.controller.stop()

    def action_detach_run(self) -> None:
        self.controller.detach()

    def action_save_config(self) -> None:
        cfg, problems = self.validated_config()
        if cfg is None:
            from engine.core.config import plural
            where = "" if self.current_mode == "config" else "; see the Config screen (F3)"
            self.notify(f"Not saved: {plural(len(problems), 'config problem')}{where}: "
                        f"{one_line(problems[0], 120)}", severity="error", markup=False)
            return
        if self.config_path is None:
            def done(path: str | None) -> None:
                if path:
                    self._save_to(cfg, Path(path))
            self.push_screen(PathPrompt("Save config as", "qlora.toml"), done)
        else:
            self._save_to(cfg, self.config_path)

    def _save_to(self, cfg, path: Path) -> None:
        from engine.core import config as config_mod
        try:
            config_mod.save(cfg, path)
        except OSError as e:
            self.notify(f"Cannot save {path}: {e}", severity="error", markup=False)
            return
        self.config, self.config_path = cfg, path
        self.notify(f"Saved {path}", markup=False)

    async def action_quit(self) -> None:
        st = self.run_state
        if st is None or not st.live:
            self.exit()
            return

        def chosen(what: str | None) -> None:
            note = self.controller.quit_choice(what)
            if note is not None:
                self.exit_note = note
                self.exit()
        self.push_screen(QuitDialog(st.run_dir.name), chosen)

    def _render_run(self) -> None:
        self.refresh_bindings()          # Start / Stop / Detach follow the run's state
        screen = self.screen
        if isinstance(screen, TrainScreen):
            screen.render_run(self.run_state)

    # ---- requests posted by the screens ----------------------------------------------------
    @on(AttachRun)
    def _on_attach(self, msg: AttachRun) -> None:
        if isinstance(self.screen, RunDetailScreen):
            self.pop_screen()
        if self.controller.attach(msg.run_dir):
            self.action_show("train")

    @on(ResumeRun)
    def _on_resume(self, msg: ResumeRun) -> None:
        self.controller.offer_resume_of(msg.run_dir)

    @on(ExportRun)
    def _on_export(self, msg: ExportRun) -> None:
        from tui.screens.export import ExportScreen
        self.push_screen(ExportScreen(msg.run_dir))

    @on(PreferenceTune)
    def _on_preference_tune(self, msg: PreferenceTune) -> None:
        from engine.core.config import ConfigError
        from engine.training.preference import continue_config
        try:
            cfg = continue_config(msg.run_dir, self.config)
        except (ValueError, ConfigError) as e:
            self.notify(one_line(str(e), 300), severity="error", markup=False)
            return
        if isinstance(self.screen, RunDetailScreen):
            self.pop_screen()
        self.set_config(cfg, None)
        self.action_show("config")
        self.notify("train.method = dpo continuing this run's adapter (model.adapter); point data.train at "
                    "preference pairs (prompt/chosen/rejected)", markup=False)

    @on(ChatWith)
    def _on_chat_with(self, msg: ChatWith) -> None:
        if isinstance(self.screen, ModalScreen) or isinstance(self.screen, RunDetailScreen):
            self.pop_screen()
        self.action_show("chat")
        self.call_after_refresh(lambda: self.screen.open(msg.src)
                                if isinstance(self.screen, ChatScreen) else None)

    @on(CompareRuns)
    def _on_compare_runs(self, msg: CompareRuns) -> None:
        from tui.screens.compare import CompareRunsScreen
        self.push_screen(CompareRunsScreen(msg.run_dirs))

    @on(RunAction)
    def _on_run_action(self, msg: RunAction) -> None:
        from tui.screens.actions import ACTION_SCREENS
        self.push_screen(ACTION_SCREENS[msg.action](msg.run_dir))

    @on(OpenRun)
    def _on_open(self, msg: OpenRun) -> None:
        self.push_screen(RunDetailScreen(msg.run_dir))

    @on(FormEdited)
    def _on_form_edited(self, msg: FormEdited) -> None:
        self.form_data, self.form_problems = msg.data, msg.problems
        if msg.config is not None:
            self.config = msg.config

    @on(LoadConfig)
    def _on_load_config(self, msg: LoadConfig) -> None:
        self.load_config_file(msg.path)

    def action_run_on_selected(self, action: str) -> None:
        """The palette's run actions from any screen: on the Runs screen, for the selected run."""
        self.action_show("runs")
        self.call_after_refresh(lambda: getattr(self.screen, "action_run_action", lambda a: None)(action))

    # ---- command palette -----------------------------------------------------------------
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Every binding is a command: the app's (any screen) and the current screen's."""
        for mode, key, title in SCREEN_KEYS:
            yield SystemCommand(f"{title} screen ({key.upper()})", f"Show the {title} screen",
                                lambda m=mode: self.action_show(m))
        shown = {b.action for b in self.BINDINGS if b.action.startswith("show(")} | {"quit"}
        for b in self.BINDINGS:
            if b.action in shown:
                continue          # the screens above; Quit is Textual's own command
            title, help_ = self.PALETTE.get(b.id, (b.description, b.tooltip or b.description))
            yield SystemCommand(f"{title} ({b.key})", help_,
                                lambda a=b.action: self.call_later(self.run_action, a))
        own = {b.key for b in self.BINDINGS}
        titles = {f"run-{action}": (title, help_) for _, action, _, title, help_ in RUN_ACTIONS}
        for b in getattr(screen, "BINDINGS", []):
            if isinstance(b, Binding) and b.description and b.key not in own:
                title, help_ = titles.get(b.id, (b.description, b.tooltip or
                                                 f"{b.description} ({screen.sub_title} screen)"))
                yield SystemCommand(f"{title} ({b.key.split(',')[0]})", help_,
                                    lambda a=b.action, s=screen: self.call_later(s.run_action, a))
        if not any(b.id in titles for b in getattr(screen, "BINDINGS", []) if isinstance(b, Binding)):
            for key, action, _, title, help_ in RUN_ACTIONS:
                yield SystemCommand(f"{title} (Runs: {key})", f"{help_}; for the run selected on Runs",
                                    lambda a=action: self.action_run_on_selected(a))
        if isinstance(screen, ConfigScreen):        # jump to any field by name
            from engine.core.config import field_specs
            for section, items in field_specs().items():
                for key, f in items:
                    if not f.metadata.get("form", True):        # TOML-only: no field to jump to
                        continue
                    yield SystemCommand(f"Field {section}.{key}", one_line(f.metadata.get("help", ""), 120),
                                        lambda s=section, k=key: screen.jump_to(s, k))
        yield from super().get_system_commands(screen)

