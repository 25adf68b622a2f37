"""Packing must not let samples attend to each other: with restarting position_ids and no KV
cache (training), sdpa and eager give each packed sample exactly its own logits."""
import pytest
import torch

from engine.models.runtime import packing_isolated
from engine.models.tokenizer import load_tokenizer


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_rows_are_isolated(impl):
    from transformers import AutoModelForCausalLM
    from engine.models.builtin import tiny_model_dir
    ok, why = packing_isolated(impl)
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
    from engine.training import runner
    cfg = tiny_cfg.copy()
    cfg.data.packing = True
    cfg.train.max_steps = 4
    run = runner.Run(cfg)
    run.start()
    assert run.join(300)
    assert run.result.type == "run_finished", getattr(run.result, "reason", "")


def test_packed_collator_keeps_rows_apart_and_masks_sample_starts():
    from engine.core import config
    from engine.training.trainer import packed_collator, padding_efficiency
    tok, _ = load_tokenizer(config.Config())
    col = packed_collator(tok, "sdpa")
    batch = col([{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [3, 2]},
                 {"input_ids": [10, 11], "labels": [10, 11], "seq_lengths": [2]}])
    assert "attention_mask" not in batch              # so transformers derives the block-diagonal mask
    assert batch["input_ids"].shape == (2, 5)         # one batch row per packed row (not flattened)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 11, -100, -100, -100]]
    assert padding_efficiency([100] * 16, 8, 2048) == 1.0
    assert padding_efficiency([100, 2000] * 8, 8, 2048) < 0.6
