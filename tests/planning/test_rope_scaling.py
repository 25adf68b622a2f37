"""model.rope_scaling: the config's checks, the checks against config.json, the scaling
applied when the model loads, and a real run of builtin:tiny past its pretrained 2,048 positions."""
from __future__ import annotations

import json

import pytest

from engine.core import config
from engine.core import events as events_mod
from engine.models import rope

TINY_MPE = 2048          # builtin:tiny's max_position_embeddings (engine/models/builtin.py)


def _problems(value) -> list[str]:
    with pytest.raises(config.ConfigError) as ei:
        config.load(None, [f"model.rope_scaling={value}"])
    return [str(p) for p in ei.value.problems]


def test_config_checks_each_bad_field_on_its_own_line():
    probs = _problems('{type = "cubic", factor = 0.5, beta = 3}')
    assert len(probs) == 3
    assert any(p.startswith("model.rope_scaling.type = 'cubic': allowed: linear, dynamic, yarn, llama3") for p in probs)
    assert any(p.startswith("model.rope_scaling.factor = 0.5: out of range") for p in probs)
    assert any(p.startswith("model.rope_scaling.beta = 3: unknown key") for p in probs)
    assert _problems('{factor = 2.0}') == ["model.rope_scaling.type = None: missing; allowed: linear, dynamic, yarn, llama3"]
    assert any("only for type = llama3" in p for p in _problems('{type = "linear", factor = 2.0, low_freq_factor = 1.0}'))
    assert any("must be a table" in p for p in _problems('"yarn"'))
    ok = config.load(None, ['model.rope_scaling={type = "yarn", factor = 4.0, original_max_position_embeddings = 2048}'])
    assert ok.model.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    assert config.load(None, []).model.rope_scaling == {}


def test_checked_against_the_models_config():
    mc = {"max_position_embeddings": 2048, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    assert rope.check({"type": "linear", "factor": 2.0}, mc, 4096) == []
    short = rope.check({"type": "linear", "factor": 1.5}, mc, 4096)
    assert len(short) == 1 and short[0].startswith("model.rope_scaling.factor = 1.5: reaches 3072 positions")
    assert "at least 2" in short[0]
    too_long = rope.check({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096}, mc, 2048)
    assert len(too_long) == 1 and "original_max_position_embeddings = 4096: more than" in too_long[0]
    llama31 = {"max_position_embeddings": 131072,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}}
    own = rope.check({"type": "linear", "factor": 2.0}, llama31, 4096, "meta-llama/Llama-3.1-8B")
    assert len(own) == 1 and "already scales its RoPE (llama3" in own[0]
    assert "no max_position_embeddings" in rope.check({"type": "linear", "factor": 2.0}, {"hidden_size": 8}, 128)[0]
    assert all("\n" not in p for p in short + too_long + own)


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_each_type_builds_a_model_that_runs_past_the_pretrained_length(kind):
    """The transformers config the loader builds: the scaling in rope_parameters (rope_theta kept),
    and the model's rotary embedding computes positions past 2,048 with it."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from engine.models import builtin
    hf = AutoConfig.from_pretrained(builtin.tiny_model_dir())
    rope.apply(hf, {"type": kind, "factor": 2.0})
    assert hf.rope_parameters["rope_type"] == kind and hf.rope_parameters["factor"] == 2.0
    assert hf.rope_parameters["rope_theta"] == 10000.0
    assert hf.max_position_embeddings == (TINY_MPE if kind == "dynamic" else 2 * TINY_MPE)
    model = LlamaForCausalLM(hf)
    plain = LlamaForCausalLM(AutoConfig.from_pretrained(builtin.tiny_model_dir()))
    pos = torch.arange(3000)[None]
    x = torch.zeros(1, 3000, hf.hidden_size)
    cos, _ = model.model.rotary_emb(x, pos)
    cos0, _ = plain.model.rotary_emb(x, pos)
    assert model.model.rotary_emb.rope_type == kind
    assert not torch.allclose(cos[0, -1], cos0[0, -1])          # positions past 2,048 are scaled


def _long_rows(path, n=4, words=1400):
    """Chat rows whose answers run past 2,048 tokens with builtin:tiny's tokenizer."""
    import random
    rnd = random.Random(0)
    vocab = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "quartz", "maple"]
    with open(path, "w") as f:
        for i in range(n):
            answer = " ".join(rnd.choice(vocab) + str(rnd.randint(0, 99)) for _ in range(words))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"tell me {i}"},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def _run(cfg):
    from engine.training import runner
    run = runner.Run(cfg)
    run.start()
    assert run.join(timeout=600)
    return run, events_mod.read_events(run.run_dir / "events.jsonl")


def test_tiny_trains_past_its_pretrained_length_with_rope_scaling_and_warns_without(tmp_path):
    data = _long_rows(tmp_path / "long.jsonl")
    base = [f'output.dir="{tmp_path / "runs"}"', f'data.train="{data}"', "data.max_length=2400",
            "data.eval_fraction=0", "data.packing=false", "train.batch_size=1", "train.grad_accum=1",
            "train.max_steps=2", "train.eval_steps=0", "train.save_steps=0", 'train.device="cpu"',
            "train.logging_steps=1"]
    cfg = config.load(None, base + ['model.rope_scaling={type = "linear", factor = 1.5}'])
    run, evs = _run(cfg)
    assert run.result.type == "run_finished", getattr(run.result, "reason", "")
    started = next(e for e in evs if isinstance(e, events_mod.RunStarted))
    assert any(line.startswith("RoPE scaling linear x1.5") and "positions up to 3072" in line for line in started.plan)
    model = run._recipe.prepared.trainer.model
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.max_position_embeddings == 3072
    steps = [e for e in evs if isinstance(e, events_mod.Step)]
    assert len(steps) == 2 and all(e.loss is not None for e in steps)
    assert steps[0].tokens_seen > TINY_MPE          # step 1 is one row: past 2,048 tokens
    assert not any(isinstance(e, events_mod.RunWarning) and "rope_scaling" in e.message for e in evs)
    # the same run without it: trains, with one warning that says to set model.rope_scaling
    run, evs = _run(config.load(None, base + ["train.max_steps=1"]))
    assert run.result.type == "run_finished"
    warns = [e.message for e in evs if isinstance(e, events_mod.RunWarning) and "rope_scaling" in e.message]
    assert len(warns) == 1 and "longer than builtin:tiny's pretrained length (2048 positions)" in warns[0]
    assert "set model.rope_scaling = {type = \"yarn\"" in warns[0]


def test_preflight_refuses_a_factor_too_small_for_max_length(tmp_path):
    from engine.training import model as model_mod
    from engine.models.source import ModelError
    cfg = config.load(None, ["data.max_length=4096", 'model.rope_scaling={type = "yarn", factor = 1.5}'])
    with pytest.raises(ModelError) as ei:
        model_mod.check_model_skeleton(cfg)
    msg = str(ei.value)
    assert msg.startswith("model.rope_scaling.factor = 1.5: reaches 3072 positions") and "\n" not in msg


def test_estimate_notes_the_scaled_length_or_says_to_set_it():
    from engine.planning import estimate as estimate_mod
    cfg = config.load(None, ["data.max_length=4096", 'model.rope_scaling={type = "yarn", factor = 2.0}'])
    mc = estimate_mod.model_config_for(cfg)
    notes = estimate_mod.estimate(cfg, mc).notes
    assert any(n.startswith("RoPE scaling yarn x2") and "positions up to 4096, pretrained for 2048" in n for n in notes)
    plain = estimate_mod.estimate(config.load(None, ["data.max_length=4096"]), mc).notes
    assert any("past the model's pretrained length (2048 positions)" in n and "model.rope_scaling" in n for n in plain)
    short = estimate_mod.estimate(config.load(None, ["data.max_length=1024"]), mc).notes
    assert not any("rope" in n.lower() for n in short)
