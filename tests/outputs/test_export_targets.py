"""What a run produced (engine/artifacts.py) and the export targets that turn it into files
(engine/outputs/targets/): the registry, the typed export events, the job that writes them to a
log a front end follows, and what a new target touches (one file and one registry line)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.core import events

sys.path.insert(0, str(Path(__file__).parents[1]))
from outputs_fixtures import make_run_dir, make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    base = make_tiny_model(root / "base")
    return {"root": root, "base": base, "run": make_run_dir(root / "runs" / "20260101-000000-tiny", base, r=4)}


# --------------------------------------------------------------------------- RunArtifact

def test_artifact_of_a_run_an_adapter_and_a_full_checkpoint(tiny, tmp_path):
    from engine.artifacts import ArtifactKind, RunArtifact, artifact_kind
    from engine.core import config
    run = tiny["run"]
    art = RunArtifact.open(run)
    assert art.kind == ArtifactKind.ADAPTER and art.output_dir == run / "adapter" and art.run_dir == run
    assert art.base == str(Path(tiny["base"]).resolve()) and art.method == "qlora"
    assert art.exports_dir == run / "export" and art.merged_dir == run / "export" / "merged"
    assert art.tokenizer_source() in (str(run / "adapter"), art.base)
    assert art.resolve_base() == art.base                      # a local model directory
    same = RunArtifact.open(run / "adapter")                   # the adapter dir finds its run
    assert same.run_dir == run and same.output_dir == art.output_dir
    # a GaLore run: its train.method says the output is the weights themselves
    assert artifact_kind("galore") == ArtifactKind.FULL and artifact_kind("dpo") == ArtifactKind.ADAPTER
    full = tmp_path / "galore-run"
    full.mkdir()
    cfg = config.Config()
    cfg.train.method = "galore"
    config.save(cfg, full / "config.toml")
    with pytest.raises(ValueError, match="no full checkpoint found: train.method = galore saves one in") as e:
        RunArtifact.open(full)                                 # not saved yet: said, not "no adapter"
    assert "\n" not in str(e.value)
    (full / "model").mkdir()
    (full / "model" / "config.json").write_text("{}")
    (full / "model" / "qlora_tui.json").write_text(json.dumps({"base": "builtin:tiny"}))
    fart = RunArtifact.open(full)
    assert fart.kind == ArtifactKind.FULL and fart.full_dir == full / "model" and fart.adapter_dir is None
    assert fart.method == "galore" and fart.base == "builtin:tiny"
    assert RunArtifact.open(full / "model").full_dir == full / "model"      # the checkpoint folder itself
    with pytest.raises(ValueError, match="a full checkpoint, not a LoRA adapter: train.method = galore"):
        RunArtifact.open(full, kind=ArtifactKind.ADAPTER)


def test_artifact_refusals_are_one_line(tmp_path):
    from engine.artifacts import AdapterError, RunArtifact
    for src, needle in ((tmp_path / "nowhere", "no such directory"),
                        (tmp_path / "empty", "no adapter found")):
        if needle != "no such directory":
            src.mkdir()
            (src / "events.jsonl").write_text("")
        with pytest.raises(AdapterError) as e:
            RunArtifact.open(src)
        assert needle in str(e.value) and "\n" not in str(e.value)
    assert "may still be running" in str(pytest.raises(AdapterError, RunArtifact.open, tmp_path / "empty").value)


# --------------------------------------------------------------------------- the registry

def test_registry_lists_targets_without_heavy_imports():
    code = ("import sys; from engine.outputs import targets; ts = targets.all_targets(); "
            "print(json.dumps([[t.name, [o.name for o in t.options]] for t in ts])); "
            "print(sorted(m for m in ('torch', 'transformers', 'gguf', 'peft', 'textual') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    listed, heavy = r.stdout.strip().splitlines()
    assert json.loads(listed) == [["gguf", ["gguf"]], ["gguf-adapter", ["gguf"]], ["merged", ["dtype"]],
                                  ["ollama", ["gguf"]], ["peft", []]]
    assert heavy == "[]"


def test_one_list_of_gguf_types_for_every_face():
    from engine.outputs import gguf_write, targets
    from tui.screens.export import option_choices
    gguf = targets.get("gguf")
    assert [v for v, _ in gguf.option("gguf").choices] == list(gguf_write.GGUF_TYPES)
    assert [v for _, v in option_choices("gguf")[0]] == list(gguf_write.GGUF_TYPES)
    adapter = [v for v, _ in targets.get("gguf-adapter").option("gguf").choices]
    assert set(adapter) < set(gguf_write.GGUF_TYPES) and "q4_k_m" not in adapter and "q8_0" in adapter
    assert targets.get("ollama").defaults() == {"gguf": "q4_k_m"}
    with pytest.raises(ValueError, match="unknown; use one of gguf, gguf-adapter, merged, ollama, peft"):
        targets.get("onnx")


def test_export_events_round_trip_and_end_a_followed_log(tmp_path):
    log = tmp_path / "export.jsonl"
    w = events.JsonlWriter(log)
    w(events.ExportStarted(target="merged", src="r", artifact="adapter", options={"dtype": "fp32"}))
    w(events.ExportProgress(target="merged", stage="merge", done=0.5, message="halfway"))
    w(events.ExportFinished(target="merged", report={"path": "p"}))
    w.close()
    got = list(events.follow(log, poll=0.01, terminal=events.EXPORT_END))       # ends at the end event
    assert [type(e) for e in got] == [events.ExportStarted, events.ExportProgress, events.ExportFinished]
    assert got[1].stage is events.ExportStage.MERGE and got[1].done == 0.5 and got[2].report == {"path": "p"}


# --------------------------------------------------------------------------- running targets

def test_cli_merged_target_prints_its_events(tiny, capsys):
    from engine import cli
    run = tiny["run"]
    assert cli.main(["export", str(run), "--target", "merged", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("export merged dtype=fp32: ")
    assert "% merge] " in out and "[100% done] done" in out and "verified: max |logit diff|" in out
    assert (run / "export" / "merged" / "config.json").is_file()
    # the target's own option is checked; another target's option is refused, one line each
    assert cli.main(["export", str(run), "--target", "merged", "--dtype", "fp8"]) == 1
    assert cli.main(["export", str(run), "--target", "merged", "--gguf", "q8_0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "export failed: --dtype 'fp8' is not one of auto, bf16, fp16, fp32 (export target merged)"
    assert err[1].startswith("export failed: --gguf is not an option of --target merged")
    # again: the merged folder is there, so it is refused (never overwritten)
    assert cli.main(["export", str(run), "--target", "merged"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_peft_target_writes_a_folder_plain_peft_loads(tiny, tmp_path, capsys):
    """`export --target peft`: the adapter, its tokenizer and our model card in one folder, which
    plain PEFT loads onto the base with the run's very weights; a second export is refused
    unless --force (which replaces it)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import shutil
    from engine import cli
    run = shutil.copytree(tiny["run"], tmp_path / "run")
    AutoTokenizer.from_pretrained(tiny["base"]).save_pretrained(run / "adapter")   # as a run saves it
    out = tmp_path / "share"
    assert cli.main(["export", str(run), "--target", "peft", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "% verify] reading the copy back through PEFT" in printed and "[100% done]" in printed
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer_config.json"} <= names
    assert "made with qlora-tui" in (out / "README.md").read_text()
    want = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["base"]), str(out))
    assert AutoTokenizer.from_pretrained(str(out)).chat_template
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == want.keys() and all(loaded[k].equal(want[k].to(loaded[k].dtype)) for k in want)
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3, 4]])
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert cli.main(["export", str(run), "--target", "peft", "--out", str(out)]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--target", "peft", "--out", str(out), "--force"]) == 0


def test_export_job_writes_its_events_to_a_log_the_front_end_follows(tiny, tmp_path):
    """The child job of the TUI: a refusal arrives as ExportFailed in its log, one line."""
    from engine.outputs import jobs
    run = make_run_dir(tmp_path / "runs" / "20260101-000000-words", tiny["base"], r=4)
    job = jobs.start_export({"src": str(run), "target": "gguf", "options": {"gguf": "f16"}})
    assert job.events.parent == run / "export" / "logs"
    seen: list = []
    end = jobs.follow_export(job, seen.append)
    assert job.proc.wait(timeout=60) == 1
    assert isinstance(end, events.ExportFailed) and "WordLevel tokenizer cannot be written" in end.error
    assert end.error.startswith("export failed: ") and "\n" not in end.error
    assert isinstance(seen[0], events.ExportStarted) and seen[-1] is end
    assert [type(e) for e in events.read_events(job.events)] == [type(e) for e in seen]


def test_a_new_target_is_one_file_and_one_registry_line(tiny, tmp_path, monkeypatch, capsys):
    """A target written in its own module and named in TARGETS: the CLI runs it (its option as a
    flag, its events printed), the TUI lists it, nothing else changes."""
    from engine import cli
    from engine.outputs import targets
    from tui.screens.export import option_choices, target_choices
    (tmp_path / "adapter_copy_target.py").write_text(textwrap.dedent('''
        import shutil
        from engine.core.events import ExportProgress
        from engine.outputs.targets import Option, Target

        def run(art, options, emit, out=None, **_):
            dest = art.exports_dir / f"adapter-copy-{options['layout']}"
            emit(ExportProgress(target="adapter-copy", stage="write", done=0.5, message=f"copying to {dest}"))
            shutil.copytree(art.output_dir, dest)
            size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
            return {"path": str(dest), "size_bytes": size, "commands": [f"ls {dest}"], "lines": [f"copied: {dest}"]}

        TARGET = Target("adapter-copy", "a copy of the adapter", "the adapter folder, copied", run,
                        (Option("layout", "layout", (("flat", "flat"),), "flat"),))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(targets.TARGETS, "adapter-copy", "adapter_copy_target:TARGET")
    assert ("a copy of the adapter", "adapter-copy") in target_choices()
    assert option_choices("adapter-copy") == ([("flat", "flat")], "flat")
    run = tiny["run"]
    assert cli.main(["export", str(run), "--target", "adapter-copy", "--layout", "flat"]) == 0
    out = capsys.readouterr().out
    assert "[ 50% write] copying to" in out and f"copied: {run / 'export' / 'adapter-copy-flat'}" in out
    assert (run / "export" / "adapter-copy-flat" / "adapter_config.json").is_file()
