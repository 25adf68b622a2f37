"""The recipe's pieces without a training run: the plan computed once, the TRL/PEFT converters,
the datasets, failure classification, the control requests' one path, the hint feed."""
from __future__ import annotations

import errno
import threading

import pytest

from engine.core import config
from engine.core import control as ctl
from engine.core import events
from engine.core import rundir
from engine.dataset.rows import read_rows
from engine.training import recipe
from engine.training.failures import classify_failure, is_disk_full, log_write_failure, nan_halt
from engine.models.runtime import Runtime
from engine.models.source import ModelError
from engine.training.preflight import PreflightError
from engine.training.run_hints import HintFeed


def configured(cfg, sets: dict):
    out = cfg.copy()
    for key, value in sets.items():
        section, name = key.split(".")
        setattr(getattr(out, section), name, value)
    return out


# ---------------------------------------------------------------- the plan

def test_plan_resolves_every_auto_once_and_building_never_calls_the_planner(tiny_cfg, monkeypatch):
    assert tiny_cfg.train.optimizer == "auto" and tiny_cfg.train.gradient_checkpointing == "auto"
    plan = recipe.plan_run(tiny_cfg)
    got = plan.choices()
    assert got["device"] == "cpu" and got["optimizer"] == "adamw_torch"
    assert got["gradient_checkpointing"] is True and got["activation_offload"] is False
    assert got["fused_lora"] is False and got["liger_kernel"] is False and got["weight_streaming"] is False
    assert got["packing"] == "auto"                      # decided from the tokenised rows in setup
    assert "auto" not in [v for k, v in got.items() if k != "packing"]
    assert tiny_cfg.train.optimizer == "auto"            # the caller's config is not changed
    assert any(line.startswith("optimizer adamw_torch") for line in plan.lines)
    assert any(line.startswith("fused NF4+LoRA linears off (CPU") for line in plan.lines)
    assert plan.estimate_bytes and plan.estimate_bytes > 0   # what the OOM hint compares with

    # building never goes back to the planner: setup builds from the plan it is given
    from engine.planning import estimate as estimate_mod
    from engine.planning import streaming_run

    def refuse(*a, **kw):
        raise AssertionError("the planner was called during build")
    for mod, name in ((estimate_mod, "plan"), (estimate_mod, "estimate"), (estimate_mod, "apply_plan"),
                      (streaming_run, "resolve"), (recipe, "plan_run")):
        monkeypatch.setattr(mod, name, refuse)
    seen = []
    prep = recipe.build(plan, rundir.Path(tiny_cfg.output.dir) / "x", seen.append, threading.Event(), [])
    assert prep.plan is plan.lines and prep.trainer.args.optim == "adamw_torch"
    assert any(line.startswith("packing off") for line in plan.lines)      # the one choice setup makes
    assert plan.cfg.data.packing is False


# ---------------------------------------------------------------- converters

def _cpu_plan(cfg):
    return recipe.RunPlan(cfg, Runtime("cpu", "fp32", True, []), [])


def test_sft_config_from_config_and_plan(tiny_cfg, tmp_path):
    cfg = configured(tiny_cfg, {"train.optimizer": "adamw_torch", "train.gradient_checkpointing": True,
                                "train.batch_size": 2, "train.grad_accum": 3, "train.max_steps": 7,
                                "train.learning_rate": 3e-4, "train.save_steps": 5, "train.eval_steps": 0,
                                "train.save_total_limit": 2, "data.max_length": 96, "data.packing": True})
    args = recipe.to_sft_config(cfg, _cpu_plan(cfg), output_dir=tmp_path / "checkpoints", has_eval=True)
    assert args.output_dir == str(tmp_path / "checkpoints")
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size, args.gradient_accumulation_steps) == (2, 2, 3)
    assert args.max_steps == 7 and args.learning_rate == 3e-4 and args.optim == "adamw_torch"
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert args.use_cpu and not args.bf16 and not args.fp16
    assert args.eval_strategy == "epoch"                # eval rows, no eval_steps: once per epoch
    assert args.save_strategy == "steps" and args.save_steps == 5 and args.save_total_limit == 2
    assert args.max_length == 96 and args.packing is True and args.report_to == []
    assert args.logging_nan_inf_filter is False and args.disable_tqdm
    off = configured(cfg, {"train.gradient_checkpointing": False, "train.save_steps": 0, "train.eval_steps": 3})
    args = recipe.to_sft_config(off, _cpu_plan(off), has_eval=False)
    assert not args.gradient_checkpointing and args.gradient_checkpointing_kwargs is None
    assert args.save_strategy == "no" and args.eval_strategy == "no"
    args = recipe.to_sft_config(off, _cpu_plan(off), has_eval=True)
    assert args.eval_strategy == "steps" and args.eval_steps == 3


def test_lora_config_from_config(tiny_cfg):
    cfg = configured(tiny_cfg, {"lora.r": 8, "lora.alpha": 32, "lora.dropout": 0.1, "lora.use_dora": True})
    lc = recipe.to_lora_config(cfg, ["q_proj", "v_proj"])
    assert (lc.r, lc.lora_alpha, lc.lora_dropout, lc.use_dora) == (8, 32, 0.1, True)
    assert set(lc.target_modules) == {"q_proj", "v_proj"} and lc.task_type == "CAUSAL_LM"


def test_datasets_are_encoded_rows_with_the_eval_split(tiny_cfg):
    from engine.modalities.text import encode_batch
    from engine.models.tokenizer import load_tokenizer
    cfg = configured(tiny_cfg, {"data.eval_fraction": 0.1})
    tok, _ = load_tokenizer(cfg)
    rows = read_rows(cfg)
    train, ev = recipe.load_datasets(cfg, tok, rows)
    assert len(train) == len(rows.train) and len(ev) == len(rows.eval) > 0
    assert train[0]["input_ids"] == encode_batch(tok, rows.train[:1])[0].input_ids
    assert train[0]["labels"] == encode_batch(tok, rows.train[:1])[0].labels
    no_eval = configured(cfg, {"data.eval_fraction": 0.0})
    assert recipe.load_datasets(no_eval, tok)[1] is None


# ---------------------------------------------------------------- failures

CKPTS = [rundir.Path("/r/checkpoints/checkpoint-4"), rundir.Path("/r/checkpoints/checkpoint-8")]


def _oom():
    import torch
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("exc,kind,says", [
    (_oom(), "oom", "CUDA out of memory at step 10; last checkpoint checkpoint-8 is intact"),
    (RuntimeError("CUDA error: out of memory"), "oom", "at step 10"),
    (PreflightError("data.train: /x.jsonl: no rows\nmore"), "data", "data.train: /x.jsonl: no rows"),
    (ModelError("model.name = 'x':\n  not found"), "config", "model.name = 'x': not found"),
    (config.ConfigError([config.Problem("train.batch_size", 0, "must be >= 1")]), "config", "train.batch_size = 0"),
    (OSError(errno.ENOSPC, "No space left on device"), "disk", "disk full while saving at step 9; previous checkpoint checkpoint-8 kept"),
    (RuntimeError("safetensors: os error 28"), "disk", "free space and resume"),
    (KeyboardInterrupt(), "killed", "interrupted"),
    (ValueError("boom\nsecond line"), "error", "ValueError: boom"),
])
def test_classify_failure(exc, kind, says):
    ev = classify_failure(exc, step=9, checkpoints=CKPTS, detail="tb")
    assert isinstance(ev, events.RunFailed) and ev.kind == kind and ev.step == 9 and ev.detail == "tb"
    assert says in ev.reason and "\n" not in ev.reason


def test_classify_failure_without_checkpoints_and_wrapped_disk_full():
    assert "last checkpoint" not in classify_failure(_oom(), step=0).reason
    try:
        try:
            raise OSError(errno.EDQUOT, "quota")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as e:
        wrapped = e
    assert is_disk_full(wrapped) and classify_failure(wrapped, step=3).kind == "disk"
    assert not is_disk_full(ValueError("no"))


def test_nan_halt_and_a_log_that_could_not_be_written(tiny_cfg):
    ev = nan_halt(tiny_cfg, 5, float("nan"))
    assert ev.kind == "nan" and ev.step == 5 and "non-finite loss at step 5" in ev.reason and "learning_rate" in ev.reason
    assert "non-finite grad norm" in nan_halt(tiny_cfg, 5, 1.5).reason
    fin = events.RunFinished(step=7, adapter_dir="/r/adapter")
    out = log_write_failure(fin, OSError(errno.ENOSPC, "full"), "events.jsonl")
    assert out.kind == "disk" and out.step == 7 and "adapter saved in /r/adapter" in out.reason
    assert log_write_failure(fin, OSError(errno.EACCES, "denied"), "events.jsonl").kind == "error"
    failed = events.RunFailed(reason="x", kind="oom")
    assert log_write_failure(failed, OSError(errno.ENOSPC, "full"), "events.jsonl") is failed


# ---------------------------------------------------------------- control requests

def test_requests_are_read_once_and_done_only_when_carried_out(tmp_path):
    save = ctl.request(tmp_path, "save")
    carried = ctl.Carried()
    req = carried.take(tmp_path)
    assert (req.stop, req.save, req.paths) == (False, True, [save])
    assert carried.take(tmp_path) == ctl.Requests()          # not read twice while being carried out
    assert save.exists() and not save.with_suffix(".done").exists()
    stop = ctl.request(tmp_path, "stop")
    req = carried.take(tmp_path)
    assert (req.stop, req.save, req.paths) == (True, False, [stop])
    carried.done()                                           # the checkpoint is complete
    assert ctl.pending(tmp_path) == [] and save.with_suffix(".done").exists() and stop.with_suffix(".done").exists()
    assert ctl.fold([]) == ctl.Requests()


# ---------------------------------------------------------------- hint feed

def test_hint_feed_skips_a_nan_the_trainer_already_reported(tiny_cfg):
    from engine.training.hints import HintEngine
    out = []
    feed = HintFeed(HintEngine(tiny_cfg), out.append)
    feed(events.Hint(rule="nan", step=3, severity="error", symptom="t"))
    feed(events.Step(step=3, total_steps=10, loss=float("nan")))
    assert out == [] and feed.last_step == 3
    fresh = HintFeed(HintEngine(tiny_cfg), out.append)          # no report from the trainer: the rule says it
    fresh(events.Step(step=3, total_steps=10, loss=float("nan")))
    assert [h.rule for h in out] == ["nan"] and out[0].step == 3


def test_event_callback_marks_a_request_done_only_when_its_checkpoint_is_complete(tiny_cfg, tmp_path):
    """The one path (one process here; rank 0 of many runs the same code): a save request makes
    this step save; it is done once the step's checkpoint has its COMPLETE marker, not before."""
    from types import SimpleNamespace
    from transformers.trainer_callback import TrainerControl, TrainerState
    from engine.training.sft import EventCallback
    seen, stop, reasons = [], threading.Event(), []
    cb = EventCallback(seen.append, stop, reasons, tmp_path, None, tiny_cfg)
    args, state = SimpleNamespace(output_dir=str(tmp_path / "checkpoints")), TrainerState(global_step=4)
    save = ctl.request(tmp_path, "save")
    control = cb.on_step_end(args, state, TrainerControl())
    assert control.should_save and not control.should_training_stop
    assert not save.with_suffix(".done").exists()
    cb.on_save(args, state, control)                 # the checkpoint was not committed: still pending
    assert not save.with_suffix(".done").exists() and seen == []
    assert not cb.on_step_end(args, TrainerState(global_step=5), TrainerControl()).should_save   # read once
    (tmp_path / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    rundir.mark_complete(tmp_path / "checkpoints" / "checkpoint-5", 5)
    cb.on_save(args, TrainerState(global_step=5), control)
    assert save.with_suffix(".done").exists() and [type(e) for e in seen] == [events.Checkpoint]
    halt = ctl.request(tmp_path, "stop")
    control = cb.on_step_end(args, TrainerState(global_step=6), TrainerControl())
    assert control.should_training_stop and control.should_save and stop.is_set()
    assert reasons == ["stop requested through the control channel"] and not halt.with_suffix(".done").exists()
