"""``qlora-tui eval RUN --lm-eval TASK.yaml``: lm-evaluation-harness on a run, offline, with a local
task (its data a jsonl on this machine). Runs only where the optional ``lm-eval`` package is
installed (``pip install 'qlora-tui[lm-eval]'``); skipped elsewhere."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

sys.path.insert(0, str(Path(__file__).parents[1]))

ROWS = [
    {"question": "the capital of canada is", "choices": ["ottawa", "paris", "rome"], "answer": 0},
    {"question": "the capital of france is", "choices": ["berlin", "paris", "oslo"], "answer": 1},
    {"question": "local ai runs on your", "choices": ["machine", "cloud", "phone"], "answer": 0},
    {"question": "hello how are", "choices": ["fine", "you", "they"], "answer": 1},
]


def _task(tmp_path: Path) -> Path:
    data = tmp_path / "tasks" / "capitals.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    task = data.parent / "capitals.yaml"
    task.write_text(f"""task: qlora_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return task


def _acc(model, tok) -> float:
    """The multiple-choice accuracy recomputed here: the choice whose tokens (after the context and
    lm-eval's " " delimiter) have the highest summed log-probability."""
    import torch
    right = 0
    for row in ROWS:
        ctx = tok(row["question"], add_special_tokens=False).input_ids
        scores = []
        for choice in row["choices"]:
            whole = tok(row["question"] + " " + choice, add_special_tokens=False).input_ids
            cont = whole[len(ctx):]
            x = torch.tensor([whole[:-1]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        right += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
    return right / len(ROWS)


def test_lm_eval_local_task_on_builtin_tiny_base_vs_tuned(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")          # a local task needs no network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from engine import cli
    from engine.outputs import evaluate, generate
    from engine.models.builtin import tiny_model_dir
    from outputs_fixtures import make_run_dir
    run = make_run_dir(tmp_path / "runs" / "20260101-000000-tiny", tiny_model_dir(), r=4)
    task = _task(tmp_path)
    assert cli.main(["eval", str(run), "--answer-rows", "0", "--max-rows", "2", "--lm-eval", str(task)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "lm-eval qlora_capitals acc" in ln)
    saved = evaluate.latest(run)
    assert list(saved["lm_eval"]) == ["qlora_capitals"] and list(saved["lm_eval"]["qlora_capitals"]) == ["acc"]
    base, tuned = saved["lm_eval"]["qlora_capitals"]["acc"]
    assert line.split()[-2:] == [f"{base:.4f}", f"{tuned:.4f}"]
    model, tok, _ = generate._load(run)
    assert tuned == pytest.approx(_acc(model, tok))
    with model.disable_adapter():
        assert base == pytest.approx(_acc(model, tok))
    # a task lm-eval does not know, a missing task file (said before the model loads): one line each
    assert cli.main(["eval", str(run), "--lm-eval", "no_such_task_xyz"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("eval failed: --lm-eval: lm-eval knows no task no_such_task_xyz")
    assert cli.main(["eval", str(run), "--lm-eval", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("eval failed: --lm-eval") and "no such task file" in err
