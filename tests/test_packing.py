"""Packing must not let samples attend to each other: with restarting position_ids and no KV
cache (training), sdpa and eager give each packed sample exactly its own logits."""
import pytest
import torch

from engine import model as M


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_rows_are_isolated(impl):
    from transformers import AutoModelForCausalLM
    from engine.builtin import tiny_model_dir
    ok, why = M.packing_isolated(impl)
    assert ok, why
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), attn_implementation=impl).eval()
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[10, 11, 12]])
    with torch.no_grad():
        la = m(a, use_cache=False).logits
        lb = m(b, use_cache=False).logits
        lp = m(torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]]),
               use_cache=False).logits
        leaky = m(torch.cat([a, b], 1), use_cache=False).logits     # no restart: b sees a
    assert torch.allclose(lp[0, :5], la[0], atol=1e-4)
    assert torch.allclose(lp[0, 5:], lb[0], atol=1e-4)
    assert not torch.allclose(leaky[0, 5:], lb[0], atol=1e-4)   # the check can fail


def test_training_with_packing_runs(tiny_cfg):
    from engine import runner as RN
    cfg = tiny_cfg.copy()
    cfg.data.packing = True
    cfg.train.max_steps = 4
    run = RN.Run(cfg)
    run.start()
    assert run.join(300)
    assert run.result.type == "run_finished", getattr(run.result, "reason", "")
