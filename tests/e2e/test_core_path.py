"""The engine's core path, end to end, for each builtin model family (text and vision), through
the command line as a user runs it: train with evals between steps, a checkpoint, a resume that
goes further, the saved adapter, a verified merge and a GGUF export (text) that reads back.

.ci/run also runs this file in a second venv built from the newest releases pyproject.toml
allows (.ci/newest.sh): a library release that changes this path fails CI the day it lands.
"""
from __future__ import annotations

import json

import pytest

from reliability_helpers import cli, events, logged_step_numbers, step_numbers
from engine.core import events as ev
from engine.core import rundir

FAMILIES = {
    "text": {"model.name": "builtin:tiny", "data.train": "builtin:sample"},
    "vision": {"model.name": "builtin:tiny-vl", "data.train": "builtin:vl-sample"},
}


def _sets(changes: dict) -> list[str]:
    out = []
    for k, v in changes.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_eval_checkpoint_resume_save_merge_export(family, tmp_path, capsys):
    from reliability_helpers import REPO
    runs = tmp_path / "runs"
    changes = {**FAMILIES[family], "train.max_steps": 4, "train.eval_steps": 2, "train.save_steps": 2,
               "train.batch_size": 2, "train.device": "cpu", "output.dir": str(runs)}
    r = cli(capsys, "train", REPO / "examples" / "demo.toml", "--headless", *_sets(changes))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = next(runs.iterdir())
    assert [e.step for e in events(d) if isinstance(e, ev.Eval)][:2] == [2, 4]
    assert rundir.checkpoints(d)

    r = cli(capsys, "train", "--resume", d, "--headless", "--set", "train.max_steps=6")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming from checkpoint-4" in r.stdout
    assert step_numbers(d) == [1, 2, 3, 4, 5, 6] and logged_step_numbers(d) == [1, 2, 3, 4, 5, 6]
    assert isinstance([e for e in events(d) if isinstance(e, ev.TERMINAL)][-1], ev.RunFinished)
    assert (d / "adapter" / "adapter_model.safetensors").exists()

    merged = tmp_path / "merged"
    r = cli(capsys, "merge", d, "--out", merged, "--dtype", "fp32")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (merged / "config.json").exists()

    if family == "text":
        r = cli(capsys, "export", d, "--gguf", "f16", "--out", tmp_path / "gguf", "--json")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        report = json.loads(r.stdout)
        assert report, r.stdout
