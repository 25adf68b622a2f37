"""GaLore (train.method = "galore"): a real CPU run on builtin:tiny, headless and from the TUI;
the full checkpoint it leaves, and what merge / serve-cmd / the estimate make of it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from engine.core import config as config_mod
from engine.core.summary import State
from engine.planning import estimate as estimate_mod
from tui_helpers import anyio_backend  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
GALORE = ['train.method="galore"', "galore.rank=16", "galore.update_proj_gap=5",
          "train.learning_rate=1e-2", "train.logging_steps=1", "train.eval_steps=0"]
L8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
       "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
       "tie_word_embeddings": False}


def test_galore_headless_run_leaves_a_full_checkpoint_that_learned(tmp_path, capsys):
    from reliability_helpers import cli
    sets = [f'output.dir="{tmp_path / "runs"}"', "train.max_steps=12", "train.save_steps=6", *GALORE]
    # the CLI in this process (no Python start-up of its own; other tests run it as a process)
    p = cli(capsys, "train", REPO / "examples" / "demo.toml", "--headless", *[a for s in sets for a in ("--set", s)])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    run_dir = next((tmp_path / "runs").iterdir())
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events if e["type"] == "run_started")
    assert any(line.startswith("GaLore: full-rank") for line in started["plan"])
    assert started["trainable_params"] < started["total_params"]     # embeddings, norms frozen
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses
    assert events[-1]["type"] == "run_finished" and events[-1]["adapter_dir"].endswith("/model")
    assert "model: " in p.stdout and "adapter: " not in p.stdout

    # a full checkpoint, loadable by plain transformers; targeted weights moved, the rest did not
    import torch
    from transformers import AutoModelForCausalLM
    model_dir = run_dir / "model"
    assert not (run_dir / "adapter").exists() and not (model_dir / "adapter_config.json").exists()
    marker = json.loads((model_dir / "qlora_tui.json").read_text())
    tuned = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(marker["base"])
    tw, bw = dict(tuned.named_parameters()), dict(base.named_parameters())
    assert not torch.equal(tw["model.layers.0.self_attn.q_proj.weight"], bw["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(tw["model.layers.1.mlp.down_proj.weight"], bw["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(tw["model.embed_tokens.weight"], bw["model.embed_tokens.weight"])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, base(ids).logits)

    # merge: nothing to merge, said plainly (exit 0, nothing written)
    m = cli(capsys, "merge", run_dir, "--out", tmp_path / "merged")     # (in this process too)
    assert m.returncode == 0 and "nothing to merge" in m.stdout and "full checkpoint" in m.stdout
    assert not (tmp_path / "merged").exists()
    # serve-cmd: a plain vllm serve of the checkpoint, no LoRA flags
    s = cli(capsys, "serve-cmd", run_dir)
    assert s.returncode == 0, s.stderr
    assert f"vllm serve {model_dir.resolve()}" in s.stdout and "--enable-lora" not in s.stdout
    # mixing it with adapters is refused in one line
    s2 = cli(capsys, "serve-cmd", run_dir, run_dir)
    assert s2.returncode == 1 and "full checkpoint" in s2.stderr and "Traceback" not in s2.stderr
    # export: its artifact is a full checkpoint, written to GGUF as it is (no merge), verified
    e = cli(capsys, "export", run_dir, "--gguf", "f16")
    assert e.returncode == 0, e.stderr
    assert "% merge] a full checkpoint (train.method = galore): written as it is" in e.stdout
    assert "verified: read back with transformers" in e.stdout
    assert len(list((run_dir / "export").glob("*-f16.gguf"))) == 1 and not (run_dir / "export" / "merged").exists()
    card = (run_dir / "export" / "README.md").read_text()
    assert "a full-weight fine-tune (galore)" in card and "LoRA r=" not in card
    m2 = cli(capsys, "export", run_dir, "--target", "merged")
    assert m2.returncode == 0 and "nothing to merge" in m2.stdout
    a = cli(capsys, "export", run_dir, "--adapter-gguf")            # no adapter: one line
    assert a.returncode == 1 and "full checkpoint" in a.stderr and len(a.stderr.strip().splitlines()) == 1


def test_estimate_models_galore_memory():
    qlora = estimate_mod.estimate(config_mod.load(None, ["train.device=\"cuda\""]), L8B)
    galore = estimate_mod.estimate(config_mod.load(None, ["train.device=\"cuda\"", 'train.method="galore"']), L8B)
    lora = estimate_mod.estimate(config_mod.load(None, ["train.device=\"cuda\"", 'train.method="lora"']), L8B)
    b = galore.breakdown
    # 16-bit weights, no 4-bit part, no adapter
    assert b["weights_quantized"] == 0 and b["lora_params"] == 0
    assert b["weights_unquantized"] == lora.breakdown["weights_unquantized"]
    # full bf16 gradients of the 7 projections of 32 layers
    linear = 32 * sum(a * o for a, o in estimate_mod.shape_of(L8B).module_dims().values())
    assert galore.trainable_params == linear
    # the gradients replace the activations the backward frees: only what outgrows them, + the overlap
    from engine.methods.galore import BACKWARD_OVERLAP
    freed = b["activations"] + b["logits"] + b["backward_workspace"]
    assert b["lora_grads"] >= BACKWARD_OVERLAP and b["lora_grads"] >= linear * 2 - freed
    # projected 8-bit Adam state: far below AdamW's 8 bytes per trainable param
    assert b["optimizer_state"] < linear * 8 / 20
    rank_512 = estimate_mod.estimate(config_mod.load(None, ["train.device=\"cuda\"", 'train.method="galore"', "galore.rank=512"]), L8B)
    assert rank_512.breakdown["optimizer_state"] > 3 * b["optimizer_state"]
    assert qlora.peak_bytes < lora.peak_bytes < galore.peak_bytes
    assert "GaLore optimizer state" in estimate_mod.format_report(galore, None)


def test_galore_estimate_peak_is_the_larger_of_activations_and_gradients_plus_step():
    """Gradients fill as the backward frees activations; the step's SVD/update buffers come after:
    short rows peak at gradients + step, long rows without checkpointing at the activations (H200:
    within 2%, bench/RESULTS.md)."""
    from engine.methods import galore
    dims = estimate_mod.shape_of(L8B).module_dims()
    for seq, batch, gc, grads_win in ((32, 1, "true", True), (2048, 4, "false", False)):
        cfg = config_mod.load(None, ['train.device="cuda"', 'train.method="galore"', f"data.max_length={seq}",
                                     f"train.batch_size={batch}", f"train.gradient_checkpointing={gc}"])
        est = estimate_mod.estimate(cfg, L8B)
        b = est.breakdown
        terms = galore.memory_terms(cfg, dims, list(dims), 32, 2)
        m, n = 4096, 14336                    # the largest matrix: fp32 copy + solver copy, U, Vh, 3 bf16 copies
        assert terms["step_transient"] == 8 * m * n + 4 * m * (m + n) + 3 * m * n * 2
        freed = b["activations"] + b["logits"] + b["backward_workspace"]
        side = max(freed, terms["grads"] + terms["step_transient"])
        assert freed + b["lora_grads"] == side + galore.BACKWARD_OVERLAP
        assert b["optimizer_state"] == terms["optimizer_state"]
        assert any("outgrow the activations" in n for n in est.notes) == grads_win


@pytest.mark.parametrize("method,shape,seq,batch,measured", [
    ("galore", "llama1b", 1024, 2, 5.64), ("galore", "llama3b", 1024, 4, 17.15),
    ("lora", "llama1b", 1024, 2, 5.84), ("lora", "llama3b", 1024, 4, 20.66)])
def test_galore_and_lora_estimates_within_10_percent_of_the_h200_runs(method, shape, seq, batch, measured):
    """bench/galore_calibration.py on the H200 (bench/RESULTS.md): peak reserved, 3 steps, no
    checkpointing; GaLore on its defaults, the 16-bit LoRA with adamw_torch."""
    sys.path.insert(0, str(REPO / "bench"))
    import galore_calibration
    mc = dict(galore_calibration.shapes()[shape], model_type="llama")
    cfg = config_mod.load(None, ['train.device="cuda"', f'train.method="{method}"', f"data.max_length={seq}",
                                 f"train.batch_size={batch}", "train.gradient_checkpointing=false",
                                 'quant.compute_dtype="bf16"']
                          + (['train.optimizer="adamw_torch"'] if method == "lora" else []))
    est = estimate_mod.estimate(cfg, mc, liger=True)
    assert est.peak_bytes / 2**30 == pytest.approx(measured, rel=0.10)


def test_galore_config_is_checked():
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(None, ['train.method="full"', "galore.rank=0"])
    fields = {p.field for p in e.value.problems}
    assert fields == {"train.method", "galore.rank"}
    with pytest.raises(config_mod.ConfigError, match="ddp"):
        config_mod.load(None, ['train.method="galore"', "distributed.gpus=2", 'distributed.strategy="fsdp"'])


@pytest.mark.anyio
async def test_tui_switching_method_updates_the_estimate_and_trains_galore(tmp_path, monkeypatch):
    from textual.widgets import Select
    from tui_helpers import demo_cfg, make_app, until
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    cfg = demo_cfg(tmp_path, "train.max_steps=6", "galore.rank=16", "train.learning_rate=1e-2",
                   "train.logging_steps=1", "train.eval_steps=0", "train.save_steps=0")
    app = make_app(cfg)
    derived = lambda: str(app.screen.query_one("#derived").render())  # noqa: E731
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f3")
        await until(pilot, lambda: getattr(app.screen, "form_ready", False), what="form")
        await until(pilot, lambda: "qlora: trainable params" in derived(), what="qlora estimate")
        before = derived()
        method = app.screen.query_one("#in-train-method", Select)
        method.focus()
        await pilot.press("enter", "down", "down", "enter")     # qlora → lora → galore
        await until(pilot, lambda: app.config.train.method == "galore", what="method galore")
        await until(pilot, lambda: "galore: trainable params" in derived(), what="galore estimate")
        assert derived() != before
        await pilot.press("f4")                                   # Train screen, start
        await pilot.press("ctrl+r")
        await until(pilot, lambda: app.run_state is not None and app.run_state.ended, timeout=300,
                    what="end of run")
        st = app.run_state
        assert st.state == State.FINISHED, st.message
        assert (st.run_dir / "model" / "model.safetensors").exists()
        assert "model saved to" in st.message
        await pilot.press("ctrl+q")
        await pilot.pause()

