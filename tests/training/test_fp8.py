"""FP8 GEMMs for the frozen 4-bit base (engine/training/fp8.py) inside the fused NF4+LoRA linear, and
the fused linear under weight streaming. The CPU runs torch's ``_scaled_mm`` with the GPU's numerics
(e4m3 operands, per-row power-of-two scales, bf16 result): builtin:tiny trains with the same losses
as the bf16 base GEMMs within FP8's rounding."""
import math

import pytest
import torch

from engine.core import config
from engine.training import fp8
from reliability_helpers import configured, finished_losses


def test_rowwise_quantisation_is_exact_but_for_e4m3_rounding():
    torch.manual_seed(0)
    x = (torch.randn(37, 96) * torch.logspace(-3, 3, 37)[:, None]).to(torch.bfloat16)
    x[5] = 0                                             # an all-zero row
    q, s = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (37, 1) and s.dtype == torch.float32
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)           # powers of two: exact scaling
    amax = x.float().abs().amax(1, keepdim=True)
    assert bool(((amax / s) <= fp8.E4M3_MAX).all()) and bool(((amax / s)[amax > 0] > fp8.E4M3_MAX / 2).all())
    back = q.float() * s
    big = x.float().abs() >= s * 2 ** -6                 # e4m3's normal range: 3 mantissa bits
    assert bool(((back - x.float()).abs()[big] <= x.float().abs()[big] * 2 ** -4).all())
    assert not back[5].any()


def test_fp8_gemms_match_bf16_within_fp8_rounding():
    torch.manual_seed(1)
    x, w, dy = torch.randn(64, 128), torch.randn(256, 128), torch.randn(64, 256)
    x, w, dy = (t.to(torch.bfloat16) for t in (x, w, dy))
    for got, ref in ((fp8.matmul_nt(x, w), x.float() @ w.float().t()), (fp8.matmul_nn(dy, w), dy.float() @ w.float())):
        assert got.dtype == torch.bfloat16
        assert (got.float() - ref).norm() / ref.norm() < 0.06          # e4m3: ~3.7% on random data
    assert fp8.fits(4096, 14336) and not fp8.fits(172, 4096)


def _fused_model():
    from peft import LoraConfig, get_peft_model
    from engine.training import model as model_mod
    from engine.models.runtime import runtime
    cfg = config.Config()
    m = get_peft_model(model_mod.load_model(cfg, runtime(cfg)),
                       LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                  task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)      # B = 0 at init would hide the LoRA path
    return m


def test_fused_linear_with_fp8_base_gives_bf16_loss_and_gradients_within_rounding():
    from engine.training import fused_lora
    m = _fused_model()
    ids = torch.randint(5, 200, (2, 16))

    def run(fp8_on):
        for mod in m.modules():
            if hasattr(mod, "_fp8"):
                mod._fp8 = fp8_on
        m.zero_grad()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    assert fused_lora.patch(m, fp8=True) == 14
    assert all(mod._fp8 for mod in m.modules() if hasattr(mod, "_fp8"))   # tiny's 128/256/64 dims fit
    ref_loss, ref = run(False)
    loss, got = run(True)
    assert loss != ref_loss and loss == pytest.approx(ref_loss, rel=2e-3)   # FP8 ran, within rounding
    for k in ref:
        cos = torch.nn.functional.cosine_similarity(got[k].flatten().float(), ref[k].flatten().float(), dim=0)
        assert cos > 0.98, k


def test_fp8_training_and_streamed_fused_training_match_bf16(tiny_cfg, tmp_path):
    """builtin:tiny, 4 steps: fused bf16 (reference), fused FP8 (same losses within FP8 rounding),
    and fused bf16 with the 4-bit layers streamed (the fused linear runs the streamer's hooks and
    asks for the layer in its backward: the same losses as unstreamed), also with the checkpointed
    layers' inputs offloaded."""
    base = configured(tiny_cfg, {"train.max_steps": 4, "train.save_steps": 0, "train.eval_steps": 0,
                                 "train.logging_steps": 1, "train.gradient_checkpointing": True,
                                 "train.fused_lora": True, "lora.dropout": 0.0})
    ref, plan = finished_losses(configured(base, {"output.dir": str(tmp_path / "ref"), "train.fp8_base": "auto"}))
    assert "FP8 base GEMMs off (CPU: no FP8 speed to gain)" in plan
    got, plan = finished_losses(configured(base, {"output.dir": str(tmp_path / "fp8"), "train.fp8_base": True}))
    assert "FP8 base GEMMs on (train.fp8_base = true)" in plan
    assert len(got) == len(ref) == 4 and all(math.isfinite(x) for x in got)
    assert got != ref and got == pytest.approx(ref, rel=5e-3)
    streamed, plan = finished_losses(configured(base, {"output.dir": str(tmp_path / "streamed"), "train.fp8_base": False,
                                               "train.gpu_memory_gib": 0.0001}))
    assert any(p.startswith("weight streaming:") for p in plan), plan
    assert streamed == pytest.approx(ref, rel=1e-5)
    # streaming with the layers' inputs offloaded (what the planner picks for a 70B at 24 GiB)
    both, plan = finished_losses(configured(base, {"output.dir": str(tmp_path / "both"), "train.fp8_base": False,
                                           "train.gpu_memory_gib": 0.0001, "train.activation_offload": True}))
    assert any(p.startswith("weight streaming:") for p in plan) and any("inputs offloaded" in p for p in plan), plan
    assert both == pytest.approx(ref, rel=1e-5)


def test_fp8_needs_the_fused_linear_and_says_so():
    from engine.training import trainer
    cfg = config.Config()
    cfg.train.fused_lora, cfg.train.fp8_base = False, True
    reasons = []
    trainer._resolve_fp8(cfg, type("RT", (), {"device": "cuda"})(), reasons)
    assert cfg.train.fp8_base is False
    assert reasons == ["FP8 base GEMMs off although train.fp8_base = true: needs the fused NF4+LoRA linear "
                       "(train.fused_lora)"]
    assert fp8.unsupported_reason("cuda") in (None, "no CUDA device") or "8.9" in fp8.unsupported_reason("cuda")


def test_planner_says_it_plans_for_fp8_on_the_config_screen():
    from engine.planning import estimate as estimate_mod
    mc = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
    cfg = config.Config()
    cfg.model.name, cfg.train.device, cfg.data.max_length = "x", "cuda", 2048
    p = estimate_mod.plan(cfg, mc, 24 * 2**30)
    assert p.fp8 and p.to_dict()["fp8"] and "FP8 base GEMMs" in estimate_mod.plan_summary(p, 24)
    cfg.train.fp8_base = False
    p = estimate_mod.plan(cfg, mc, 24 * 2**30)
    assert not p.fp8 and "FP8" not in estimate_mod.plan_summary(p, 24)


def test_the_reference_pass_uses_the_policys_base_gemms():
    """DPO/KTO's reference is the model with the adapter disabled: with FP8 base GEMMs on, it must go
    through the same GEMMs as the policy, so a fresh adapter (B = 0) gives the policy's logits
    exactly (DPO's first loss log 2), and a trained one differs from the base by the LoRA alone."""
    from engine.training import fused_lora
    m = _fused_model()
    ids = torch.randint(5, 200, (2, 16))
    assert fused_lora.patch(m, fp8=True) == 14
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.zero_()                              # a fresh adapter
        policy = m(input_ids=ids).logits
        with m.disable_adapter():
            reference = m(input_ids=ids).logits
        assert torch.equal(policy, reference)
        for mod in m.modules():
            if hasattr(mod, "_fp8"):
                mod._fp8 = False
        with m.disable_adapter():
            bf16_reference = m(input_ids=ids).logits
        assert not torch.equal(reference, bf16_reference)     # FP8 really ran in the reference pass
