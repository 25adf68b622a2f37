"""The multi-process path on the CPU: [distributed] gpus = 2 relaunches the engine as two
processes (gloo here, accelerate + NCCL on GPUs); rank 0 alone writes the run directory, every
rank trains on its share of the rows, and a stop request reaches all ranks on the same step; a save
request is marked done once its checkpoint is complete."""
import json
import time
from pathlib import Path

import pytest
import torch

from engine.core import control
from engine.core import rundir

REPO = Path(__file__).resolve().parents[2]


def launch(tmp_path, *sets):
    """`engine train --headless` with distributed.gpus = 2, its launcher in this process (already
    started: no third Python start-up) and its two worker processes real; returns the exit status."""
    import os
    from engine import cli as CLI
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        return CLI.main(["train", str(REPO / "examples" / "demo.toml"), "--headless",
                         "--set", f"output.dir='{tmp_path}'", "--set", "distributed.gpus=2",
                         *sum((["--set", s] for s in sets), [])])
    finally:
        os.umask(umask)                   # the launcher sets the run files' private umask


def test_two_processes_one_event_log_and_adapter(tmp_path, capfd):
    rc = launch(tmp_path, "train.max_steps=4", "train.save_steps=2")
    out, err = capfd.readouterr()           # the workers' output too (they write to our fds)
    assert rc == 0, err[-3000:]
    assert out.count("step 4/4") == 1                 # rank 0 prints, the other rank does not
    run = rundir.list_runs(tmp_path)[0]
    assert run.state == "finished"
    evs = [json.loads(line) for line in (run.path / "events.jsonl").read_text().splitlines()]
    steps = [e for e in evs if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]   # one log, no duplicates from rank 1
    # 4 steps x batch 4 x 2 processes = 32 of 285 rows: the epoch counts both ranks' rows
    assert abs(steps[-1]["epoch"] - 32 / 285) < 0.02
    assert (run.path / "adapter" / "adapter_model.safetensors").exists()
    assert rundir.checkpoints(run.path)


def test_stop_request_reaches_every_rank(tmp_path, capfd, monkeypatch):
    import threading
    monkeypatch.setenv("QLORA_TUI_FAULTS", "slow=0.2")          # inherited by the workers
    result = []
    launcher = threading.Thread(target=lambda: result.append(
        launch(tmp_path, "train.max_steps=400", "train.save_steps=0")), daemon=True)
    launcher.start()
    deadline = time.time() + 300
    run_dir = None
    while time.time() < deadline and launcher.is_alive():
        runs = rundir.list_runs(tmp_path)
        if runs and runs[0].step >= 2:
            run_dir = runs[0].path
            break
        time.sleep(0.1)
    assert run_dir is not None, capfd.readouterr().err[-3000:] if not launcher.is_alive() else "no steps"
    # a save request is marked done once its checkpoint is complete (the one-GPU path), not before
    done = control.request(run_dir, "save").with_suffix(".done")
    while not done.exists():
        assert launcher.is_alive() and time.time() < deadline, "the save request was never carried out"
        time.sleep(0.02)
    saved = rundir.checkpoints(run_dir)              # complete ones only (COMPLETE marker)
    assert saved, "the save request was marked done before its checkpoint was complete"
    control.request(run_dir, "stop")
    launcher.join(timeout=300)
    assert result == [3], capfd.readouterr().err[-3000:]          # engine.core.exitcodes.STOPPED
    ri = rundir.info(run_dir)
    assert ri.state == "stopped" and ri.step < 400
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("use_dora,grow_vocab", [(False, False), (True, True)])
def test_fsdp_adapter_file_is_what_peft_writes(tmp_path, use_dora, grow_vocab):
    """engine.training.trainer.save_fsdp_adapter turns a gathered (full, unwrapped-key) state dict into
    the adapter PEFT itself writes: same keys, same tensors, and PEFT loads it. The gather is
    FSDP's collective (run on 2 H200s, bench/RESULTS.md); here the state dict comes from the
    same model unsharded, which is what FSDP's full state dict equals."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from engine.models.builtin import tiny_model_dir
    from engine.training.trainer import save_fsdp_adapter
    base_dir = str(tiny_model_dir())
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if grow_vocab:
        model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + 8)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  use_dora=use_dora, init_lora_weights=False,
                                                  task_type="CAUSAL_LM"))      # as engine.training.trainer builds it

    class Accelerator:                   # the three calls save_fsdp_adapter makes, without FSDP
        is_main_process = True

        @staticmethod
        def get_state_dict(m):
            return m.state_dict()

        @staticmethod
        def unwrap_model(m):
            return m

    class Trainer:
        accelerator = Accelerator()
        model = peft_model

    assert save_fsdp_adapter(Trainer(), tmp_path / "ours", with_embeddings=grow_vocab)
    peft_model.save_pretrained(str(tmp_path / "peft"), save_embedding_layers=grow_vocab)
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    ref = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(ref) and len(ours) > 0
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    ref_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for c in (ours_cfg, ref_cfg):
        c["target_modules"] = sorted(c["target_modules"])
    assert ours_cfg == ref_cfg
    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    if grow_vocab:
        fresh.resize_token_embeddings(fresh.get_input_embeddings().weight.shape[0] + 8)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "ours"))
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, peft_model(x).logits)


def test_a_checkpoint_without_adapter_weights_is_never_copied_as_the_adapter(tmp_path):
    """Resuming a run killed while saving its adapter takes the adapter from the last
    checkpoint; an FSDP checkpoint has sharded model state instead, and must not become an
    adapter directory without weights."""
    from engine.training.resume import adapter_from_checkpoint
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "checkpoint-10"
    (ckpt / "pytorch_model_fsdp_0").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    with pytest.raises(RuntimeError, match="no adapter weights"):
        adapter_from_checkpoint(run_dir, None, ckpt, lambda ev: None)
    assert not (run_dir / "adapter").exists()
    (ckpt / "adapter_model.safetensors").write_bytes(b"x")          # a LoRA checkpoint: copied
    adapter = adapter_from_checkpoint(run_dir, None, ckpt, lambda ev: None)
    assert (adapter / "adapter_model.safetensors").exists()
    assert not (adapter / "trainer_state.json").exists()            # training state stays behind
