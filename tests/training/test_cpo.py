"""train.method = "cpo" (engine/methods/cpo.py): Contrastive Preference Optimization, a preference
method added as one file and one registry line. The config takes it, the planner counts it as a
reference-free preference method, the data check refuses rows it cannot train, and a real 4-bit
run on builtin:tiny (CPU) trains it through TRL's CPOTrainer and reports its metrics."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import methods
from engine.core import config
from engine.core import events as events_mod
from engine.core import summary
from engine.dataset import data as data_mod
from engine.dataset import rows as rows_mod

from reliability_helpers import configured, events

WORDS = "apple river stone cloud green tiger piano lemon".split()


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _pairs(n: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        out.append({"prompt": [{"role": "user", "content": f"say {a} {b}"}],
                    "chosen": [{"role": "assistant", "content": f"{a} {b} !"}],
                    "rejected": [{"role": "assistant", "content": f"{a} {b} ."}]})
    return out


def test_cpo_is_a_reference_free_preference_method_in_config_planner_and_data(tmp_path):
    m = methods.get("cpo")
    assert m.family == "preference" and not m.reference and m.artifact == "adapter"
    assert config.load(None, ['train.method="cpo"']).train.method == "cpo"
    from engine.planning import estimate as E
    mc = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)

    def est(method, batch):
        return E.estimate(config.load(None, [f'train.method="{method}"', "data.max_length=1024",
                                             f"train.batch_size={batch}", 'train.device="cuda"']), mc)
    cpo1, sft2, dpo1 = est("cpo", 1), est("qlora", 2), est("dpo", 1)
    assert cpo1.breakdown["activations"] == sft2.breakdown["activations"] and cpo1.batch_size == 1
    assert cpo1.peak_bytes == dpo1.peak_bytes and not any("reference pass" in n for n in cpo1.notes)
    kto = _write(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": True}] * 3)
    with pytest.raises(data_mod.DataError, match='set train.method = "kto"'):
        rows_mod.load_for_training(config.load(None, ['train.method="cpo"', f'data.train="{kto}"']))


def test_cpo_trains_two_steps_and_reports_its_metrics(tmp_path):
    from engine.training import runner
    train = _write(tmp_path / "pairs.jsonl", _pairs(16))
    cfg = configured(config.Config(), {
        "model.name": "builtin:tiny", "data.train": str(train), "data.max_length": 64, "data.eval_fraction": 0.0,
        "train.method": "cpo", "train.max_steps": 2, "train.batch_size": 4, "train.grad_accum": 1,
        "train.learning_rate": 5e-3, "train.logging_steps": 1, "train.eval_steps": 0, "train.save_steps": 0,
        "train.gradient_checkpointing": False, "lora.r": 8, "lora.alpha": 16, "output.dir": str(tmp_path / "runs")})
    run = runner.Run(cfg)
    run.start()
    assert run.join(timeout=600)
    assert run.result.type == "run_finished", getattr(run.result, "reason", run.result)
    d = run.run_dir
    started = next(e for e in events(d) if isinstance(e, events_mod.RunStarted))
    assert any("CPO (β 0.1" in line and "no reference model" in line for line in started.plan), started.plan
    prefs = [e for e in summary.standing(events(d)) if isinstance(e, events_mod.Preference) and e.split == "train"]
    assert [e.step for e in prefs] == [1, 2] and all(e.method == "cpo" and e.accuracy is not None for e in prefs)
    steps = [e for e in events(d) if isinstance(e, events_mod.Step)]
    assert steps[-1].tokens_seen > 0                        # counted from both sides of each pair
    assert (d / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((d / "adapter" / "adapter_config.json").read_text())["r"] == 8
