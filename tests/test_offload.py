"""Offloaded and selective gradient checkpointing (engine/offload.py) and the planner's choice
of them at 10, 16, 24 GiB and a whole H200, from config.json alone."""
import json
import math

import pytest

from engine import config as C
from engine import estimate as E
from engine import events as EV
from engine import runner as RN

GIB = 2 ** 30
# Llama-3.1-8B's config.json (the keys the estimate reads)
LLAMA8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "tie_word_embeddings": False}


def bench_cfg(**train):
    """The bench's recipe: seq 2048, effective batch 8, r=32 all-linear, adamw_torch, on CUDA."""
    cfg = C.Config()
    cfg.model.name = "x"
    cfg.data.max_length = 2048
    cfg.train.batch_size, cfg.train.grad_accum = 8, 1
    cfg.train.optimizer, cfg.train.device = "adamw_torch", "cuda"
    cfg.lora.r, cfg.lora.alpha = 32, 64
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture
def liger(monkeypatch):
    monkeypatch.setattr(E, "_liger_available", lambda: True)
    monkeypatch.setattr(E, "_flash_attn_available", lambda: False)


@pytest.mark.parametrize("gib, batch, layers, offload", [
    (10, 4, 32, True),       # every layer checkpointed, inputs on the host: micro-batch 4 fits
    (16, 8, 31, True),       # micro-batch 8: offloading frees the inputs, one layer kept whole
    (24, 8, 29, False),      # room for three whole layers; offloading would buy less than it costs
    (139.2, 8, 0, False),    # the whole H200: no checkpointing
])
def test_planner_choice_per_budget(liger, gib, batch, layers, offload):
    p = E.plan(bench_cfg(), LLAMA8B, int(gib * GIB))
    assert (p.batch_size, p.checkpoint_layers, p.offload) == (batch, layers, offload), p.reasons
    assert p.grad_accum == 8 // batch
    assert p.estimate.device_bytes <= gib * GIB * (1 - E.HEADROOM)
    text = " ".join(p.reasons)
    assert ("offloaded to pinned CPU memory" in text) == offload
    if 0 < layers < 32:
        assert f"on for {layers} of 32 layers (the fewest that fit)" in text
    # the choice is the fastest of what fits: one more layer kept whole would not fit
    if 0 < layers < 32:
        more = E.estimate(bench_cfg(), LLAMA8B, batch_size=batch, gradient_checkpointing=True, liger=True,
                          checkpoint_layers=layers - 1, offload=offload)
        assert more.device_bytes > gib * GIB * (1 - E.HEADROOM)


def test_explicit_settings_are_kept(liger):
    p = E.plan(bench_cfg(activation_offload=False), LLAMA8B, 10 * GIB)
    assert not p.offload and p.batch_size < 4
    p = E.plan(bench_cfg(checkpoint_layers=32, activation_offload=True), LLAMA8B, 24 * GIB)
    assert (p.checkpoint_layers, p.offload, p.batch_size) == (32, True, 8)
    p = E.plan(bench_cfg(gradient_checkpointing=False), LLAMA8B, 24 * GIB)
    assert p.checkpoint_layers == 0 and p.batch_size == 1
    cfg = bench_cfg()
    cfg.distributed.gpus = 2
    p = E.plan(cfg, LLAMA8B, 10 * GIB)
    assert not p.offload and "one GPU only" in " ".join(p.reasons)


def test_estimate_offload_and_selective_terms():
    cfg = bench_cfg()
    full = E.estimate(cfg, LLAMA8B, gradient_checkpointing=True, liger=True)
    off = E.estimate(cfg, LLAMA8B, gradient_checkpointing=True, liger=True, offload=True)
    # offloading frees 30 of the 32 checkpointed inputs (two stay in flight): 30 x 16384 x 4096 x 2 B
    assert full.breakdown["activations"] - off.breakdown["activations"] == 30 * 16384 * 4096 * 2
    assert off.host_bytes == 32 * 16384 * 4096 * 2 and full.host_bytes == 0
    half = E.estimate(cfg, LLAMA8B, gradient_checkpointing=True, liger=True, checkpoint_layers=16)
    none = E.estimate(cfg, LLAMA8B, gradient_checkpointing=False, liger=True)
    assert full.peak_bytes < half.peak_bytes < none.peak_bytes
    assert (half.checkpoint_layers, half.layers, none.checkpoint_layers) == (16, 32, 0)
    assert E.relative_speed(0.5, 16384) > E.relative_speed(True, 16384)
    assert E.relative_speed(True, 16384, offload=True) < E.relative_speed(True, 16384)


def test_config_cross_checks():
    with pytest.raises(C.ConfigError) as e:
        C.from_dict({"train": {"activation_offload": True}, "distributed": {"gpus": 2}})
    assert "train.activation_offload" in str(e.value) and "one GPU" in str(e.value)
    with pytest.raises(C.ConfigError) as e:
        C.from_dict({"train": {"gradient_checkpointing": False, "checkpoint_layers": 3}})
    assert "train.checkpoint_layers" in str(e.value)


def _losses(cfg):
    run = RN.Run(cfg)
    run.start()
    assert run.join(timeout=300)
    assert run.result.type == "run_finished", getattr(run.result, "reason", "")
    evs = [json.loads(x) for x in (run.run_dir / "events.jsonl").read_text().splitlines()]
    started = next(e for e in evs if e["type"] == "run_started")
    return [e["loss"] for e in evs if e["type"] == "step"], started["plan"]


def test_offloaded_and_selective_checkpointing_train_with_the_same_losses(tiny_cfg):
    """builtin:tiny on the CPU: the first layer checkpointed through the offloaded function (host
    copy, recompute with the forward's RNG state, backward inside backward), the others kept
    whole, gives the losses of plain checkpointing on every layer."""
    from engine import offload
    base = tiny_cfg.copy()
    base.train.max_steps, base.train.eval_steps, base.train.save_steps = 5, 0, 0
    base.train.logging_steps = 1
    base.train.gradient_checkpointing = True
    base.lora.dropout = 0.1          # the recompute must draw the same dropout masks
    ref, _ = _losses(base)
    mixed = base.copy()
    mixed.train.activation_offload, mixed.train.checkpoint_layers = True, 1
    offload._STASH.__init__()
    got, plan = _losses(mixed)
    assert "checkpointing: 1 decoder layers checkpointed, inputs offloaded to pinned CPU memory" in plan
    assert len(offload._STASH._buffers) == 1 and not any(offload._STASH._busy)   # used, and released
    assert len(ref) == len(got) == 5 and all(math.isfinite(x) for x in ref)
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert ref[-1] != ref[0]          # it trained: the adapter's gradients reached the loss
