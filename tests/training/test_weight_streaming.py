"""Weight streaming (engine/training/streaming.py) on builtin:tiny, the CPU standing in for the GPU: the
engine is told it has less memory than the 4-bit weights, streams them layer by layer, and
trains exactly as without streaming (per-step losses), through stop, checkpoint and resume."""
import pytest

from engine.core import events as events_mod
from engine.training import runner
from engine.core import rundir
from reliability_helpers import configured, events

TINY_BUDGET = {"train.gpu_memory_gib": 0.0001}     # ~107 KB: below tiny's ~150 KB of 4-bit layers


def _steps(run_dir):
    return {e.step: e for e in events(run_dir) if e.type == "step"}


def _run(cfg, stop_at=None, **kw):
    run = runner.Run(cfg, **kw)
    if stop_at:
        def on(ev):
            if ev.type == "step" and ev.step == stop_at:
                run.request_stop("test stop")
        run.bus.subscribe(on)
    run.start()
    assert run.join(timeout=300)
    assert run.result.type == "run_finished", getattr(run.result, "reason", run.result)
    return run


def test_streamed_run_matches_unstreamed_losses_through_stop_and_resume(tiny_cfg, tmp_path):
    base = configured(tiny_cfg, {"train.max_steps": 4, "train.save_steps": 0, "train.eval_steps": 0,
                                 "train.logging_steps": 1, "train.gradient_checkpointing": "auto"})
    ref = _run(configured(base, {"output.dir": str(tmp_path / "ref")}))
    ref_steps = _steps(ref.run_dir)
    ref_plan = [e for e in events(ref.run_dir) if e.type == "run_started"][0].plan
    assert not any("weight streaming:" in p for p in ref_plan)

    # the same run, streamed, stopped after step 2 (checkpoint), then resumed to the end
    cfg = configured(base, {"output.dir": str(tmp_path / "streamed"), **TINY_BUDGET})
    first = _run(cfg, stop_at=2)
    d = first.run_dir
    assert first.result.stopped and rundir.checkpoints(d)
    started = [e for e in events(d) if e.type == "run_started"][0]
    assert any(p.startswith("weight streaming on") for p in started.plan), started.plan
    assert any(p.startswith("weight streaming:") for p in started.plan), started.plan
    resumed = _run(None, run_dir=d, resume=True)
    assert resumed.result.step == 4
    got = _steps(d)
    assert sorted(got) == sorted(ref_steps) == list(range(1, 5))
    for s, e in got.items():
        assert e.loss == pytest.approx(ref_steps[s].loss, rel=1e-5), s
        assert e.grad_norm == pytest.approx(ref_steps[s].grad_norm, rel=1e-4), s
    ev_ref = [e.eval_loss for e in events(ref.run_dir) if e.type == "eval"]
    ev_got = [e.eval_loss for e in events(d) if e.type == "eval"]
    assert ev_got and ev_got[-1] == pytest.approx(ev_ref[-1], rel=1e-5)


def test_streamer_keeps_only_its_window_and_fails_loudly_outside_it():
    """Direct: a 4-layer 4-bit model, ahead=1; evicted layers hold 0-element placeholders."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    from engine.training import streaming
    torch.manual_seed(0)
    mc = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(mc).save_pretrained(tmp)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)

        def model():
            m = LlamaForCausalLM.from_pretrained(tmp, quantization_config=q, dtype=torch.float32,
                                                 device_map={"": "cpu"})
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.enable_input_require_grads()
            torch.manual_seed(1)
            return get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian")).train()

        x = torch.randint(0, 64, (2, 16))
        plain = model()
        loss_a = plain(input_ids=x, labels=x).loss
        loss_a.backward()
        grads_a = {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad}
        streamed = model()
        st = streaming.WeightStreamer(streaming.decoder_layers(streamed), "cpu", ahead=1)
        resident_seen = []
        for i in range(4):       # after the streamer's own hook
            streaming.decoder_layers(streamed)[i].self_attn.q_proj.base_layer.register_forward_pre_hook(
                lambda *_: resident_seen.append(sorted(st.resident)))
        import gc
        import weakref
        copies, load = [], st._load

        def tracked(i):                # every copy the streamer makes, watched without keeping it
            load(i)
            copies.extend((i, weakref.ref(t.untyped_storage())) for t in st.pending[i][0])
        st._load = tracked
        loss_b = streamed(input_ids=x, labels=x).loss
        gc.collect()
        # between forward and backward only the window is alive: the autograd graph keeps no
        # evicted layer's weights (bitsandbytes' own matmul node would keep all four)
        assert {i for i, r in copies if r() is not None} == {3}
        loss_b.backward()
        assert loss_b.item() == loss_a.item()
        for n, p in streamed.named_parameters():
            if p.requires_grad:
                assert torch.equal(p.grad, grads_a[n]), n
        # forward 0..3 then recompute 3..0: never more than the current layer + 1 ahead
        assert resident_seen == [[0], [1], [2], [3], [3], [2], [1], [0]]
        assert st.loads == 8 - 1        # layer 3's recompute reuses its forward copy
        evicted = streaming.decoder_layers(streamed)[3].mlp.down_proj.base_layer.weight
        assert evicted.numel() == 0 and evicted.quant_state.absmax.numel() == 0   # nothing stale
        streamed.eval()                 # gradients without checkpointing: refused, not a crash
        with pytest.raises(RuntimeError, match="gradient checkpointing"):
            streamed(input_ids=x, labels=x)
        st.remove()
        assert evicted.numel() > 0
