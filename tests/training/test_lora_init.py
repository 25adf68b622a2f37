"""lora.init = loftq | pissa: real CPU runs on builtin:tiny, the adapter each leaves (a plain LoRA
over the original base), merges that verify, and the estimate's init cost.

What is checked against the files the runs leave, with our own arithmetic:
- PiSSA: the trained model is W_res + s·B·A with W_res = W − s·B0·A0 (RUN_DIR/adapter_init); the
  merged checkpoint holds exactly that, so merge/export carry what was trained.
- LoftQ: s·B0·A0 brings the 4-bit base closer to W than the 4-bit base alone; the merge is
  W + s·(B·A − B0·A0).
"""
import json
from pathlib import Path

import pytest

from engine.core import config
from engine.outputs import merge
from engine.planning import estimate as estimate_mod
from engine.training import runner

REPO = Path(__file__).resolve().parents[2]


def _run(tmp: Path, init: str, method: str):
    extra = ["quant.load_in_4bit=false"] if method == "lora" else []
    cfg = config.load(REPO / "examples" / "demo.toml",
                      [f'output.dir="{tmp / "runs"}"', "train.max_steps=2", "train.eval_steps=0", "data.eval_fraction=0.0",
                       "data.max_length=128",
                       "train.save_steps=0", f'lora.init="{init}"', f'train.method="{method}"'] + extra)
    run = runner.Run(cfg)
    run.start()
    assert run.join(timeout=300)
    assert run.result.type == "run_finished", getattr(run.result, "reason", "")
    return run.run_dir


def _lora(d: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(d / "adapter_model.safetensors"))


def _pair(sd: dict, module: str):
    a = next(v for k, v in sd.items() if module in k and "lora_A" in k)
    b = next(v for k, v in sd.items() if module in k and "lora_B" in k)
    return a.float(), b.float()


MODULE = "layers.1.self_attn.q_proj"
KEY = f"model.{MODULE}.weight"


def _base_and_merged(run_dir: Path, tmp: Path):
    from safetensors.torch import load_file
    rep = merge.merge(run_dir, tmp / "merged", dtype="fp32")
    assert rep.max_abs_diff <= rep.tolerance                      # merged == base + adapter
    base_dir = Path(json.loads((tmp / "merged" / "qlora_merge.json").read_text())["base"])
    base = load_file(str(base_dir / "model.safetensors"))[KEY].float()
    merged = load_file(str(tmp / "merged" / "model.safetensors"))[KEY].float()
    return base, merged


def _scales(run_dir: Path):
    init = json.loads((run_dir / "adapter_init" / "adapter_config.json").read_text())
    final = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    return init, final


@pytest.mark.parametrize("init,method", [("pissa", "lora"), ("loftq", "qlora")])
def test_init_run_trains_and_its_merge_carries_the_trained_model(init, method, tmp_path):
    import torch
    run_dir = _run(tmp_path, init, method)
    started = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    plan = next(e for e in started if e["type"] == "run_started")["plan"]
    assert any(p.startswith("PiSSA:" if init == "pissa" else "LoftQ:") for p in plan)
    icfg, fcfg = _scales(run_dir)
    r, alpha = icfg["r"], icfg["lora_alpha"]
    assert fcfg["r"] == 2 * r and fcfg["lora_alpha"] == 2 * alpha and fcfg["init_lora_weights"] is True
    assert json.loads((run_dir / "adapter" / "qlora_init.json").read_text())["init"] == init
    s = alpha / r
    a0, b0 = _pair(_lora(run_dir / "adapter_init"), MODULE)
    a, b = _pair(_lora(run_dir / "adapter"), MODULE)
    assert a.shape[0] == 2 * r and torch.equal(a[r:], a0) and torch.equal(b[:, r:], -b0)
    trained_a, trained_b = a[:r], b[:, :r]
    assert (trained_b @ trained_a - b0 @ a0).abs().max() > 0          # it trained
    base, merged = _base_and_merged(run_dir, tmp_path)
    delta = s * (trained_b @ trained_a - b0 @ a0)
    assert (merged - (base + delta)).abs().max() <= 1e-5 * max(1.0, float(base.abs().max()))
    if init == "pissa":
        # what trained: the residual base plus the trained adapter; the merge is that model
        residual = base - s * (b0 @ a0)
        assert (merged - (residual + s * (trained_b @ trained_a))).abs().max() <= 1e-5
        # PiSSA's A0/B0 are the top-r singular directions: s·B0·A0 is the best rank-r part of W
        u, sv, vh = torch.linalg.svd(base, full_matrices=False)
        best = (u[:, :r] * sv[:r]) @ vh[:r]
        assert (s * (b0 @ a0) - best).abs().max() <= 1e-4 * float(base.abs().max())
    else:
        import bitsandbytes as bnb
        q, state = bnb.functional.quantize_4bit(base.contiguous(), quant_type="nf4", compress_statistics=True)
        deq = bnb.functional.dequantize_4bit(q, state).float()
        alone = float((base - deq).norm())
        with_init = float((base - deq - s * (b0 @ a0)).norm())
        assert with_init < 0.9 * alone                  # LoftQ's start is closer to W than NF4 alone


def test_init_choices_are_checked_one_line_each():
    def problems(*sets):
        try:
            config.load(None, list(sets))
        except config.ConfigError as e:
            return str(e)
        return ""
    assert "4-bit base cannot hold" in problems('lora.init="pissa"')
    assert "LoftQ corrects a 4-bit base" in problems('lora.init="loftq"', 'train.method="lora"',
                                                      "quant.load_in_4bit=false")
    assert "cannot be combined with lora.use_dora" in problems('lora.init="loftq"', "lora.use_dora=true")
    assert "allowed: default, loftq, pissa" in problems('lora.init="olora"')
    assert problems('lora.init="loftq"') == ""


LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                tie_word_embeddings=False, model_type="llama")


def test_estimate_counts_the_init_transient():
    from engine.methods.base import init_transient_bytes
    base = config.load(None, ['model.name="x"'])
    loftq = config.load(None, ['model.name="x"', 'lora.init="loftq"'])
    short = dict(batch_size=1, seq_len=128, gradient_checkpointing=True)
    e0 = estimate_mod.estimate(base, LLAMA_8B, **short)
    e1 = estimate_mod.estimate(loftq, LLAMA_8B, **short)
    # down_proj (4096 x 14336) is the largest: W, its 4-bit copy dequantised, the error, its SVD in fp32
    k = 4096
    want = 4 * (3 * 4096 * 14336 + 4096 * k + k + k * 14336)
    assert init_transient_bytes("loftq", 4096, 14336) == want
    assert e1.breakdown["lora_init"] > 0 and e0.breakdown["lora_init"] == 0
    assert e1.peak_bytes == e0.peak_bytes + e1.breakdown["lora_init"]
    assert sum(v for k_, v in e1.breakdown.items() if k_ != "cuda_context") == e1.peak_bytes
    assert any("lora.init = loftq" in n for n in e1.notes)
    # with long rows training's own peak is higher than the init's: nothing is added
    long = estimate_mod.estimate(loftq, LLAMA_8B, batch_size=4, seq_len=4096, gradient_checkpointing=False)
    assert long.breakdown["lora_init"] == 0
