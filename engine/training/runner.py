"""Runs: a config becomes a run directory and a background thread that emits events.

``Run(cfg).start()`` checks the inputs first (``preflight``: bad config, data or model path
never leave a half-created run directory), creates the run directory, and trains in a
thread. Every outcome ends the event stream with ``run_finished`` or ``run_failed``; an
exception in the thread never dies silently. ``start_detached`` runs the same thing in a
separate process in its own session, so it survives the terminal and the SSH connection.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from engine.core import config
from engine.core import events
from engine.core import perms
from engine.core import rundir
from engine.core.faults import from_env as faults_from_env


from engine.training.preflight import (PreflightError, needs_remote_code_confirmation,  # noqa: F401 (API)
                                      preflight, quick_preflight, remote_code_check)
from engine.training.resume import frozen_keys, resume_config  # noqa: F401 (API)


def oom_fix_overrides(cfg: config.Config, step: int = 0) -> list[str]:
    """The OOM hint's fixes as ``--set`` overrides (``engine.training.hints.oom_overrides`` owns them),
    for ``Run(None, run_dir, resume=True, overrides=...)`` / ``train --resume RUN_DIR --set ...``."""
    from engine.training.hints import oom_overrides
    return oom_overrides(cfg, step)


def absolutise(cfg: config.Config) -> config.Config:
    """Paths made absolute so the run's own config.toml is self-contained."""
    cfg = cfg.copy()
    for sec, key in (("data", "train"), ("data", "eval"), ("model", "name"), ("model", "adapter"),
                     ("output", "dir")):
        v = getattr(getattr(cfg, sec), key)
        if not v or v.startswith("builtin:"):
            continue
        if key in ("name", "adapter") and not (Path(cfg.resolve_path(v)).exists() or v.startswith((".", "/", "~"))):
            continue     # a hub id
        setattr(getattr(cfg, sec), key, str(Path(cfg.resolve_path(v)).resolve()))
    cfg.source = ""
    return cfg


def superseded_events(run_dir: Path, step: int) -> int:
    """How many logged events a resume from ``step`` redoes (the log keeps them: the ``Resumed``
    marker the resume appends tells readers to drop them; ``engine.core.summary.redone``)."""
    from engine.core.summary import redone, standing
    return sum(redone(ev, step) for ev in standing(events.read_events(run_dir / rundir.EVENTS)))


class Run:
    """One training run in a background thread. Subscribe to ``bus`` for its events."""

    def __init__(self, cfg: config.Config | None, run_dir: str | Path | None = None, resume: bool = False,
                 overrides: list[str] | None = None):
        """``resume=True``: continue ``run_dir`` from its newest complete checkpoint; ``cfg`` is
        ignored (the run's own config.toml is used), ``overrides`` (``section.key=value``) change
        it first, e.g. the OOM fixes of ``oom_fix_overrides``; model/quant/lora cannot change."""
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir else None
        self.resume = resume
        self.overrides = list(overrides or [])
        self.bus = events.EventBus()
        self.stop_flag = threading.Event()
        self.stop_reason: list[str] = []
        self.thread: threading.Thread | None = None
        self.result: events.Event | None = None
        self._writer: events.JsonlWriter | None = None
        self._resume_ckpt: Path | None = None
        self._resume_note = ""
        self._changed: list[str] = []
        self.notes: list[str] = []       # preflight warnings (bad rows skipped, custom code not run)
        self._lock: int | None = None    # fd of RUN_DIR/lock while this process writes the run
        self._sink_failure: BaseException | None = None   # the log writer failed (disk full)
        self._plan = None                # what auto resolved to (engine.training.recipe.RunPlan)
        self._recipe = None              # setup -> train -> save (engine.training.recipe.Recipe)

    # ---- control
    def request_stop(self, reason: str = "stop requested") -> None:
        if not self.stop_flag.is_set():
            self.stop_reason.append(reason)
        self.stop_flag.set()

    def join(self, timeout: float | None = None) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    # ---- start
    def prepare(self, check: bool = True) -> Path:
        """Preflight, then create (or reopen, for resume) the run directory and its log.

        In a multi-GPU job (engine.training.distributed) only rank 0 writes to the run directory; the
        other ranks train on the directory the launcher made and emit to no one."""
        from engine.training import distributed
        if distributed.in_worker() and not distributed.is_main():
            assert self.run_dir is not None, "workers are started on an existing run directory"
            if self.resume:
                self.cfg, _ = resume_config(self.run_dir, self.overrides)
                ck = rundir.checkpoints(self.run_dir)
                self._resume_ckpt = ck[-1] if ck else None
            self.bus.subscribe(self._on_event)
            self._writer = False       # prepared; nothing to write
            self._start_reporter()
            return self.run_dir
        perms.use_private_umask()          # this process writes the run: its files are private
        owned = distributed.launcher_owns()  # the launcher holds the lock (it checked liveness)
        if self.resume:
            assert self.run_dir is not None
            if not (self.run_dir / rundir.CONFIG).exists():
                raise PreflightError(f"{self.run_dir}: not a run directory (no {rundir.CONFIG})")
            if not owned:
                rundir.wait_writer_exit(self.run_dir)   # a writer whose log has ended, still exiting
                self._lock = rundir.acquire_lock(self.run_dir)    # before anything in it is touched
            perms.make_private(self.run_dir)
            if not owned and rundir.process_alive(self.run_dir) and rundir.owner_pid(self.run_dir) != os.getpid():
                raise PreflightError(f"{self.run_dir}: the run is still live (pid {rundir.owner_pid(self.run_dir)}); "
                                     "attach to it or stop it first")
            self.cfg = self._resume_config()
            self._resume_ckpt, self._resume_note = self._resume_checkpoint()
        elif check:
            try:
                self.notes = preflight(self.cfg)
            except PreflightError as e:
                self._record_refusal(e)
                raise
        if self.run_dir is None:
            self.cfg = absolutise(self.cfg)
            name = self.cfg.output.name or self.cfg.model.name
            self.run_dir = rundir.create(self.cfg.output.dir, name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._lock is None and not owned:
            self._lock = rundir.acquire_lock(self.run_dir)
        (self.run_dir / rundir.CONTROL).mkdir(exist_ok=True)
        if not self.resume:
            config.save(self.cfg, self.run_dir / rundir.CONFIG)
        rundir.write_pid(self.run_dir)      # (under a launcher: rank 0 takes over run.json from it)
        self._writer = events.JsonlWriter(self.run_dir / rundir.EVENTS)
        self.bus.subscribe(self._writer)
        self.bus.on_sink_error.append(self._sink_error)
        self.bus.subscribe(self._on_event)
        self._start_reporter()
        return self.run_dir

    _reporter = None

    def _start_reporter(self) -> None:
        """A worker of a multi-process job: its progress and heartbeat in RUN_DIR/nodes/ (every
        rank); rank 0 of a multi-node job also watches the other nodes' heartbeats."""
        from engine.training import distributed
        if not distributed.in_worker():
            return
        self._reporter = distributed.NodeReporter(self.cfg, self.run_dir)
        if distributed.is_main() and self.cfg.distributed.nodes > 1:
            self._reporter.on_lost = self._nodes_lost
        self._reporter.start()

    def _nodes_lost(self, rows) -> None:
        """The watchdog (rank 0): other nodes went silent and no collective failed in
        ``timeout_s``: end the run as crashed, naming them, and leave (the job cannot go on)."""
        from engine.core.exitcodes import FAILED
        if self.result is None:
            self._emit_final(self._node_lost_event(rows))
            if self._writer:
                self._writer.close()
        os._exit(FAILED)

    def _node_lost_event(self, rows, detail: str = "") -> events.RunFailed:
        from engine.core import nodes
        step = self._recipe.step if self._recipe is not None else 0
        ck = rundir.checkpoints(self.run_dir)
        last = f"; resume from {ck[-1].name} with qlora-tui train --resume {self.run_dir} on every node" if ck \
            else f"; no complete checkpoint: qlora-tui train --resume {self.run_dir} on every node starts over"
        return events.RunFailed(reason="lost " + "; ".join(nodes.describe_lost(r) for r in rows) + last,
                                kind=events.FailKind.NODE_LOST, step=step, detail=detail)

    def _record_refusal(self, e: Exception) -> None:
        """A detached child was handed its run directory before the checks (so `train --detach`
        returns at once): a refusal goes into that run's log, where `runs` and `attach` see it."""
        if self.run_dir is None or not (self.run_dir / rundir.CONFIG).exists():
            return
        kind = events.FailKind.DATA if "data" in str(e).lower() or "line " in str(e) else events.FailKind.CONFIG
        try:
            w = events.JsonlWriter(self.run_dir / rundir.EVENTS)
            w(events.RunFailed(reason=str(e).replace("\n", " "), kind=kind))
            w.close()
        except OSError:
            pass

    def _resume_config(self) -> config.Config:
        from engine.training import resume
        cfg, changed = resume_config(self.run_dir, self.overrides)
        if changed:
            config.save(cfg, self.run_dir / rundir.CONFIG)
            self._changed = changed
        resume.retire_stale_requests(self.run_dir)
        return cfg

    def start(self, check: bool = True) -> Path:
        if self._writer is None:
            self.prepare(check)
        self.thread = threading.Thread(target=self._main, name="qlora-run", daemon=True)
        self.thread.start()
        return self.run_dir

    def _sink_error(self, fn, exc: BaseException) -> None:
        """The run's log (or another sink) failed: stop after this step; the run ends failed."""
        if fn is self._writer and self._sink_failure is None:
            self._sink_failure = exc
            self.request_stop("the event log could not be written")

    def _emit_final(self, ev: events.Event) -> None:
        """Emit the terminal event; after a log failure it says so (kind ``disk`` when the disk
        is full) and goes into the space the log writer kept in reserve."""
        exc = self._sink_failure
        if exc is not None:
            from engine.training.failures import log_write_failure
            ev = log_write_failure(ev, exc, rundir.EVENTS)
        self.bus.emit(ev)
        if exc is not None and self._writer:
            self._writer.write_final(ev)

    def _on_event(self, ev: events.Event) -> None:
        if isinstance(ev, events.TERMINAL):
            self.result = ev

    # ---- the thread
    def _say_how_it_starts(self, emit) -> None:
        """Preflight warnings (in the log, the printer and the TUI); on resume, the marker (the
        log is appended to, never rewritten: readers drop what was logged past it) and what the
        resume changed."""
        for note in self.notes:
            emit(events.RunWarning(source="preflight", message=note))
        if not self.resume:
            return
        ckpt = self._resume_ckpt
        emit(events.Resumed(from_step=rundir.checkpoint_step(ckpt) if ckpt else 0,
                            checkpoint=str(ckpt) if ckpt else ""))
        emit(events.Status(phase=events.Phase.RESUME, message=self._resume_note + (
            "; config changed: " + ", ".join(f"{k} = {self.cfg.get(k)!r}" for k in self._changed)
            if self._changed else "")))

    def _main(self) -> None:
        from engine.training import run_hints
        run_hints.attach(self.cfg, self.bus, lambda: self.alive and self.result is None)
        try:
            self._say_how_it_starts(self.bus.emit)
            self._train()
        except BaseException as e:  # noqa: BLE001 - every failure must become an event
            self._emit_final(self._failure(e))
        finally:
            if self._recipe is not None:
                self._recipe.cleanup()
            if self._reporter is not None:
                self._reporter.close()
            if self._writer:
                self._writer.close()
            if self._lock is not None:
                os.close(self._lock)        # the run is over: another writer may take it
                self._lock = None

    def _train(self) -> None:
        """Plan, then the recipe's setup -> train -> save; the final event."""
        from engine.training import recipe as recipe_mod
        from engine.training import resume
        emit = self.bus.emit
        ckpt = self._resume_ckpt
        if self.resume:
            if resume.nothing_left(self.cfg, ckpt):
                self._emit_final(resume.finish_from_checkpoint(self.run_dir, self.cfg, ckpt, emit))
                return
        rows = recipe_mod.Recipe.read_rows(self.cfg, emit)
        self._plan = recipe_mod.plan_run(self.cfg, rows)     # once, before anything is built
        recipe = self._recipe = recipe_mod.Recipe(self._plan, self.run_dir, emit, self.stop_flag,
                                                  self.stop_reason, faults_from_env())
        recipe.setup(rows)
        step = recipe.train(ckpt)
        if recipe.nonfinite is not None:
            from engine.training.failures import nan_halt
            recipe.save()
            self._emit_final(nan_halt(self.cfg, recipe.nonfinite.step, recipe.nonfinite.loss))
            return
        adapter = recipe.save()
        stopped = self.stop_flag.is_set()
        cb = recipe.prepared.callback if recipe.prepared is not None else None
        self._emit_final(events.RunFinished(
            step=step, adapter_dir=str(adapter), final_loss=recipe.last_loss, stopped=stopped,
            reason=(self.stop_reason[0] if self.stop_reason else "stopped") if stopped else "completed",
            train_seconds=getattr(cb, "train_seconds", None), predicted_seconds=getattr(cb, "predicted_seconds", None)))

    def _failure(self, e: BaseException) -> events.Event:
        """The run_failed event for ``e`` (an OOM also gets its hint first)."""
        from engine.training.failures import classify_failure, is_oom
        step = self._recipe.step if self._recipe is not None else 0
        if self._reporter is not None and self._reporter.on_lost is not None and not is_oom(e):
            from engine.training.distributed import is_comm_error
            # a collective failed: did a node die? (its heartbeats go stale a few beats later)
            lost = self._reporter.lost(wait=None if is_comm_error(e) else 0.0)
            if lost:
                return self._node_lost_event(lost, detail=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        if is_oom(e):
            self._oom_hint(step)
        ev = classify_failure(e, step=step, checkpoints=rundir.checkpoints(self.run_dir),
                              detail=traceback.format_exc())
        if self._reporter is not None and self._reporter.on_lost is not None:
            from engine.core import nodes
            left = [r for r in nodes.by_node(nodes.latest(self.run_dir))
                    if r.node != self._reporter.node and all(p.done for p in r.procs)]
            if left:        # another node failed first (its own error is in its log): say where to look
                ev.reason = "; ".join(f"node {r.node} ({r.ranks}) left the job first: its log is "
                                      f"{nodes.node_log(self.run_dir, r.node)}" for r in left) + "; here: " + ev.reason
        return ev

    def _oom_hint(self, step: int) -> None:
        """The OOM hint: the plan's estimate against the peak torch saw."""
        try:
            from engine.training.hints import HintEngine
        except ImportError:
            return
        observed = None
        try:
            import torch
            if torch.cuda.is_available():
                observed = int(torch.cuda.max_memory_reserved())
        except Exception:
            pass
        plan = self._plan
        self.bus.emit(HintEngine(self.cfg).oom_hint(plan.estimate_bytes if plan else None, observed, self.cfg, step=step))

    def _resume_checkpoint(self) -> tuple[Path | None, str]:
        """The newest complete checkpoint (half-written ones are removed) and what resuming from it says."""
        base = self.run_dir / rundir.CHECKPOINTS
        ck = rundir.checkpoints(self.run_dir)
        if base.is_dir():
            for p in base.iterdir():
                if p.name.startswith("checkpoint-") and p not in ck:
                    shutil.rmtree(p, ignore_errors=True)
        if not ck:
            dropped = superseded_events(self.run_dir, 0)
            return None, f"no complete checkpoint: starting over ({dropped} logged events are redone)"
        step = rundir.checkpoint_step(ck[-1])
        dropped = superseded_events(self.run_dir, step)
        return ck[-1], (f"resuming from {ck[-1].name} (step {step})"
                        + (f"; {dropped} later events are redone now" if dropped else ""))


def install_signal_handlers(run: Run, headless: bool = True) -> None:
    """SIGHUP/SIGTERM: graceful stop (checkpoint + adapter). SIGINT: graceful, twice: at once."""
    def graceful(signum, frame):
        name = signal.Signals(signum).name
        why = {"SIGHUP": "SIGHUP (terminal or SSH connection closed)", "SIGTERM": "SIGTERM",
               "SIGINT": "Ctrl+C"}.get(name, name)
        if name == "SIGINT" and run.stop_flag.is_set():
            run.bus.emit(events.RunFailed(reason="Ctrl+C twice: stopped at once without saving; "
                                     "resume from the last checkpoint", kind=events.FailKind.KILLED))
            from engine.core.exitcodes import KILLED
            os._exit(KILLED)
        run.request_stop(f"stopped by {why}: checkpoint and adapter saved")
        if name == "SIGINT" and headless:
            print("stopping after this step (checkpoint + adapter); Ctrl+C again to stop at once",
                  file=sys.stderr, flush=True)
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, graceful)


def launch_distributed(cfg: config.Config | None, *, run_dir: Path | None = None, resume: bool = False,
                       overrides: list[str] | None = None, check: bool = True) -> int:
    """Run a multi-process job's part on this node in the foreground: make the run directory
    (node 0, a fresh run) or use the given one, then start this node's ``distributed.gpus``
    workers through ``accelerate launch`` (joined to the other nodes' when ``distributed.nodes``
    > 1); return their exit status. On node 0 this launcher holds the run's lock for the job's
    life and names itself in ``run.json`` until rank 0 starts and takes that over."""
    from engine.training import distributed
    sets = sum((["--set", o] for o in overrides or []), [])
    if resume:
        cfg, _ = resume_config(run_dir, overrides)
        args = ["train", "--resume", str(run_dir), "--headless"] + sets
    elif run_dir is None:
        if check:
            preflight(cfg)
        cfg = absolutise(cfg)
        run_dir = rundir.create(cfg.output.dir, cfg.output.name or cfg.model.name)
        config.save(cfg, run_dir / rundir.CONFIG)
        args = ["train", str(run_dir / rundir.CONFIG), "--run-dir", str(run_dir), "--no-check", "--headless"] + sets
    else:       # an existing directory (launch, --join): rank 0 checks (records a refusal in the run's log)
        args = ["train", str(run_dir / rundir.CONFIG), "--run-dir", str(run_dir), "--headless"] \
            + ([] if check else ["--no-check"]) + sets
    d = cfg.distributed
    main = d.node_rank == 0
    lock = None
    if main:
        if resume and rundir.owner_pid(run_dir) != os.getpid() and rundir.is_live(run_dir):
            raise PreflightError(f"{run_dir}: the run is still live; attach to it or stop it first")
        rundir.wait_writer_exit(run_dir)
        lock = rundir.acquire_lock(run_dir)        # (a detached parent's lock is adopted)
        rundir.write_pid(run_dir)
    where = f"node {d.node_rank} of {d.nodes}: " if d.nodes > 1 else ""
    print(f"run {run_dir}: {where}launching {d.gpus} processes ({d.strategy})", flush=True)
    if main and d.nodes > 1 and not resume:
        for line in join_commands(cfg, run_dir, first=1):
            print(line, flush=True)
    env = dict(_child_env(), **{distributed.LAUNCHED: "1", distributed.LAUNCHER_OWNS: "1"})
    env.pop(rundir.LOCK_FD_ENV, None)
    try:
        proc = subprocess.Popen(distributed.launch_argv(cfg, args), env=env)
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:      # the workers got the signal too and stop gracefully
                continue
        from engine.core import exitcodes
        if main and rc != exitcodes.OK:
            _end_unended(run_dir, rc)
        if rc == exitcodes.OK and rundir.info(run_dir).state == "stopped":
            return exitcodes.STOPPED
        return rc
    finally:
        if lock is not None:
            os.close(lock)


def _end_unended(run_dir: Path, rc: int) -> None:
    """Node 0's workers ended without rank 0 writing the final event (rank 0 itself died, or the
    launcher killed it): the run ends crashed, saying so, instead of only looking crashed."""
    try:
        evs = events.read_events(run_dir / rundir.EVENTS)
    except OSError:
        return
    from engine.core.summary import fold
    if fold(evs).ended:
        return
    w = events.JsonlWriter(run_dir / rundir.EVENTS)
    try:
        w(events.RunFailed(reason=f"the worker processes of node 0 ended without a final event (exit status "
                                  f"{rc}); resume with qlora-tui train --resume {run_dir} on every node",
                           kind=events.FailKind.NODE_LOST, step=fold(evs).step))
    finally:
        w.close()


def join_commands(cfg: config.Config, run_dir: Path, overrides: list[str] | None = None, *, first: int = 0,
                  resume: bool = False) -> list[str]:
    """The command each node runs to take part in a multi-node job of ``run_dir`` (copyable
    lines: a ``# node K`` comment, then the command), for nodes ``first`` .. nodes - 1."""
    import shlex
    from engine.training import distributed
    d = cfg.distributed
    hosts = distributed.read_hostfile(cfg) if d.hostfile else []
    keep = [o for o in overrides or [] if not o.replace(" ", "").startswith("distributed.node_rank=")]
    out = []
    for k in range(first, d.nodes):
        host = f" (host {hosts[k]})" if hosts else ""
        how = ["--resume", str(run_dir)] if resume else ["--join", str(run_dir)]
        argv = ["qlora-tui", "train", *how, "--set", f"distributed.node_rank={k}"]
        for o in keep:
            argv += ["--set", o]
        out.append(f"# node {k}{host}:")
        out.append(" ".join(shlex.quote(a) for a in argv + ["--detach"]))
    return out


def start_detached(cfg: config.Config | None, *, resume: str | Path | None = None, check: bool | str = True,
                   overrides: list[str] | None = None, join: str | Path | None = None) -> Path:
    """Start a run in its own session (survives the terminal closing); return its directory.

    ``check``: True runs the preflight here (the TUI's launch thread shows its refusal);
    "child" runs only ``quick_preflight`` here (milliseconds: paths, model, consent) and leaves the
    whole preflight to the child, which records a refusal in the run's log (`train --detach`
    returns at once). ``resume``: continue that run directory instead (``overrides`` change its config first,
    e.g. ``oom_fix_overrides``). ``join``: this node's part of the multi-node job of that run
    directory (``cfg``: its config with this node's overrides). The child is ``python -m engine
    train ... --headless`` with stdin on /dev/null and its output in RUN_DIR/stdout.log (a node
    other than 0: RUN_DIR/nodes/node-K.log); it is never a child of the caller's session, so
    closing the terminal or the SSH connection does not reach it.
    """
    with perms.private_files():            # the run's files are private from the first one on
        return _start_detached(cfg, resume=resume, check=check, overrides=overrides, join=join)


def _start_detached(cfg, *, resume, check, overrides, join=None) -> Path:
    node = 0
    if resume:
        run_dir = Path(resume)
        if not (run_dir / rundir.CONFIG).exists():
            raise PreflightError(f"{run_dir}: not a run directory (no {rundir.CONFIG})")
        try:                                  # another node of a multi-node job finds node 0 live
            node = config.load(run_dir / rundir.CONFIG, overrides).distributed.node_rank
        except config.ConfigError:
            node = 0                          # said by resume_config below
        if node == 0:
            if rundir.is_live(run_dir):
                raise PreflightError(f"{run_dir}: the run is still live; attach to it instead")
            rundir.wait_writer_exit(run_dir)    # ended (as `runs` says) and still exiting: let it go
        resume_config(run_dir, overrides)   # what the child would refuse, said here where it is seen
        argv = ["train", "--resume", str(run_dir)]
        for o in overrides or []:
            argv += ["--set", o]
    elif join:
        run_dir = Path(join)
        node = cfg.distributed.node_rank
        if node == 0 and rundir.is_live(run_dir):
            raise PreflightError(f"{run_dir}: the run is already live; attach to it instead")
        argv = ["train", "--join", str(run_dir)]
        for o in overrides or []:
            argv += ["--set", o]
    else:
        if check is True:
            preflight(cfg)
        elif check == "child":
            quick_preflight(cfg)             # the cheap checks here, where the refusal is seen
        cfg = absolutise(cfg)
        run_dir = rundir.create(cfg.output.dir, cfg.output.name or cfg.model.name)
        config.save(cfg, run_dir / rundir.CONFIG)
        argv = ["train", str(run_dir / rundir.CONFIG), "--run-dir", str(run_dir)]
        if check is True:
            argv.append("--no-check")      # done here; check="child": the child checks
    if node != 0:         # another node's part of the job: node 0 owns the run; this one logs beside it
        from engine.core import nodes
        nodes.nodes_dir(run_dir).mkdir(exist_ok=True)
        log = open(nodes.node_log(run_dir, node), "ab")
        try:
            subprocess.Popen([sys.executable, "-m", "engine", *argv, "--headless"],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=os.getcwd(), env=_child_env())
        finally:
            log.close()
        return run_dir
    # the lock is taken here and handed to the child (same open file): a second resume of the
    # same run is refused now, where it is seen, and nobody can slip in between
    lock = rundir.acquire_lock(run_dir)
    env = dict(_child_env(), **{rundir.LOCK_FD_ENV: str(lock), rundir.SINCE_ENV: str(time.time_ns())})
    log = open(run_dir / rundir.STDOUT, "ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "engine", *argv, "--headless"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=os.getcwd(), env=env, pass_fds=(lock,))
    finally:
        log.close()
        os.close(lock)
    # record the child at once so a UI sees the run as live before it writes run.json itself
    rundir.write_pid(run_dir, proc.pid)
    return run_dir


def _child_env() -> dict:
    from engine.core.child import engine_env
    env = engine_env()
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env
