"""Shard-by-shard merge (engine/outputs/merge_stream.py): a 70B-class base is never loaded whole.
Checked on builtin:tiny: forced, and automatic when the base exceeds half the host RAM."""
import json
from pathlib import Path

import pytest

def _adapter(base_dir, out, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, device_map={"": "cpu"})
    torch.manual_seed(0)
    pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    pm.save_pretrained(str(out))
    x = torch.randint(4, 200, (1, 12))
    with torch.no_grad():
        return x, pm(input_ids=x).logits


def _merged_logits(out, x):
    import torch
    from transformers import AutoModelForCausalLM
    mm = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(mm.model.layers[0].self_attn.q_proj).__name__ == "Linear"    # plain 16/32-bit
    with torch.no_grad():
        return mm(input_ids=x).logits


def test_streamed_merge_of_a_16bit_base_equals_base_plus_adapter(tmp_path, monkeypatch):
    import torch
    import transformers
    from engine.outputs import merge as merge_mod
    from engine.models.builtin import tiny_model_dir
    base = tiny_model_dir()
    x, ref = _adapter(base, tmp_path / "ad", torch.float32)

    def never(*a, **k):
        raise AssertionError("the streamed merge loaded a whole model")
    with monkeypatch.context() as mp:
        mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
        rep = merge_mod.merge(tmp_path / "ad", tmp_path / "out", dtype="fp32", base=str(base), stream=True)
    assert rep.max_abs_diff < 1e-4 and any("shard by shard" in w for w in rep.warnings)
    assert json.loads((tmp_path / "out" / "qlora_merge.json").read_text())["streamed"] is True
    assert (_merged_logits(tmp_path / "out", x) - ref).abs().max().item() < 1e-4


def test_a_base_larger_than_half_the_host_ram_merges_shard_by_shard(tmp_path, monkeypatch):
    import torch
    from engine.outputs import merge as merge_mod
    from engine.outputs import merge_stream
    from engine.models.builtin import tiny_model_dir
    base = tiny_model_dir()
    assert not merge_stream.should_stream(str(base))
    monkeypatch.setenv("QLORA_TUI_HOST_RAM_GIB", "0.001")          # 1 MiB of RAM: tiny is 2.2 MB
    assert merge_stream.should_stream(str(base))
    x, ref = _adapter(base, tmp_path / "ad", torch.float32)
    rep = merge_mod.merge(tmp_path / "ad", tmp_path / "out", dtype="bf16", base=str(base))
    assert json.loads((tmp_path / "out" / "qlora_merge.json").read_text())["streamed"] is True
    got = _merged_logits(tmp_path / "out", x)
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item() + 0.05    # bf16 weights
    assert rep.size_bytes > 0
