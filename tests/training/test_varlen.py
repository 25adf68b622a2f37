"""varlen attention (engine/training/attention.py): packed samples kept apart without a mask.

On the CPU the attention function runs its per-sample sdpa path (the flash kernel is CUDA-only);
the kernel call itself runs on the meta device (torch's fake kernel: shapes, dtypes, arguments
and the backward's), and ``self_check`` compares it with sdpa on a GPU before a run uses it."""
import math

import pytest
import torch

from engine.core import config
from engine.planning import estimate as estimate_mod
from engine.training import attention
from reliability_helpers import finished_losses
from test_offload import bench_cfg     # the bench's recipe (seq 2048, batch 8, r=32, CUDA)

GIB = 2 ** 30


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM
    from engine.models.builtin import tiny_model_dir
    attention.register()
    path = tiny_model_dir()
    load = lambda impl: AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).eval()
    return load("varlen"), load("sdpa")


def _rows():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, 1000, (n,), generator=g) for n in (7, 3, 12, 5)]


def _packed(rows):
    ids = torch.cat(rows)[None]
    pos = torch.cat([torch.arange(len(r)) for r in rows])[None]
    return ids, pos


def test_packed_rows_give_each_sample_its_own_logits(tiny):
    varlen, sdpa = tiny
    rows = _rows()
    ids, pos = _packed(rows)
    with torch.no_grad():
        packed = varlen(ids, position_ids=pos).logits[0]
        alone = [sdpa(r[None]).logits[0] for r in rows]
        leaky = varlen(ids).logits[0]                     # no restart: one long sample
    at = 0
    for r, ref in zip(rows, alone):
        assert torch.allclose(packed[at:at + len(r)], ref, atol=1e-5)
        at += len(r)
    assert not torch.allclose(leaky[7:10], alone[1], atol=1e-3)     # the check can fail


def test_perturbing_one_sample_leaves_the_others_unchanged(tiny):
    varlen, _ = tiny
    rows = _rows()
    ids, pos = _packed(rows)
    other = [r.clone() for r in rows]
    other[1] = (other[1] + 17) % 1000                     # sample 1 changed, the rest the same
    ids2, _ = _packed(other)
    with torch.no_grad():
        a = varlen(ids, position_ids=pos).logits[0]
        b = varlen(ids2, position_ids=pos).logits[0]
    assert torch.equal(a[:7], b[:7]) and torch.equal(a[10:], b[10:])
    assert not torch.allclose(a[7:10], b[7:10], atol=1e-3)


def test_padded_batch_matches_sdpa(tiny):
    varlen, sdpa = tiny
    x = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    am = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        a = varlen(x, attention_mask=am).logits
        b = sdpa(x, attention_mask=am).logits
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1, :3], b[1, :3], atol=1e-5)


def test_lora_losses_packed_equal_padded(tiny):
    """Four LoRA steps on the same samples: padded rows under sdpa vs one padding-free packed row
    under varlen (TRL's collator, as the trainer feeds it): the same per-step losses."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from engine.models.builtin import tiny_model_dir
    from transformers import AutoModelForCausalLM
    batches = [_rows(), [r.flip(0) for r in _rows()]] * 2
    losses = {}
    for impl in ("sdpa", "varlen"):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), attn_implementation=impl)
        m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        col = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=impl == "varlen")
        losses[impl] = []
        for rows in batches:
            batch = col([{"input_ids": r.tolist()} for r in rows])
            if impl == "sdpa":
                batch["labels"][batch["attention_mask"] == 0] = -100
            loss = m(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[impl].append(loss.item())
    assert losses["varlen"] == pytest.approx(losses["sdpa"], rel=1e-5)
    assert losses["sdpa"][-1] != losses["sdpa"][0]


def test_kernel_call_on_the_meta_device():
    """The CUDA path's exact call (this torch's varlen_attn, GQA, int32 lengths), forward and
    backward, through torch's fake kernel."""
    q = torch.empty(300, 8, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k = torch.empty(300, 2, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    seg = attention.Segments(None, torch.tensor([0, 100, 300], dtype=torch.int32, device="meta"), 200)
    assert attention.use_kernel(q)
    out = attention.varlen_call(q, k, k, seg, 0.125)
    assert out.shape == q.shape and out.dtype == q.dtype
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_call_adapts_to_the_kernel_signature():
    def torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
        pass
    kw, repeat = attention._call_kwargs(torch_2_10, 0.1, gqa=True)
    assert kw == {"is_causal": True} and repeat       # no scale / enable_gqa there: handled around it
    kw, repeat = attention._call_kwargs(attention.kernel(), 0.1, gqa=True)
    assert kw["window_size"] == (-1, 0) and kw["scale"] == 0.1 and not repeat


def test_segments_from_positions_and_padding():
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]])
    seg = attention.segments(2, 5, "cpu", pos, None)
    assert seg.cu_seqlens.tolist() == [0, 3, 5, 7, 8, 9, 10] and seg.max_len == 3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    seg = attention.segments(2, 5, "cpu", None, mask)
    assert seg.cu_seqlens.tolist() == [0, 5, 8] and seg.keep.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert attention.segments(2, 5, "cpu", None, mask) is seg        # once per batch, not per layer


def test_choice_on_cpu_says_why_not():
    from engine.models.runtime import Runtime
    cfg = config.Config()
    cfg.data.packing = True
    lines = attention.choose(cfg, Runtime("cpu", "fp32", True))
    assert cfg.model.attn_implementation == "auto"
    assert lines and "varlen not used: CPU" in lines[0]
    assert attention.attention_work([330] * 6, 2048) == pytest.approx(6 * 330 ** 2 / 2048 ** 2)


def test_planner_and_estimate_know_varlen(monkeypatch):
    from test_offload import LLAMA8B
    monkeypatch.setattr(estimate_mod, "_liger_available", lambda: True)
    monkeypatch.setattr(estimate_mod, "_flash_attn_available", lambda: False)
    monkeypatch.setattr(estimate_mod, "_varlen_available", lambda: True)
    p = estimate_mod.plan(bench_cfg(), LLAMA8B, 24 * GIB)
    assert any(r.startswith("attention varlen for packed rows") for r in p.reasons), p.reasons
    packed = bench_cfg()
    packed.data.packing = True
    kw = dict(batch_size=8, gradient_checkpointing=False, liger=True)
    varlen = estimate_mod.estimate(packed, LLAMA8B, **kw)
    assert varlen.peak_bytes == estimate_mod.estimate(bench_cfg(), LLAMA8B, **kw).peak_bytes
    packed.model.attn_implementation = "sdpa"          # the mask: seq x seq x 2 B a layer
    sdpa = estimate_mod.estimate(packed, LLAMA8B, **kw)
    assert sdpa.breakdown["activations"] - varlen.breakdown["activations"] == 32 * 8 * 2048 * 2048 * 2
    monkeypatch.setattr(estimate_mod, "_varlen_available", lambda: False)
    p = estimate_mod.plan(bench_cfg(), LLAMA8B, 24 * GIB)
    assert not any(r.startswith("attention varlen") for r in p.reasons)


def test_engine_run_with_varlen_equals_sdpa_packing(tiny_cfg):
    """A real 4-bit QLoRA run of builtin:tiny with packing: varlen (TRL's padding-free rows) and
    sdpa (block-diagonal mask) train on the same packed samples with the same losses."""
    base = tiny_cfg.copy()
    base.train.max_steps, base.train.eval_steps, base.train.save_steps, base.train.logging_steps = 3, 0, 0, 1
    base.data.packing = True
    base.model.attn_implementation = "sdpa"
    ref, _ = finished_losses(base)
    v = base.copy()
    v.model.attn_implementation = "varlen"
    got, _ = finished_losses(v)
    assert len(ref) == len(got) == 3 and all(math.isfinite(x) for x in ref)
    assert got == pytest.approx(ref, rel=1e-4)
