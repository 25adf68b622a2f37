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

from engine import config as C
from engine import events as E
from engine import rundir as R
from engine.faults import from_env as faults_from_env


class PreflightError(ValueError):
    pass


def preflight(cfg: C.Config, check_model: bool = True) -> list[str]:
    """Everything that can be checked before a run directory exists. Raises PreflightError."""
    from engine import data as D
    from engine import model as M
    try:
        train, ev = D.load_for_training(cfg)
    except D.DataError as e:
        raise PreflightError(str(e)) from None
    notes = []
    if train.problems:
        notes.append(f"{len(train.problems)} data problem(s): bad rows are skipped "
                     f"(first: line {train.problems[0].line}: {train.problems[0].message})")
    if check_model:
        try:
            M.check_model_skeleton(cfg)
        except M.ModelError as e:
            raise PreflightError(str(e)) from None
    return notes


def absolutise(cfg: C.Config) -> C.Config:
    """Paths made absolute so the run's own config.toml is self-contained."""
    cfg = cfg.copy()
    for sec, key in (("data", "train"), ("data", "eval"), ("model", "name"), ("output", "dir")):
        v = getattr(getattr(cfg, sec), key)
        if not v or v.startswith("builtin:"):
            continue
        if key == "name" and not (Path(cfg.resolve_path(v)).exists() or v.startswith((".", "/", "~"))):
            continue     # a hub id
        setattr(getattr(cfg, sec), key, str(Path(cfg.resolve_path(v)).resolve()))
    cfg.source = ""
    return cfg


def rollback_events(run_dir: Path, step: int) -> int:
    """Drop step/eval/checkpoint events past ``step`` (work a resume will redo). Returns how many."""
    path = run_dir / R.EVENTS
    evs = E.read_events(path)
    keep, dropped = [], 0
    for ev in evs:
        if ev.type in ("step", "eval", "checkpoint", "hint") and getattr(ev, "step", 0) > step:
            dropped += 1
            continue
        keep.append(ev)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for ev in keep:
            fh.write(E.dumps(ev) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return dropped


class Run:
    """One training run in a background thread. Subscribe to ``bus`` for its events."""

    def __init__(self, cfg: C.Config, run_dir: str | Path | None = None, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir else None
        self.resume = resume
        self.bus = E.EventBus()
        self.stop_flag = threading.Event()
        self.stop_reason: list[str] = []
        self.thread: threading.Thread | None = None
        self.result: E.Event | None = None
        self._writer: E.JsonlWriter | None = None
        self._resume_ckpt: Path | None = None
        self._resume_note = ""

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
        """Preflight, then create (or reopen, for resume) the run directory and its log."""
        if self.resume:
            assert self.run_dir is not None
            if not (self.run_dir / R.CONFIG).exists():
                raise PreflightError(f"{self.run_dir}: not a run directory (no {R.CONFIG})")
            if R.process_alive(self.run_dir) and R.owner_pid(self.run_dir) != os.getpid():
                raise PreflightError(f"{self.run_dir}: the run is still live (pid {R.owner_pid(self.run_dir)}); "
                                     "attach to it or stop it first")
            self.cfg = C.load(self.run_dir / R.CONFIG)
            # pick the checkpoint and roll the log back *before* the log is opened for appending
            # (rollback replaces events.jsonl; a writer opened earlier would write to the old file)
            self._resume_ckpt, self._resume_note = self._resume_checkpoint()
        elif check:
            preflight(self.cfg)
        if self.run_dir is None:
            self.cfg = absolutise(self.cfg)
            name = self.cfg.output.name or self.cfg.model.name
            self.run_dir = R.create(self.cfg.output.dir, name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / R.CONTROL).mkdir(exist_ok=True)
        if not self.resume:
            C.save(self.cfg, self.run_dir / R.CONFIG)
        R.write_pid(self.run_dir)
        self._writer = E.JsonlWriter(self.run_dir / R.EVENTS)
        self.bus.subscribe(self._writer)
        self.bus.subscribe(self._on_event)
        return self.run_dir

    def start(self, check: bool = True) -> Path:
        if self._writer is None:
            self.prepare(check)
        self.thread = threading.Thread(target=self._main, name="qlora-run", daemon=True)
        self.thread.start()
        return self.run_dir

    def _on_event(self, ev: E.Event) -> None:
        if ev.type in E.TERMINAL:
            self.result = ev

    # ---- the thread
    def _main(self) -> None:
        emit = self.bus.emit
        hints = None
        try:
            from engine.hints import HintEngine
            hints = HintEngine(self.cfg)
        except ImportError:
            pass
        if hints is not None:
            last_step = [0]

            def feed(ev):
                if ev.type == "hint":
                    return
                if ev.type == "step":
                    last_step[0] = ev.step
                for h in hints.observe(ev):
                    emit(h)
            self.bus.subscribe(feed, replay=False)
            threading.Thread(target=self._watch_gpu, args=(hints, last_step), daemon=True,
                             name="qlora-gpu-hints").start()
        step = 0
        prepared = None
        try:
            from engine import trainer as T
            ckpt = self._resume_ckpt
            if self.resume:
                emit(E.Status(phase="resume", message=self._resume_note))
            prepared = T.build(self.cfg, self.run_dir, emit, self.stop_flag, self.stop_reason,
                               faults_from_env())
            trainer = prepared.trainer
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
            step = trainer.state.global_step
            cb = next(c for c in trainer.callback_handler.callbacks if hasattr(c, "nonfinite"))
            if cb.nonfinite is not None:
                nf = cb.nonfinite
                self._save_adapter(trainer, prepared, emit)
                what = "loss" if not T._finite(nf.loss) else "grad norm"
                emit(E.RunFailed(reason=f"non-finite {what} at step {nf.step}: halted (train.nan_policy = "
                                 "halt); lower train.learning_rate, e.g. to 1e-4",
                                 kind="nan", step=nf.step))
                return
            adapter = self._save_adapter(trainer, prepared, emit)
            stopped = self.stop_flag.is_set()
            emit(E.RunFinished(step=step, adapter_dir=str(adapter), final_loss=cb.last_loss, stopped=stopped,
                               reason=(self.stop_reason[0] if self.stop_reason else "stopped") if stopped
                               else "completed"))
        except BaseException as e:  # noqa: BLE001 - every failure must become an event
            emit(self._failure_event(e, prepared, step))
        finally:
            if self._writer is not None:
                self._writer.close()

    def _watch_gpu(self, hints, last_step, every: float = 2.0) -> None:
        """Feed NVML utilisation of this process's GPU to the low-GPU-use rule while training."""
        from engine.gpu import GpuSampler
        idx = int(os.environ.get("LOCAL_RANK", "0"))
        sampler = GpuSampler(indices=[idx])
        if not sampler.available:
            return
        try:
            while self.thread is not None and self.thread.is_alive() and self.result is None:
                if last_step[0] > 0:
                    for g in sampler.sample():
                        if g.util_percent is not None:
                            for h in hints.observe_gpu(g.util_percent, last_step[0]):
                                self.bus.emit(h)
                time.sleep(every)
        finally:
            sampler.close()

    def _failure_event(self, e: BaseException, prepared, step: int) -> E.Event:
        from engine import data as D
        from engine import model as M
        tb = traceback.format_exc()
        try:
            step = prepared.trainer.state.global_step if prepared else step
        except Exception:
            pass
        name = type(e).__name__
        if name == "OutOfMemoryError" or "out of memory" in str(e).lower():
            try:
                from engine.hints import HintEngine
                est = None
                try:
                    from engine import estimate as ES
                    est = ES.estimate(self.cfg, ES.model_config_for(self.cfg)).peak_bytes
                except Exception:
                    pass
                observed = None
                try:
                    import torch
                    if torch.cuda.is_available():
                        observed = int(torch.cuda.max_memory_reserved())
                except Exception:
                    pass
                self.bus.emit(HintEngine(self.cfg).oom_hint(est, observed, self.cfg, step=step))
            except ImportError:
                pass
            ck = R.checkpoints(self.run_dir)
            last = f"; last checkpoint {ck[-1].name} is intact (resume with the fix)" if ck else ""
            return E.RunFailed(reason=f"CUDA out of memory at step {step + 1}{last}", kind="oom",
                               step=step, detail=tb)
        if isinstance(e, (D.DataError, PreflightError)):
            return E.RunFailed(reason=str(e).splitlines()[0], kind="data", step=step, detail=tb)
        if isinstance(e, (M.ModelError, C.ConfigError)):
            return E.RunFailed(reason=" ".join(str(e).split()), kind="config", step=step, detail=tb)
        if isinstance(e, OSError) and getattr(e, "errno", None) == 28:
            ck = R.checkpoints(self.run_dir)
            kept = f"; previous checkpoint {ck[-1].name} kept" if ck else ""
            return E.RunFailed(reason=f"disk full while saving at step {step}{kept}; free space and resume",
                               kind="disk", step=step, detail=tb)
        if isinstance(e, KeyboardInterrupt):
            return E.RunFailed(reason="interrupted", kind="killed", step=step, detail=tb)
        msg = str(e).strip().splitlines()
        return E.RunFailed(reason=f"{name}: {msg[0][:300] if msg else ''}".rstrip(": "), kind="error",
                           step=step, detail=tb)

    def _save_adapter(self, trainer, prepared, emit) -> Path:
        """Write the final adapter (+ tokenizer) atomically to RUN_DIR/adapter."""
        emit(E.Status(phase="save", message="saving the adapter"))
        final = self.run_dir / R.ADAPTER
        tmp = self.run_dir / (R.ADAPTER + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.model.save_pretrained(str(tmp))
        prepared.tokenizer.save_pretrained(str(tmp))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if not self.cfg.output.keep_checkpoints and not self.stop_flag.is_set():
            shutil.rmtree(self.run_dir / R.CHECKPOINTS, ignore_errors=True)
        return final

    def _resume_checkpoint(self) -> tuple[Path | None, str]:
        """The newest complete checkpoint (half-written ones are removed) and the log rolled back to it."""
        base = self.run_dir / R.CHECKPOINTS
        ck = R.checkpoints(self.run_dir)
        if base.is_dir():
            for p in base.iterdir():
                if p.name.startswith("checkpoint-") and p not in ck:
                    shutil.rmtree(p, ignore_errors=True)
        if not ck:
            dropped = rollback_events(self.run_dir, 0)
            return None, f"no complete checkpoint: starting over ({dropped} events rolled back)"
        step = R.checkpoint_step(ck[-1])
        dropped = rollback_events(self.run_dir, step)
        return ck[-1], (f"resuming from {ck[-1].name} (step {step})"
                        + (f"; {dropped} later events rolled back (that work is redone now)" if dropped else ""))


def install_signal_handlers(run: Run, headless: bool = True) -> None:
    """SIGHUP/SIGTERM: graceful stop (checkpoint + adapter). SIGINT: graceful, twice: at once."""
    def graceful(signum, frame):
        name = signal.Signals(signum).name
        why = {"SIGHUP": "SIGHUP (terminal or SSH connection closed)", "SIGTERM": "SIGTERM",
               "SIGINT": "Ctrl+C"}.get(name, name)
        if name == "SIGINT" and run.stop_flag.is_set():
            run.bus.emit(E.RunFailed(reason="Ctrl+C twice: stopped at once without saving; "
                                     "resume from the last checkpoint", kind="killed"))
            os._exit(130)
        run.request_stop(f"stopped by {why}: checkpoint and adapter saved")
        if name == "SIGINT" and headless:
            print("stopping after this step (checkpoint + adapter); Ctrl+C again to stop at once",
                  file=sys.stderr, flush=True)
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, graceful)


def start_detached(cfg: C.Config, *, resume: str | Path | None = None, check: bool = True) -> Path:
    """Start a run in its own session (survives the terminal closing); return its directory."""
    if resume:
        run_dir = Path(resume)
        if not (run_dir / R.CONFIG).exists():
            raise PreflightError(f"{run_dir}: not a run directory (no {R.CONFIG})")
        if R.process_alive(run_dir):
            raise PreflightError(f"{run_dir}: the run is still live; attach to it instead")
        argv = ["train", "--resume", str(run_dir)]
    else:
        if check:
            preflight(cfg)
        cfg = absolutise(cfg)
        run_dir = R.create(cfg.output.dir, cfg.output.name or cfg.model.name)
        C.save(cfg, run_dir / R.CONFIG)
        argv = ["train", str(run_dir / R.CONFIG), "--run-dir", str(run_dir), "--no-check"]
    log = open(run_dir / R.STDOUT, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "engine", *argv, "--headless"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=os.getcwd(), env=_child_env())
    log.close()
    # record the child at once so a UI sees the run as live before it writes run.json itself
    R.write_pid(run_dir, proc.pid)
    return run_dir


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
