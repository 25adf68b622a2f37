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
from engine.core import rundir
from engine.core.faults import from_env as faults_from_env
from engine.core.units import is_nonfinite


class PreflightError(ValueError):
    pass


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def preflight(cfg: config.Config, check_model: bool = True) -> list[str]:
    """Everything that can be checked before a run directory exists. Raises PreflightError."""
    from engine.dataset import data as data_mod
    from engine.training import model as model_mod
    from engine.training import trackers
    try:
        trackers.check_available(cfg.output.report_to)
    except trackers.TrackerError as e:
        raise PreflightError(str(e)) from None
    try:
        train, ev = data_mod.load_for_training(cfg)
    except data_mod.DataError as e:
        raise PreflightError(_with_first_bad_line(cfg, str(e))) from None
    notes = []
    if train.problems:
        notes.append(f"{config.plural(len(train.problems), 'data problem')}: bad rows are skipped "
                     f"(first: line {train.problems[0].line}: {train.problems[0].message})")
    if check_model:
        note = remote_code_check(cfg)
        if note:
            notes.append(note)
        try:
            model_mod.check_model_skeleton(cfg)
            model_mod.load_tokenizer(cfg)    # shipped tokenizer code, a broken chat template: said here
        except model_mod.ModelError as e:
            raise PreflightError(str(e)) from None
    return notes


def _with_first_bad_line(cfg: config.Config, msg: str) -> str:
    """A data error that names no line gets the first unreadable line of the file it is about."""
    from engine.dataset import data as data_mod
    if "line " in msg:
        return msg
    for key in ("train", "eval"):
        value = getattr(cfg.data, key)
        if not value or str(data_mod.resolve(cfg.resolve_path(value))) not in msg:
            continue
        where = data_mod.resolve(cfg.resolve_path(value))
        n = 0
        try:
            for line, _rec, err in data_mod.iter_raw(cfg.resolve_path(value)):
                n += 1
                if err is not None:
                    return f"{msg}; first problem at line {line}: {err}"
        except (data_mod.DataError, OSError, ValueError):
            return msg
        if n == 0:
            return f"{where}: the file has no rows (data.{key}); add training examples"
    return msg


def remote_code_check(cfg: config.Config) -> str | None:
    """Refuse a local model whose architecture exists only as code shipped with it, unless
    ``model.trust_remote_code`` is set (the TUI asks the user to confirm that first; see
    ``needs_remote_code_confirmation``). Returns a note when the code is present but not needed.
    Hub ids are checked by transformers itself (it refuses without trust_remote_code)."""
    import json
    from engine.training import model as model_mod
    if cfg.model.trust_remote_code:
        return None
    try:
        path = Path(model_mod.model_path(cfg))
    except model_mod.ModelError as e:
        raise PreflightError(str(e)) from None
    if not path.is_dir():
        return None
    shipped = {}
    for fname in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((path / fname).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            shipped[fname] = data
    if not shipped:
        return None
    model_type = (shipped.get("config.json") or {}).get("model_type")
    if model_type is None:
        try:
            model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError):
            model_type = None
    from transformers import CONFIG_MAPPING
    files = " and ".join(shipped)
    if model_type and model_type in CONFIG_MAPPING:
        return (f"model.name = {cfg.model.name!r} ships its own Python code (auto_map in {files}); it is "
                f"not run: transformers' built-in {model_type!r} is used (model.trust_remote_code = false)")
    raise PreflightError(
        f"model.name = {cfg.model.name!r}: the architecture {model_type!r} exists only as Python code "
        f"shipped with the model (auto_map in {files}); it is not run unless you set "
        "model.trust_remote_code = true (and confirm it in the TUI) — only for a repository you trust")


def needs_remote_code_confirmation(cfg: config.Config) -> bool:
    """True when starting this config would run code shipped with the model: the TUI must ask
    the user to confirm before it starts (or resumes) the run. Headless runs take the config's
    explicit ``model.trust_remote_code = true`` as the consent."""
    return bool(cfg.model.trust_remote_code)


# sections a resume may not change: the checkpoint's adapter and base must stay what they are
RESUME_FROZEN = ("model", "quant", "lora", "galore")


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[config.Config, list[str]]:
    """The config a resume of ``run_dir`` would use, and the keys ``overrides`` change.
    Raises PreflightError (finished run, frozen section changed) or ConfigError (bad value)."""
    run_dir = Path(run_dir)
    if not (run_dir / rundir.CONFIG).exists():
        raise PreflightError(f"{run_dir}: not a run directory (no {rundir.CONFIG})")
    old = config.load(run_dir / rundir.CONFIG)
    last = rundir.info(run_dir)
    if last.state == rundir.State.FINISHED and not overrides:
        raise PreflightError(f"{run_dir}: the run finished (step {last.step}); nothing to resume "
                             "(raise train.max_steps with --set to train on)")
    if not overrides:
        return old, []
    cfg = config.load(run_dir / rundir.CONFIG, overrides)
    before, after = old.to_dict(), cfg.to_dict()
    changed = [f"{sec}.{k}" for sec, vals in after.items() if isinstance(vals, dict)
               for k, v in vals.items() if before.get(sec, {}).get(k) != v]
    frozen = [k for k in changed if k.split(".")[0] in RESUME_FROZEN or k == "train.method"]
    if frozen:
        raise PreflightError(f"{', '.join(frozen)}: cannot change on resume (the checkpoint's adapter "
                             "and base model must stay the same); start a new run instead")
    cfg.source = ""
    return cfg, changed


def oom_fix_overrides(cfg: config.Config, step: int = 0) -> list[str]:
    """The OOM hint's fixes as ``--set`` overrides (``engine.training.hints.oom_overrides`` owns them),
    for ``Run(None, run_dir, resume=True, overrides=...)`` / ``train --resume RUN_DIR --set ...``."""
    from engine.training.hints import oom_overrides
    return oom_overrides(cfg, step)


def absolutise(cfg: config.Config) -> config.Config:
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
            return self.run_dir
        rundir.use_private_umask()          # this process writes the run: its files are private
        if self.resume:
            assert self.run_dir is not None
            if not (self.run_dir / rundir.CONFIG).exists():
                raise PreflightError(f"{self.run_dir}: not a run directory (no {rundir.CONFIG})")
            self._lock = rundir.acquire_lock(self.run_dir)    # before anything in it is touched
            rundir.make_private(self.run_dir)
            if rundir.process_alive(self.run_dir) and rundir.owner_pid(self.run_dir) != os.getpid():
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
        if self._lock is None:
            self._lock = rundir.acquire_lock(self.run_dir)
        (self.run_dir / rundir.CONTROL).mkdir(exist_ok=True)
        if not self.resume:
            config.save(self.cfg, self.run_dir / rundir.CONFIG)
        rundir.write_pid(self.run_dir)
        self._writer = events.JsonlWriter(self.run_dir / rundir.EVENTS)
        self.bus.subscribe(self._writer)
        self.bus.on_sink_error.append(self._sink_error)
        self.bus.subscribe(self._on_event)
        return self.run_dir

    def _record_refusal(self, e: Exception) -> None:
        """A detached child was handed its run directory before the checks (so `train --detach`
        returns at once): a refusal goes into that run's log, where `runs` and `attach` see it."""
        if self.run_dir is None or not (self.run_dir / rundir.CONFIG).exists():
            return
        kind = "data" if "data" in str(e).lower() or "line " in str(e) else "config"
        try:
            w = events.JsonlWriter(self.run_dir / rundir.EVENTS)
            w(events.RunFailed(reason=str(e).replace("\n", " "), kind=kind))
            w.close()
        except OSError:
            pass

    def _resume_config(self) -> config.Config:
        from engine.core import control as ctl
        cfg, changed = resume_config(self.run_dir, self.overrides)
        if changed:
            config.save(cfg, self.run_dir / rundir.CONFIG)
            self._changed = changed
        since = rundir.writer_since_ns()
        for path, _cmd in ctl.pending(self.run_dir):    # requests to the dead process: not for us
            if ctl.sent_ns(path) >= since:
                continue                                  # sent to this writer (after it started)
            try:
                path.replace(path.with_suffix(".stale"))
            except OSError:
                pass
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
        if exc is not None and isinstance(ev, events.RunFinished):
            from engine.training.trainer import _is_disk_full
            disk = _is_disk_full(exc)
            ev = events.RunFailed(kind="disk" if disk else "error", step=ev.step, reason=(
                f"{'disk full: ' if disk else ''}{rundir.EVENTS} could not be written ({exc}); the run stopped "
                f"at step {ev.step}" + (f", adapter saved in {ev.adapter_dir}" if ev.adapter_dir else "")
                + "; free space and resume"))
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
        emit(events.Status(phase="resume", message=self._resume_note + (
            "; config changed: " + ", ".join(f"{k} = {self.cfg.get(k)!r}" for k in self._changed)
            if self._changed else "")))

    def _main(self) -> None:
        emit = self.bus.emit
        self._say_how_it_starts(emit)
        hints = None
        try:
            from engine.training.hints import HintEngine
            hints = HintEngine(self.cfg)
        except ImportError:
            pass
        if hints is not None:
            last_step = [0]
            nan_steps: set[int] = set()    # the trainer's own NaN check already said so on that step

            def feed(ev):
                if isinstance(ev, events.Hint):
                    if ev.rule == "nan":
                        nan_steps.add(ev.step)
                    return
                if isinstance(ev, events.Step):
                    last_step[0] = ev.step
                for h in hints.observe(ev):
                    if h.rule == "nan" and h.step in nan_steps:
                        continue
                    emit(h)
            self.bus.subscribe(feed, replay=False)
            threading.Thread(target=self._watch_gpu, args=(hints, last_step), daemon=True,
                             name="qlora-gpu-hints").start()
        step = 0
        prepared = None
        try:
            from engine.training import trainer as trainer_mod
            ckpt = self._resume_ckpt
            if self.resume:
                if ckpt is not None and 0 < self.cfg.train.max_steps <= rundir.checkpoint_step(ckpt):
                    # nothing left to train (killed while saving the adapter, say): HF would train
                    # one step past max_steps; take the adapter from the checkpoint instead
                    step = rundir.checkpoint_step(ckpt)
                    adapter = self._adapter_from_checkpoint(ckpt, emit)
                    from engine.core.summary import fold
                    done = fold(events.read_events(self.run_dir / rundir.EVENTS))
                    self._emit_final(events.RunFinished(step=step, adapter_dir=str(adapter),
                                       final_loss=done.last_loss,
                                       reason=f"completed (nothing left to train; adapter from {ckpt.name})"))
                    return
            prepared = trainer_mod.build(self.cfg, self.run_dir, emit, self.stop_flag, self.stop_reason,
                               faults_from_env())
            trainer = prepared.trainer
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
            step = trainer.state.global_step
            cb = next(c for c in trainer.callback_handler.callbacks if hasattr(c, "nonfinite"))
            if cb.nonfinite is not None:
                nf = cb.nonfinite
                self._save_adapter(trainer, prepared, emit)
                what = "loss" if is_nonfinite(nf.loss) else "grad norm"
                from engine.training.hints import _extreme_scaling
                extreme = _extreme_scaling(self.cfg)
                fix = extreme[1] if extreme else "lower train.learning_rate, e.g. to 1e-4"
                self._emit_final(events.RunFailed(reason=f"non-finite {what} at step {nf.step}: halted (train.nan_policy = "
                                 f"halt); {fix}", kind="nan", step=nf.step))
                return
            adapter = self._save_adapter(trainer, prepared, emit)
            stopped = self.stop_flag.is_set()
            self._emit_final(events.RunFinished(step=step, adapter_dir=str(adapter), final_loss=cb.last_loss, stopped=stopped,
                               reason=(self.stop_reason[0] if self.stop_reason else "stopped") if stopped
                               else "completed"))
        except BaseException as e:  # noqa: BLE001 - every failure must become an event
            self._emit_final(self._failure_event(e, prepared, step))
        finally:
            from engine.training import trackers
            trackers.finish(self.cfg.output.report_to)
            if self._writer:
                self._writer.close()
            if self._lock is not None:
                os.close(self._lock)        # the run is over: another writer may take it
                self._lock = None

    def _watch_gpu(self, hints, last_step, every: float = 2.0) -> None:
        """Feed NVML utilisation of this process's GPU to the low-GPU-use rule while training."""
        from engine.training.gpu import GpuSampler
        from engine.training.distributed import local_rank
        sampler = GpuSampler.for_cuda_device(local_rank())   # through CUDA_VISIBLE_DEVICES
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

    def _failure_event(self, e: BaseException, prepared, step: int) -> events.Event:
        from engine.dataset import data as data_mod
        from engine.training import model as model_mod
        tb = traceback.format_exc()
        try:
            step = prepared.trainer.state.global_step if prepared else step
        except Exception:
            pass
        name = type(e).__name__
        if name == "OutOfMemoryError" or "out of memory" in str(e).lower():
            try:
                from engine.training.hints import HintEngine
                est = None
                try:
                    from engine.planning import estimate as estimate_mod
                    est = estimate_mod.estimate(self.cfg, estimate_mod.model_config_for(self.cfg)).peak_bytes
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
            ck = rundir.checkpoints(self.run_dir)
            last = f"; last checkpoint {ck[-1].name} is intact (resume with the fix)" if ck else ""
            return events.RunFailed(reason=f"CUDA out of memory at step {step + 1}{last}", kind="oom",
                               step=step, detail=tb)
        if isinstance(e, (data_mod.DataError, PreflightError)):
            return events.RunFailed(reason=str(e).splitlines()[0], kind="data", step=step, detail=tb)
        if isinstance(e, (model_mod.ModelError, config.ConfigError)):
            return events.RunFailed(reason=" ".join(str(e).split()), kind="config", step=step, detail=tb)
        from engine.training.trainer import _is_disk_full
        if _is_disk_full(e):
            ck = rundir.checkpoints(self.run_dir)
            kept = f"; previous checkpoint {ck[-1].name} kept" if ck else ""
            return events.RunFailed(reason=f"disk full while saving at step {step}{kept}; free space and resume",
                               kind="disk", step=step, detail=tb)
        if isinstance(e, KeyboardInterrupt):
            return events.RunFailed(reason="interrupted", kind="killed", step=step, detail=tb)
        msg = str(e).strip().splitlines()
        return events.RunFailed(reason=f"{name}: {msg[0][:300] if msg else ''}".rstrip(": "), kind="error",
                           step=step, detail=tb)

    def _save_adapter(self, trainer, prepared, emit) -> Path:
        """Write the final adapter (+ tokenizer) atomically to RUN_DIR/adapter."""
        emit(events.Status(phase="save", message="saving the adapter"))
        from engine.training import galore
        final = self.run_dir / galore.output_dir_name(self.cfg)
        tmp = self.run_dir / (final.name + ".tmp")
        from engine.training import distributed
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        if distributed.in_worker():
            # every rank takes part (FSDP gathers the sharded adapter); rank 0 writes
            if getattr(trainer, "is_fsdp_enabled", False):
                from engine.training import trainer as trainer_mod
                trainer_mod.save_fsdp_adapter(trainer, tmp, prepared.resized_embeddings)
            else:
                trainer.save_model(str(tmp))
            trainer.accelerator.wait_for_everyone()
            if not distributed.is_main():
                return final
        else:
            trainer.model.save_pretrained(str(tmp))
        if not (any((tmp / n).is_file() for n in ADAPTER_WEIGHTS) or galore.is_full(self.cfg) and galore.has_weights(tmp)):
            raise RuntimeError(f"the adapter weights were not written to {tmp}; the checkpoints in "
                               f"{self.run_dir / rundir.CHECKPOINTS} are kept")
        prepared.tokenizer.save_pretrained(str(tmp))
        if galore.is_full(self.cfg):
            galore.write_marker(tmp, self.cfg, prepared.model_path)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if not self.cfg.output.keep_checkpoints and not self.stop_flag.is_set():
            shutil.rmtree(self.run_dir / rundir.CHECKPOINTS, ignore_errors=True)
        return final

    TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                      "training_args.bin", "scaler.pt", rundir.COMPLETE)

    def _adapter_from_checkpoint(self, ckpt: Path, emit) -> Path:
        """RUN_DIR/adapter from a checkpoint's adapter + tokenizer files (atomically)."""
        emit(events.Status(phase="save", message=f"saving the adapter from {ckpt.name}"))
        from engine.training import galore
        if galore.is_full(self.cfg) and galore.has_weights(ckpt):
            return self._full_from_checkpoint(ckpt)
        if not any((ckpt / n).is_file() for n in ADAPTER_WEIGHTS):
            # an FSDP checkpoint holds sharded model state, not an adapter: never copy it as one
            raise RuntimeError(f"{ckpt} has no adapter weights (a sharded FSDP checkpoint?); resume "
                               f"with a higher train.max_steps to train on and save the adapter")
        final = self.run_dir / rundir.ADAPTER
        tmp = self.run_dir / (rundir.ADAPTER + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ckpt, tmp, ignore=lambda _d, names: [n for n in names if n in self.TRAINING_STATE])
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return final

    def _full_from_checkpoint(self, ckpt: Path) -> Path:
        """GaLore: RUN_DIR/model from a checkpoint's full weights + tokenizer (atomically)."""
        from engine.training import galore
        from engine.training import model as model_mod
        final = self.run_dir / galore.FULL_DIR
        tmp = self.run_dir / (galore.FULL_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ckpt, tmp, ignore=lambda _d, names: [n for n in names if n in self.TRAINING_STATE])
        galore.write_marker(tmp, self.cfg, model_mod.model_path(self.cfg))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return final

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
                                     "resume from the last checkpoint", kind="killed"))
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
    """Run a multi-GPU job in the foreground: make the run directory (rank 0's), then start
    ``distributed.gpus`` workers through ``accelerate launch``; return their exit status."""
    from engine.training import distributed
    if resume:
        cfg, _ = resume_config(run_dir, overrides)
        args = ["train", "--resume", str(run_dir), "--headless"] + sum((["--set", o] for o in overrides or []), [])
    else:
        if check:
            preflight(cfg)
        if run_dir is None:
            cfg = absolutise(cfg)
            run_dir = rundir.create(cfg.output.dir, cfg.output.name or cfg.model.name)
            config.save(cfg, run_dir / rundir.CONFIG)
        args = ["train", str(run_dir / rundir.CONFIG), "--run-dir", str(run_dir), "--no-check", "--headless"]
    print(f"run {run_dir}: launching {cfg.distributed.gpus} processes ({cfg.distributed.strategy})",
          flush=True)
    proc = subprocess.Popen(distributed.launch_argv(cfg, args), env=dict(_child_env(), **{distributed.LAUNCHED: "1"}))
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:      # the workers got the signal too and stop gracefully
            continue
    from engine.core import exitcodes
    if rc == exitcodes.OK and rundir.info(run_dir).state == "stopped":
        return exitcodes.STOPPED
    return rc


def start_detached(cfg: config.Config | None, *, resume: str | Path | None = None, check: bool | str = True,
                   overrides: list[str] | None = None) -> Path:
    """Start a run in its own session (survives the terminal closing); return its directory.

    ``check``: True runs the preflight here (the TUI's launch thread shows its refusal);
    "child" leaves it to the child, which records a refusal in the run's log (`train --detach`
    returns at once). ``resume``: continue that run directory instead (``overrides`` change its config first,
    e.g. ``oom_fix_overrides``). The child is ``python -m engine train ... --headless`` with
    stdin on /dev/null and its output in RUN_DIR/stdout.log; it is never a child of the
    caller's session, so closing the terminal or the SSH connection does not reach it.
    """
    with rundir.private_files():            # the run's files are private from the first one on
        return _start_detached(cfg, resume=resume, check=check, overrides=overrides)


def _start_detached(cfg, *, resume, check, overrides) -> Path:
    if resume:
        run_dir = Path(resume)
        if not (run_dir / rundir.CONFIG).exists():
            raise PreflightError(f"{run_dir}: not a run directory (no {rundir.CONFIG})")
        if rundir.process_alive(run_dir):
            raise PreflightError(f"{run_dir}: the run is still live; attach to it instead")
        resume_config(run_dir, overrides)   # what the child would refuse, said here where it is seen
        argv = ["train", "--resume", str(run_dir)]
        for o in overrides or []:
            argv += ["--set", o]
    else:
        if check is True:
            preflight(cfg)
        cfg = absolutise(cfg)
        run_dir = rundir.create(cfg.output.dir, cfg.output.name or cfg.model.name)
        config.save(cfg, run_dir / rundir.CONFIG)
        argv = ["train", str(run_dir / rundir.CONFIG), "--run-dir", str(run_dir)]
        if check is True:
            argv.append("--no-check")      # done here; check="child": the child checks
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
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
