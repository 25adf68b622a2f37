"""The TRL ``SFTTrainer`` subclass and the callbacks that turn its progress into events.

Plain module-level classes (``engine.training.recipe`` builds them): ``QLoraTrainer`` adds the
per-step NaN bookkeeping, fault injection (``QLORA_TUI_FAULTS``), a dtype-keeping resume and
checkpoints committed by a COMPLETE marker; ``EventCallback`` emits the run's events and carries
out stop/save requests (``engine.core.control``) for one process and many through one path;
``LogFirst`` makes the trackers log what ``EventCallback`` adds.

``QLoraTrainer`` is ``QLoraTrainerMixin`` over TRL's ``SFTTrainer``, made on first use of the
name (PEP 562 module ``__getattr__``): importing TRL loads rich, which no engine module may load
at import time (tests/architecture/test_engine_has_no_ui.py). ``trainer_class`` makes the same for any method's TRL
trainer (``engine.methods``: ``Method.trainer``). Importing this module imports torch and transformers.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from engine.core import control as ctl
from engine.core import events
from engine.core import rundir
from engine.core.faults import Faults
from engine.core.units import is_nonfinite
from engine.training import distributed
from engine.training.failures import is_disk_full


class NonFiniteHalt(RuntimeError):
    def __init__(self, step: int, loss, grad_norm):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        super().__init__(f"non-finite {'loss' if is_nonfinite(loss) else 'grad norm'} at step {step}")


def __getattr__(name: str):
    if name == "QLoraTrainer":
        from engine import methods
        cls = trainer_class(methods.get(methods.DEFAULT))
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_CLASSES: dict[tuple[str, bool], type] = {}     # (Method.trainer, pair_inputs) -> the class


def trainer_class(method) -> type:
    """The engine's trainer for ``method`` (an ``engine.methods`` Method): ``QLoraTrainerMixin``
    over the TRL trainer it names (``Method.trainer``, "module:attr"), made once per trainer; the
    SFT methods' is ``QLoraTrainer`` (over TRL's ``SFTTrainer``)."""
    pair_inputs = bool(getattr(method, "pair_inputs", False))
    key = (method.trainer, pair_inputs)
    if key in _CLASSES:
        return _CLASSES[key]
    from engine.core.registry import load
    base = load(method.trainer)
    body = {"__module__": __name__, "__doc__": f"{base.__name__} with the engine's step bookkeeping "
                                               f"({QLoraTrainerMixin.__name__})."}
    if pair_inputs:                     # TRL's ORPO/CPO batches: no input_ids
        body["_track_num_input_tokens"] = _count_pair_tokens
    name = "QLoraTrainer" if base.__name__ == "SFTTrainer" else f"QLora{base.__name__}"
    cls = type(name, (QLoraTrainerMixin, base), body)
    _CLASSES[key] = cls
    return cls


def _count_pair_tokens(self, inputs) -> None:
    """Tokens seen (tokens/s) for TRL's ORPO/CPO batches, which have no ``input_ids``: the
    non-padding tokens of both sides (each holds the prompt)."""
    n = sum(inputs[k].sum() for k in ("chosen_attention_mask", "rejected_attention_mask") if k in inputs)
    if isinstance(n, int):
        return
    n = torch.as_tensor(n, device=self.args.device, dtype=torch.int64)
    self.state.num_input_tokens_seen += self.accelerator.gather(n).sum().item()


class QLoraTrainerMixin:
    """SFTTrainer with per-step NaN bookkeeping and optional fault injection (``QLoraTrainer``)."""

    def __init__(self, *args, faults: Faults | None = None, event_callback: EventCallback | None = None, **kwargs):
        self.faults = faults or Faults()
        self.event_callback = event_callback
        self.fp8_guard = False        # set by the recipe when FP8 base GEMMs are on: checked on the first micro-batch
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, *a, **kw):
        faults = self.faults
        step = self.state.global_step + 1
        if self.fp8_guard and model.training:
            self.fp8_guard = False
            self._check_fp8(model, inputs, step)
        if faults.slow:
            time.sleep(faults.slow)
        if faults.oom_step == step:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by QLORA_TUI_FAULTS). "
                                         "Tried to allocate 2.00 GiB")
        out = super().compute_loss(model, inputs, *a, **kw)
        if faults.nan_step == step:
            if isinstance(out, tuple):
                out = (out[0] * float("nan"),) + tuple(out[1:])
            else:
                out = out * float("nan")
        return out

    def _check_fp8(self, model, inputs, step: int) -> None:
        """FP8 guards its own numerics: the first micro-batch's loss with the base GEMMs in FP8 and
        in bf16 (two forwards without gradients); a relative difference above
        ``probes.FP8_GUARD_THRESHOLD`` turns FP8 off for the run. Either way a NumericsCheck event."""
        from engine.training import offload, probes
        mods = [m for m in model.modules() if getattr(m, "_fp8", False)]
        if not mods:
            return

        def loss_with(fp8: bool) -> float:
            for m in mods:
                m._fp8 = fp8
            with torch.no_grad():
                return float(model(**inputs).loss.float())
        t0 = time.perf_counter()
        try:
            ref, fast = loss_with(False), loss_with(True)
        finally:
            for m in mods:
                m._fp8 = True
            offload._STASH.reset()                 # no backward follows these forwards
        if self.faults.fp8_drift:
            fast *= 1.02
        rel = abs(fast - ref) / max(abs(ref), 1e-12)
        rel = rel if rel == rel else float("inf")
        kept = rel <= probes.FP8_GUARD_THRESHOLD
        if not kept:
            for m in mods:
                m._fp8 = False
        emit = self.event_callback.emit if self.event_callback is not None else (lambda ev: None)
        emit(events.NumericsCheck(path="train.fp8_base", step=step, reference_loss=ref, fast_loss=fast,
                                  relative_difference=rel, threshold=probes.FP8_GUARD_THRESHOLD, kept=kept,
                                  seconds=round(time.perf_counter() - t0, 4)))
        if not kept:
            emit(events.RunWarning(
                message=f"FP8 base GEMMs turned off for this run: the first step's loss differs from the bf16 "
                        f"path's by {rel:.2%} (limit {probes.FP8_GUARD_THRESHOLD:.1%}); the run goes on in bf16",
                source="build", step=step))
        if distributed.is_main():
            probes.record_numerics(probes.device_name(next(model.parameters()).device.type), "fp8_base", rel, kept)

    def evaluate(self, *a, **kw):
        """Eval, then every 4-bit layer back on its trainable kernel before the next step
        (engine.training.model.keep_4bit_trainable: a library may switch layers to an
        inference-only layout while no gradient is asked for)."""
        out = super().evaluate(*a, **kw)
        from engine.training.model import restore_trainable_4bit
        n = restore_trainable_4bit(self.model)
        if n and self.event_callback is not None:
            self.event_callback.emit(events.RunWarning(
                message=f"{n} 4-bit layers were switched to an inference-only kernel during eval; "
                        "restored before training went on", source="build", step=self.state.global_step))
        return out

    def _maybe_log_save_evaluate(self, tr_loss, *a, **kw):
        out = super()._maybe_log_save_evaluate(tr_loss, *a, **kw)
        # HF resets the running loss with ``tr_loss -= tr_loss``: NaN - NaN stays NaN, so one
        # poisoned step (nan_policy = warn) would make every later logged loss NaN
        if (self._globalstep_last_logged == self.state.global_step and isinstance(tr_loss, torch.Tensor)
                and not bool(torch.isfinite(tr_loss).all())):
            tr_loss.zero_()
        return out

    def training_step(self, model, inputs, *a, **kw):
        loss = super().training_step(model, inputs, *a, **kw)
        rep = distributed.REPORTER
        if rep is not None:              # this process's own tokens (the job's are gathered by the Trainer)
            mask = inputs.get("attention_mask") if hasattr(inputs, "get") else None
            ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
            rep.local_tokens += int(mask.sum()) if mask is not None else (ids.numel() if ids is not None else 0)
        cb = self.event_callback
        if cb is not None:
            cb.step_loss = loss.detach() if cb.step_loss is None else cb.step_loss + loss.detach()
        return loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume: load the adapter, keeping each trainable parameter's dtype.

        TRL trains QLoRA adapters in bf16, but PEFT's load_adapter upcasts them to fp32:
        a resumed run would go on in another precision than the run it continues.
        """
        m = model if model is not None else self.model
        dtypes = {n: p.dtype for n, p in m.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for n, p in m.named_parameters():
            if n in dtypes and p.dtype != dtypes[n]:
                p.data = p.data.to(dtypes[n])

    def _save_checkpoint(self, model, trial):
        """HF's checkpoint, then the COMPLETE marker (the commit point), then our rotation.

        HF would rotate before anything marks the new checkpoint complete, so with
        save_total_limit = 1 a kill in between left no complete checkpoint: rotation is
        ours, over complete checkpoints only, after the marker.
        """
        step = self.state.global_step
        d = Path(self.args.output_dir) / f"checkpoint-{step}"
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            if self.faults.diskfull_step == step:
                d.mkdir(parents=True, exist_ok=True)
                (d / "adapter_model.safetensors").write_bytes(b"\0" * 16)
                raise OSError(errno.ENOSPC, "No space left on device (injected)", str(d))
            super()._save_checkpoint(model, trial)
            self._commit(d, step)
        except Exception as e:
            if is_disk_full(e):
                shutil.rmtree(d, ignore_errors=True)     # the half-written one; frees its space
                raise OSError(errno.ENOSPC, f"No space left on device while writing {d}", str(d)) from e
            raise
        finally:
            self.args.save_total_limit = limit
        if distributed.is_main():
            rundir.rotate_checkpoints(Path(self.args.output_dir).parent, limit)

    def _commit(self, d: Path, step: int) -> None:
        """The COMPLETE marker, once every rank has written its part (FSDP shards)."""
        if distributed.in_worker():
            self.accelerator.wait_for_everyone()
        if not distributed.is_main():
            return
        if self.faults.markerfull_step == step:
            from engine.core import faults as faults_mod
            faults_mod.DISK_FULL.set()
            raise OSError(errno.ENOSPC, "No space left on device (injected, writing COMPLETE)", str(d))
        rundir.mark_complete(d, step)


class LogFirst(TrainerCallback):
    """Calls our callback's on_log before the trackers' (it then skips the handler's own call)."""

    def __init__(self, cb: EventCallback):
        self.cb = cb

    def on_log(self, args, state, control, logs=None, **kw):
        self.cb.on_log(args, state, control, logs=logs, **kw)
        self.cb.logged = id(logs)


class EventCallback(TrainerCallback):
    """Turns Trainer callbacks into events; polls the stop flag and the control channel."""

    def __init__(self, emit, stop_flag, stop_reason, run_dir, faults, cfg):
        self.emit = emit
        self.stop_flag = stop_flag
        self.stop_reason = stop_reason
        self.run_dir = Path(run_dir)
        self.faults = faults
        self.cfg = cfg
        self.trainer = None
        self.meta = {}
        self.predict = None                      # steps -> (seconds, line): the recipe's time to train
        self.predicted_seconds = None
        self.train_seconds = None
        self._t_begin = None
        self._eval_seconds = 0.0
        self.step_loss = None
        self.nonfinite: NonFiniteHalt | None = None
        self._t_last = None
        self._tok_last = 0
        self._step_last = 0
        self.resumed_from = 0
        self.last_loss = None
        self.logged = None                       # id of the logs LogFirst already handled
        self.requests = ctl.Carried()            # control requests carried out, done once saved

    # -- lifecycle
    def on_train_begin(self, args, state, control, **kw):
        model = kw.get("model")
        trainable = total = 0
        if model is not None:
            for p in model.parameters():
                n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
                total += n
                if p.requires_grad:
                    trainable += n
        self.resumed_from = state.global_step
        self._step_last = state.global_step
        self._tok_last = state.num_input_tokens_seen
        self._t_last = self._t_begin = time.perf_counter()
        predicted, line = None, ""
        if self.predict is not None:
            try:
                predicted, line = self.predict(state.max_steps - state.global_step)
            except Exception:        # advice only
                predicted, line = None, ""
        self.predicted_seconds = predicted
        self.emit(events.RunStarted(run_dir=str(self.run_dir), total_steps=state.max_steps,
                                    trainable_params=trainable, total_params=total,
                                    resumed_from_step=state.global_step, pid=os.getpid(),
                                    predicted_seconds=predicted, prediction=line, **self.meta))

    def on_train_end(self, args, state, control, **kw):
        if self._t_begin is not None:   # the training steps' wall time, this segment, evaluations excluded
            self.train_seconds = max(0.0, time.perf_counter() - self._t_begin - self._eval_seconds)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        model = kw.get("model") or (self.trainer.model if self.trainer else None)
        step = state.global_step + 1
        loss = self.step_loss
        self.step_loss = None
        loss_ok = loss is None or bool(torch.isfinite(loss).all())
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None] if model else []
        grad_norm = None
        if grads:
            norms = torch._foreach_norm(grads)
            gn = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
            grad_norm = float(gn)
        bad = not loss_ok or is_nonfinite(grad_norm)
        if distributed.in_worker():      # FSDP shards gradients: ranks must agree to drop the step
            bad = bool(distributed.all_reduce_flags([int(bad)])[0])
        if not bad:
            return
        lv = float(loss.float().mean()) if loss is not None else None
        for p in model.parameters():         # drop the poisoned gradients: the weights stay finite
            p.grad = None
        halt = NonFiniteHalt(step, lv, grad_norm)
        from engine.training.hints import HintEngine
        self.emit(HintEngine(self.cfg).nan_hint(step, lv, grad_norm, self.cfg))
        if self.cfg.train.nan_policy == "halt":
            self.nonfinite = halt
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kw):
        """Stop/save: the stop flag (signals) and the control channel, one path for one process
        and many: rank 0 reads the requests, every rank stops/saves on the same step, and a
        request is marked done once the checkpoint it asked for is complete (``on_save``)."""
        req = self.requests.take(self.run_dir) if distributed.is_main() else ctl.Requests()
        if req.stop and not self.stop_flag.is_set():
            self.stop_reason.append("stop requested through the control channel")
        stop, save = distributed.all_reduce_flags([int(self.stop_flag.is_set() or req.stop), int(req.save)])
        if stop:
            self.stop_flag.set()
            control.should_training_stop = True
        control.should_save = bool(control.should_save or stop or save) and self.nonfinite is None
        if not control.should_save:
            self.requests.done()         # no checkpoint comes of them (a NaN halt): carried out as far as they go
        return control

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is not None and self.logged == id(logs):
            self.logged = None           # already handled, first, through LogFirst
            return
        logs = logs or {}
        pref = self._preference(logs, state.global_step)
        if "eval_loss" in logs:
            self.emit(events.Eval(step=state.global_step, eval_loss=logs["eval_loss"]))
            if pref is not None:
                self.emit(pref)
            t0 = time.perf_counter()
            self._generations(state.global_step)
            runtime = logs.get("eval_runtime")       # evaluations are not training time
            self._eval_seconds += (time.perf_counter() - t0) + (float(runtime) if isinstance(runtime, (int, float)) else 0.0)
            return
        if "loss" not in logs:
            return
        tps, eta = self._rates(state)
        if distributed.REPORTER is not None:
            distributed.REPORTER.update(state.global_step)
        loss = logs.get("loss")
        self.last_loss = loss
        if tps is not None:
            logs["tokens_per_second"] = tps     # the trackers' callbacks run after this one
        self.emit(events.Step(step=state.global_step, total_steps=state.max_steps, loss=loss,
                              learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                              tokens_per_second=tps, epoch=logs.get("epoch", state.epoch), eta_seconds=eta,
                              tokens_seen=int(state.num_input_tokens_seen), peak_memory_bytes=_peak_memory()))
        if pref is not None:
            self.emit(pref)

    def _preference(self, logs: dict, step: int):
        """A preference method's metrics of this log (engine.training.preference), else None."""
        method = self.cfg.train.method
        from engine.training.preference import is_preference, metrics_event
        if not is_preference(self.cfg):
            return None
        return metrics_event(logs, step, method)

    _prompts: list | None = None
    _generation_failed = False

    def _generations(self, step: int) -> None:
        """``eval.prompts`` answered by the adapter as it is at this eval (greedy, at most
        ``eval.max_new_tokens`` each), as one ``Generations`` event. One process only (a
        distributed run's ranks would have to generate in step); a failure is one warning and
        the run goes on without generations."""
        if self._generation_failed or distributed.in_worker() or self.trainer is None:
            return
        from engine.outputs import generate
        if self._prompts is None:
            self._prompts = generate.eval_prompts(self.cfg, self.cfg.eval.samples)
        tok = getattr(self.trainer, "processing_class", None)
        if not self._prompts or tok is None or not hasattr(tok, "apply_chat_template") \
                or hasattr(tok, "image_processor"):        # a vision processor: text prompts only here
            return
        model = self.trainer.model
        was_training = model.training
        t0 = time.perf_counter()
        try:
            model.eval()
            answers = generate.greedy_answers(model, tok, self._prompts, self.cfg.eval.max_new_tokens)
        except Exception as e:  # noqa: BLE001 - generations are a view; training goes on
            self._generation_failed = True
            self.emit(events.RunWarning(step=step, message=f"eval generations turned off: "
                                        f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
            return
        finally:
            if was_training:
                model.train()
        self.emit(events.Generations(step=step, seconds=time.perf_counter() - t0,
                                     samples=[{"prompt": p, "answer": a} for p, a in zip(self._prompts, answers)]))

    def _rates(self, state) -> tuple[float | None, float | None]:
        """Tokens/s and the ETA since the last logged step."""
        now = time.perf_counter()
        dt = now - (self._t_last or now)
        dtok = state.num_input_tokens_seen - self._tok_last
        dsteps = state.global_step - self._step_last
        tps = dtok / dt if dt > 0 and dtok > 0 else None
        eta = None
        if dsteps > 0 and dt > 0:
            eta = dt / dsteps * max(0, state.max_steps - state.global_step)
        self._t_last, self._tok_last, self._step_last = now, state.num_input_tokens_seen, state.global_step
        return tps, eta

    def on_save(self, args, state, control, **kw):
        d = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if (d / rundir.COMPLETE).exists():      # written by the trainer's _save_checkpoint
            self.emit(events.Checkpoint(step=state.global_step, path=str(d)))
            self.requests.done()


def _peak_memory() -> int | None:
    try:
        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_reserved())
    except Exception:
        pass
    return None
