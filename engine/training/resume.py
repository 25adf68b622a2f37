"""Resuming a run: the config it goes on with, requests left to a dead process, and a run whose
checkpoint already holds every step (its adapter is taken from that checkpoint).

``engine.training.runner.Run(None, run_dir, resume=True)`` uses these; the log is never rolled
back: the run appends a ``Resumed`` marker (``engine.core.summary`` drops what it redoes).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from engine.core import config
from engine.core import events
from engine.core import rundir

# what a resume may not change: the checkpoint's adapter and base must stay what they are
RESUME_FROZEN = ("model", "quant", "lora", "galore")      # whole sections
RESUME_FROZEN_KEYS = ("train.method",)                    # single keys


def frozen_keys(keys) -> list[str]:
    """The dotted keys of ``keys`` a resume may not change (the one rule: the CLI's resume, the TUI's
    recovery dialog and its fix list all ask here)."""
    return [k for k in keys if k.split(".", 1)[0] in RESUME_FROZEN or k in RESUME_FROZEN_KEYS]

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# a checkpoint's files that are training state, not part of the adapter
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                  "training_args.bin", "scaler.pt", rundir.COMPLETE)


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[config.Config, list[str]]:
    """The config a resume of ``run_dir`` would use, and the keys ``overrides`` change.
    Raises PreflightError (finished run, frozen section changed) or ConfigError (bad value)."""
    from engine.training.preflight import PreflightError
    run_dir = Path(run_dir)
    if not (run_dir / rundir.CONFIG).exists():
        raise PreflightError(f"{run_dir}: not a run directory (no {rundir.CONFIG})")
    old = config.load(run_dir / rundir.CONFIG)
    last = rundir.info(run_dir)
    if last.state == rundir.State.DAMAGED:
        raise PreflightError(f"{run_dir}: cannot resume: {last.reason}")
    if last.state == "finished" and not overrides:
        raise PreflightError(f"{run_dir}: the run finished (step {last.step}); nothing to resume "
                             "(raise train.max_steps with --set to train on)")
    if not overrides:
        return old, []
    cfg = config.load(run_dir / rundir.CONFIG, overrides)
    before, after = old.to_dict(), cfg.to_dict()
    changed = [f"{sec}.{k}" for sec, vals in after.items() if isinstance(vals, dict)
               for k, v in vals.items() if before.get(sec, {}).get(k) != v]
    frozen = frozen_keys(changed)
    if frozen:
        raise PreflightError(f"{', '.join(frozen)}: cannot change on resume (the checkpoint's adapter "
                             "and base model must stay the same); start a new run instead")
    cfg.source = ""
    return cfg, changed


def retire_stale_requests(run_dir: Path) -> None:
    """Control requests sent to the process that died are not for the resumed run: ``*.stale``."""
    from engine.core import control as ctl
    since = rundir.writer_since_ns()
    for path, _cmd in ctl.pending(run_dir):
        if ctl.sent_ns(path) >= since:
            continue                                  # sent to this writer (after it started)
        try:
            path.replace(path.with_suffix(".stale"))
        except OSError:
            pass


def nothing_left(cfg: config.Config, ckpt: Path | None) -> bool:
    """The checkpoint already holds ``train.max_steps`` (killed while saving the adapter, say):
    HF would train one step past max_steps; the adapter is taken from the checkpoint instead."""
    return ckpt is not None and 0 < cfg.train.max_steps <= rundir.checkpoint_step(ckpt)


def finish_from_checkpoint(run_dir: Path, cfg: config.Config, ckpt: Path, emit) -> events.RunFinished:
    """The adapter of a run with nothing left to train, from its last checkpoint; the final event."""
    step = rundir.checkpoint_step(ckpt)
    adapter = adapter_from_checkpoint(run_dir, cfg, ckpt, emit)
    from engine.core.summary import fold        # the steps that stand after the resume marker
    done = fold(events.read_events(run_dir / rundir.EVENTS))
    return events.RunFinished(step=step, adapter_dir=str(adapter), final_loss=done.last_loss,
                              reason=f"completed (nothing left to train; adapter from {ckpt.name})")


def adapter_from_checkpoint(run_dir: Path, cfg: config.Config, ckpt: Path, emit) -> Path:
    """RUN_DIR/adapter from a checkpoint's adapter + tokenizer files (atomically)."""
    emit(events.Status(phase=events.Phase.SAVE, message=f"saving the adapter from {ckpt.name}"))
    from engine import methods
    from engine.methods import galore
    from engine.methods.base import FULL
    if methods.of(cfg).artifact == FULL and galore.has_weights(ckpt):
        return full_from_checkpoint(run_dir, cfg, ckpt)
    if not any((ckpt / n).is_file() for n in ADAPTER_WEIGHTS):
        # an FSDP checkpoint holds sharded model state, not an adapter: never copy it as one
        raise RuntimeError(f"{ckpt} has no adapter weights (a sharded FSDP checkpoint?); resume "
                           f"with a higher train.max_steps to train on and save the adapter")
    return _copy_from_checkpoint(ckpt, run_dir / rundir.ADAPTER)


def full_from_checkpoint(run_dir: Path, cfg: config.Config, ckpt: Path) -> Path:
    """GaLore: RUN_DIR/model from a checkpoint's full weights + tokenizer (atomically)."""
    from engine.methods import galore
    from engine.models.source import model_path
    return _copy_from_checkpoint(ckpt, run_dir / galore.FULL_DIR,
                                 lambda tmp: galore.write_marker(tmp, cfg, model_path(cfg)))


def _copy_from_checkpoint(ckpt: Path, final: Path, finish=None) -> Path:
    """``final`` = the checkpoint without its training state, written beside it and renamed in."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp, ignore=lambda _d, names: [n for n in names if n in TRAINING_STATE])
    if finish is not None:
        finish(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final
