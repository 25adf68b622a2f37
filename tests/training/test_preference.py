"""Preference tuning (train.method = dpo, orpo, kto, simpo) and preference data.

The data half needs no model: every preference format is detected and normalised to TRL's
explicit form, and a preference file under an SFT method is refused in one line (never trained
as SFT). The training half runs real 4-bit runs on builtin:tiny (CPU) over a synthetic set whose
chosen answers follow a rule the rejected ones break (repeat the two words and end with "!"; the
rejected answer ends with "."): the untrained base prefers the rejected answers (17 of 20 held-out
pairs), so what the held-out pairs show after training was learned. The held-out log-probabilities are computed here,
independently of TRL's own metrics, from the saved adapter with the adapter on and off.
"""
from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest

from engine.core import config
from engine.core import events as events_mod
from engine.core import rundir
from engine.core import summary
from engine.dataset import data as data_mod
from engine.dataset.rows import load_for_training
from engine.dataset import preference as pref

from reliability_helpers import (cli, configured, env_with, events, logged_step_numbers, start_headless,
                                 step_numbers, terminal, wait_run_dir, wait_step, write_cfg)

WORDS = "apple river stone cloud green tiger piano lemon candle forest ocean silver".split()


def _pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        out.append({"prompt": [{"role": "user", "content": f"say {a} {b}"}],
                    "chosen": [{"role": "assistant", "content": f"{a} {b} !"}],
                    "rejected": [{"role": "assistant", "content": f"{a} {b} ."}]})
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _load(tmp_path, rows, name="d.jsonl"):
    return data_mod.load(str(_write(tmp_path / name, rows)))


# ---------------------------------------------------------------- data: detected, normalised

def test_every_preference_format_is_detected_and_normalised(tmp_path):
    u = {"role": "user", "content": "Hi?"}
    good, bad = {"role": "assistant", "content": "Hello."}, {"role": "assistant", "content": "Go away."}
    cases = {
        "explicit conversational": ({"prompt": [u], "chosen": [good], "rejected": [bad]}, "preference",
                                    {"prompt": [u], "chosen": [good], "rejected": [bad]}),
        "implicit conversational": ({"chosen": [u, good], "rejected": [u, bad]}, "preference",
                                    {"prompt": [u], "chosen": [good], "rejected": [bad]}),
        "explicit plain": ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, "preference",
                           {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}),
        "implicit plain": ({"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: red"}, "preference",
                           {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " red"}),
        "LLaMA-Factory sharegpt": ({"conversations": [{"from": "human", "value": "Hi?"}],
                                    "chosen": {"from": "gpt", "value": "Hello."},
                                    "rejected": {"from": "gpt", "value": "Go away."}}, "preference",
                                   {"prompt": [u], "chosen": [good], "rejected": [bad]}),
        "KTO TRL": ({"prompt": [u], "completion": [bad], "label": False}, "kto",
                    {"prompt": [u], "completion": [bad], "label": False}),
        "KTO LLaMA-Factory": ({"messages": [u, good], "label": True}, "kto",
                              {"prompt": [u], "completion": [good], "label": True}),
        "KTO plain": ({"prompt": "The sky is", "completion": " green.", "label": False}, "kto",
                      {"prompt": "The sky is", "completion": " green.", "label": False}),
    }
    for name, (row, fmt, want) in cases.items():
        ds = _load(tmp_path, [row] * 3)
        assert ds.format == fmt, (name, ds.format, ds.reason)
        assert not ds.problems, (name, ds.problems)
        assert [r.data for r in ds.rows] == [want] * 3, name


def test_preference_rows_as_other_tools_write_them(tmp_path):
    """Pairs and labels as other tools write them: UltraFeedback-binarized (both sides whole
    conversations beside a copy of the prompt and a 'messages' column: TRL's implicit prompt),
    OpenAI's preference fine-tuning rows, KTO labels as 1/0 or text, OpenAI's 'developer' role."""
    u = {"role": "user", "content": "Hi?"}
    good, bad = {"role": "assistant", "content": "Hello."}, {"role": "assistant", "content": "Go away."}
    sys_ = {"role": "system", "content": "Be kind."}
    cases = {
        "UltraFeedback binarized": ({"prompt": "Hi?", "prompt_id": "x1", "chosen": [u, good], "rejected": [u, bad],
                                     "messages": [u, good], "score_chosen": 8.0, "score_rejected": 2.0},
                                    "preference", {"prompt": [u], "chosen": [good], "rejected": [bad]}),
        "whole conversations beside a conversation prompt": (
            {"prompt": [u], "chosen": [sys_, u, good], "rejected": [sys_, u, bad]}, "preference",
            {"prompt": [sys_, u], "chosen": [good], "rejected": [bad]}),
        "OpenAI preference": ({"input": {"messages": [{"role": "developer", "content": "Be kind."}, u],
                                         "tools": [], "parallel_tool_calls": True},
                               "preferred_output": [good], "non_preferred_output": [bad]}, "preference",
                              {"prompt": [sys_, u], "chosen": [good], "rejected": [bad]}),
        "Alpaca-style pairs": ({"instruction": "Hi?", "input": "Be brief.", "chosen": "Hello.", "rejected": "Go away."},
                               "preference", {"prompt": [{"role": "user", "content": "Hi?\n\nBe brief."}],
                                              "chosen": [good], "rejected": [bad]}),
        "pairs with their question as 'input' (distilabel's orca pairs)": (
            {"system": "Be kind.", "input": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "generations": ["a", "b"]},
            "preference", {"prompt": [sys_, u], "chosen": [good], "rejected": [bad]}),
        "KTO label 0": ({"prompt": "The sky is", "completion": " green.", "label": 0}, "kto",
                        {"prompt": "The sky is", "completion": " green.", "label": False}),
        "KTO label text": ({"messages": [u, good], "kto_tag": "true"}, "kto",
                           {"prompt": [u], "completion": [good], "label": True}),
    }
    for name, (row, fmt, want) in cases.items():
        ds = _load(tmp_path, [row] * 3)
        assert ds.format == fmt, (name, ds.format, ds.reason)
        assert not ds.problems, (name, ds.problems)
        assert [r.data for r in ds.rows] == [want] * 3, name
    tools = {"input": {"messages": [u], "tools": [{"type": "function", "function": {"name": "f"}}]},
             "preferred_output": [good], "non_preferred_output": [bad]}
    ds = _load(tmp_path, [tools])
    assert ds.format == "preference" and not ds.rows
    assert [p.kind for p in ds.problems] == ["unsupported_tools"] and "input.tools" in ds.problems[0].message


def test_bad_pairs_are_problems_by_line(tmp_path):
    u = [{"role": "user", "content": "Hi?"}]
    ok = {"prompt": u, "chosen": [{"role": "assistant", "content": "Hello."}],
          "rejected": [{"role": "assistant", "content": "No."}]}
    rows = [ok, dict(ok, rejected=ok["chosen"]), dict(ok, chosen=""), dict(ok, chosen=[{"role": "robot", "content": "x"}]),
            {"prompt": "x", "chosen": "a", "rejected": 3}]
    ds = _load(tmp_path, rows)
    assert ds.format == "preference" and len(ds.rows) == 1
    got = {p.line: p.message for p in ds.problems}
    assert "identical" in got[2] and "empty" in got[3] and "robot" in got[4] and "string" in got[5], got


def test_llamafactory_v1_pairs_with_content_parts(tmp_path):
    """LLaMA-Factory v1's ``chosen_messages`` / ``rejected_messages`` (two whole conversations, content
    as parts, per-turn loss_weight) are implicit-prompt pairs: the shared turns are the prompt."""
    def turn(role, text, w):
        return {"role": role, "content": [{"type": "text", "value": text}], "loss_weight": w}
    head = [turn("system", "Be brief.", 0.0), turn("user", "Hi?", 0.0)]
    rows = [{"chosen_messages": head + [turn("assistant", f"Hello {i}.", 1.0)],
             "rejected_messages": head + [turn("assistant", f"Go away {i}.", 1.0)]} for i in range(3)]
    rows.append({"chosen_messages": head + [{"role": "assistant", "content": [{"type": "image", "value": "x.png"}]}],
                 "rejected_messages": head + [turn("assistant", "No.", 1.0)]})
    ds = _load(tmp_path, rows)
    assert ds.format == "preference" and len(ds.rows) == 3
    assert ds.rows[1].data == {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
                               "chosen": [{"role": "assistant", "content": "Hello 1."}],
                               "rejected": [{"role": "assistant", "content": "Go away 1."}]}
    assert [(p.line, p.kind) for p in ds.problems] == [(4, "wrong_type")] and "'chosen'" in ds.problems[0].message


@pytest.mark.parametrize("row", [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},                           # TRL explicit
    {"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "gpt", "value": "Hello."},
     "rejected": {"from": "gpt", "value": "No."}},                                                 # LLaMA-Factory
    {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}], "label": False},
    {"chosen_messages": [{"role": "user", "content": [{"type": "text", "value": "Hi?"}]},          # LLaMA-Factory v1
                         {"role": "assistant", "content": [{"type": "text", "value": "Hello."}]}],
     "rejected_messages": [{"role": "user", "content": [{"type": "text", "value": "Hi?"}]},
                           {"role": "assistant", "content": [{"type": "text", "value": "No."}]}]},
    {"prompt": "The sky is", "completion": " green.", "label": 0},                                  # KTO, 1/0
    {"input": {"messages": [{"role": "user", "content": "Hi?"}]},                                  # OpenAI
     "preferred_output": [{"role": "assistant", "content": "Hello."}],
     "non_preferred_output": [{"role": "assistant", "content": "No."}]},
])
def test_preference_data_is_never_trained_as_sft(row, tmp_path, capsys):
    data = _write(tmp_path / "pairs.jsonl", [row] * 12)
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(f'[model]\nname = "builtin:tiny"\n[data]\ntrain = "{data}"\n[output]\ndir = "{tmp_path / "runs"}"\n')
    r = cli(capsys, "train", cfg_path, "--headless")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines == [lines[0]] and f"{data}: {pref.REFUSAL}" in lines[0], r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_methods_refuse_data_they_cannot_train(tmp_path):
    sft = _write(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                       {"role": "assistant", "content": "b"}]}] * 3)
    kto = _write(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": True}] * 3)
    pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3)
    for method, path, needle in (("dpo", sft, "needs preference data"), ("orpo", kto, 'set train.method = "kto"'),
                                 ("qlora", kto, pref.REFUSAL)):
        cfg = config.load(None, [f'train.method="{method}"', f'data.train="{path}"'])
        with pytest.raises(data_mod.DataError) as e:
            load_for_training(cfg)
        assert str(e.value).startswith(str(path)) and needle in str(e.value), str(e.value)
    cfg = config.load(None, ['train.method="kto"', f'data.train="{pairs}"'])   # KTO takes pairs, unpaired
    train, _ = load_for_training(cfg)
    rows = pref.for_trainer(cfg, [r.data for r in train.rows])
    assert [r["label"] for r in rows] == [True, False] * 3 and rows[1]["completion"] == "c"
    with pytest.raises(config.ConfigError, match="KTO needs a micro-batch of 2"):
        config.load(None, ['train.method="kto"', "train.batch_size=1"])
    with pytest.raises(config.ConfigError, match="model.adapter"):
        config.load(None, ['model.adapter="/somewhere"'])        # continuing an SFT run is a preference thing


# ---------------------------------------------------------------- training (real 4-bit runs)

@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return _write(d / "train.jsonl", _pairs(64, 1)), _write(d / "heldout.jsonl", _pairs(20, 2))


def _cfg(tmp_path, train: Path, method: str, **changes) -> config.Config:
    over = {"model.name": "builtin:tiny", "data.train": str(train), "data.max_length": 64,
            "data.eval_fraction": 0.0, "train.method": method, "train.max_steps": 12, "train.batch_size": 4,
            "train.grad_accum": 1, "train.learning_rate": 5e-3, "train.logging_steps": 2, "train.eval_steps": 0,
            "train.save_steps": 0, "train.gradient_checkpointing": False, "lora.r": 16, "lora.alpha": 32,
            "output.dir": str(tmp_path / "runs")}
    over.update(changes)
    return configured(config.Config(), over)


def _train(cfg):
    from engine.training import runner
    run = runner.Run(cfg)
    run.start()
    assert run.join(timeout=600)
    assert run.result.type == "run_finished", getattr(run.result, "reason", run.result)
    return run.run_dir


class Scorer:
    """Summed and mean completion log-probabilities of the run's saved adapter, on and off."""

    def __init__(self, run_dir: Path):
        from peft import PeftModel
        from engine.training import model as mm
        from engine.models.runtime import runtime
        from engine.models.tokenizer import load_tokenizer
        cfg = config.load(Path(run_dir) / rundir.CONFIG)
        rt = runtime(cfg)
        self.tok = load_tokenizer(cfg)[0]
        self.model = PeftModel.from_pretrained(mm.load_model(cfg, rt), str(Path(run_dir) / rundir.ADAPTER)).eval()

    def logp(self, prompt, answer, adapter: bool = True) -> tuple[float, float]:
        import contextlib
        import torch
        p = self.tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        f = self.tok.apply_chat_template(prompt + answer, tokenize=False)
        pi = self.tok(p, add_special_tokens=False)["input_ids"]
        fi = self.tok(f, add_special_tokens=False)["input_ids"]
        assert fi[:len(pi)] == pi
        ctx = contextlib.nullcontext() if adapter else self.model.disable_adapter()
        with torch.no_grad(), ctx:
            lp = self.model(torch.tensor([fi])).logits.float().log_softmax(-1)[0]
        tok = [lp[i - 1, fi[i]].item() for i in range(len(pi), len(fi))]
        return sum(tok), sum(tok) / len(tok)


def _pair_scores(run_dir: Path, pairs: list[dict]):
    s = Scorer(run_dir)
    out = []
    for r in pairs:
        (c, cm), (j, jm) = s.logp(r["prompt"], r["chosen"]), s.logp(r["prompt"], r["rejected"])
        (c0, c0m), (j0, j0m) = (s.logp(r["prompt"], r["chosen"], adapter=False),
                                s.logp(r["prompt"], r["rejected"], adapter=False))
        out.append(dict(c=c, j=j, cm=cm, jm=jm, c0=c0, j0=j0, c0m=c0m, j0m=j0m))
    return out


def _standing_prefs(run_dir: Path, split: str) -> list[events_mod.Preference]:
    return [e for e in summary.standing(events(run_dir)) if isinstance(e, events_mod.Preference) and e.split == split]


def test_dpo_learns_the_rule_on_held_out_pairs(pair_files, tmp_path):
    train, held = pair_files
    d = _train(_cfg(tmp_path, train, "dpo", **{"data.eval": str(held), "train.eval_steps": 12}))
    pairs = [json.loads(x) for x in held.read_text().splitlines()]
    sc = _pair_scores(d, pairs)
    # the untrained base prefers the rejected answers: the rule is not there before training
    assert sum(x["c0"] > x["j0"] for x in sc) / len(sc) < 0.5
    # DPO's implicit reward: log-ratio to the reference (the base, adapter off) of each side
    acc = sum((x["c"] - x["c0"]) > (x["j"] - x["j0"]) for x in sc) / len(sc)
    assert acc >= 0.9, acc
    rise = sum((x["c"] - x["j"]) - (x["c0"] - x["j0"]) for x in sc) / len(sc)
    assert rise > 0, rise          # the chosen log-prob rises relative to the rejected
    # the method's own metrics are typed events, train and eval, folded into the run's summary
    ev = _standing_prefs(d, "eval")
    assert ev and ev[-1].method == "dpo" and ev[-1].accuracy >= 0.9 and ev[-1].margin > 0
    tr = _standing_prefs(d, "train")
    assert [e.step for e in tr] == [e.step for e in summary.standing(events(d)) if isinstance(e, events_mod.Step)]
    s = summary.fold(events(d))
    assert s.method == "dpo" and s.preference["eval_accuracy"][-1][1] >= 0.9 and len(s.preference["margin"]) == len(tr)
    started = next(e for e in events(d) if isinstance(e, events_mod.RunStarted))
    assert any("adapter disabled" in line for line in started.plan), started.plan
    # a normal PEFT adapter over the 4-bit base: the merge path takes it as it takes an SFT run's
    cfg_used = config.load(d / rundir.CONFIG)
    assert cfg_used.train.method == "dpo" and json.loads((d / "adapter" / "adapter_config.json").read_text())["r"] == 16


def test_orpo_learns_the_rule_on_held_out_pairs(pair_files, tmp_path):
    train, held = pair_files
    d = _train(_cfg(tmp_path, train, "orpo", **{"data.eval": str(held), "train.eval_steps": 12}))
    sc = _pair_scores(d, [json.loads(x) for x in held.read_text().splitlines()])
    # ORPO has no reference: its reward is the policy's mean token log-prob of each side
    base = sum(x["c0m"] > x["j0m"] for x in sc) / len(sc)
    acc = sum(x["cm"] > x["jm"] for x in sc) / len(sc)
    assert base < 0.5 and acc >= 0.9, (base, acc)
    assert sum((x["c"] - x["j"]) - (x["c0"] - x["j0"]) for x in sc) > 0
    ev = _standing_prefs(d, "eval")
    assert ev and ev[-1].method == "orpo" and ev[-1].accuracy >= 0.9


def test_kto_moves_the_desirable_answers_up(tmp_path):
    rows = []                                   # LLaMA-Factory's KTO shape: a conversation and its label
    for r in _pairs(64, 3):
        good = r["prompt"] + r["chosen"]
        bad = r["prompt"] + r["rejected"]
        rows += [{"messages": good, "label": True}, {"messages": bad, "label": False}]
    train = _write(tmp_path / "kto.jsonl", rows)
    d = _train(_cfg(tmp_path, train, "kto", **{"train.max_steps": 10}))
    sc = _pair_scores(d, _pairs(20, 4))
    up = sum(x["c"] - x["c0"] for x in sc) / len(sc)
    down = sum(x["j"] - x["j0"] for x in sc) / len(sc)
    assert up > 0 and up > down, (up, down)      # desirable answers up, and more than undesirable ones
    tr = _standing_prefs(d, "train")
    assert tr and tr[-1].method == "kto" and tr[-1].kl is not None and tr[-1].rewards_chosen > tr[-1].rewards_rejected


def test_simpo_trains_and_reports_its_metrics(pair_files, tmp_path):
    train, _ = pair_files
    d = _train(_cfg(tmp_path, train, "simpo", **{"train.max_steps": 4}))
    tr = _standing_prefs(d, "train")
    assert tr and tr[-1].method == "simpo" and tr[-1].accuracy is not None
    steps = [e for e in events(d) if isinstance(e, events_mod.Step)]
    assert steps[-1].tokens_seen > 0 and steps[-1].tokens_per_second        # counted from both sides
    assert (d / "adapter" / "adapter_model.safetensors").is_file()


def test_dpo_kill9_then_resume_keeps_every_step_once(pair_files, tmp_path, capsys):
    train, _ = pair_files
    cfg = _cfg(tmp_path, train, "dpo", **{"train.max_steps": 10, "train.save_steps": 3, "train.logging_steps": 1})
    runs = tmp_path / "runs"
    proc = start_headless(write_cfg(cfg, tmp_path / "dpo.toml"), env=env_with(QLORA_TUI_FAULTS="slow=0.3"))
    d = wait_run_dir(runs)
    wait_step(d, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = step_numbers(d)
    assert terminal(d) is None and before == list(range(1, len(before) + 1))
    ck = rundir.checkpoints(d)
    assert ck, before
    at = rundir.checkpoint_step(ck[-1])
    r = cli(capsys, "train", "--resume", d, "--headless")
    assert r.returncode == 0, r.stderr[-3000:]
    assert step_numbers(d) == list(range(1, 11))
    assert logged_step_numbers(d) == before + list(range(at + 1, 11))
    prefs = [e.step for e in _standing_prefs(d, "train")]
    assert prefs == list(range(1, 11)), prefs           # the method's series too: each step once
    assert summary.fold(events(d)).preference["accuracy"][-1][0] == 10
    assert terminal(d).type == "run_finished"


def test_dpo_continues_an_sft_run_with_the_sft_model_as_reference(pair_files, tmp_path):
    train, _ = pair_files
    sft = _train(configured(config.Config(), {
        "model.name": "builtin:tiny", "data.train": "builtin:sample", "data.max_length": 64, "train.max_steps": 3,
        "train.batch_size": 4, "train.grad_accum": 1, "train.learning_rate": 5e-3, "train.eval_steps": 0,
        "train.save_steps": 0, "train.gradient_checkpointing": False, "lora.r": 8, "lora.alpha": 16,
        "data.eval_fraction": 0.0, "output.dir": str(tmp_path / "sft")}))
    d = _train(_cfg(tmp_path, train, "dpo", **{"model.adapter": str(sft), "train.max_steps": 2,
                                               "train.logging_steps": 1}))
    parent = json.loads((d / "parent.json").read_text())
    assert parent["run_dir"] == str(sft.resolve()) and parent["adapter"] == str((sft / "adapter").resolve())
    first = next(e for e in events(d) if isinstance(e, events_mod.Step))
    # the reference is the SFT model, not the base: at step 1 policy = reference, so DPO's loss is
    # exactly log 2 and both rewards are 0 (against the base they would not be: the SFT adapter moved it)
    assert first.loss == pytest.approx(0.693147, abs=1e-4)
    p1 = next(e for e in events(d) if isinstance(e, events_mod.Preference))
    assert abs(p1.rewards_chosen) < 1e-4 and abs(p1.rewards_rejected) < 1e-4
    started = next(e for e in events(d) if isinstance(e, events_mod.RunStarted))
    assert any("SFT adapter" in line for line in started.plan) and any("r 8" in line for line in started.plan)
    assert json.loads((d / "adapter" / "adapter_config.json").read_text())["r"] == 8
    assert not (d / "adapter" / "ref").exists()        # TRL's frozen reference copy is not saved as a result
    # merge takes a preference run as it takes an SFT run (the continued adapter: the "ref" copy
    # TRL keeps for the reference is not what is merged)
    from engine.outputs.merge import merge
    report = merge(d, tmp_path / "merged", dtype="fp32")
    assert report.max_abs_diff <= report.tolerance and report.adapter_effect > 0
    assert report.adapter == str(d / "adapter")


# ---------------------------------------------------------------- hints (pure Python, event streams)

def _hints(method: str, series: list[dict], **cfg_changes) -> dict[str, events_mod.Hint]:
    from engine.training.hints import HintEngine
    cfg = configured(config.Config(), {"train.method": method, "train.learning_rate": 5e-6, **cfg_changes})
    h = HintEngine(cfg)
    h.total_steps = 10 * len(series)
    out = {}
    for i, kw in enumerate(series, 1):
        for hint in h.observe(events_mod.Preference(step=10 * i, method=method, **kw)):
            assert hint.rule not in out, f"{hint.rule} fired twice in one episode"
            out[hint.rule] = hint
    return out


def _healthy(i: int) -> dict:
    return dict(loss=0.69 * 0.9 ** i, accuracy=min(1.0, 0.5 + 0.04 * i), margin=0.1 * i,
                rewards_chosen=0.02 * i, rewards_rejected=-0.05 * i)


def test_preference_hints_fire_on_each_failure_and_say_what_to_change():
    healthy = _hints("dpo", [_healthy(i) for i in range(30)])
    assert not healthy, healthy
    stuck = _hints("dpo", [dict(loss=0.6931, accuracy=0.5, margin=0.0, rewards_chosen=0.0, rewards_rejected=0.0)] * 30)
    assert {"pref_log2", "pref_accuracy_chance", "pref_margin_flat"} <= set(stuck), stuck
    assert stuck["pref_log2"].step == 50 and "train.learning_rate=2.5e-5" in stuck["pref_log2"].overrides
    assert "preference.beta=0.05" in stuck["pref_margin_flat"].overrides
    # likelihood displacement: the margin grows, but by pushing the chosen answers down as well
    down = _hints("dpo", [dict(loss=0.6 - 0.01 * i, accuracy=0.9, margin=0.04 * i, rewards_chosen=-0.02 * i,
                               rewards_rejected=-0.06 * i) for i in range(30)])
    assert set(down) == {"pref_displacement"}, down
    assert "preference.beta=0.2" in down["pref_displacement"].overrides and "orpo" in down["pref_displacement"].fix
    # an exploding KL: KTO's own KL, and DPO's |reward| / β
    kl = _hints("kto", [dict(loss=0.3, margin=0.2 * i, rewards_chosen=0.1 * i, rewards_rejected=-0.1 * i,
                             kl=2.0 ** (i / 3)) for i in range(30)])
    assert "pref_kl" in kl and "KL" in kl["pref_kl"].symptom and "preference.beta=0.2" in kl["pref_kl"].overrides
    run_away = _hints("dpo", [dict(loss=0.1, accuracy=1.0, margin=0.5 * i, rewards_chosen=0.1 * i,
                                   rewards_rejected=-0.4 * i) for i in range(30)])
    assert set(run_away) == {"pref_kl"} and "β" in run_away["pref_kl"].symptom
    # log 2 is DPO's sigmoid loss alone: ORPO starting elsewhere is no symptom
    assert "pref_log2" not in _hints("orpo", [dict(loss=0.6931, accuracy=1.0, margin=0.1 * i) for i in range(10)])


# ---------------------------------------------------------------- the estimate counts the method

def test_estimate_counts_two_sequences_per_pair_and_the_reference_pass():
    from engine.planning import estimate as E
    mc = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)

    def est(method, batch):
        cfg = config.load(None, [f'train.method="{method}"', "data.max_length=2048", f"train.batch_size={batch}",
                                 'train.device="cuda"', "train.gradient_checkpointing=true"])
        return E.estimate(cfg, mc)
    sft2, dpo1, orpo1 = est("qlora", 2), est("dpo", 1), est("orpo", 1)
    # one pair = chosen + rejected: the activations of two SFT rows; the batch still reads as 1 pair
    assert dpo1.breakdown["activations"] == sft2.breakdown["activations"] and dpo1.batch_size == 1
    # TRL's preference trainers keep the full logits and their gradient (2 x 4096 tokens x vocab x bf16)
    assert dpo1.breakdown["logits"] >= 2 * 4096 * 128256 * 2 > sft2.breakdown["logits"]
    assert dpo1.peak_bytes > sft2.peak_bytes
    # the reference pass is named (time, no peak) for DPO; ORPO has none
    assert any("reference pass" in n for n in dpo1.notes) and not any("reference pass" in n for n in orpo1.notes)
    assert orpo1.peak_bytes == dpo1.peak_bytes


# ---------------------------------------------------------------- import-axolotl maps rl:

@pytest.mark.parametrize("rl, fields, want", [
    ("dpo", "rl_beta: 0.05\ndpo_label_smoothing: 0.1\n", {"train.method": "dpo", "preference.beta": 0.05,
                                                          "preference.label_smoothing": 0.1}),
    ("ipo", "rl_beta: 0.2\n", {"train.method": "dpo", "preference.loss_type": "ipo", "preference.beta": 0.2}),
    ("orpo", "orpo_alpha: 0.2\n", {"train.method": "orpo", "preference.orpo_lambda": 0.2}),
    ("kto", "rl_beta: 0.1\nkto_desirable_weight: 1.33\nkto_undesirable_weight: 1.0\n",
     {"train.method": "kto", "preference.desirable_weight": 1.33, "preference.undesirable_weight": 1.0}),
    ("simpo", "rl_beta: 2.5\nsimpo_gamma: 1.4\ncpo_alpha: 0.0\n",
     {"train.method": "simpo", "preference.simpo_beta": 2.5, "preference.simpo_gamma": 1.4}),
])
def test_import_axolotl_maps_rl_and_its_fields(rl, fields, want, tmp_path):
    from engine.outputs.axolotl import convert
    yml = tmp_path / "rl.yml"
    yml.write_text("base_model: meta-llama/Llama-3.1-8B-Instruct\nadapter: qlora\nload_in_4bit: true\n"
                   f"rl: {rl}\n{fields}datasets:\n  - path: pairs.jsonl\n    type: chatml.intel\n")
    cfg_dict, unmapped, notes = convert(yml)
    cfg = config.from_dict(cfg_dict)
    for key, value in want.items():
        assert cfg.get(key) == value, (key, cfg.get(key))
    assert cfg.data.format == "auto" and cfg.quant.load_in_4bit
    assert not [u for u in unmapped if u in ("rl", "rl_beta", "orpo_alpha", "simpo_gamma", "cpo_alpha",
                                             "kto_desirable_weight", "dpo_label_smoothing")], unmapped
    assert any(n.startswith(f"rl: {rl} → train.method = ") for n in notes), notes


def test_axolotl_intel_rows_read_as_chat_pairs_with_their_system(tmp_path):
    ds = _load(tmp_path, [{"system": "Be brief.", "question": "Sky?", "chosen": "Blue.", "rejected": "I won't say."}])
    assert ds.format == "preference" and not ds.problems
    assert ds.rows[0].data == {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}],
                               "chosen": [{"role": "assistant", "content": "Blue."}],
                               "rejected": [{"role": "assistant", "content": "I won't say."}]}


def test_inspect_measures_pairs_and_previews_prompt_and_chosen(tmp_path, capsys):
    from engine.dataset import inspect as inspect_mod
    rows = _pairs(12, 5) + [dict(_pairs(1, 6)[0], rejected=_pairs(1, 6)[0]["chosen"])]     # line 13: identical
    path = _write(tmp_path / "pairs.jsonl", rows)
    cfg = config.load(None, ['model.name="builtin:tiny"', f'data.train="{path}"', "data.max_length=64"])
    rep = inspect_mod.inspect(cfg)
    assert rep.format == "preference" and rep.rows == 12 and rep.rows_tokenized == 12
    assert [(p.line, p.kind) for p in rep.problems] == [(13, "identical_pair")]
    pv = inspect_mod.preview(cfg, 0)
    trained = "".join(t for t, tr in pv.segments if tr)
    assert rows[0]["chosen"][0]["content"] in trained and rows[0]["prompt"][0]["content"] not in trained
    assert rows[0]["rejected"][0]["content"] not in pv.text
    # under an SFT method the report says first what training will say (the Dataset screen shows it)
    assert rep.warnings[0] == f"training refuses this file: {pref.REFUSAL}"
    sft = _write(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    dpo = config.load(None, ['model.name="builtin:tiny"', f'data.train="{sft}"', 'train.method="dpo"'])
    assert "train.method = 'dpo' needs preference data" in inspect_mod.inspect(dpo).warnings[0]
    assert not [w for w in inspect_mod.inspect(config.load(None, [
        'model.name="builtin:tiny"', f'data.train="{path}"', 'train.method="dpo"'])).warnings if "refuses" in w]


def _problem_pairs() -> list[dict]:
    """Pairs with, by line: 13 identical sides, 14 an empty chosen, 15 a blank prompt, 16 a chosen
    answer far over max_length 64, 17 a rejected one over it (the rest fit)."""
    rows = _pairs(12, 5)
    rows.append(dict(rows[0], rejected=rows[0]["chosen"]))
    rows.append(dict(rows[1], chosen=""))
    rows.append(dict(rows[2], prompt="   "))
    rows.append(dict(rows[3], chosen=[{"role": "assistant", "content": "apple " * 120}]))
    rows.append(dict(rows[4], rejected=[{"role": "assistant", "content": "river stone " * 50}]))
    return rows


def test_inspect_reports_sides_and_bad_pairs_by_line_with_the_trainers_masks(tmp_path, capsys):
    """Per-side token statistics are those of the trainer's own encoder (the preview's masks,
    side by side); identical pairs, empty sides and pairs over max_length are named by line, in
    the report, its JSON and `qlora-tui inspect`."""
    import numpy as np
    from engine.dataset import inspect as inspect_mod
    path = _write(tmp_path / "pairs.jsonl", _problem_pairs())
    cfg = config.load(None, ['model.name="builtin:tiny"', f'data.train="{path}"', "data.max_length=64",
                             'train.method="dpo"'])
    rep = inspect_mod.inspect(cfg)
    assert {(p.line, p.kind) for p in rep.problems} == {(13, "identical_pair"), (14, "empty_content"),
                                                        (15, "empty_content")}
    pvs = [inspect_mod.preview(cfg, i) for i in range(rep.rows)]
    assert [pv.line for pv in pvs] == [*range(1, 13), 16, 17]
    per_side = {"prompt": [pv.sides["chosen"].n_tokens - pv.sides["chosen"].n_trained_untruncated for pv in pvs],
                "chosen": [pv.sides["chosen"].n_trained_untruncated for pv in pvs],
                "rejected": [pv.sides["rejected"].n_trained_untruncated for pv in pvs]}
    want = {k: {"min": min(v), "median": float(np.median(v)), "max": max(v)} for k, v in per_side.items()}
    assert rep.sides == want
    longer = {pv.line: max(s.n_tokens for s in pv.sides.values()) for pv in pvs}
    over = [(ln, n) for ln, n in longer.items() if n > 64]
    assert [ln for ln, _ in over] == [16, 17] and rep.over_max_length == over
    assert rep.over_max_length_total == 2 and rep.truncated_rows == 2
    # each side's mask: the prompt is shared and untrained, each answer trained on its own side
    pv = pvs[0]
    prompt = pv.text[:pv.prompt_chars]
    assert "say" in prompt and all(s.text.startswith(prompt) for s in pv.sides.values())
    for name in ("chosen", "rejected"):
        side = pv.sides[name]
        trained = "".join(t for t, tr in side.segments if tr)
        assert _problem_pairs()[0][name][0]["content"] in trained and "say" not in trained
    assert pvs[-2].sides["chosen"].truncated_at == 64 and pvs[-2].sides["rejected"].truncated_at is None
    side_doc = pvs[0].to_dict()["sides"]
    assert any(seg["trained"] for seg in side_doc["rejected"]["segments"]) and "sides" not in side_doc["chosen"]
    doc = rep.to_dict()["preference"]
    assert doc["over_max_length"] == [{"line": ln, "tokens": n} for ln, n in over] and doc["sides"] == want

    r = cli(capsys, "inspect", path, "--model", "builtin:tiny", "--max-length", "64", "--set", 'train.method="dpo"')
    out = r.stdout
    assert "line 13: [identical_pair]" in out and "line 14: [empty_content]" in out and "line 15: [empty_content]" in out
    assert "pairs over max_length 64 (their longer side is truncated): 2" in out, out
    assert f"  line 16: {longer[16]} tokens" in out and f"  line 17: {longer[17]} tokens" in out
    assert f"chosen min {want['chosen']['min']}, median {want['chosen']['median']:g}, max {want['chosen']['max']}" in out
    r = cli(capsys, "inspect", path, "--model", "builtin:tiny", "--max-length", "64", "--set", 'train.method="dpo"',
            "--show-line", "16")
    assert r.stdout.startswith("chosen: row 13 (line 16)") and "\nrejected: row 13 (line 16)" in r.stdout
    assert "✂[max_length 64" in r.stdout.split("\nrejected:")[0] and "✂" not in r.stdout.split("\nrejected:")[1]
    assert f"⟦{_problem_pairs()[4 - 1]['rejected'][0]['content']}" in r.stdout     # the rejected answer, trained


def test_inspect_counts_kto_labels_and_each_side(tmp_path):
    from engine.dataset import inspect as inspect_mod
    rows = [{"prompt": [{"role": "user", "content": f"say {w}"}],
             "completion": [{"role": "assistant", "content": f"{w} !" * (i + 1)}], "label": i % 3 != 0}
            for i, w in enumerate(WORDS)]
    path = _write(tmp_path / "kto.jsonl", rows)
    cfg = config.load(None, ['model.name="builtin:tiny"', f'data.train="{path}"', "data.max_length=32",
                             'train.method="kto"'])
    rep = inspect_mod.inspect(cfg)
    assert rep.format == "kto" and rep.labels == {"desirable": 8, "undesirable": 4}
    pvs = [inspect_mod.preview(cfg, i) for i in range(rep.rows)]
    assert [pv.label for pv in pvs] == [r["label"] for r in rows] and all(list(pv.sides) == ["completion"] for pv in pvs)
    trained = [pv.n_trained_untruncated for pv in pvs]
    assert rep.sides["completion"]["min"] == min(trained) and rep.sides["completion"]["max"] == max(trained)
    over = [(pv.line, pv.n_tokens) for pv in pvs if pv.n_tokens > 32]
    assert over and len(over) < len(pvs) and rep.over_max_length == over
    assert inspect_mod.format_preview(pvs[0], 32).startswith("label: undesirable; row 1 (line 1)")


def test_generate_takes_its_prompts_from_preference_rows():
    from engine.outputs.generate import _user_turn
    conv = _pairs(1, 7)[0]
    assert _user_turn(conv) == conv["prompt"][0]["content"]
    assert _user_turn({"prompt": "The sky is", "chosen": " blue", "rejected": " red"}) == "The sky is"
    assert _user_turn({"question": "Sky?", "chosen": "Blue.", "rejected": "No."}) == "Sky?"


def test_dpo_through_the_fused_nf4_lora_linear_keeps_the_reference_off(pair_files, tmp_path):
    """The fused linear (GPU default) under DPO, forced on the CPU: every 4-bit LoRA layer is
    patched, the reference pass (adapter disabled) still takes the base alone, and DPO learns."""
    from engine.training import runner
    train, held = pair_files
    run = runner.Run(_cfg(tmp_path, train, "dpo", **{"train.fused_lora": True, "train.max_steps": 6,
                                                      "train.logging_steps": 1}))
    run.start()
    assert run.join(timeout=600) and run.result.type == "run_finished", run.result
    cbs = [c for c in run._recipe.prepared.trainer.callback_handler.callbacks if hasattr(c, "patched")]
    assert cbs and cbs[0].patched == 14                 # 2 layers x 7 projections of builtin:tiny
    prefs = _standing_prefs(run.run_dir, "train")
    assert prefs[0].margin == pytest.approx(0.0, abs=1e-6)       # step 1: policy = reference (B = 0)
    assert prefs[-1].margin > 0.3 and prefs[-1].accuracy >= 0.75
