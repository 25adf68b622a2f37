"""Offloaded and selective gradient checkpointing (engine/training/offload.py), the fused NF4+LoRA linear
(engine/training/fused_lora.py), and the planner's choices at 10, 16, 24 GiB and a whole H200, from
config.json alone."""
import math

import pytest

from engine.core import config
from engine.planning import estimate as estimate_mod
from reliability_helpers import finished_losses

GIB = 2 ** 30
# Llama-3.1-8B's config.json (the keys the estimate reads)
LLAMA8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "tie_word_embeddings": False}


def bench_cfg(**train):
    """The bench's recipe: seq 2048, effective batch 8, r=32 all-linear, adamw_torch, on CUDA."""
    cfg = config.Config()
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
    monkeypatch.setattr(estimate_mod, "_liger_available", lambda: True)
    monkeypatch.setattr(estimate_mod, "_flash_attn_available", lambda: False)


@pytest.mark.parametrize("gib, batch, layers, offload", [
    (10, 4, 32, True),       # every layer checkpointed, inputs on the host: micro-batch 4 fits
    (16, 8, 31, True),       # micro-batch 8: offloading frees the inputs, one layer kept whole
    (24, 8, 29, False),      # room for three whole layers; offloading would buy less than it costs
    (139.2, 8, 0, False),    # the whole H200: no checkpointing
])
def test_planner_choice_per_budget(liger, gib, batch, layers, offload):
    p = estimate_mod.plan(bench_cfg(), LLAMA8B, int(gib * GIB))
    assert (p.batch_size, p.checkpoint_layers, p.offload) == (batch, layers, offload), p.reasons
    assert p.grad_accum == 8 // batch
    assert p.estimate.device_bytes <= gib * GIB * (1 - estimate_mod.HEADROOM)
    text = " ".join(p.reasons)
    assert ("offloaded to pinned CPU memory" in text) == offload
    if 0 < layers < 32:
        assert f"on for {layers} of 32 layers (the fewest that fit)" in text
    # the choice is the fastest of what fits: one more layer kept whole would not fit
    if 0 < layers < 32:
        more = estimate_mod.estimate(bench_cfg(), LLAMA8B, batch_size=batch, gradient_checkpointing=True, liger=True,
                          checkpoint_layers=layers - 1, offload=offload)
        assert more.device_bytes > gib * GIB * (1 - estimate_mod.HEADROOM)


def test_explicit_settings_are_kept(liger):
    p = estimate_mod.plan(bench_cfg(activation_offload=False), LLAMA8B, 10 * GIB)
    assert not p.offload and p.batch_size < 4
    p = estimate_mod.plan(bench_cfg(checkpoint_layers=32, activation_offload=True), LLAMA8B, 24 * GIB)
    assert (p.checkpoint_layers, p.offload, p.batch_size) == (32, True, 8)
    p = estimate_mod.plan(bench_cfg(gradient_checkpointing=False), LLAMA8B, 24 * GIB)
    assert p.checkpoint_layers == 0 and p.batch_size == 1
    cfg = bench_cfg()
    cfg.distributed.gpus = 2
    p = estimate_mod.plan(cfg, LLAMA8B, 10 * GIB)
    assert not p.offload and "one GPU only" in " ".join(p.reasons)


def test_estimate_offload_and_selective_terms():
    cfg = bench_cfg()
    full = estimate_mod.estimate(cfg, LLAMA8B, gradient_checkpointing=True, liger=True)
    off = estimate_mod.estimate(cfg, LLAMA8B, gradient_checkpointing=True, liger=True, offload=True)
    # offloading frees 30 of the 32 checkpointed inputs (two stay in flight): 30 x 16384 x 4096 x 2 B
    assert full.breakdown["activations"] - off.breakdown["activations"] == 30 * 16384 * 4096 * 2
    assert off.offload_host_bytes == 32 * 16384 * 4096 * 2 and full.offload_host_bytes == 0
    half = estimate_mod.estimate(cfg, LLAMA8B, gradient_checkpointing=True, liger=True, checkpoint_layers=16)
    none = estimate_mod.estimate(cfg, LLAMA8B, gradient_checkpointing=False, liger=True)
    assert full.peak_bytes < half.peak_bytes < none.peak_bytes
    assert (half.checkpoint_layers, half.layers, none.checkpoint_layers) == (16, 32, 0)
    assert estimate_mod.relative_speed(0.5, 16384) > estimate_mod.relative_speed(True, 16384)
    assert estimate_mod.relative_speed(True, 16384, offload=True) < estimate_mod.relative_speed(True, 16384)


def test_config_cross_checks():
    with pytest.raises(config.ConfigError) as e:
        config.from_dict({"train": {"activation_offload": True}, "distributed": {"gpus": 2}})
    assert "train.activation_offload" in str(e.value) and "one GPU" in str(e.value)
    with pytest.raises(config.ConfigError) as e:
        config.from_dict({"train": {"gradient_checkpointing": False, "checkpoint_layers": 3}})
    assert "train.checkpoint_layers" in str(e.value)


def test_offloaded_and_selective_checkpointing_train_with_the_same_losses(tiny_cfg):
    """builtin:tiny on the CPU: the first layer checkpointed through the offloaded function (host
    copy, recompute with the forward's RNG state, backward inside backward), the others kept
    whole, gives the losses of plain checkpointing on every layer."""
    from engine.training import offload
    base = tiny_cfg.copy()
    base.train.max_steps, base.train.eval_steps, base.train.save_steps = 5, 0, 0
    base.train.logging_steps = 1
    base.train.gradient_checkpointing = True
    base.lora.dropout = 0.1          # the recompute must draw the same dropout masks
    ref, _ = finished_losses(base)
    mixed = base.copy()
    mixed.train.activation_offload, mixed.train.checkpoint_layers = True, 1
    offload._STASH.__init__()
    got, plan = finished_losses(mixed)
    assert "checkpointing: 1 decoder layers checkpointed, inputs offloaded to pinned CPU memory" in plan
    assert len(offload._STASH._buffers) == 1 and not any(offload._STASH._busy)   # used, and released
    assert len(ref) == len(got) == 5 and all(math.isfinite(x) for x in ref)
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert ref[-1] != ref[0]          # it trained: the adapter's gradients reached the loss


def test_fused_lora_matches_peft_on_a_4bit_model():
    """builtin:tiny in 4 bits on the CPU: the fused function gives PEFT's loss and gradients, and
    falls back to PEFT's own forward where it does not apply (adapters disabled)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from engine.training import fused_lora
    from engine.training import model as model_mod
    from engine.models.runtime import runtime
    cfg = config.Config()
    rt = runtime(cfg)
    assert rt.load_in_4bit
    m = get_peft_model(model_mod.load_model(cfg, rt), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                         target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)      # B = 0 at init would hide the LoRA path
    ids = torch.randint(5, 200, (2, 16))

    def run():
        m.zero_grad()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    ref_loss, ref = run()
    assert fused_lora.patch(m) == 14 and fused_lora.patch(m) == 0          # 7 projections x 2 layers, once
    loss, got = run()
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-7), k
    with m.disable_adapter():
        with torch.no_grad():
            off = m(input_ids=ids, labels=ids).loss.item()
    assert off != pytest.approx(loss, rel=1e-6)             # the fallback ran the base alone
    assert fused_lora.eligible_reason(config.from_dict({"lora": {"dropout": 0.1}})).startswith("lora.dropout")
