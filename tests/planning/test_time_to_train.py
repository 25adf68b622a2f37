"""Time to train: the estimate's first verdict is the plan's; time to train before launch
(engine/planning/timing.py: the GPU catalog, the compute model, `estimate --gpu NAME`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.core import config
from engine.planning import estimate as estimate_mod
from engine.planning import timing
from engine.planning.estimate import GIB
from tui_helpers import anyio_backend, isolated_settings  # noqa: F401 (fixtures)

LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                max_position_embeddings=131072)
DEMO = str(Path(__file__).resolve().parents[2] / "examples" / "demo.toml")


def _model_dir(tmp_path, mc=LLAMA_8B):
    d = tmp_path / "llama8b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(mc))
    return d


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from engine import cli
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---- the plan's verdict first

def test_plan_verdict_comes_before_the_config_as_written(tmp_path, capsys):
    """The issue's case: the 8B shape at 32K tokens in 24 GiB. The config as written needs more than
    24 GiB, the plan fits: the report opens with the plan's verdict, and the as-written need comes
    after the planner's lines, said as what the plan avoided."""
    d = _model_dir(tmp_path)
    rc, out, _ = _cli(capsys, "estimate", "--gpu-mem", "24", "--set", f'model.name="{d}"',
                      "--set", "data.max_length=32768", "--set", 'train.device="cuda"')
    assert rc == 0
    lines = out.splitlines()
    first = next(ln for ln in lines if ln.startswith("Fits:"))
    assert first.startswith("Fits: yes (the plan: ") and "of 24.00 GiB" in first
    planner = next(i for i, ln in enumerate(lines) if ln.startswith("Planner:"))
    written = next(i for i, ln in enumerate(lines) if ln.startswith("The config as written"))
    assert lines.index(first) < planner < written
    assert "would not fit" in lines[written] and "the plan above is what runs" in lines[written]
    assert "Fits: NO" not in out
    # the figures are the estimate's own: the plan's device bytes first, the config's second
    cfg = config.load(None, [f'model.name="{d}"', "data.max_length=32768", 'train.device="cuda"'])
    mc = estimate_mod.model_config_for(cfg)
    pl = estimate_mod.plan(cfg, mc, 24 * GIB)
    as_written = estimate_mod.estimate(cfg, mc, gpu_mem_bytes=24 * GIB)
    assert f"{pl.estimate.device_bytes / GIB:.2f} GiB of 24.00 GiB" in first
    assert f"{as_written.device_bytes / GIB:.2f} GiB needed" in lines[written]
    assert as_written.fits is False and pl.estimate.fits is True


def test_plan_that_does_not_fit_says_so_first(tmp_path, capsys):
    d = _model_dir(tmp_path)
    rc, out, _ = _cli(capsys, "estimate", "--gpu-mem", "4", "--set", f'model.name="{d}"',
                      "--set", 'train.device="cuda"')
    assert rc == 0
    assert out.lstrip().splitlines()[0].startswith("Fits: NO (the plan: ")


# ---- the catalog

@pytest.mark.parametrize("name,key", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-40GB", "a100-40"),
                                      ("NVIDIA A100 80GB PCIe", "a100-80"), ("NVIDIA GeForce RTX 4090", "rtx4090"),
                                      ("h200", "h200"), ("RTX 5090", "rtx5090"), ("l40s", "l40s"),
                                      ("NVIDIA GeForce RTX 3090", "rtx3090")])
def test_gpu_names_resolve_to_catalog_cards(name, key):
    assert timing.gpu_named(name).key == key


def test_unknown_gpu_is_one_line_listing_the_catalog(capsys):
    rc, _, err = _cli(capsys, "estimate", DEMO, "--gpu", "voodoo5")
    assert rc == 2
    assert err.count("\n") == 1 and "voodoo5" in err and all(k in err for k in timing.GPUS)


# ---- the compute model

def _work(steps=100, rows=8, per_row=2048.0):
    return timing.Workload(steps, rows, per_row, per_row)


def test_calibration_run_and_the_budget_rows_are_reproduced():
    """The model's MFU comes from the measured whole-H200 run (reproduced exactly); the measured
    budget rows of the same call (bench/RESULTS.md: micro-batch, share of layers recomputed,
    offloaded, tokens/s) are predicted within the ±15% the H200 range claims."""
    s = estimate_mod.shape_of(timing.CALIBRATION[2])
    lora = timing._adapter_params(s, 32, s.module_dims())
    h200 = timing.GPUS["h200"]
    rows = [(8, 0.0, False, 18974), (4, 1.0, True, 12689), (8, 31 / 32, True, 13640), (8, 29 / 32, False, 14023)]
    for mb, share, off, measured in rows:
        tps = timing.tokens_per_s(s, h200, row_tokens=2048, span=2048, micro_batch=mb, recompute=share,
                                  offload=off, lora_params=lora)
        assert abs(tps / measured - 1) <= (0.005 if share == 0 else timing.RANGE_HOPPER), (mb, share, tps)


def test_prediction_follows_tokens_recompute_card_and_fp8(tmp_path):
    d = _model_dir(tmp_path)
    cfg = config.load(None, [f'model.name="{d}"', "data.max_length=2048", 'train.device="cuda"',
                             "train.batch_size=8"])
    mc = estimate_mod.model_config_for(cfg)
    whole = estimate_mod.plan(cfg, mc, timing.GPUS["h200"].memory_bytes)
    h200 = timing.predict(cfg, mc, whole, _work(), timing.GPUS["h200"], modelled=True)
    assert h200.seconds == pytest.approx(h200.tokens / h200.tokens_per_s)
    assert h200.tokens == 100 * 8 * 2048
    assert h200.low < h200.seconds < h200.high
    assert h200.high / h200.seconds == pytest.approx(1 + timing.RANGE_HOPPER)
    twice = timing.predict(cfg, mc, whole, _work(steps=200), timing.GPUS["h200"], modelled=True)
    assert twice.seconds == pytest.approx(2 * h200.seconds)
    # a budget that forces checkpointing recomputes layers: more FLOPs a token, slower
    tight = estimate_mod.plan(cfg, mc, 12 * GIB)
    assert tight.estimate.checkpoint_layers > whole.estimate.checkpoint_layers
    slow = timing.predict(cfg, mc, tight, _work(), timing.GPUS["h200"], modelled=True)
    assert slow.seconds > h200.seconds
    # a card without FP8 pays the measured FP8 gain on top of its lower bf16 peak
    a100 = timing.predict(cfg, mc, whole, _work(), timing.GPUS["a100-80"], modelled=True)
    assert not a100.fp8 and any("no FP8" in n for n in a100.notes)
    peak_ratio = timing.GPUS["h200"].bf16_tflops / timing.GPUS["a100-80"].bf16_tflops
    assert a100.seconds / h200.seconds == pytest.approx(peak_ratio * timing.FP8_GAIN)
    assert a100.high / a100.seconds == pytest.approx(1 + timing.RANGE_OTHER)


def test_long_rows_cost_more_per_token_through_attention():
    s = estimate_mod.shape_of(LLAMA_8B)
    short = timing.flops_per_token(s, 2048, 1.0)
    long = timing.flops_per_token(s, 32768, 1.0)
    assert long - short == pytest.approx(8 * s.q_dim * (32768 - 2048) * s.layers)


# ---- the CLI

def test_estimate_gpu_predicts_time_from_the_data(capsys):
    rc, out, _ = _cli(capsys, "estimate", DEMO, "--gpu", "h100", "--json")
    assert rc == 0
    j = json.loads(out)
    assert j["gpu_mem_bytes"] == timing.GPUS["h100"].memory_bytes
    t = j["time"]
    assert t["modelled"] is True and t["gpu"] == "h100" and t["seconds"] > 0
    assert t["low"] < t["seconds"] < t["high"]
    # tokens = the inspector's steps x effective batch x tokens per row of the planned config
    from engine.dataset import inspect as inspect_mod
    cfg = config.load(DEMO, ['train.device="cuda"'])
    pl = estimate_mod.plan(cfg, estimate_mod.model_config_for(cfg), timing.GPUS["h100"].memory_bytes)
    planned = estimate_mod.apply_plan(cfg, pl)
    rep = inspect_mod.inspect(planned)
    work = timing.workload_from_report(planned, rep)
    assert rep.total_steps == cfg.train.max_steps == work.steps
    assert t["tokens"] == int(work.tokens)
    rc, text, _ = _cli(capsys, "estimate", DEMO, "--gpu", "h100")
    lines = text.splitlines()
    assert lines[0].startswith("Fits: yes (the plan: ") and lines[1].startswith("Time to train: ~")
    assert "modelled for H100 SXM" in lines[1]
    assert f"{work.steps:,} steps x" in text


def test_estimate_on_cpu_gives_a_rough_figure_labelled_so(capsys):
    rc, out, _ = _cli(capsys, "estimate", DEMO, "--set", 'train.device="cpu"', "--json")
    assert rc == 0
    t = json.loads(out)["time"]
    assert t["gpu"] == timing.CPU_KEY and t["modelled"] is False and t["seconds"] > 0
    assert t["high"] / t["seconds"] == pytest.approx(timing.CPU_SPREAD)
    assert t["seconds"] / t["low"] == pytest.approx(timing.CPU_SPREAD)
    assert t["tokens_per_s"] == pytest.approx(t["tokens"] / t["seconds"], rel=1e-3)
    rc, text, _ = _cli(capsys, "estimate", DEMO, "--set", 'train.device="cpu"')
    assert text.startswith("Time to train: ~") and "a rough CPU figure" in text.splitlines()[0]


def test_cuda_config_without_a_gpu_here_says_to_name_one(tmp_path, capsys):
    d = _model_dir(tmp_path)
    rc, out, _ = _cli(capsys, "estimate", "--gpu-mem", "80", "--set", f'model.name="{d}"',
                      "--set", 'train.device="cuda"')
    assert rc == 0
    assert "Time to train: no prediction: no NVIDIA GPU found here; pass --gpu NAME" in out


def test_time_unknown_when_the_data_cannot_be_counted(tmp_path, capsys):
    d = _model_dir(tmp_path)          # a config.json alone: no tokenizer to count the data with
    rc, out, _ = _cli(capsys, "estimate", "--gpu", "rtx4090", "--set", f'model.name="{d}"')
    assert rc == 0
    assert out.splitlines()[1].startswith("Time to train: unknown (the data could not be counted")


# ---- the run: the prediction at run start, the ETA from it, both kept at the end

def test_run_carries_the_prediction_and_the_measured_time(tiny_cfg):
    """A real CPU run of builtin:tiny: run_started carries the time-to-train prediction (the rough
    CPU figure) before step 1, the Train screen's ETA starts from it, and run_finished keeps the
    prediction next to the measured training time; the summary and the Train screen say both."""
    from engine.core import summary as summary_mod
    from reliability_helpers import configured, finished_run
    from tui.runstate import RunState
    from tui.widgets.run_view import Metrics, StepProgress
    cfg = configured(tiny_cfg, {"train.max_steps": 4, "train.eval_steps": 0, "train.save_steps": 0,
                                "train.device": "cpu"})
    evs, started = finished_run(cfg)
    assert started.predicted_seconds is not None and started.predicted_seconds > 0
    assert "a rough CPU figure" in started.prediction and started.prediction.startswith("Time to train: ~")
    end = evs[-1]
    assert end.type == "run_finished"
    assert end.predicted_seconds == started.predicted_seconds
    assert end.train_seconds is not None and end.train_seconds > 0
    # the ETA before the first step is the prediction
    st = RunState(run_dir=Path(started.run_dir))
    st.apply(started)
    assert st.eta_seconds == started.predicted_seconds
    assert StepProgress.view_of(st)[2].endswith("(predicted)")
    # after the whole log: both kept, compared
    st = RunState(run_dir=Path(started.run_dir))
    for ev in evs:
        st.apply(ev)
    assert st.predicted_seconds == started.predicted_seconds and st.train_seconds == end.train_seconds
    assert st.time_text == summary_mod.time_text(end.train_seconds, started.predicted_seconds)
    assert st.time_text.startswith("trained in ") and "predicted" in st.time_text
    rows = dict(Metrics.view_of(Metrics(), st)[0])
    assert "predicted" in rows["time"]


def test_prediction_scales_with_the_steps_left(tiny_cfg):
    """A resume predicts only the steps left: the run's predictor is linear in steps."""
    from engine.planning import timing as timing_mod
    cfg = tiny_cfg.copy()
    cfg.train.device = "cpu"
    cfg.data.packing = False
    pred = timing_mod.run_predictor(cfg, "cpu", 40.0)
    full, line = pred(12)
    half, _ = pred(6)
    assert half == pytest.approx(full / 2) and "rough CPU figure" in line
    assert pred(0)[0] == 0


# ---- the Config screen

@pytest.mark.anyio
async def test_config_screen_shows_the_time_to_train(tmp_path):
    from tui_helpers import demo_cfg, make_app, plain, until
    app = make_app(demo_cfg(tmp_path))
    async with app.run_test(size=(120, 50)) as pilot:
        await pilot.press("f3")
        await until(pilot, lambda: getattr(app.screen, "form_ready", False), what="form")
        await until(pilot, lambda: "Time to train: ~" in plain(app.screen.query_one("#derived")),
                    what="the time line", timeout=60)
        text = plain(app.screen.query_one("#derived"))
        assert "a rough CPU figure" in text          # no GPU on this machine: labelled so


# ---- long context: the estimate's explicit terms (no "add 30% above 2,048")

SEQ_TERMS = ("activations", "backward_workspace")
FIXED_TERMS = ("weights_quantized", "weights_unquantized", "lora_params", "lora_grads", "optimizer_state")


def _long(seq, *extra):
    cfg = config.load(None, [f"data.max_length={seq}", 'train.device="cuda"', "train.batch_size=1",
                             'model.attn_implementation="sdpa"', *extra])
    return estimate_mod.estimate(cfg, LLAMA_8B, gradient_checkpointing=True)


@pytest.mark.parametrize("seq", [4096, 8192, 16384, 32768, 65536])
def test_long_context_terms_follow_the_breakdown(seq):
    """From 2,048 tokens to ``seq``: the weights, adapters and optimizer do not move; activations
    (per token x seq, one checkpointed input a layer + one recomputed layer) and the backward
    workspace grow by exactly seq/2048; the LM head grows only by its per-token part (its logits
    are chunked in 4,096 x 32,768 tiles); the old rule's 30% is nowhere."""
    a, b = _long(2048), _long(seq)
    ratio = seq / 2048
    for k in FIXED_TERMS:
        assert b.breakdown[k] == a.breakdown[k], k
    for k in SEQ_TERMS:
        assert b.breakdown[k] == pytest.approx(a.breakdown[k] * ratio, rel=1e-6), k
    s = estimate_mod.shape_of(LLAMA_8B)
    tile = lambda n: min(n, estimate_mod.LOGIT_TOKEN_TILE) * estimate_mod.LOGIT_VOCAB_TILE * 2  # noqa: E731
    assert b.breakdown["logits"] - a.breakdown["logits"] == tile(seq) - tile(2048) + (seq - 2048) * 8 * s.hidden
    assert b.peak_bytes > a.peak_bytes


def test_eager_attention_adds_the_seq_squared_scores():
    """Eager attention keeps heads x seq probabilities a token in the recomputed layer: the one
    term that grows with seq x seq; sdpa has none."""
    s = estimate_mod.shape_of(LLAMA_8B)
    for seq in (2048, 8192):
        eager = _long(seq, 'model.attn_implementation="eager"')
        sdpa = _long(seq)
        extra = eager.breakdown["activations"] - sdpa.breakdown["activations"]
        assert extra == seq * s.heads * seq * (4 + 2)          # one recomputed layer's scores
        assert any(n.startswith("eager attention:") for n in eager.notes)


def test_max_length_help_has_no_thirty_percent_rule():
    f = {f.name: f for f in __import__("dataclasses").fields(config.DataConfig)}["max_length"]
    assert "30%" not in f.metadata["help"] and "model.rope_scaling" in f.metadata["help"]


def test_hostile_times_in_a_log_are_dropped():
    from engine.core import events as ev
    from engine.core.summary import fold
    s = fold([ev.RunStarted(predicted_seconds="nan", prediction=["x"]),
              ev.RunFinished(step=1, train_seconds=-5, predicted_seconds=float("inf"))])
    assert s.predicted_seconds is None and s.train_seconds is None and s.prediction == ""
    assert s.time_text == ""
    s = fold([ev.RunStarted(predicted_seconds=90.0), ev.RunFinished(step=1, train_seconds=120.0)])
    assert s.time_text == "trained in 02:00 (predicted 01:30, +33%)"
