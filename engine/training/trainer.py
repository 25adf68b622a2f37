"""Builds the TRL ``SFTTrainer`` (PEFT LoRA over a bitsandbytes 4-bit base) and turns its
progress into events.

Data is tokenised here with ``engine.dataset.chat.encode_batch`` (the code path the inspector's
preview uses) and handed to TRL pre-tokenised as ``input_ids`` + ``labels``; TRL then
truncates to ``max_length``, drops rows with no trained token, and packs if asked.
"""
from __future__ import annotations

import errno
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.core import control as ctl
from engine.core import events
from engine.core.faults import Faults
from engine.core.units import is_nonfinite


class NonFiniteHalt(RuntimeError):
    def __init__(self, step: int, loss, grad_norm):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        super().__init__(f"non-finite {'loss' if is_nonfinite(loss) else 'grad norm'} at step {step}")



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


def encode_dataset(tok, rows: list[dict], batch: int = 1000):
    from datasets import Dataset
    from engine.dataset.chat import encode_batch
    ids, labels = [], []
    for i in range(0, len(rows), batch):
        for enc in encode_batch(tok, rows[i:i + batch]):
            ids.append(enc.input_ids)
            labels.append(enc.labels)
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def split_eval(cfg, train_rows, eval_rows):
    """Hold out ``data.eval_fraction`` of train rows (seeded) when no eval file is given."""
    if eval_rows is not None or cfg.data.eval_fraction <= 0 or len(train_rows) < 10:
        return train_rows, eval_rows
    import random
    idx = list(range(len(train_rows)))
    random.Random(cfg.train.seed).shuffle(idx)
    n = max(1, int(round(len(idx) * cfg.data.eval_fraction)))
    held = set(idx[:n])
    return ([r for i, r in enumerate(train_rows) if i not in held],
            [r for i, r in enumerate(train_rows) if i in held])


def resolve_auto(cfg, rt, emit, longest: int | None = None) -> tuple[object, list[str]]:
    """Replace every ``auto`` with a concrete choice and say why (the fit planner on GPU).

    ``data.packing = auto`` stays auto here: it depends on the rows' lengths (``decide_packing``).
    ``longest``: the longest row where rows are not packed (image rows): the planner plans for it.
    """
    cfg = cfg.copy()
    reasons = list(rt.notes)
    packing_auto = cfg.data.packing == "auto"
    tr = cfg.train
    from engine.training import galore
    if galore.is_full(cfg):        # the GaLore optimizer (named in the GaLore plan line)
        tr.optimizer = galore.hf_optimizer(cfg, rt.device)[0]
    if tr.optimizer == "auto":
        tr.optimizer = "paged_adamw_8bit" if rt.device == "cuda" else "adamw_torch"
        reasons.append(f"optimizer {tr.optimizer} ({'GPU: paged 8-bit AdamW' if rt.device == 'cuda' else 'CPU: bitsandbytes paged optimizers need CUDA'})")
    if rt.device == "cuda" and "auto" in (tr.gradient_checkpointing, tr.liger_kernel, cfg.data.packing,
                                          tr.activation_offload, tr.weight_streaming):
        try:
            from engine.planning import estimate as est
            mc = est.model_config_for(cfg)
            free = est.gpu_free_bytes()
            if tr.gpu_memory_gib and free is not None:
                free = min(free, int(tr.gpu_memory_gib * 2**30))
                reasons.append(f"planning for a {tr.gpu_memory_gib:g} GiB budget (train.gpu_memory_gib)")
            p = est.plan(_planned_rows(cfg, longest, reasons), mc, free)
            cfg = est.apply_plan(cfg, p)
            tr = cfg.train
            reasons += [r for r in p.reasons if not r.startswith(("packing", "attention"))]   # decided from the data
        except Exception as e:     # the planner is advice: never a reason to fail the run
            reasons.append(f"fit planner skipped ({str(e).splitlines()[0][:200]})")
    if tr.gradient_checkpointing == "auto":
        tr.gradient_checkpointing = True
        reasons.append("gradient checkpointing on (default: least memory)")
    if tr.activation_offload == "auto":
        tr.activation_offload = False
        reasons.append("activation offload off (" + ("CPU: no GPU memory to save" if rt.device != "cuda"
                                                     else "not needed") + ")")
    _resolve_fused_lora(cfg, rt, reasons)
    if tr.liger_kernel == "auto":
        import importlib.util
        tr.liger_kernel = rt.device == "cuda" and importlib.util.find_spec("liger_kernel") is not None
        reasons.append("Liger kernels " + ("on (installed, CUDA)" if tr.liger_kernel else
                                           "off (" + ("CPU" if rt.device != "cuda" else "liger-kernel not installed") + ")"))
    if packing_auto:
        cfg.data.packing = "auto"
    return cfg, reasons


def _planned_rows(cfg, longest: int | None, reasons: list[str]):
    """cfg as the planner should see it: rows of the longest row's length where that is known
    and shorter than data.max_length (unpacked image rows are padded to it, never beyond)."""
    if not longest or longest >= cfg.data.max_length:
        return cfg
    out = cfg.copy()
    out.data.max_length = longest
    reasons.append(f"planning for the longest image row, {longest:,} tokens (data.max_length = "
                   f"{cfg.data.max_length:,}; image rows are not packed, a batch pads to its longest row)")
    return out


def _resolve_fused_lora(cfg, rt, reasons: list[str]) -> None:
    """``train.fused_lora = auto``: on for one-process or DDP GPU runs where it applies."""
    from engine.training.fused_lora import eligible_reason
    tr = cfg.train
    why_not = eligible_reason(cfg)
    if tr.fused_lora == "auto":
        if rt.device != "cuda":
            why_not = "CPU: measured on the GPU only"
        elif cfg.distributed.gpus > 1 and cfg.distributed.strategy == "fsdp":
            why_not = "FSDP shards the 4-bit weights"
        tr.fused_lora = why_not is None
        reasons.append("fused NF4+LoRA linears " + ("on (LoRA accumulated inside the base GEMM)" if tr.fused_lora
                                                    else f"off ({why_not})"))
    elif tr.fused_lora and why_not:
        reasons.append(f"fused NF4+LoRA linears: {why_not} on every call (train.fused_lora = true)")


PACKING_MIN_WASTE = 0.15   # pack when padding would waste at least this share of the compute


def padding_efficiency(lengths: list[int], batch: int, max_length: int, seed: int = 0) -> float:
    """Real tokens / padded tokens when shuffled rows are padded per micro-batch (the plain recipe)."""
    import random
    ls = [min(n, max_length) for n in lengths]
    random.Random(seed).shuffle(ls)
    real = padded = 0
    for i in range(0, len(ls), batch):
        b = ls[i:i + batch]
        real += sum(b)
        padded += max(b) * len(b)
    return real / padded if padded else 1.0


def decide_packing(cfg, rt, lengths: list[int]) -> tuple[bool, str]:
    """``data.packing = auto``: pack on GPU when padding would waste compute and attention keeps
    packed samples apart; never on the CPU."""
    from engine.training.model import attn_implementation, packing_isolated
    if rt.device != "cuda":
        return False, "packing off (CPU: no padding cost worth removing)"
    eff = padding_efficiency(lengths, cfg.train.batch_size, cfg.data.max_length, cfg.train.seed)
    if eff > 1 - PACKING_MIN_WASTE:
        return False, f"packing off (rows are {eff:.0%} real tokens when padded per batch: little to gain)"
    ok, why = packing_isolated(attn_implementation(cfg, rt.device))
    if not ok:
        return False, f"packing off ({why})"
    return True, f"packing on (padding would waste {1 - eff:.0%}; {why})"


def packed_collator(tok, attn: str):
    """For sdpa/eager: packed rows stay one batch row each, position_ids restart per sample and no
    attention_mask is passed, so transformers builds a per-row block-diagonal causal mask. (TRL's
    padding-free collator flattens the whole batch into one row, which flash-attention handles but
    which gives sdpa one huge (batch*len)^2 mask.) flash-attention and varlen keep TRL's own
    (padding-free) collator: no pad tokens, the samples' lengths computed on the CPU."""
    if attn in ("flash_attention_2", "varlen"):
        return None
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    class PackedRows(DataCollatorForLanguageModeling):
        def torch_call(self, examples):
            out = super().torch_call(examples)
            out.pop("attention_mask", None)
            out["labels"][out["position_ids"] == 0] = -100   # a sample's first token is not
            return out                                        # predicted from the previous sample
    return PackedRows(pad_token_id=tok.pad_token_id, padding_free=False, return_position_ids=True)


def build(cfg, run_dir: Path, emit, stop_flag: threading.Event, stop_reason: list,
          faults: Faults | None = None) -> Prepared:
    """Load data, tokenizer and model; return a ready SFTTrainer wired to ``emit``."""
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from engine.dataset import data as data_mod
    from engine.training import model as model_mod

    faults = faults or Faults()
    emit(events.Status(phase="data", message="reading data"))
    train_ds, eval_ds = data_mod.load_for_training(cfg)
    warnings = []
    for p in (train_ds.problems + (eval_ds.problems if eval_ds else []))[:5]:
        warnings.append(f"{data_mod.resolve(train_ds.path).name}:{p.line}: {p.message} (row skipped)")
    n_bad = len(train_ds.problems)
    if n_bad > 5:
        warnings.append(f"... {n_bad} problems in all; run `qlora-tui inspect` for the full list")

    rt = model_mod.runtime(cfg)
    from engine.training.vision import longest_row
    cfg, plan = resolve_auto(cfg, rt, emit, longest_row(cfg, train_ds) if rt.device == "cuda" else None)
    from engine.planning import streaming_plan
    try:
        plan += streaming_plan.resolve(cfg, rt)
        streaming_plan.check_host_ram(cfg)            # before any weight is loaded
    except ValueError as e:
        raise model_mod.ModelError(str(e)) from None
    path = model_mod.model_path(cfg)
    emit(events.Status(phase="tokenizer", message=f"loading tokenizer from {path}"))
    from engine.training import vision
    proc = vision.load_processor(cfg, path) if vision.model_is_vision(cfg, path) else None
    if proc is None and train_ds.format == vision.FORMAT:
        raise model_mod.ModelError(f"data.train has images but model.name = {cfg.model.name!r} is a text-only model; "
                           "use an image-text model (e.g. Qwen/Qwen2-VL-7B-Instruct, or builtin:tiny-vl)")
    tok, tw = (proc.tokenizer, []) if proc is not None else model_mod.load_tokenizer(cfg, path)
    warnings += tw
    train_rows = [r.data for r in train_ds.rows]
    eval_rows = [r.data for r in eval_ds.rows] if eval_ds else None
    train_rows, eval_rows = split_eval(cfg, train_rows, eval_rows)
    emit(events.Status(phase="tokenize", message=f"tokenising {len(train_rows)} train rows"))
    if proc is not None:     # images: encoded as the loader asks; no packing (TRL has none for images)
        train_tok, _lengths, vw = vision.training_set(proc, train_rows, cfg.data.max_length)
        eval_tok = vision.training_set(proc, eval_rows, cfg.data.max_length)[0] if eval_rows else None
        warnings += vw[:5]
        cfg.data.packing = False
        plan.append("packing off (image rows: each keeps its own visual tokens)")
    else:
        train_tok = encode_dataset(tok, train_rows)
        eval_tok = encode_dataset(tok, eval_rows) if eval_rows else None
    lengths = [len(x) for x in train_tok["input_ids"]] if proc is None and cfg.data.packing is not False else []
    if cfg.data.packing == "auto":
        cfg.data.packing, why = decide_packing(cfg, rt, lengths)
        plan.append(why)
    from engine.training import attention        # packed rows: the varlen kernel where it runs
    plan += attention.choose(cfg, rt, lengths)

    emit(events.Status(phase="model", message=f"loading {cfg.model.name} "
                  f"({'4-bit ' + cfg.quant.quant_type if rt.load_in_4bit else rt.dtype}) on {rt.device}"))
    model = model_mod.load_model(cfg, rt, path)
    plan += model_mod.fit_4bit_kernels(model, rt)       # shapes a bitsandbytes kernel cannot run
    resized = len(tok) > model.get_input_embeddings().weight.shape[0]
    if resized:
        model.resize_token_embeddings(len(tok))
    targets = vision.lora_targets(cfg, model) if proc is not None else model_mod.resolve_target_modules(cfg, model)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, bias=cfg.lora.bias, task_type="CAUSAL_LM",
                      use_dora=cfg.lora.use_dora, use_rslora=cfg.lora.use_rslora)
    tr = cfg.train
    bf16 = rt.device == "cuda" and rt.dtype == "bf16"
    fp16 = rt.device == "cuda" and rt.dtype == "fp16"
    has_eval = eval_tok is not None and len(eval_tok) > 0
    fsdp = cfg.distributed.gpus > 1 and cfg.distributed.strategy == "fsdp"
    report = [] if cfg.output.report_to == "none" else [cfg.output.report_to]
    if report:
        from engine.training import trackers
        plan.append(f"{cfg.output.report_to} logs: {trackers.setup(cfg.output.report_to, run_dir)}")
    args = SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=tr.batch_size, per_device_eval_batch_size=tr.batch_size,
        gradient_accumulation_steps=tr.grad_accum, num_train_epochs=tr.epochs, max_steps=tr.max_steps,
        learning_rate=tr.learning_rate, warmup_steps=tr.warmup_ratio, lr_scheduler_type=tr.scheduler,
        optim=tr.optimizer, weight_decay=tr.weight_decay, max_grad_norm=tr.max_grad_norm,
        gradient_checkpointing=bool(tr.gradient_checkpointing),
        # FSDP-QLoRA wants reentrant checkpointing (PEFT's FSDP-QLoRA recipe); everything else not
        gradient_checkpointing_kwargs={"use_reentrant": fsdp} if tr.gradient_checkpointing else None,
        ddp_find_unused_parameters=False if cfg.distributed.gpus > 1 else None,
        use_liger_kernel=bool(tr.liger_kernel),
        seed=tr.seed, data_seed=tr.seed, logging_steps=tr.logging_steps, logging_first_step=True,
        logging_nan_inf_filter=False,
        eval_strategy="steps" if has_eval and tr.eval_steps else ("epoch" if has_eval else "no"),
        eval_steps=tr.eval_steps or None,
        save_strategy="steps" if tr.save_steps else "no", save_steps=tr.save_steps or 500,
        save_total_limit=tr.save_total_limit, report_to=report,
        bf16=bf16, fp16=fp16, use_cpu=rt.device == "cpu",
        max_length=cfg.data.max_length, packing=bool(cfg.data.packing),
        dataset_num_proc=None, dataloader_num_workers=0, disable_tqdm=True,
        include_num_input_tokens_seen="non_padding", save_only_model=False,
        restore_callback_states_from_checkpoint=False,
    )
    optimizers = (None, None)
    collator = None
    from engine.training import galore
    if galore.is_full(cfg):      # GaLore: full-rank weights, no adapter; the Trainer builds its optimizer
        lora = None
        plan += galore.setup(cfg, model, args, rt)
    if cfg.data.packing:
        collator = packed_collator(tok, model_mod.attn_implementation(cfg, rt.device))
    if proc is not None:     # our encoded rows as they are (labels built here), images batched
        args.remove_unused_columns = False
        args.dataset_kwargs = {"skip_prepare_dataset": True}
        collator = vision.collate(tok.pad_token_id)
        plan.append(f"vision: {'frozen 16-bit vision tower' if cfg.model.freeze_vision_tower else 'LoRA on the vision tower too'}; "
                    f"LoRA on {len(targets)} language-model layers")
    peft_config = lora
    if cfg.lora.lora_fa and lora is not None:
        from peft import get_peft_model
        from peft.optimizers import create_lorafa_optimizer
        if tr.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, lora)
        optimizers = (create_lorafa_optimizer(model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                              lr=tr.learning_rate, weight_decay=tr.weight_decay), None)
        peft_config = None
        plan.append("LoRA-FA: A frozen, only B trained (PEFT's LoRA-FA optimizer)")

    cb = EventCallback(emit, stop_flag, stop_reason, run_dir, faults, cfg)
    trainer_cls = _trainer_class(SFTTrainer, faults, cb)
    emit(events.Status(phase="build", message="building the trainer"))
    trainer = trainer_cls(model=model, args=args, train_dataset=train_tok,
                          eval_dataset=eval_tok if has_eval else None,
                          processing_class=proc if proc is not None else tok,
                          peft_config=peft_config, callbacks=[cb], optimizers=optimizers)
    if collator is not None:     # after __init__: TRL refuses custom collators with bfd packing
        trainer.data_collator = collator
    _install_speed_tools(trainer, cfg, plan)
    if cfg.train.weight_streaming is True:
        from engine.training import streaming
        trainer.weight_streamer = streaming.attach(trainer.model, model_mod.train_device(rt))
        plan.append(f"weight streaming: {trainer.weight_streamer.streamed_bytes / 2**30:.2f} GiB of 4-bit "
                    f"layers in host memory, {trainer.weight_streamer.ahead} layer(s) prefetched ahead")
    cb.trainer = trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    for noisy in (PrinterCallback, ProgressCallback):   # our events replace HF's own printing
        trainer.remove_callback(noisy)
    # our on_log runs first, so the trackers' callbacks log the tokens/s it adds; the rest of
    # our callback keeps its place after HF's flow callback (its save/stop decisions win)
    trainer.callback_handler.callbacks.insert(0, _LogFirst(cb))
    cb.meta = dict(model=cfg.model.name, device=rt.device, train_rows=len(train_tok),
                   eval_rows=len(eval_tok) if has_eval else 0, plan=plan, config=cfg.to_dict())
    for w in warnings:
        emit(events.RunWarning(source="build", message=w))
    return Prepared(trainer, proc if proc is not None else tok, path, rt, len(train_tok), len(eval_tok) if has_eval else 0, plan, warnings,
                    resized_embeddings=resized)


def _install_speed_tools(trainer, cfg, plan: list[str]) -> None:
    """The fused NF4+LoRA linear (engine.training.fused_lora) and selective / offloaded checkpointing
    (engine.training.offload) over the Trainer's own checkpointing; both applied when training starts."""
    tr = cfg.train
    # not with weight streaming: its hooks move the 4-bit weights the fused function reads (untested together)
    if tr.fused_lora is True and tr.weight_streaming is not True and not (
            cfg.distributed.gpus > 1 and cfg.distributed.strategy == "fsdp"):
        from engine.training.fused_lora import FusedLoRACallback
        trainer.add_callback(FusedLoRACallback())
    if not tr.gradient_checkpointing or (tr.checkpoint_layers < 0 and tr.activation_offload is not True):
        return
    from engine.training import offload
    cp = offload.CheckpointPlan(layers=tr.checkpoint_layers if tr.checkpoint_layers >= 0 else None,
                                offload=tr.activation_offload is True)
    trainer.add_callback(offload.CheckpointingCallback(cp))
    plan.append("checkpointing: " + cp.describe())


def save_fsdp_adapter(trainer, out_dir: Path, with_embeddings: bool) -> bool:
    """FSDP-QLoRA: gather the sharded adapter and write it in PEFT's format (every rank calls
    this; rank 0 writes). Returns True on the process that wrote it.

    Neither the Trainer nor PEFT does this today: ``save_model`` writes no weights with a
    sharded state dict, and with a full one PEFT 0.21 picks the adapter's keys by walking the
    model's modules, whose names under FSDP carry ``_fsdp_wrapped_module.`` while the gathered
    keys do not, so it writes an empty file (both seen on 2 H200s). The keys written here are
    PEFT's: the adapter name dropped (``…q_proj.lora_A.weight``), DoRA magnitudes without
    ``.weight``, and the embedding matrices when the tokenizer grew (PEFT's "auto" rule)."""
    import copy
    from safetensors.torch import save_file
    acc = trainer.accelerator
    full = acc.get_state_dict(trainer.model)          # a collective; the whole dict on rank 0 only
    if not acc.is_main_process:
        return False
    peft_model = acc.unwrap_model(trainer.model)
    name = peft_model.active_adapter
    out = {}
    for k, v in full.items():
        if f".{name}." in k and ".lora_" in k:
            k = k.replace(f".{name}.", ".")
            if k.endswith("lora_magnitude_vector.weight"):
                k = k[: -len(".weight")]
        elif not (with_embeddings and k.endswith(("embed_tokens.weight", "lm_head.weight"))):
            continue
        out[k] = v.detach().to("cpu").contiguous()
    if not any(".lora_" in k for k in out):
        raise RuntimeError("the gathered model state has no LoRA weights; nothing to save")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = copy.deepcopy(peft_model.peft_config[name])
    cfg.inference_mode = True
    cfg.save_pretrained(str(out_dir))
    return True


def _trainer_class(base, faults: Faults, cb):
    """SFTTrainer with per-step NaN bookkeeping and optional fault injection."""
    import torch

    class Trainer(base):
        def compute_loss(self, model, inputs, *a, **kw):
            step = self.state.global_step + 1
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
            from engine.core import rundir
            step = self.state.global_step
            d = Path(self.args.output_dir) / f"checkpoint-{step}"
            limit = self.args.save_total_limit
            self.args.save_total_limit = None
            try:
                if faults.diskfull_step == step:
                    d.mkdir(parents=True, exist_ok=True)
                    (d / "adapter_model.safetensors").write_bytes(b"\0" * 16)
                    raise OSError(errno.ENOSPC, "No space left on device (injected)", str(d))
                super()._save_checkpoint(model, trial)
                self._commit(d, step)
            except Exception as e:
                if _is_disk_full(e):
                    shutil.rmtree(d, ignore_errors=True)     # the half-written one; frees its space
                    raise OSError(errno.ENOSPC, f"No space left on device while writing {d}", str(d)) from e
                raise
            finally:
                self.args.save_total_limit = limit
            from engine.training import distributed as distributed_mod
            if distributed_mod.is_main():
                rundir.rotate_checkpoints(Path(self.args.output_dir).parent, limit)

        def _commit(self, d: Path, step: int) -> None:
            """The COMPLETE marker, once every rank has written its part (FSDP shards)."""
            from engine.training import distributed as distributed_mod
            from engine.core import rundir
            if distributed_mod.in_worker():
                self.accelerator.wait_for_everyone()
            if not distributed_mod.is_main():
                return
            if faults.markerfull_step == step:
                from engine.core import faults as faults_mod
                faults_mod.DISK_FULL.set()
                raise OSError(errno.ENOSPC, "No space left on device (injected, writing COMPLETE)", str(d))
            rundir.mark_complete(d, step)

    return Trainer


def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC however the writer reports it (OSError, safetensors' or torch's own errors)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if "no space left" in text or "os error 28" in text or "disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


class _LogFirst:
    """Calls our callback's on_log before the trackers' (it then skips the handler's own call)."""

    def __init__(self, cb):
        self.cb = cb

    def __getattr__(self, name):          # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **kw: None
        raise AttributeError(name)

    def on_log(self, args, state, control, logs=None, **kw):
        self.cb.on_log(args, state, control, logs=logs, **kw)
        self.cb._logged = id(logs)


def EventCallback(*args, **kwargs):
    """A TrainerCallback (transformers imported lazily) that turns progress into events."""
    from transformers import TrainerCallback

    class _EventCallback(_EventCallbackMethods, TrainerCallback):
        pass
    return _EventCallback(*args, **kwargs)


class _EventCallbackMethods:
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
        self.step_loss = None
        self.nonfinite: NonFiniteHalt | None = None
        self._t_last = None
        self._tok_last = 0
        self._step_last = 0
        self.resumed_from = 0
        self.last_loss = None
        self._save_requests: list[Path] = []

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
        self._t_last = time.perf_counter()
        self.emit(events.RunStarted(run_dir=str(self.run_dir), total_steps=state.max_steps,
                               trainable_params=trainable, total_params=total,
                               resumed_from_step=state.global_step, pid=os.getpid(), **self.meta))

    def on_pre_optimizer_step(self, args, state, control, **kw):
        import torch
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
        from engine.training import distributed as distributed_mod
        if distributed_mod.in_worker():      # FSDP shards gradients: ranks must agree to drop the step
            bad = bool(distributed_mod.all_reduce_flags([int(bad)])[0])
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
        from engine.training import distributed as distributed_mod
        if distributed_mod.in_worker():
            # rank 0 reads the control channel; every rank must stop/save on the same step
            stop, save = self.stop_flag.is_set(), False
            if distributed_mod.is_main():
                for path, cmd in ctl.pending(self.run_dir):
                    if cmd == "stop":
                        if not stop:
                            self.stop_reason.append("stop requested through the control channel")
                        stop = True
                    else:
                        save = True
                    ctl.mark_done(path)
            stop, save = distributed_mod.all_reduce_flags([int(stop), int(save)])
            if stop:
                self.stop_flag.set()
                control.should_training_stop = True
            control.should_save = bool(control.should_save or stop or save) and self.nonfinite is None
            return control
        if self.stop_flag.is_set():
            control.should_training_stop = True
            control.should_save = True
        for path, cmd in ctl.pending(self.run_dir):
            if cmd == "stop":
                if not self.stop_flag.is_set():
                    self.stop_reason.append("stop requested through the control channel")
                self.stop_flag.set()
                control.should_training_stop = True
                control.should_save = True
            elif cmd == "save":
                control.should_save = True
                self._save_requests.append(path)    # marked done once the checkpoint is written
                continue
            ctl.mark_done(path)
        if self.nonfinite is not None:
            control.should_save = False
        return control

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is not None and getattr(self, "_logged", None) == id(logs):
            self._logged = None          # already handled, first, through _LogFirst
            return
        logs = logs or {}
        if "eval_loss" in logs:
            self.emit(events.Eval(step=state.global_step, eval_loss=logs["eval_loss"]))
            return
        if "loss" not in logs:
            return
        now = time.perf_counter()
        dt = now - (self._t_last or now)
        dtok = state.num_input_tokens_seen - self._tok_last
        dsteps = state.global_step - self._step_last
        tps = dtok / dt if dt > 0 and dtok > 0 else None
        eta = None
        if dsteps > 0 and dt > 0:
            per_step = dt / dsteps
            eta = per_step * max(0, state.max_steps - state.global_step)
        self._t_last, self._tok_last, self._step_last = now, state.num_input_tokens_seen, state.global_step
        peak = None
        try:
            import torch
            if torch.cuda.is_available():
                peak = int(torch.cuda.max_memory_reserved())
        except Exception:
            pass
        loss = logs.get("loss")
        self.last_loss = loss
        if tps is not None:
            logs["tokens_per_second"] = tps     # the trackers' callbacks run after this one
        self.emit(events.Step(step=state.global_step, total_steps=state.max_steps, loss=loss,
                         learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                         tokens_per_second=tps, epoch=logs.get("epoch", state.epoch), eta_seconds=eta,
                         tokens_seen=int(state.num_input_tokens_seen), peak_memory_bytes=peak))

    def on_save(self, args, state, control, **kw):
        d = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if (d / "COMPLETE").exists():      # written by the trainer's _save_checkpoint
            self.emit(events.Checkpoint(step=state.global_step, path=str(d)))
        for path in self._save_requests:
            ctl.mark_done(path)
        self._save_requests.clear()
