"""The one run the app shows: launch, resume, follow, detach and stop, and its state.

``RunController`` is the only owner of the followed run's ``RunState``, of the follow worker
and of ``follow_batches``: the app creates one, forwards the run messages (``RunLaunched``,
``RunEvents``, ...) to it, and reads ``controller.state``. Screens never reach in: they post
requests (``AttachRun``, ``ResumeRun``) that the app hands over here.

Threads: a launch worker calls ``engine.training.runner.start_detached``; a follow worker polls
the run's events.jsonl (``EventLog.read_new``, never blocking) and posts batches (at most one per
``FOLLOW_INTERVAL``) as ``RunEvents``.
Only messages cross into the UI thread; the state is folded there.
"""
from __future__ import annotations

import os
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable

from textual.worker import get_current_worker

from engine.core.events import TERMINAL, RunFailed, RunFinished, RunWarning
from tui.dialogs import RemoteCodeDialog, ResumeFixDialog
from tui.follow import follow_batches
from tui.messages import FollowEnded, LaunchFailed, ResumeFailed, RunEvents, RunLaunched
from tui.runstate import RunState, from_events
from tui.safe import one_line

# A live run redraws at most once a second while its steps come faster (a step after a pause
# shows at once): a run on the same CPU cores must not pay for the UI (bench/tui_overhead.py
# measures it; 4 Hz cost a CPU-bound run 12 % of its tokens/s), and a loss curve needs no more.
FOLLOW_INTERVAL = 1.0

# the failures whose hint names a fix that a resume applies
FAILED_WHAT = {"oom": "Out of memory", "nan": "Loss became NaN"}


class RunController:
    """Owns the followed run. ``changed`` is called (UI thread) after every change of state."""

    def __init__(self, app, changed: Callable[[], None]) -> None:
        self.app = app
        self.changed = changed
        self.state: RunState | None = None
        self.launching = False
        self._follow_stop: threading.Event | None = None
        self._news_since = 0.0            # events older than this are history, not news

    @property
    def live(self) -> bool:
        """A launch or resume is under way, or the followed run has not ended."""
        return self.launching or (self.state is not None and self.state.live)

    def busy(self) -> bool:
        """True, and says so, while a run is live: the app follows one run at a time."""
        if self.live:
            self._notify("A run is already live: stop it (ctrl+x) or detach (ctrl+d) first.",
                         severity="warning")
        return self.live

    def _notify(self, text: str, **kw) -> None:
        self.app.notify(text, markup=False, **kw)

    # ---- launch ------------------------------------------------------------------------------
    def start(self, cfg) -> None:
        """Start a run of ``cfg`` (asks first when the model's own code would run)."""
        if self.busy():
            return
        from engine.training import runner
        if runner.needs_remote_code_confirmation(cfg):
            def answered(yes: bool | None) -> None:
                if yes:
                    from engine.models.consent import grant_remote_code
                    grant_remote_code(cfg)
                    self._begin_launch(cfg)
                else:
                    self._notify("Not started: the model's own code was not allowed to run.")
            self.app.push_screen(RemoteCodeDialog(cfg.model.name), answered)
            return
        self._begin_launch(cfg)

    def _begin_launch(self, cfg) -> None:
        if self.live:
            return
        self.launching = True
        self.state = RunState(phase="launching", message="creating the run directory…")
        self.app.action_show("train")
        self.changed()
        self.app.run_worker(partial(self._launch, cfg), name="launch", group="launch",
                            thread=True, exclusive=True, exit_on_error=False)

    def _launch(self, cfg) -> None:
        """(launch worker thread)"""
        try:
            from engine.training import runner
            run_dir = runner.start_detached(cfg)
        except Exception as e:   # config, data or permission problems: shown, not raised
            self.app.post_message(LaunchFailed(f"{type(e).__name__}: {e}"))
            return
        self.app.post_message(RunLaunched(Path(run_dir)))

    def launched(self, msg: RunLaunched) -> None:
        self.launching = False
        self.follow(msg.run_dir, launched=True, resume=msg if msg.resumed else None)
        what = "Run resumed" if msg.resumed else "Run started"
        self._notify(f"{what}: {msg.run_dir}", timeout=4)
        if self._stop_pending:          # ctrl+x while it was being created: not lost
            self._stop_pending = False
            self.stop()

    _stop_pending = False

    def launch_failed(self, msg: LaunchFailed) -> None:
        self.launching = False
        self._stop_pending = False
        self.state = RunState()
        self.state.apply(RunFailed(reason=msg.error))
        self.changed()
        self._notify(one_line(msg.error, 300), title="Could not start", severity="error",
                     timeout=10)

    # ---- resume ------------------------------------------------------------------------------
    def resume(self, run_dir: Path, fixes: list[str]) -> None:
        """Resume ``run_dir`` with the overrides ``fixes`` (the dialog's answer)."""
        st = self.state
        if self.busy():
            return
        self.launching = True
        if st is not None and st.run_dir == run_dir:
            st.phase, st.message = "launching", "resuming with " + ", ".join(fixes)
        self.app.action_show("train")
        self.changed()
        self.app.run_worker(partial(self._resume, Path(run_dir), list(fixes)), name="resume",
                            group="launch", thread=True, exclusive=True, exit_on_error=False)

    def _resume(self, run_dir: Path, fixes: list[str]) -> None:
        """(launch worker thread)"""
        from engine.core import rundir
        from engine.training import runner
        # the failed process wrote its last event and is still exiting (torch teardown): a
        # resume while it is alive would be refused as "still live", so let it go first
        rundir.wait_writer_exit(run_dir)
        since = time.time()
        try:
            old_size = os.stat(run_dir / rundir.EVENTS).st_size
        except OSError:
            old_size = 0
        try:
            runner.start_detached(None, resume=run_dir, overrides=fixes)
        except Exception as e:   # PreflightError, ConfigError, OSError: one line, no traceback
            self.app.post_message(ResumeFailed(run_dir, f"{type(e).__name__}: {e}"))
            return
        self.app.post_message(RunLaunched(run_dir, resumed=True, old_size=old_size, since=since))

    def resume_failed(self, msg: ResumeFailed) -> None:
        self.launching = self._stop_pending = False
        st = self.state
        if st is not None and st.run_dir == msg.run_dir:
            if not st.ended:
                st.apply(RunFailed(reason=msg.error, step=st.step))
            st.phase, st.message = "failed", msg.error
            st.follower_ended = True
        self.changed()
        self._notify(one_line(msg.error, 300), title="Could not resume", severity="error",
                     timeout=10)

    def resume_fixes(self, st: RunState) -> tuple[list[str], str]:
        """The overrides that answer ``st``'s failure, as its hint named them, and what failed.
        OOM and NaN only; any other end (stopped, crashed, other failure) resumes unchanged."""
        from engine.core import config as config_mod
        from engine.core import rundir
        from engine.training import hints as hints_mod
        kind = st.fail_kind if isinstance(st.end, RunFailed) else ""
        if kind not in FAILED_WHAT:
            return [], ("Stopped" if isinstance(st.end, RunFinished) else
                        "Failed" if st.ended else "Crashed")
        named = [h for h in st.hints if getattr(h, "rule", "") == kind and getattr(h, "overrides", None)]
        if named:
            return list(named[-1].overrides), FAILED_WHAT[kind]
        cfg = config_mod.load(st.run_dir / rundir.CONFIG)
        return hints_mod.hint_overrides(kind, cfg, st.fail_step or st.step), FAILED_WHAT[kind]

    def offer_resume_of(self, run_dir: Path) -> None:
        """The recovery dialog for a run picked on the Runs screen (read from its log)."""
        self.offer_resume(read_run(run_dir))

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
            self._notify(f"Cannot offer a resume: {one_line(e, 200)}", severity="warning")
            return
        if not fixes and st.fail_kind in FAILED_WHAT and isinstance(st.end, RunFailed):
            self._notify("No automatic fix left to try for this run's config.")
            return
        frozen = runner.frozen_keys(fixes)
        fixes = [f for f in fixes if f not in frozen]
        ckpts = rundir.checkpoints(st.run_dir)
        from_step = rundir.checkpoint_step(ckpts[-1]) if ckpts else 0
        self.app.push_screen(ResumeFixDialog(st.run_dir.name, what, st.finished_reason or st.message,
                                             fixes, cfg=cfg, from_step=from_step, frozen=frozen),
                             partial(self._resume_chosen, st.run_dir, fixes, cfg))

    def _resume_chosen(self, run_dir: Path, fixes: list[str], cfg, yes: bool | None) -> None:
        if not yes:
            return
        from engine.training import runner
        if runner.needs_remote_code_confirmation(cfg):
            def confirmed(ok: bool | None) -> None:
                if ok:
                    from engine.models.consent import grant_remote_code
                    grant_remote_code(cfg)
                    self.resume(run_dir, fixes)
            self.app.push_screen(RemoteCodeDialog(cfg.model.name, "Resuming this run"), confirmed)
            return
        self.resume(run_dir, fixes)

    # ---- stop / detach -----------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the live run to stop gracefully (it saves its adapter, then ends). Asked while
        the run is still being created, the stop is sent as soon as it exists."""
        if self.launching:
            self._stop_pending = True
            if self.state is not None:
                self.state.stop_requested = True
                self.changed()
            self._notify("Stopping as soon as the run has started (the adapter is saved).")
            return
        st = self.state
        if st is None or st.run_dir is None or st.ended or st.follower_ended:
            self._notify("No live run to stop.")
            return
        from engine.core import control
        try:
            control.request(st.run_dir, "stop")
        except OSError as e:
            self._notify(f"Cannot send stop: {e}", severity="error")
            return
        st.stop_requested = True
        self.changed()
        self._notify("Stopping: the run saves its adapter, then ends.")

    def detach(self) -> None:
        """Stop following the live run; it keeps training."""
        st = self.state
        if st is None or not st.live:
            self._notify("No live run to detach from.")
            return
        self._stop_following()
        self._notify(f"Detached: {st.run_dir.name} keeps training. Re-attach with "
                     f"`qlora-tui attach {st.run_dir}` or from Runs (F5).", timeout=8)

    def _stop_following(self) -> None:
        if self._follow_stop is not None:
            self._follow_stop.set()
        if self.state is not None:
            self.state.detached = True
        self.changed()

    def quit_choice(self, what: str | None) -> str | None:
        """What the quit dialog's answer does to the live run: the note printed after exit,
        or None to stay (the dialog was dismissed)."""
        st = self.state
        if what == "stop":
            from engine.core import control
            try:
                control.request(st.run_dir, "stop")
                note = f"Stop requested: {st.run_dir} saves its adapter and ends."
            except OSError as e:
                note = f"Could not request a stop ({e}); the run continues."
            self._stop_following()
            return note
        if what == "detach":
            self._stop_following()
            return f"Run continues in {st.run_dir}\nRe-attach: qlora-tui attach {st.run_dir}"
        return None

    # ---- following a run ---------------------------------------------------------------------
    def attach(self, run_dir: Path) -> bool:
        """Follow the live run ``run_dir`` (the Runs screen's request); False when refused."""
        st = self.state
        if self.live and st is not None and st.run_dir != Path(run_dir):
            self._notify("Detach from the current run first (ctrl+d).", severity="warning")
            return False
        self.follow(run_dir)
        return True

    def follow(self, run_dir: str | Path, launched: bool = False,
               resume: RunLaunched | None = None) -> None:
        """Show ``run_dir``: its history, then live events.

        ``resume``: the run was just resumed. Its process appends to events.jsonl (a
        ``Resumed`` marker first); the follower waits until it has, then reads the log from the
        start into a fresh RunState, whose fold drops what the marker says is redone.
        """
        if self._follow_stop is not None:
            self._follow_stop.set()
        run_dir = Path(run_dir)
        self.state = RunState(run_dir=run_dir, phase="starting" if launched else "reading",
                              message=("resuming from the last checkpoint…" if resume else
                                       "loading torch and the model…" if launched else ""))
        stop = self._follow_stop = threading.Event()
        self._news_since = resume.since if resume else time.time() - 5
        self.app.run_worker(partial(self._follow, run_dir, stop, launched,
                                    resume.old_size if resume else None),
                            name="follow", group="follow", thread=True, exit_on_error=False)
        self.changed()

    def _follow(self, run_dir: Path, stop: threading.Event, launched: bool,
                old_size: int | None = None) -> None:
        """(follow worker thread)"""
        from engine.core import rundir
        worker = get_current_worker()
        t0 = time.monotonic()

        def alive() -> bool:
            if rundir.process_alive(run_dir):
                return True
            # a just-spawned run may not have written run.json yet
            return launched and not (run_dir / rundir.RUN_JSON).exists() and time.monotonic() - t0 < 120

        post = self.app.post_message
        if old_size is not None and not _wait_for_resumed_log(run_dir / rundir.EVENTS, old_size,
                                                              alive, stop, worker):
            if not stop.is_set() and not worker.is_cancelled:
                post(ResumeFailed(run_dir, _resume_failure(run_dir)))
            return
        why = follow_batches(run_dir / rundir.EVENTS, stop,
                             lambda evs: post(RunEvents(run_dir, evs, stop)),
                             alive=alive, cancelled=lambda: worker.is_cancelled,
                             interval=FOLLOW_INTERVAL)
        post(FollowEnded(run_dir, why, stop))

    def _current(self, msg) -> bool:
        """Whether ``msg`` is about the followed run and comes from its current follower (a
        follower that was stopped, by a detach then a re-attach to the same run within its
        last interval, must not add its batch again or end the new one)."""
        st = self.state
        return (st is not None and st.run_dir == msg.run_dir
                and (msg.follower is None or msg.follower is self._follow_stop))

    def events(self, msg: RunEvents) -> None:
        if not self._current(msg):
            return
        st = self.state
        for ev in msg.events:
            st.apply(ev)
            if isinstance(ev, RunWarning) and ev.time >= self._news_since:
                self._notify(one_line(ev.message, 300), title="Warning", severity="warning", timeout=8)
        last = msg.events[-1]
        if last.time < self._news_since:
            pass                                 # history (attach, or before a resume): not news
        elif isinstance(last, RunFinished):
            self._notify(f"Run {'stopped' if last.stopped else 'finished'}; adapter: "
                         f"{last.adapter_dir}", timeout=6)
        elif isinstance(last, RunFailed):
            self._notify(one_line(last.reason, 300), title="Run failed", severity="error",
                         timeout=10)
        self.changed()

    def follow_ended(self, msg: FollowEnded) -> None:
        if not self._current(msg):
            return
        st = self.state
        st.follower_ended = True
        if not st.ended and not st.detached:
            st.phase = "crashed"
            st.message = ("the run process ended without a final event; resume with "
                          "qlora-tui train --resume " + str(st.run_dir))
        self.changed()
        # the followed run ended out of memory or with a NaN loss: offer the resume with the fix
        # (the follower only ends at a terminal event that is the last line of the log, so this
        # is the run's final state, not an earlier failure that a resume already went past)
        if (isinstance(st.end, RunFailed) and st.fail_kind in FAILED_WHAT and not st.detached
                and msg.why == "ended"):
            self.offer_resume(st)

    def follow_failed(self, error: BaseException) -> None:
        """The follow worker itself raised: the run is no longer followed (it may go on)."""
        st = self.state
        if st is not None and not st.ended:
            st.follower_ended = True
            st.phase, st.message = "crashed", f"stopped following: {type(error).__name__}: {error}"
        self.changed()


def read_run(run_dir: str | Path) -> RunState:
    """A run's state folded from its whole log: a run that is not followed (the Runs screens,
    a resume offered from them). Call it off the UI thread for a long log."""
    from engine.core import events as events_mod
    from engine.core import rundir
    return from_events(events_mod.read_events(Path(run_dir) / rundir.EVENTS), run_dir)


def _last_line_is_terminal(path: Path) -> bool:
    """Whether the last complete line of a log is a terminal event (reads its tail only)."""
    from engine.core import events as events_mod
    from engine.core import files
    try:
        with files.open_regular(path) as fh:
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
        return isinstance(events_mod.loads(lines[-1]), TERMINAL)
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
    from engine.core import files
    try:
        with files.open_regular(run_dir / rundir.STDOUT) as fh:     # its tail only
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - 65536))
            lines = [ln for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    last = lines[-1] if lines else "no output"
    return f"the resume of {run_dir.name} ended before it began: {last}"
