"""The training recipe: a plan computed once, small TRL-style converters, and a ``Recipe`` in
torchtune's shape (``setup -> train -> save -> cleanup``).

- ``plan_run(cfg)``: what every ``auto`` resolved to (the fit planner on the GPU), as a value,
  before anything is built. Building never goes back to the planner; ``data.packing = auto`` is
  the one choice left to setup, because it depends on the tokenised rows' lengths.
- ``to_sft_config(cfg, plan)``, ``to_lora_config(cfg, targets)``, ``load_datasets(cfg, tok)``:
  the config turned into TRL's and PEFT's objects, each testable without a model.
- ``Recipe(plan, ...)``: ``setup()`` loads data, tokenizer and model and builds the trainer
  (``engine.training.sft``); ``train()``; ``save()`` writes the final adapter; ``cleanup()``.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from engine import methods
from engine.core import events
from engine.core.faults import Faults
from engine.dataset.rows import Rows, read_rows
from engine.core.registry import load
from engine.methods.base import FULL
from engine.training import preference


@dataclass
class RunPlan:
    """What ``auto`` resolved to for one run, and why (``lines``: what run_started's ``plan`` lists;
    setup appends what it built from it: kernels, checkpointing, trackers, streaming)."""
    cfg: object                        # the config with every ``auto`` replaced (packing: see above)
    runtime: object                    # engine.models.runtime.Runtime: device, dtype, 4-bit or not
    lines: list[str] = field(default_factory=list)
    estimate_bytes: int | None = None  # the pre-flight peak estimate (the OOM hint compares with it)
    warnings: list[str] = field(default_factory=list)   # fast paths that failed their check here

    def choices(self) -> dict:
        """The resolved choices by name (what the plan lines explain)."""
        tr = self.cfg.train
        from engine.models.runtime import attn_implementation
        return {"device": self.runtime.device, "dtype": self.runtime.dtype, "load_in_4bit": self.runtime.load_in_4bit,
                "batch_size": tr.batch_size, "grad_accum": tr.grad_accum, "optimizer": tr.optimizer,
                "gradient_checkpointing": tr.gradient_checkpointing, "checkpoint_layers": tr.checkpoint_layers,
                "activation_offload": tr.activation_offload, "weight_streaming": tr.weight_streaming,
                "fused_lora": tr.fused_lora, "fp8_base": tr.fp8_base, "liger_kernel": tr.liger_kernel, "packing": self.cfg.data.packing,
                "attention": attn_implementation(self.cfg, self.runtime.device)}


def plan_run(cfg, rows: "Rows | None" = None) -> RunPlan:
    """Resolve every ``auto`` of ``cfg`` once (``engine.training.trainer.resolve_auto``, weight
    streaming, the host-RAM check). Image ``rows`` are planned for their longest row (they are
    never packed). Raises ModelError for settings that cannot run."""
    from engine.planning import streaming_run
    from engine.models.runtime import runtime
    from engine.models.source import ModelError
    from engine.training.trainer import resolve_auto
    from engine.training.vision import longest_row
    rt = runtime(cfg)
    longest = longest_row(cfg, rows.format, rows.train) if rows is not None and rt.device == "cuda" else None
    resolved, lines = resolve_auto(cfg, rt, None, longest)
    try:
        lines += streaming_run.resolve(resolved, rt)
        streaming_run.check_host_ram(resolved)            # before any weight is loaded
    except ValueError as e:
        raise ModelError(str(e)) from None
    from engine.training import probes                     # each fast path checked on this device
    checked, warnings = probes.verify(resolved, rt)
    return RunPlan(resolved, rt, lines + checked, _peak_estimate(cfg), warnings)


def _peak_estimate(cfg) -> int | None:
    """The estimate `qlora-tui estimate` shows for this config (None when it cannot be made)."""
    try:
        from engine.planning import estimate as estimate_mod
        return estimate_mod.estimate(cfg, estimate_mod.model_config_for(cfg)).peak_bytes
    except Exception:        # the estimate is advice: never a reason to fail the run
        return None


def to_lora_config(cfg, targets):
    """PEFT's LoraConfig for ``[lora]`` over ``targets`` (module names or "all-linear")."""
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, bias=cfg.lora.bias, task_type="CAUSAL_LM",
                      use_dora=methods.of(cfg).dora(cfg), use_rslora=cfg.lora.use_rslora)


def _report_to(value: str) -> list[str]:
    from engine.training.trackers import names
    return names(value)


def trainer_args(cfg, plan: RunPlan, *, output_dir: str | Path = "checkpoints", has_eval: bool = False) -> dict:
    """The Trainer arguments every method shares (TRL's SFTConfig and its preference configs)."""
    tr, rt = cfg.train, plan.runtime
    fsdp = cfg.distributed.processes > 1 and cfg.distributed.strategy == "fsdp"
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=tr.batch_size, per_device_eval_batch_size=tr.batch_size,
        gradient_accumulation_steps=tr.grad_accum, num_train_epochs=tr.epochs, max_steps=tr.max_steps,
        learning_rate=tr.learning_rate, warmup_steps=tr.warmup_ratio, lr_scheduler_type=tr.scheduler,
        optim=tr.optimizer, weight_decay=tr.weight_decay, max_grad_norm=tr.max_grad_norm,
        gradient_checkpointing=bool(tr.gradient_checkpointing),
        # FSDP-QLoRA wants reentrant checkpointing (PEFT's FSDP-QLoRA recipe); everything else not
        gradient_checkpointing_kwargs={"use_reentrant": fsdp} if tr.gradient_checkpointing else None,
        ddp_find_unused_parameters=False if cfg.distributed.processes > 1 else None,
        ddp_timeout=cfg.distributed.timeout_s,      # a collective waiting for a dead node fails after this
        seed=tr.seed, data_seed=tr.seed, logging_steps=tr.logging_steps, logging_first_step=True,
        logging_nan_inf_filter=False,
        eval_strategy="steps" if has_eval and tr.eval_steps else ("epoch" if has_eval else "no"),
        eval_steps=tr.eval_steps or None,
        save_strategy="steps" if tr.save_steps else "no", save_steps=tr.save_steps or 500,
        save_total_limit=tr.save_total_limit,
        report_to=_report_to(cfg.output.report_to),
        bf16=rt.device == "cuda" and rt.dtype == "bf16", fp16=rt.device == "cuda" and rt.dtype == "fp16",
        use_cpu=rt.device == "cpu",
        dataset_num_proc=None, dataloader_num_workers=0, disable_tqdm=True,
        save_only_model=False, restore_callback_states_from_checkpoint=False,
    )


def to_sft_config(cfg, plan: RunPlan, *, output_dir: str | Path = "checkpoints", has_eval: bool = False):
    """TRL's SFTConfig for the resolved ``cfg`` on ``plan``'s device (checkpoints go to ``output_dir``)."""
    from trl import SFTConfig
    return SFTConfig(**trainer_args(cfg, plan, output_dir=output_dir, has_eval=has_eval),
                     use_liger_kernel=bool(cfg.train.liger_kernel),
                     max_length=cfg.data.max_length, packing=bool(cfg.data.packing),
                     include_num_input_tokens_seen="non_padding")


def load_datasets(cfg, tokenizer, rows: Rows | None = None):
    """The tokenised (train, eval) datasets of a text run (eval None without eval rows)."""
    from engine.modalities.text import encode_dataset
    rows = rows if rows is not None else read_rows(cfg)
    return encode_dataset(tokenizer, rows.train), (encode_dataset(tokenizer, rows.eval) if rows.eval else None)


@dataclass
class Prepared:
    trainer: object
    tokenizer: object
    model_path: str
    runtime: object
    train_rows: int
    eval_rows: int
    plan: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resized_embeddings: bool = False     # the tokenizer gained tokens: the adapter carries embeddings
    callback: object = None              # engine.training.sft.EventCallback


def build(plan: RunPlan, run_dir: Path, emit, stop_flag, stop_reason: list, faults: Faults | None = None) -> Prepared:
    """Load data, tokenizer and model; return a ready SFTTrainer wired to ``emit``."""
    return Recipe(plan, run_dir, emit, stop_flag, stop_reason, faults).setup()


class Recipe:
    """One run's training in torchtune's shape: ``setup -> train -> save -> cleanup``."""

    def __init__(self, plan: RunPlan, run_dir: Path, emit, stop_flag, stop_reason: list,
                 faults: Faults | None = None):
        self.plan, self.cfg, self.rt = plan, plan.cfg, plan.runtime
        self.run_dir = Path(run_dir)
        self.emit, self.stop_flag, self.stop_reason = emit, stop_flag, stop_reason
        self.faults = faults or Faults()
        self.prepared: Prepared | None = None
        self.modality = None        # engine.modalities.base.Modality, chosen once in _load_tokenizer
        self.proc = None            # the processing class the trainer gets and saves (processor or tokenizer)
        self.tok = None
        self.model_path = ""        # the checkpoint the base is loaded from (set by setup)

    # ---------------------------------------------------------------- setup
    @staticmethod
    def read_rows(cfg, emit) -> Rows:
        """The rows, read before the plan is made (a data error comes first, as nothing is loaded)."""
        emit(events.Status(phase=events.Phase.DATA, message="reading data"))
        return read_rows(cfg)

    def setup(self, rows: Rows | None = None) -> Prepared:
        """Data (``rows``, else read here), tokenizer, model and the trainer, from the plan."""
        from engine.models.source import model_path
        if rows is None:
            rows = self.read_rows(self.cfg, self.emit)
        path = model_path(self.cfg)
        self.model_path = path
        self._load_tokenizer(path, rows)
        train_tok, eval_tok = self._tokenise(rows)
        self._warn_past_pretrained_length(train_tok)
        model, resized = self._load_model(path)
        has_eval = eval_tok is not None and len(eval_tok) > 0
        trainer, cb = self._make_trainer(model, train_tok, eval_tok if has_eval else None)
        cb.meta = dict(model=self.cfg.model.name, device=self.rt.device, train_rows=len(train_tok),
                       eval_rows=len(eval_tok) if has_eval else 0, plan=self.plan.lines, config=self.cfg.to_dict())
        cb.predict = self._predictor(train_tok)
        for w in self.plan.warnings + rows.warnings:
            self.emit(events.RunWarning(source="build", message=w))
        self.prepared = Prepared(trainer, self.proc, path, self.rt,
                                 len(train_tok), len(eval_tok) if has_eval else 0, self.plan.lines,
                                 rows.warnings, resized_embeddings=resized, callback=cb)
        return self.prepared

    def _load_tokenizer(self, path: str, rows: Rows) -> None:
        from engine import modalities
        cfg = self.cfg
        self.emit(events.Status(phase=events.Phase.TOKENIZER, message=f"loading tokenizer from {path}"))
        self.modality = modalities.for_run(cfg, path, rows.format)
        self.proc, self.tok, tw = self.modality.load_processing(cfg, path)
        rows.warnings += tw

    def _tokenise(self, rows: Rows):
        """The encoded (train, eval) sets; ``data.packing = auto`` decided from their lengths."""
        from engine.training.trainer import decide_packing
        cfg = self.cfg
        self.emit(events.Status(phase=events.Phase.TOKENIZE, message=f"tokenising {len(rows.train)} train rows"))
        if preference.is_preference(cfg):     # TRL's preference trainers tokenise pairs themselves
            cfg.data.packing = False
            self.plan.lines.append("packing off (preference pairs: each side keeps its own sequence)")
            return preference.datasets(cfg, rows)
        train_tok, eval_tok, warnings = load(self.modality.training_set)(cfg, self.proc, rows)
        rows.warnings += warnings
        if not self.modality.packs:     # e.g. image rows: each keeps its own visual tokens
            cfg.data.packing = False
            self.plan.lines.append(self.modality.no_packing)
        lengths = [len(x) for x in train_tok["input_ids"]] if cfg.data.packing is not False else []
        if cfg.data.packing == "auto":
            cfg.data.packing, why = decide_packing(cfg, self.rt, lengths)
            self.plan.lines.append(why)
        from engine.training import attention        # packed rows: the varlen kernel where it runs
        self.plan.lines.extend(attention.choose(cfg, self.rt, lengths))
        return train_tok, eval_tok

    def _model_config(self) -> dict | None:
        """The model's config.json as a dict (None when it cannot be read here: advice skipped)."""
        try:
            from engine.planning import estimate as estimate_mod
            return estimate_mod.model_config_for(self.cfg)
        except Exception:
            return None

    def _warn_past_pretrained_length(self, train_tok) -> None:
        """Rows longer than the model's pretrained length without model.rope_scaling: one warning
        saying to set it (engine.models.rope.length_warning)."""
        if preference.is_preference(self.cfg) or not self.modality.lengths_known or self.cfg.model.rope_scaling:
            return
        mc = self._model_config()
        if mc is None:
            return
        from engine.models import rope
        longest = max((len(x) for x in train_tok["input_ids"]), default=0)
        why = rope.length_warning(self.cfg, mc, longest)
        if why:
            self.emit(events.RunWarning(source="build", message=why))

    def _predictor(self, train_tok):
        """Steps -> (seconds, what it is) for run_started's time to train
        (engine.planning.timing.run_predictor), from the tokenised rows' mean length; None where
        there is no prediction (preference pairs, image rows, a GPU not in the catalog)."""
        if preference.is_preference(self.cfg) or not self.modality.lengths_known:
            return None
        try:
            import numpy as np
            lengths = np.fromiter((len(x) for x in train_tok["input_ids"]), dtype=np.int64)
            if not len(lengths):
                return None
            from engine.planning import timing
            return timing.run_predictor(self.cfg, self.rt.device, float(lengths.mean()))
        except Exception:        # the prediction is advice: never a reason to fail the run
            return None

    def _load_model(self, path: str):
        from engine.training import model as model_mod
        cfg, rt = self.cfg, self.rt
        self.emit(events.Status(phase=events.Phase.MODEL, message=f"loading {cfg.model.name} "
                                f"({'4-bit ' + cfg.quant.quant_type if rt.load_in_4bit else rt.dtype}) on {rt.device}"))
        mc = self._model_config()
        model = model_mod.load_model(cfg, rt, path, self.modality)
        if cfg.model.rope_scaling and mc is not None:
            from engine.models import rope
            self.plan.lines.append(rope.describe(cfg.model.rope_scaling, mc))
        self.plan.lines.extend(model_mod.keep_4bit_trainable(model, rt))   # no inference-only 4-bit kernel in a run
        resized = len(self.tok) > model.get_input_embeddings().weight.shape[0]
        if resized:
            model.resize_token_embeddings(len(self.tok))
        return model, resized

    def _adapter_setup(self, model, args):
        """The LoRA config (None for GaLore: full-rank), the model and the optimizers to hand TRL."""
        cfg, lines = self.cfg, self.plan.lines
        if preference.is_preference(cfg) and cfg.model.adapter:     # an SFT run's adapter, trained on
            return None, preference.load_adapter(cfg, model, lines), (None, None)
        targets = load(self.modality.lora_targets)(cfg, model)
        lora = to_lora_config(cfg, targets)
        method = methods.of(cfg)
        full = method.artifact == FULL    # GaLore: full-rank weights, no adapter; the Trainer builds its optimizer
        if method.setup:
            lines += load(method.setup)(cfg, model, args, self.rt)
        line = self.modality.plan_line(cfg, len(targets))
        if line:
            lines.append(line)
        if full:
            return None, model, (None, None)
        if cfg.lora.init != "default":        # LoftQ / PiSSA: the adapter is built and initialised here
            from engine.training import lora_init
            return None, lora_init.apply(cfg, model, lora, self.model_path, self.run_dir, lines), (None, None)
        if not cfg.lora.lora_fa:
            return lora, model, (None, None)
        from peft import get_peft_model
        from peft.optimizers import create_lorafa_optimizer
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, lora)
        optimizer = create_lorafa_optimizer(model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                            lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
        lines.append("LoRA-FA: A frozen, only B trained (PEFT's LoRA-FA optimizer)")
        return None, model, (optimizer, None)

    def _collator(self, args):
        return load(self.modality.collator)(self.cfg, self.rt, self.tok, args)

    def _make_trainer(self, model, train_tok, eval_tok):
        from engine.training import sft
        from engine.training.trainer import install_speed_tools
        cfg, lines = self.cfg, self.plan.lines
        if cfg.output.report_to != "none":
            from engine.training import trackers
            lines.append(f"{cfg.output.report_to} logs: {trackers.setup(cfg.output.report_to, self.run_dir)}")
        pref = preference.is_preference(cfg)
        if pref:
            args = preference.to_config(cfg, trainer_args(cfg, self.plan, output_dir=self.run_dir / "checkpoints",
                                                          has_eval=eval_tok is not None))
            lines += preference.plan_lines(cfg)
            preference.record_parent(cfg, self.run_dir)
        else:
            args = to_sft_config(cfg, self.plan, output_dir=self.run_dir / "checkpoints", has_eval=eval_tok is not None)
        peft_config, model, optimizers = self._adapter_setup(model, args)
        collator = None if pref else self._collator(args)
        cb = sft.EventCallback(self.emit, self.stop_flag, self.stop_reason, self.run_dir, self.faults, cfg)
        self.emit(events.Status(phase=events.Phase.BUILD, message="building the trainer"))
        trainer_cls = sft.trainer_class(methods.of(cfg))      # the method's TRL trainer under our mixin
        trainer = trainer_cls(model=model, args=args, train_dataset=train_tok, eval_dataset=eval_tok,
                                   processing_class=self.proc,
                                   peft_config=peft_config, callbacks=[cb], optimizers=optimizers,
                                   faults=self.faults, event_callback=cb)
        if collator is not None:     # after __init__: TRL refuses custom collators with bfd packing
            trainer.data_collator = collator
        install_speed_tools(trainer, cfg, lines)
        # FP8's guard: the first micro-batch's loss both ways (SFT batches; a pair's loss is the method's)
        trainer.fp8_guard = cfg.train.fp8_base is True and not pref
        if cfg.train.fp8_base is True and pref:
            lines.append("FP8 base GEMMs without the loss guard (it compares SFT losses; this run's loss is "
                         f"{cfg.train.method.upper()}'s): the plan-time check on this device still holds them")
        self._attach_streaming(trainer)
        cb.trainer = trainer
        from transformers.trainer_callback import PrinterCallback, ProgressCallback
        for noisy in (PrinterCallback, ProgressCallback):   # our events replace HF's own printing
            trainer.remove_callback(noisy)
        # our on_log runs first, so the trackers' callbacks log the tokens/s it adds; the rest of
        # our callback keeps its place after HF's flow callback (its save/stop decisions win)
        trainer.callback_handler.callbacks.insert(0, sft.LogFirst(cb))
        return trainer, cb

    def _attach_streaming(self, trainer) -> None:
        if self.cfg.train.weight_streaming is not True:
            return
        from engine.models.runtime import train_device
        from engine.training import streaming
        trainer.weight_streamer = streaming.attach(trainer.model, train_device(self.rt))
        self.plan.lines.append(f"weight streaming: {trainer.weight_streamer.streamed_bytes / 2**30:.2f} GiB of 4-bit "
                               f"layers in host memory, {trainer.weight_streamer.ahead} layer(s) prefetched ahead")

    # ---------------------------------------------------------------- train
    def train(self, resume_from: Path | None = None) -> int:
        """Train (from the checkpoint ``resume_from``); the last optimizer step done."""
        trainer = self.prepared.trainer
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        return trainer.state.global_step

    @property
    def step(self) -> int:
        """The last optimizer step done (0 before training starts)."""
        try:
            return self.prepared.trainer.state.global_step
        except AttributeError:
            return 0

    @property
    def nonfinite(self):
        """The NaN halt (``train.nan_policy = halt``) that stopped training, or None."""
        return self.prepared.callback.nonfinite if self.prepared else None

    @property
    def last_loss(self):
        return self.prepared.callback.last_loss if self.prepared else None

    # ---------------------------------------------------------------- save
    def save(self) -> Path:
        """Write the final adapter (+ tokenizer) atomically to RUN_DIR/adapter (GaLore: RUN_DIR/model)."""
        from engine.core import rundir
        from engine.training import distributed
        from engine.methods import galore
        self.emit(events.Status(phase=events.Phase.SAVE, message="saving the adapter"))
        trainer, cfg = self.prepared.trainer, self.cfg
        final = self.run_dir / methods.of(cfg).output_dir()
        tmp = self.run_dir / (final.name + ".tmp")
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        if not self._write_weights(trainer, tmp):
            return final                  # another rank: rank 0 writes
        self._check_weights(tmp)
        self.prepared.tokenizer.save_pretrained(str(tmp))
        if methods.of(cfg).artifact == FULL:
            galore.write_marker(tmp, cfg, self.prepared.model_path)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if not cfg.output.keep_checkpoints and not self.stop_flag.is_set():
            shutil.rmtree(self.run_dir / rundir.CHECKPOINTS, ignore_errors=True)
        return final

    def _write_weights(self, trainer, tmp: Path) -> bool:
        """The adapter's weights into ``tmp``; False on a rank that does not write."""
        from engine.training import distributed
        if not distributed.in_worker():
            model = trainer.model
            if self.cfg.lora.init != "default":     # a plain LoRA over the original base
                from engine.training import lora_init
                lora_init.save_converted(model, tmp, self.run_dir, self.cfg.lora.init)
            else:
                extra = {}
                if len(getattr(model, "peft_config", {}) or {}) > 1:     # DPO/KTO continuing an SFT run: the
                    extra["selected_adapters"] = ["default"]            # frozen "ref" copy is not the result
                model.save_pretrained(str(tmp), **extra)
            return True
        # every rank takes part (FSDP gathers the sharded adapter); rank 0 writes
        if getattr(trainer, "is_fsdp_enabled", False):
            from engine.training.trainer import save_fsdp_adapter
            save_fsdp_adapter(trainer, tmp, self.prepared.resized_embeddings)
        else:
            trainer.save_model(str(tmp))
        trainer.accelerator.wait_for_everyone()
        return distributed.is_main()

    def _check_weights(self, tmp: Path) -> None:
        from engine.core import rundir
        from engine.methods import galore
        from engine.training.resume import ADAPTER_WEIGHTS
        if any((tmp / n).is_file() for n in ADAPTER_WEIGHTS) or methods.of(self.cfg).artifact == FULL and galore.has_weights(tmp):
            return
        raise RuntimeError(f"the adapter weights were not written to {tmp}; the checkpoints in "
                           f"{self.run_dir / rundir.CHECKPOINTS} are kept")

    # ---------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        """Close the tracker's run (its files complete before the run's thread ends)."""
        finish_trackers(self.cfg)


def finish_trackers(cfg) -> None:
    from engine.training import trackers
    trackers.finish(cfg.output.report_to)
