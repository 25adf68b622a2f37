"""Training after an eval computes the same steps as training without one.

bitsandbytes (0.49+) switches a 4-bit layer on an AVX512-bf16 CPU to an inference-only layout the
first time it runs without gradients, and keeps it: the steps after an eval then differentiate a
kernel with no backward (silently different losses), a width the layout cannot hold (an MLP of
172) fails, and a vision model's biased layers fail in place. Here each builtin model family is
trained with evals and without, on this machine's CPU and as on such a CPU (bitsandbytes told it
has AVX512-bf16), and the training losses must be equal step for step.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reliability_helpers import configured, finished_losses


def _as_avx512_bf16_cpu(monkeypatch):
    """Make bitsandbytes' 4-bit layers decide as on a CPU with AVX512-bf16 (what they read when
    built); the packed layout the eval would then switch to is what the run must never use."""
    import bitsandbytes.nn.modules as bnb_modules
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def _losses_with_and_without_eval(cfg, eval_steps: int):
    with_eval, plan = finished_losses(configured(cfg, {"train.eval_steps": eval_steps}))
    without, _ = finished_losses(configured(cfg, {"train.eval_steps": 10_000}))
    return with_eval, without, plan


@pytest.mark.parametrize("family,eval_steps", [("text", 5), ("vision", 3)])
def test_evals_do_not_change_the_training_losses(tiny_cfg, tmp_path, monkeypatch, family, eval_steps):
    _as_avx512_bf16_cpu(monkeypatch)
    changes = {"train.max_steps": 8, "train.save_steps": 0, "train.device": "cpu", "train.batch_size": 2}
    if family == "vision":
        changes.update({"model.name": "builtin:tiny-vl", "data.train": "builtin:vl-sample",
                        "train.max_steps": 6})
    cfg = configured(tiny_cfg, changes)
    with_eval, without, plan = _losses_with_and_without_eval(cfg, eval_steps)
    assert len(with_eval) == len(without) == cfg.train.max_steps
    assert with_eval == without, (with_eval, without)
    assert any("trainable kernel in eval too" in p for p in plan), plan


def _odd_llama(tiny_cfg, dst: Path, **shape) -> Path:
    """A local random-weight Llama of builtin:tiny's vocabulary with other widths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from engine.models.source import model_path
    src = Path(model_path(tiny_cfg))
    dst.mkdir()
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, dst / f.name)
    conf = LlamaConfig.from_pretrained(src)
    for k, v in shape.items():
        setattr(conf, k, v)
    torch.manual_seed(0)
    LlamaForCausalLM(conf).save_pretrained(dst)
    return dst


@pytest.mark.parametrize("shape", [{"intermediate_size": 172}, {"intermediate_size": 200, "hidden_size": 96,
                                                                 "num_attention_heads": 3, "num_key_value_heads": 1}])
def test_widths_the_packed_layout_cannot_hold_train_and_evaluate(tiny_cfg, tmp_path, monkeypatch, shape):
    _as_avx512_bf16_cpu(monkeypatch)
    model_dir = _odd_llama(tiny_cfg, tmp_path / "odd", **shape)
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                     {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                            for i in range(24)))
    cfg = configured(tiny_cfg, {"model.name": str(model_dir), "data.train": str(data), "data.max_length": 64,
                                "train.max_steps": 4, "train.save_steps": 0, "train.device": "cpu"})
    with_eval, without, _ = _losses_with_and_without_eval(cfg, 2)
    assert with_eval == without and len(with_eval) == 4


def test_a_layer_switched_to_the_inference_layout_is_restored_exactly(tiny_cfg):
    """What bitsandbytes' eval does on such a CPU, done by hand to the loaded model: the check that
    runs after every eval puts each layer back: the same 4-bit codes, and the same weights up to
    the block scales' trip through bf16 and back through double quantisation (under 1%)."""
    import torch
    import bitsandbytes.functional as F
    from engine.training import model as model_mod
    from engine.models.runtime import runtime
    cfg = configured(tiny_cfg, {"train.device": "cpu"})
    rt = runtime(cfg)
    assert rt.load_in_4bit
    model = model_mod.load_model(cfg, rt)
    model_mod.keep_4bit_trainable(model, rt)
    layers = [m for m in model_mod._bnb_4bit_layers(model) if m.out_features % 32 == 0
              and m.in_features % m.weight.quant_state.blocksize == 0][:3]
    assert layers
    before = []
    for m in layers:
        before.append((m.weight.data.clone(), F.dequantize_4bit(m.weight.data, m.weight.quant_state).clone()))
        m.weight.data, m.weight.quant_state = F._convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
        assert m.weight.quant_state.packing_format_for_cpu
    assert model_mod.restore_trainable_4bit(model) == len(layers)
    for m, (raw, dense) in zip(layers, before):
        assert not m.weight.quant_state.packing_format_for_cpu
        assert torch.equal(m.weight.data.reshape(-1), raw.reshape(-1))
        back = F.dequantize_4bit(m.weight.data, m.weight.quant_state)
        rel = float((back - dense).norm() / dense.norm())
        assert rel < 0.01, rel
    assert model_mod.restore_trainable_4bit(model) == 0
