"""The qlora-tui Textual app: four screens (modes) over one config and at most one followed run.

Threads: a launch worker calls ``engine.training.runner.start_detached``; a follow worker polls the
run's events.jsonl (``EventLog.read_new``) and posts batches (≤1/s) as ``RunEvents``; the Train
screen polls NVML in its own worker. Only messages cross into the UI thread; widgets are touched
there only.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Iterable

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import ModalScreen, Screen
from textual.worker import get_current_worker

from engine.core import events
from engine.training.builtin import DEMO_OVERRIDES, demo_config  # noqa: F401 (the offline demo)
from themes.qlora import DEFAULT_THEME, THEMES
from tui import settings
from tui.dialogs import PathPrompt, QuitDialog, RemoteCodeDialog, ResumeFixDialog
from tui.follow import follow_batches
from tui.messages import FollowEnded, LaunchFailed, ResumeFailed, RunEvents, RunLaunched
from tui.runstate import RunState
from tui.safe import one_line
from tui.screens.config import ConfigScreen
from tui.screens.dataset import DatasetScreen
from tui.screens.runs import RunsScreen
from tui.screens.train import TrainScreen

# `qlora-tui` with no argument: the fast offline demo (same values as examples/demo.toml)


# A live run redraws at most once a second while its steps come faster (a step after a pause
# shows at once): a run on the same CPU cores must not pay for the UI (bench/tui_overhead.py
# measures it; 4 Hz cost a CPU-bound run 12 % of its tokens/s), and a loss curve needs no more.
FOLLOW_INTERVAL = 1.0

SCREEN_KEYS = [("dataset", "f2", "Dataset"), ("config", "f3", "Config"), ("train", "f4", "Train"),
               ("runs", "f5", "Runs")]


class QloraApp(App):
    TITLE = "qlora-tui"
    CSS = """
    Screen { background: $background; }
    ModalScreen { background: $background 60%; }   /* dialogs: the screen stays visible, dimmed */
    /* parts drawn in colour alone must survive 16 colours and the light theme: the empty part
       of a progress bar and the header differ from the background by more than a shade */
    Bar > .bar--bar, Bar > .bar--complete, Bar > .bar--indeterminate { background: $foreground 30%; }
    Header { background: $primary 50%; }
    """
    MODES = {"dataset": DatasetScreen, "config": ConfigScreen, "train": TrainScreen,
             "runs": RunsScreen}
    BINDINGS = [
        Binding("f2", "show('dataset')", "Dataset", id="show-dataset",
                tooltip="Dataset: detected format, problems, token lengths, row browser"),
        Binding("f3", "show('config')", "Config", id="show-config",
                tooltip="Config: every field with help, range and live validation"),
        Binding("f4", "show('train')", "Train", id="show-train",
                tooltip="Train: progress, loss curves, GPU gauges, hints"),
        Binding("f5", "show('runs')", "Runs", id="show-runs", tooltip="Runs: past and live runs"),
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
        from engine.training import model as model_mod
        model_mod.require_consent()     # a model's own code runs only after a yes in this app
        self.config = config if config is not None else demo_config()
        self.config_path = Path(config_path) if config_path else None
        self.form_data: dict = self.config.to_dict()
        self.form_problems: list = []
        self.run_state: RunState | None = None
        self.start_mode = "train" if attach else start_mode
        self.attach_dir = Path(attach) if attach else None
        self.readings_interval = readings_interval
        self.exit_note = ""
        self._samplers = samplers
        self._follow_stop: threading.Event | None = None
        self._launching = False
        self._follow_started = 0.0
        self._news_since = 0.0            # events older than this are history, not news
        super().__init__()
        for theme in THEMES:
            self.register_theme(theme)
        wanted = settings.load().get("theme", DEFAULT_THEME)
        self.theme = wanted if wanted in self.available_themes else DEFAULT_THEME

    # ---- start-up ------------------------------------------------------------------------
    def on_mount(self) -> None:
        self.theme_changed_signal.subscribe(self, self._remember_theme)
        self.switch_mode(self.start_mode)
        if self.attach_dir is not None:
            self.follow_run(self.attach_dir)

    def _remember_theme(self, theme) -> None:
        settings.update(theme=theme.name)

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
    def validated_config(self):
        """(Config, []) from the form, or (None, problems)."""
        from engine.core import config as config_mod
        try:
            return config_mod.from_dict(self.form_data, source=self.config.source), []
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
        st = self.run_state
        live = self._launching or (st is not None and st.live)
        if action == "start_training":
            return not live and self.current_mode != "runs"    # Runs: its footer has Resume
        if action in ("stop_training", "detach_run"):
            return live
        return True

    def action_show(self, mode: str) -> None:
        if self.current_mode != mode:
            self.switch_mode(mode)

    def action_start_training(self) -> None:
        if isinstance(self.screen, ModalScreen):
            return                        # a dialog is open: it is answered first
        st = self.run_state
        if self._launching or (st is not None and st.live):
            self.notify("A run is already live: stop it (ctrl+x) or detach (ctrl+d) first.",
                        severity="warning", markup=False)
            return
        cfg, problems = self.validated_config()
        if cfg is None:
            from engine.core.config import plural
            self.notify(f"Fix the config first: {plural(len(problems), 'problem')}, e.g. "
                        f"{one_line(problems[0], 120)}", severity="error", markup=False)
            self.action_show("config")
            return
        self.config = cfg
        from engine.training import runner
        if runner.needs_remote_code_confirmation(cfg):
            def answered(yes: bool | None) -> None:
                if yes:
                    from engine.training import model as model_mod
                    model_mod.grant_remote_code(cfg)
                    self._begin_launch(cfg)
                else:
                    self.notify("Not started: the model's own code was not allowed to run.",
                                markup=False)
            self.push_screen(RemoteCodeDialog(cfg.model.name), answered)
            return
        self._begin_launch(cfg)

    def _begin_launch(self, cfg) -> None:
        st = self.run_state
        if self._launching or (st is not None and st.live):
            return
        self._launching = True
        self.run_state = RunState(phase="launching", message="creating the run directory…")
        self.action_show("train")
        self._render_run()
        self._launch(cfg)

    @work(thread=True, exclusive=True, group="launch", exit_on_error=False)
    def _launch(self, cfg) -> None:
        try:
            from engine.training import runner
            run_dir = runner.start_detached(cfg)
        except Exception as e:   # config, data or permission problems: shown, not raised
            self.post_message(LaunchFailed(f"{type(e).__name__}: {e}"))
            return
        self.post_message(RunLaunched(Path(run_dir)))

    @work(thread=True, exclusive=True, group="launch", exit_on_error=False)
    def _resume(self, run_dir: Path, fixes: list[str]) -> None:
        from engine.core import rundir
        from engine.training import runner
        # the failed process wrote its last event and is still exiting (torch teardown): a
        # resume while it is alive would be refused as "still live", so let it go first
        deadline = time.monotonic() + 60
        while rundir.process_alive(run_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        since = time.time()
        try:
            old_size = os.stat(run_dir / rundir.EVENTS).st_size
        except OSError:
            old_size = 0
        try:
            runner.start_detached(None, resume=run_dir, overrides=fixes)
        except Exception as e:   # PreflightError, ConfigError, OSError: one line, no traceback
            self.post_message(ResumeFailed(run_dir, f"{type(e).__name__}: {e}"))
            return
        self.post_message(RunLaunched(run_dir, resumed=True, old_size=old_size, since=since))

    @on(RunLaunched)
    def _on_launched(self, msg: RunLaunched) -> None:
        self._launching = False
        self.follow_run(msg.run_dir, launched=True, resume=msg if msg.resumed else None)
        what = "Run resumed" if msg.resumed else "Run started"
        self.notify(f"{what}: {msg.run_dir}", markup=False, timeout=4)

    @on(ResumeFailed)
    def _on_resume_failed(self, msg: ResumeFailed) -> None:
        self._launching = False
        st = self.run_state
        if st is not None and st.run_dir == msg.run_dir:
            if not st.ended:
                st.apply(events.RunFailed(reason=msg.error, step=st.step))
            st.phase, st.message = "failed", msg.error
            st.follower_ended = True
        self._render_run()
        self.notify(one_line(msg.error, 300), title="Could not resume", severity="error",
                    markup=False, timeout=10)

    # ---- failed run → resume with the fix ------------------------------------------------
    FAILED_WHAT = {"oom": "Out of memory", "nan": "Loss became NaN"}

    def resume_fixes(self, st: RunState) -> tuple[list[str], str]:
        """The overrides that answer ``st``'s failure, as its hint named them, and what failed.
        OOM and NaN only; any other end (stopped, crashed, other failure) resumes unchanged."""
        from engine.core import config as config_mod
        from engine.training import hints as hints_mod
        from engine.core import rundir
        kind = st.fail_kind if isinstance(st.end, events.RunFailed) else ""
        if kind not in self.FAILED_WHAT:
            return [], ("Stopped" if isinstance(st.end, events.RunFinished) else
                        "Failed" if st.ended else "Crashed")
        named = [h for h in st.hints if getattr(h, "rule", "") == kind and getattr(h, "overrides", None)]
        if named:
            return list(named[-1].overrides), self.FAILED_WHAT[kind]
        cfg = config_mod.load(st.run_dir / rundir.CONFIG)
        return hints_mod.hint_overrides(kind, cfg, st.fail_step or st.step), self.FAILED_WHAT[kind]

    def offer_resume(self, st: RunState) -> None:
        """The recovery dialog for a run that ended (failed, stopped, crashed): every fix its
        hint named, and whether it resumes from a checkpoint or restarts from step 0."""
        from engine.core import config as config_mod
        from engine.core import rundir
        from engine.training import runner
        try:
            fixes, what = self.resume_fixes(st)
            cfg = config_mod.load(st.run_dir / rundir.CONFIG)
        except (OSError, ValueError, config_mod.ConfigError) as e:
            self.notify(f"Cannot offer a resume: {one_line(e, 200)}", severity="warning",
                        markup=False)
            return
        if not fixes and st.fail_kind in self.FAILED_WHAT and isinstance(st.end, events.RunFailed):
            self.notify("No automatic fix left to try for this run's config.", markup=False)
            return
        frozen = [f for f in fixes if f.split(".", 1)[0] in runner.RESUME_FROZEN]
        fixes = [f for f in fixes if f not in frozen]
        run_dir = st.run_dir
        ckpts = rundir.checkpoints(run_dir)
        from_step = rundir.checkpoint_step(ckpts[-1]) if ckpts else 0

        def chosen(yes: bool | None) -> None:
            if not yes:
                return
            if runner.needs_remote_code_confirmation(cfg):
                def confirmed(ok: bool | None) -> None:
                    if ok:
                        from engine.training import model as model_mod
                        model_mod.grant_remote_code(cfg)
                        self.resume_run(run_dir, fixes)
                self.push_screen(RemoteCodeDialog(cfg.model.name, "Resuming this run"), confirmed)
                return
            self.resume_run(run_dir, fixes)
        self.push_screen(ResumeFixDialog(run_dir.name, what, st.finished_reason or st.message,
                                         fixes, cfg=cfg, from_step=from_step, frozen=frozen),
                         chosen)

    def resume_run(self, run_dir: Path, fixes: list[str]) -> None:
        st = self.run_state
        if self._launching or (st is not None and st.live):
            self.notify("A run is already live.", severity="warning", markup=False)
            return
        self._launching = True
        if st is not None and st.run_dir == run_dir:
            st.phase, st.message = "launching", "resuming with " + ", ".join(fixes)
        self.action_show("train")
        self._render_run()
        self._resume(Path(run_dir), list(fixes))

    @on(LaunchFailed)
    def _on_launch_failed(self, msg: LaunchFailed) -> None:
        self._launching = False
        self.run_state = RunState()
        self.run_state.apply(events.RunFailed(reason=msg.error))
        self._render_run()
        self.notify(one_line(msg.error, 300), title="Could not start", severity="error",
                    markup=False, timeout=10)

    def action_stop_training(self) -> None:
        st = self.run_state
        if st is None or st.run_dir is None or st.ended or st.follower_ended:
            self.notify("No live run to stop.", markup=False)
            return
        from engine.core import control
        try:
            control.request(st.run_dir, "stop")
        except OSError as e:
            self.notify(f"Cannot send stop: {e}", severity="error", markup=False)
            return
        st.stop_requested = True
        self._render_run()
        self.notify("Stopping: the run saves its adapter, then ends.", markup=False)

    def action_detach_run(self) -> None:
        st = self.run_state
        if st is None or not st.live:
            self.notify("No live run to detach from.", markup=False)
            return
        self._detach()
        self.notify(f"Detached: {st.run_dir.name} keeps training. Re-attach with "
                    f"`qlora-tui attach {st.run_dir}` or from Runs (F5).", markup=False, timeout=8)

    def _detach(self) -> None:
        st = self.run_state
        if self._follow_stop is not None:
            self._follow_stop.set()
        if st is not None:
            st.detached = True
        self._render_run()

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
            if what == "stop":
                from engine.core import control
                try:
                    control.request(st.run_dir, "stop")
                    self.exit_note = (f"Stop requested: {st.run_dir} saves its adapter and ends.")
                except OSError as e:
                    self.exit_note = f"Could not request a stop ({e}); the run continues."
                self._detach()
                self.exit()
            elif what == "detach":
                self._detach()
                self.exit_note = (f"Run continues in {st.run_dir}\n"
                                  f"Re-attach: qlora-tui attach {st.run_dir}")
                self.exit()
        self.push_screen(QuitDialog(st.run_dir.name), chosen)

    # ---- following a run -----------------------------------------------------------------
    def follow_run(self, run_dir: str | Path, launched: bool = False,
                   resume: RunLaunched | None = None) -> None:
        """Show ``run_dir`` on the Train screen: its history, then live events.

        ``resume``: the run was just resumed. Its process appends to events.jsonl (a
        ``Resumed`` marker first); the follower waits until it has, then reads the log from the
        start into a fresh RunState, whose fold drops what the marker says is redone.
        """
        if self._follow_stop is not None:
            self._follow_stop.set()
        run_dir = Path(run_dir)
        self.run_state = RunState(run_dir=run_dir, phase="starting" if launched else "reading",
                                  message=("resuming from the last checkpoint…" if resume else
                                           "loading torch and the model…" if launched else ""))
        self._follow_stop = threading.Event()
        self._follow_started = time.time()
        self._news_since = resume.since if resume else self._follow_started - 5
        self._follow(run_dir, self._follow_stop, launched, resume.old_size if resume else None)
        self._render_run()

    @work(thread=True, group="follow", exit_on_error=False)
    def _follow(self, run_dir: Path, stop: threading.Event, launched: bool,
                old_size: int | None = None) -> None:
        from engine.core import rundir
        worker = get_current_worker()
        t0 = time.monotonic()

        def alive() -> bool:
            if rundir.process_alive(run_dir):
                return True
            # a just-spawned run may not have written run.json yet
            return launched and not (run_dir / rundir.RUN_JSON).exists() and time.monotonic() - t0 < 120

        if old_size is not None and not _wait_for_resumed_log(run_dir / rundir.EVENTS, old_size,
                                                              alive, stop, worker):
            if not stop.is_set() and not worker.is_cancelled:
                self.post_message(ResumeFailed(run_dir, _resume_failure(run_dir)))
            return
        why = follow_batches(run_dir / rundir.EVENTS, stop,
                             lambda evs: self.post_message(RunEvents(run_dir, evs, stop)),
                             alive=alive, cancelled=lambda: worker.is_cancelled,
                             interval=FOLLOW_INTERVAL)
        self.post_message(FollowEnded(run_dir, why, stop))

    def _current_follower(self, msg) -> bool:
        """False for a message of a follower that was stopped (detach, then a re-attach to the
        same run within its last interval): it must not add its batch again or end the new one."""
        return msg.follower is None or msg.follower is self._follow_stop

    @on(RunEvents)
    def _on_run_events(self, msg: RunEvents) -> None:
        st = self.run_state
        if st is None or st.run_dir != msg.run_dir or not self._current_follower(msg):
            return
        for ev in msg.events:
            st.apply(ev)
            if isinstance(ev, events.RunWarning) and ev.time >= self._news_since:
                self.notify(one_line(ev.message, 300), title="Warning", severity="warning",
                            markup=False, timeout=8)
        last = msg.events[-1]
        if last.time < self._news_since:
            pass                                 # history (attach, or before a resume): not news
        elif isinstance(last, events.RunFinished):
            self.notify(f"Run {'stopped' if last.stopped else 'finished'}; adapter: "
                        f"{last.adapter_dir}", markup=False, timeout=6)
        elif isinstance(last, events.RunFailed):
            self.notify(one_line(last.reason, 300), title="Run failed", severity="error",
                        markup=False, timeout=10)
        self._render_run()

    @on(FollowEnded)
    def _on_follow_ended(self, msg: FollowEnded) -> None:
        st = self.run_state
        if st is None or st.run_dir != msg.run_dir or not self._current_follower(msg):
            return
        st.follower_ended = True
        if not st.ended and not st.detached:
            st.phase = "crashed"
            st.message = ("the run process ended without a final event; resume with "
                          "qlora-tui train --resume " + str(st.run_dir))
        self._render_run()
        # the followed run ended out of memory or with a NaN loss: offer the resume with the fix
        # (the follower only ends at a terminal event that is the last line of the log, so this
        # is the run's final state, not an earlier failure that a resume already went past)
        if (isinstance(st.end, events.RunFailed) and st.fail_kind in self.FAILED_WHAT and not st.detached
                and msg.why == "ended"):
            self.offer_resume(st)

    def _render_run(self) -> None:
        self.refresh_bindings()          # Start / Stop / Detach follow the run's state
        screen = self.screen
        if isinstance(screen, TrainScreen):
            screen.render_run(self.run_state)

    def action_export_run(self) -> None:
        """The palette's Export: on the Runs screen, for the selected run."""
        self.action_show("runs")
        self.call_after_refresh(lambda: getattr(self.screen, "action_export", lambda: None)())

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
        for b in getattr(screen, "BINDINGS", []):
            if isinstance(b, Binding) and b.description and b.key not in own:
                yield SystemCommand(f"{b.description} ({b.key.split(',')[0]})",
                                    b.tooltip or f"{b.description} ({screen.sub_title} screen)",
                                    lambda a=b.action, s=screen: self.call_later(s.run_action, a))
        if not any(getattr(b, "action", None) == "export" for b in getattr(screen, "BINDINGS", [])):
            yield SystemCommand("Export run as GGUF (Runs: e)", "The selected run as GGUF for llama.cpp / Ollama",
                                self.action_export_run)
        yield from super().get_system_commands(screen)


def _last_line_is_terminal(path: Path) -> bool:
    """Whether the last complete line of a log is a terminal event (reads its tail only)."""
    from engine.core import events as events_mod
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return False
    lines = [ln for ln in tail.split("\n")[:-1] if ln.strip()]
    if not lines:
        return False
    try:
        return isinstance(events_mod.loads(lines[-1]), events_mod.TERMINAL)
    except Exception:
        return False


def _wait_for_resumed_log(path: Path, old_size: int, alive, stop: threading.Event,
                          worker, timeout: float = 300.0) -> bool:
    """Wait until a resumed run has appended to its log (past ``old_size`` bytes) and its last
    line is no longer a terminal event. False when the resume process ended first (or the wait
    was cancelled); True also when it ended after it began."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not stop.is_set() and not worker.is_cancelled:
        try:
            grown = os.stat(path).st_size > old_size
        except OSError:
            grown = False
        if grown and not _last_line_is_terminal(path):
            return True
        if not alive():
            return grown    # ended: follow what it wrote if it got as far as its marker
        stop.wait(0.1)
    return False


def _resume_failure(run_dir: Path) -> str:
    """Why a resume process ended before it began: the last line of its stdout.log."""
    from engine.core import rundir
    try:
        lines = [ln for ln in (run_dir / rundir.STDOUT).read_text(errors="replace").splitlines()
                 if ln.strip()]
    except OSError:
        lines = []
    last = lines[-1] if lines else "no output"
    return f"the resume of {run_dir.name} ended before it began: {last}"
