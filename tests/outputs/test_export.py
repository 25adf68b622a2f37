"""GGUF export, model card, push (up to the upload call) and trackers, on real builtin:tiny runs.

One real 4-step QLoRA run with tensorboard serves the tracker test and every export test; the
GGUF files are read back by transformers (``gguf_file=``) and by the gguf package's reader.
"""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core import config
from engine.core import events
from engine.outputs import export
from engine.outputs import gguf_write
from engine.outputs import modelcard
from engine.training import runner

REPO = Path(__file__).resolve().parents[2]


def _run(tmp: Path, report_to: str, steps: int, eval_steps: int):
    cfg = config.load(REPO / "examples" / "demo.toml",
                  [f'output.dir="{tmp / "runs"}"', f"train.max_steps={steps}", f"train.eval_steps={eval_steps}",
                   "train.save_steps=0", f'output.report_to="{report_to}"'])
    run = runner.Run(cfg)
    run.start()
    assert run.join(timeout=300)
    assert run.result.type == "run_finished", getattr(run.result, "reason", "")
    return run.run_dir


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    # two trackers at once: tensorboard and MLflow's local file store (RUN_DIR/mlruns)
    return _run(tmp_path_factory.mktemp("export"), "tensorboard,mlflow", steps=4, eval_steps=2)


@pytest.fixture(scope="module")
def f16(tb_run):
    return export.export_model(tb_run, "f16")


# --------------------------------------------------------------------------- trackers

def _tb_scalars(run_dir: Path) -> dict:
    from tensorboardX.proto import event_pb2
    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files, "no tensorboard event file in the run directory"
    out: dict = {}
    for f in files:
        data, i = f.read_bytes(), 0
        while i < len(data):       # TFRecord: length, crc, payload, crc
            n = struct.unpack("<Q", data[i:i + 8])[0]
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_tensorboard_logs_loss_lr_and_our_tokens_per_second(tb_run):
    scalars = _tb_scalars(tb_run)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert "train/learning_rate" in scalars and "eval/loss" in scalars
    tps = [v for _, v in scalars["train/tokens_per_second"]]
    assert len(tps) >= 3 and all(v > 0 for v in tps)
    steps = [e for e in events.read_events(tb_run / "events.jsonl") if e.type == "step"]
    assert [round(v, 3) for _, v in scalars["train/loss"]] == [round(e.loss, 3) for e in steps]
    started = next(e for e in events.read_events(tb_run / "events.jsonl") if e.type == "run_started")
    assert any(str(tb_run / "tensorboard") in p for p in started.plan)
    from tui.widgets.run_view import tracker_logs       # what the Train screen shows of it
    head, where = tracker_logs(started.plan)
    assert head == "tensorboard,mlflow" and f"tensorboard: {tb_run / 'tensorboard'}" in where
    assert f"mlflow: file://{tb_run / 'mlruns'}" in where


def test_mlflow_file_store_holds_the_runs_losses(tb_run):
    """What MLflow's local file store holds, read back with MLflow's own client: the train loss of
    every step (equal to our events'), the eval loss, the learning rate, and the run's params."""
    from mlflow.tracking import MlflowClient
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file://{tb_run / 'mlruns'}")
    exp = client.get_experiment_by_name("qlora-tui")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    rid = runs[0].info.run_id
    loss = sorted((m.step, m.value) for m in client.get_metric_history(rid, "loss"))
    steps = [e for e in events.read_events(tb_run / "events.jsonl") if e.type == "step"]
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    assert [round(v, 3) for _, v in loss] == [round(e.loss, 3) for e in steps]
    assert client.get_metric_history(rid, "eval_loss") and client.get_metric_history(rid, "learning_rate")
    assert runs[0].data.params.get("learning_rate") is not None


def _wandb_history_keys(path: Path) -> set:
    """The metric names in a .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf, keys = path.read_bytes(), 7, b"", set()
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                keys |= {it.key or "/".join(it.nested_key) for it in rec.history.item}
    return keys


def test_wandb_offline_writes_its_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = _run(tmp_path, "wandb", steps=2, eval_steps=0)
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    keys = _wandb_history_keys(runs[0])
    assert {"train/loss", "train/learning_rate", "train/tokens_per_second"} <= keys


def test_tracker_dirs_follow_each_run_unless_the_user_set_them(monkeypatch):
    from engine.training import trackers
    monkeypatch.setattr(trackers, "_OURS", {})
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    trackers.setup("tensorboard", "/r/run1")
    trackers.setup("tensorboard", "/r/run2")          # a second run in the same process
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == "/r/run2/tensorboard"
    assert trackers.log_location("tensorboard", "RUN_DIR") == "RUN_DIR/tensorboard"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "/mine/tb")
    trackers.setup("tensorboard", "/r/run3")
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == "/mine/tb"
    assert trackers.log_location("tensorboard", "/r/run3") == "/mine/tb"


def test_missing_tracker_package_is_one_preflight_line(monkeypatch):
    from engine.training import trackers
    monkeypatch.setattr(trackers, "_available", lambda: [])        # as if no tracker package were installed
    cfg = config.load(None, ['output.report_to="tensorboard"'])
    with pytest.raises(runner.PreflightError) as e:
        runner.preflight(cfg, check_model=False)
    assert "tensorboardX" in str(e.value) and "qlora-tui[tensorboard]" in str(e.value)
    assert "\n" not in str(e.value)
    cfg = config.load(None, ['output.report_to="trackio"'])
    with pytest.raises(runner.PreflightError, match="trackio needs the trackio package: pip install trackio"):
        runner.preflight(cfg, check_model=False)


def test_report_to_is_checked_against_the_names_transformers_knows():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    from engine.training import trackers
    assert trackers.known() == list(INTEGRATION_TO_CALLBACK)
    assert {"tensorboard", "wandb", "mlflow", "trackio", "comet_ml"} <= set(trackers.known())
    cfg = config.load(None, ['output.report_to="mlflowx"'])
    with pytest.raises(runner.PreflightError, match="'mlflowx' is not a tracker transformers knows; .*mlflow"):
        runner.preflight(cfg, check_model=False)
    with pytest.raises(config.ConfigError, match="output.report_to"):
        config.load(None, ['output.report_to="none,wandb"'])
    from engine.training.recipe import _report_to
    assert _report_to("tensorboard, mlflow") == ["tensorboard", "mlflow"] and _report_to("none") == []


# --------------------------------------------------------------------------- GGUF model

def _reader(path):
    import gguf
    return gguf.GGUFReader(str(path))


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def test_gguf_f16_loads_back_and_matches(tb_run, f16):
    from transformers import AutoTokenizer
    path = Path(f16.path)
    assert path.is_file() and path.parent == tb_run / "export"
    assert f16.max_abs_diff <= f16.tolerance and f16.top1_agreement >= 0.99
    assert f16.tokenizer_roundtrip and f16.prompts >= 3
    r = _reader(path)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    tok = AutoTokenizer.from_pretrained(f16.merged_dir)
    assert _field(r, "tokenizer.chat_template") == tok.chat_template
    assert _field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["output_norm.weight"] == "F32"
    # an independent read-back: the chat-rendered sample encodes the same through the GGUF tokenizer
    g_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = tok.apply_chat_template([{"role": "user", "content": "capital of Canada?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert g_tok(text).input_ids == tok(text).input_ids
    assert g_tok.decode(tok(text).input_ids) == tok.decode(tok(text).input_ids)
    # the result is in the run's events
    exported = [e for e in events.read_events(tb_run / "events.jsonl") if e.type == "export"]
    assert exported and exported[0].path == f16.path and exported[0].max_abs_diff == f16.max_abs_diff


def test_gguf_q8_0_within_stated_bound(tb_run, f16):
    q8 = export.export_model(tb_run, "q8_0")
    assert q8.merged_dir == f16.merged_dir             # the merge is reused
    path = Path(q8.path)
    assert path.stat().st_size < Path(f16.path).stat().st_size * 0.7
    types = {t.name: t.tensor_type.name for t in _reader(path).tensors}
    assert types["blk.1.ffn_down.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    # our own comparison, made here again: transformers dequantizes q8_0 on load
    ref, got = _merged_and_gguf_logits(q8.merged_dir, path)
    atol, rtol = gguf_write.TYPES["q8_0"].tolerance
    diff = float((ref - got).abs().max())
    assert 0 < diff <= atol + rtol * float(ref.abs().max())
    assert diff <= q8.tolerance and q8.max_abs_diff <= q8.tolerance


@pytest.mark.parametrize("kind", ["q4_k_m", "q5_k_m", "q6_k"])
def test_gguf_k_quants_of_builtin_tiny(tb_run, f16, kind):
    """k-quants written by us, read back by transformers (the gguf package dequantises them): the
    logits within the type's stated bound; each tensor in the type llama.cpp's rules give it
    (builtin:tiny's 128-wide rows fall back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0)."""
    rep = export.export_model(tb_run, kind)
    assert rep.merged_dir == f16.merged_dir and rep.max_abs_diff <= rep.tolerance
    path = Path(rep.path)
    r = _reader(path)
    assert _field(r, "general.file_type") == int(getattr(__import__("gguf").LlamaFileType, "MOSTLY_" + kind.upper()))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    base, fallback = {"q4_k_m": ("Q4_K", "Q5_0"), "q5_k_m": ("Q5_K", "Q5_1"), "q6_k": ("Q6_K", "Q8_0")}[kind]
    # ffn_down rows are 256 wide: a real k-quant; in _m mixes use_more_bits(1, 2) puts layer 1 at Q6_K
    assert types["blk.0.ffn_down.weight"] == base
    assert types["blk.1.ffn_down.weight"] == ("Q6_K" if kind != "q6_k" else base)
    assert types["blk.0.attn_q.weight"] == fallback and types["token_embd.weight"] == fallback
    assert types["blk.1.attn_v.weight"] == "Q8_0"            # Q6_K by the _m rule, 128 wide -> Q8_0
    assert types["output.weight"] == "Q8_0"                  # llama.cpp: output rows not k-sized
    assert types["output_norm.weight"] == "F32"
    ref, got = _merged_and_gguf_logits(rep.merged_dir, path)
    atol, rtol = gguf_write.TYPES[kind].tolerance
    assert 0 < float((ref - got).abs().max()) <= atol + rtol * float(ref.abs().max())


def test_gguf_k_quants_on_256_wide_llama(tmp_path):
    """Every linear of a 256-wide Llama is a real k-quant block; q4_k_m reads back within bound,
    attn_v/ffn_down of layers 2 and 3 (use_more_bits(i, 4)) at Q6_K, the output head at Q6_K."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from engine.models.builtin import tiny_model_dir
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from outputs_fixtures import make_adapter
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir()))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    make_adapter(tmp_path / "base", tmp_path / "adapter", r=8, scale=0.05)
    rep = export.export_model(tmp_path / "adapter", "q4_k_m", out=tmp_path / "out")
    assert rep.max_abs_diff <= rep.tolerance and rep.tokenizer_roundtrip
    types = {t.name: t.tensor_type.name for t in _reader(rep.path).tensors}
    for i in range(4):
        want = "Q6_K" if i in (2, 3) else "Q4_K"
        assert types[f"blk.{i}.attn_v.weight"] == want and types[f"blk.{i}.ffn_down.weight"] == want
        assert {types[f"blk.{i}.{n}.weight"] for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")} == {"Q4_K"}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    q8 = export.export_model(tmp_path / "adapter", "q8_0", out=tmp_path / "out")
    assert Path(rep.path).stat().st_size < 0.65 * Path(q8.path).stat().st_size


def test_modelfile_template_stops_and_system(tb_run, f16):
    text = Path(f16.modelfile).read_text()
    assert f"FROM ./{Path(f16.path).name}" in text
    assert "<|im_start|>{{ .Role }}" in text and "<|im_end|>" in text.split("TEMPLATE", 1)[1]
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a concise assistant for people fine-tuning language models."""' in text
    assert any(c.startswith("ollama create ") and f16.modelfile in c for c in f16.commands)
    assert any(c.startswith("llama-cli -m ") for c in f16.commands)


def test_model_card_metadata_and_loss(tb_run, f16):
    card = Path(f16.card).read_text()
    head = card.split("---")[1]
    assert "library_name: gguf" in head and "pipeline_tag: text-generation" in head
    assert "base_model" not in head and "`builtin:tiny` is not a hub id" in card   # a local base is not claimed
    assert modelcard.is_our_card(Path(f16.path).parent / "README.md")
    assert "| step | train loss | eval loss |" in card and "final eval loss:" in card
    assert "qlora-tui export" in card and "[lora]" in card          # the command and the training config
    merged_card = (Path(f16.merged_dir) / "README.md").read_text()
    assert "library_name: transformers" in merged_card


def test_card_front_matter_for_hub_ids():
    head = "\n".join(modelcard._front_matter("meta-llama/Llama-3.1-8B", ["org/chat-data", "/data/local.jsonl"],
                                             "adapter"))
    assert "base_model: meta-llama/Llama-3.1-8B" in head and "- org/chat-data" in head
    assert "local.jsonl" not in head and "library_name: peft" in head


# --------------------------------------------------------------------------- GGUF adapter

def test_adapter_gguf_tensors_and_delta(tb_run, f16):
    import numpy as np
    import torch
    from safetensors.torch import load_file
    rep = export.export_adapter(tb_run, "f32")
    r = _reader(rep.path)
    assert _field(r, "general.type") == "adapter" and _field(r, "adapter.type") == "lora"
    acfg = json.loads((tb_run / "adapter" / "adapter_config.json").read_text())
    assert _field(r, "adapter.lora.alpha") == pytest.approx(acfg["lora_alpha"])
    tensors = {t.name: t for t in r.tensors}
    rank = acfg["r"]
    expect = {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(2) for ab in "ab"
              for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == expect
    # llama.cpp's layout: lora_a ne = [n_in, r], lora_b ne = [r, n_out]
    assert list(tensors["blk.0.attn_q.weight.lora_a"].shape) == [128, rank]
    assert list(tensors["blk.0.attn_k.weight.lora_b"].shape) == [rank, 64]      # 2 kv heads x 32
    assert list(tensors["blk.0.ffn_down.weight.lora_a"].shape) == [256, rank]
    # B @ A * alpha / r from the file (q rows back in HF order) is the merge's weight change
    a = np.asarray(tensors["blk.1.attn_q.weight.lora_a"].data, dtype=np.float32)
    b = np.asarray(tensors["blk.1.attn_q.weight.lora_b"].data, dtype=np.float32)
    delta = b @ a * acfg["lora_alpha"] / rank
    heads = 4
    unpermuted = delta.reshape(heads, delta.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(delta.shape)
    base_dir = json.loads((Path(f16.merged_dir) / "qlora_merge.json").read_text())["base"]
    base = load_file(str(Path(base_dir) / "model.safetensors"))
    merged = load_file(str(Path(f16.merged_dir) / "model.safetensors"))
    key = "model.layers.1.self_attn.q_proj.weight"
    want = (merged[key].float() - base[key].float()).numpy()
    assert np.abs(unpermuted - want).max() < 1e-4 * max(1.0, np.abs(want).max()) + 1e-5
    assert np.abs(want).max() > 1e-4          # the adapter changes the weights at all


# --------------------------------------------------------------------------- refusals

def test_refusals_are_one_line():
    with pytest.raises(gguf_write.GGUFError, match="llama-quantize .* Q3_K_M"):
        gguf_write.check_type("q3_k_m")
    with pytest.raises(gguf_write.GGUFError, match="use one of f32, f16"):
        gguf_write.check_type("q3")
    with pytest.raises(gguf_write.GGUFError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        gguf_write.architecture_of({"architectures": ["GPT2LMHeadModel"]}, "config.json")
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from outputs_fixtures import make_tokenizer
    with pytest.raises(gguf_write.GGUFError, match="WordLevel tokenizer cannot be written"):
        gguf_write.read_vocab(make_tokenizer(), 32, "tok")


def test_cli_export_refusal_exit_code(tb_run, capsys):
    from engine import cli
    assert cli.main(["export", str(tb_run), "--gguf", "q2_k"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("export failed: --gguf q2_k") and "\n" not in err


# --------------------------------------------------------------------------- push

def test_push_plan_and_unreachable_hub(tb_run, f16, tmp_path):
    folder, _, files = modelcard.push_plan(tb_run, "gguf")
    assert folder == tb_run / "export"
    stem = Path(f16.path).stem
    assert {f"{stem}.gguf", f"{stem}.Modelfile", "README.md"} <= set(files)
    assert sorted(files) == sorted({p.name for p in folder.glob("*.gguf")} | {"README.md"}
                                   | {p.name for p in folder.glob("*.Modelfile")})
    assert "merged" not in " ".join(files)
    folder, _, files = modelcard.push_plan(tb_run, "adapter")
    assert "adapter_model.safetensors" in files and "README.md" in files
    _, upload, _ = modelcard.push_plan(tb_run, "adapter")             # ours, built in memory, not PEFT's
    assert isinstance(upload["README.md"], bytes) and b"qlora_tui:" in upload["README.md"]
    assert not modelcard.is_our_card(folder / "README.md")           # the folder itself is untouched
    _, _, files = modelcard.push_plan(tb_run, "merged")
    assert "model.safetensors" in files and "config.json" in files
    # the upload call itself, against a hub that cannot be reached: one line, exit 1
    env = dict(os.environ, HF_TOKEN="hf_not_a_real_token", HF_ENDPOINT="http://127.0.0.1:9",
               HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"))
    p = subprocess.run([sys.executable, "-m", "engine", "push", str(tb_run), "me/tiny", "--what", "gguf"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().startswith("push failed: upload to me/tiny failed:")
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert "hf_not_a_real_token" not in p.stdout + p.stderr
    # no token anywhere: says where to put one
    env.pop("HF_TOKEN")
    p = subprocess.run([sys.executable, "-m", "engine", "push", str(tb_run), "me/tiny"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "HF_TOKEN" in p.stderr and "hf auth login" in p.stderr


# --------------------------------------------------------------------------- other shapes

def _spm_tokenizer():
    """A sentencepiece-style BPE (Metaspace, byte fallback: the Llama 2 / Mistral v0.1 shape)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from engine.models.builtin import corpus
    from engine.models.builtin import CHATML_TEMPLATE
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                          show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_other_architectures_and_tokenizers(kind, tmp_path):
    """Qwen2 (q/k/v biases, no row permutation, tied embeddings, byte-level BPE) and Mistral
    (head_dim != hidden / heads, a sentencepiece-style BPE with byte fallback as Mistral v0.1 has):
    each exported f16 and read back within bound."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from engine.models.builtin import tiny_model_dir
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from outputs_fixtures import make_adapter
    tok = _spm_tokenizer() if kind == "mistral" else AutoTokenizer.from_pretrained(str(tiny_model_dir()))
    cls, model_cls, extra = {"qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
                             "mistral": (MistralConfig, MistralForCausalLM, {"head_dim": 48})}[kind]
    torch.manual_seed(0)
    cfg = cls(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **extra)
    model_cls(cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    make_adapter(tmp_path / "base", tmp_path / "adapter", r=8, scale=0.05)
    rep = export.export_model(tmp_path / "adapter", "f16", out=tmp_path / "out")
    assert rep.arch == ("qwen2" if kind == "qwen2" else "llama")
    assert rep.tokenizer_roundtrip and rep.max_abs_diff <= rep.tolerance and rep.top1_agreement >= 0.99
    names = {t.name for t in _reader(rep.path).tensors}
    assert ("blk.0.attn_q.bias" in names) == (kind == "qwen2")
    assert ("output.weight" in names) == (kind != "qwen2")
    assert _field(_reader(rep.path), "tokenizer.ggml.model") == ("llama" if kind == "mistral" else "gpt2")


# --------------------------------------------------------------------------- more families

_GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == "
                   "'assistant' else 'user') + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
_PHI3_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
_MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST]' + "
                     "m['content'] + '[/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


def _trained_tokenizer(kind: str):
    """A small tokenizer of ``kind``'s shape trained on the builtin corpus: gemma (sentencepiece
    BPE, spaces replaced by U+2581, no prefix space), phi3 (Llama 2's: Prepend + Replace
    normalizer) or tekken (Mistral-Nemo's byte-level BPE with its split regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from engine.models.builtin import corpus
    if kind == "tekken":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(gguf_write._TEKKEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
        tk.train_from_iterator(corpus(), trainers.BpeTrainer(
            vocab_size=600, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        tok.chat_template = _MISTRAL_TEMPLATE
        return tok
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if kind == "gemma":
        tk.normalizer = normalizers.Replace(" ", "\u2581")
        tk.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    else:
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        specials = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials += [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                          show_progress=False))
    if kind == "gemma":
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                      unk_token="<unk>", pad_token="<pad>")
        tok.chat_template = _GEMMA_TEMPLATE
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|end|>", unk_token="<unk>",
                                      pad_token="<|endoftext|>")
        tok.chat_template = _PHI3_TEMPLATE
    return tok


def _family(kind: str):
    """(tokenizer, config, model class) of a tiny random model of ``kind``'s shape."""
    import transformers as tf
    from transformers import AutoTokenizer
    from engine.models.builtin import tiny_model_dir
    tok = {"qwen3": None, "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3", "mistral_nemo": "tekken"}[kind]
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir())) if tok is None else _trained_tokenizer(tok)
    common = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "qwen3":     # q/k norms, no biases, head_dim 128 (Qwen3's; transformers' GGUF reader assumes it)
        return tok, tf.Qwen3Config(**dict(common, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                                          tie_word_embeddings=True)), tf.Qwen3ForCausalLM
    # Gemma: head_dim = query_pre_attn_scalar = 256 as in the real 2B/9B models (llama.cpp derives the
    # attention scale from head_dim; transformers' GGUF reader assumes 256)
    if kind == "gemma2":    # soft-capping, sandwich norms, tied embeddings, a sliding window
        return tok, tf.Gemma2Config(**common, head_dim=256, sliding_window=64), tf.Gemma2ForCausalLM
    if kind == "gemma3":    # q/k norms, local/global rope, sliding window
        return tok, tf.Gemma3TextConfig(**common, head_dim=256, sliding_window=64), tf.Gemma3ForCausalLM
    if kind == "phi3":      # fused qkv and gate_up projections
        return tok, tf.Phi3Config(**common, original_max_position_embeddings=512), tf.Phi3ForCausalLM
    # Mistral-Nemo: head_dim 64 != hidden / heads, the tekken tokenizer
    return tok, tf.MistralConfig(**common, head_dim=64), tf.MistralForCausalLM


@pytest.mark.parametrize("kind", ["qwen3", "gemma2", "gemma3", "phi3", "mistral_nemo"])
def test_more_families_export_and_read_back(kind, tmp_path):
    import torch
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from outputs_fixtures import make_adapter
    tok, cfg, model_cls = _family(kind)
    torch.manual_seed(0)
    model_cls(cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    make_adapter(tmp_path / "base", tmp_path / "adapter", r=8, scale=0.05)
    rep = export.export_model(tmp_path / "adapter", "f16", out=tmp_path / "out")
    arch = {"mistral_nemo": "llama"}.get(kind, kind)
    assert rep.arch == arch and _field(_reader(rep.path), "general.architecture") == arch
    assert rep.tokenizer_roundtrip and rep.max_abs_diff <= rep.tolerance
    assert rep.top1_agreement >= 0.99
    r = _reader(rep.path)
    names = {t.name for t in r.tensors}
    if kind in ("qwen3", "gemma3"):
        assert "blk.0.attn_q_norm.weight" in names and "blk.0.attn_k_norm.weight" in names
    if kind == "phi3":
        assert "blk.0.attn_qkv.weight" in names and "blk.0.attn_q.weight" not in names
    if kind.startswith("gemma"):
        assert "output.weight" not in names and "blk.1.post_ffw_norm.weight" in names
        assert _field(r, "tokenizer.ggml.model") == "llama" and _field(r, "tokenizer.ggml.add_space_prefix") is False
        assert _field(r, f"{kind}.attention.sliding_window") == 64
        # llama.cpp stores Gemma's norm as 1 + w
        norm = next(t for t in r.tensors if t.name == "blk.0.attn_norm.weight")
        import numpy as np
        assert np.allclose(np.asarray(norm.data), 1.0)          # a fresh Gemma norm weight is 0
    if kind == "gemma2":
        assert _field(r, "gemma2.attn_logit_softcapping") == pytest.approx(cfg.attn_logit_softcapping)
        assert _field(r, "gemma2.final_logit_softcapping") == pytest.approx(cfg.final_logit_softcapping)
    if kind == "mistral_nemo":
        assert _field(r, "tokenizer.ggml.pre") == "tekken" and _field(r, "llama.attention.key_length") == 64
    text = Path(rep.modelfile).read_text()
    family = {"qwen3": "<|im_start|>", "gemma2": "<start_of_turn>", "gemma3": "<start_of_turn>",
              "phi3": "<|assistant|>", "mistral_nemo": "[INST]"}[kind]
    assert "TEMPLATE" in text and family in text.split("TEMPLATE", 1)[1]


def test_unsupported_families_are_refused_by_name():
    with pytest.raises(gguf_write.GGUFError, match="Gemma3ForConditionalGeneration cannot be exported.*mmproj"):
        gguf_write.architecture_of({"architectures": ["Gemma3ForConditionalGeneration"]}, "config.json")
    import gguf
    w = gguf.GGUFWriter(None, "gemma2")
    odd = {"architectures": ["Gemma2ForCausalLM"], "hidden_size": 128, "num_attention_heads": 4, "head_dim": 32,
           "num_hidden_layers": 2, "intermediate_size": 256, "vocab_size": 100, "query_pre_attn_scalar": 256}
    with pytest.raises(gguf_write.GGUFError, match="query_pre_attn_scalar 256 differs from head_dim 32"):
        gguf_write.add_hparams(w, odd, "gemma2", "config.json")
    with pytest.raises(gguf_write.GGUFError, match="FalconForCausalLM is not supported.*Qwen3ForCausalLM.*Phi3ForCausalLM"):
        gguf_write.architecture_of({"architectures": ["FalconForCausalLM"]}, "config.json")


# --------------------------------------------------------------------------- eval

def test_eval_base_vs_tuned_on_the_cpu_run(tb_run, tmp_path, capsys):
    """``qlora-tui eval``: loss/perplexity on the run's held-out split, recomputed here with plain
    PEFT for one row; exact match / contains-answer scored on a prompt-completion file whose
    completion is the tuned model's own greedy answer (so the tuned side must match it)."""
    import math
    import torch
    from engine import cli
    from engine.outputs import evaluate, generate
    rep = evaluate.evaluate(tb_run, answer_rows=0)
    assert rep.rows >= 10 and rep.tokens > 0 and rep.answered == 0
    assert "held-out" in rep.data and Path(rep.path).parent == tb_run / "eval"
    assert rep.tuned.perplexity == pytest.approx(math.exp(rep.tuned.loss))
    assert rep.base.loss != rep.tuned.loss
    saved = json.loads(Path(rep.path).read_text())
    assert saved["tuned"]["loss"] == rep.tuned.loss
    # the same held-out rows, one of them scored here with PEFT directly
    where, rows = evaluate.held_out_rows(tb_run, None)
    from engine.modalities.text import encode_dataset
    model, tok, _ = generate._load(tb_run)
    one = evaluate.evaluate(tb_run, data=None, max_rows=1, answer_rows=0, save=False)
    enc = encode_dataset(tok, rows[:1])
    x, y = torch.tensor([enc["input_ids"][0]]), torch.tensor([enc["labels"][0]])
    with torch.no_grad():
        assert one.tuned.loss == pytest.approx(float(model(input_ids=x, labels=y).loss), rel=1e-5)
        with model.disable_adapter():
            assert one.base.loss == pytest.approx(float(model(input_ids=x, labels=y).loss), rel=1e-5)
    # answers: the tuned model's own greedy answer as the reference
    candidates = generate.default_prompts(tb_run, n=4) + generate.BUILTIN_PROMPTS
    answers = generate.compare(tb_run, prompts=candidates, max_new_tokens=8)
    prompt, tuned_answer = next((a["prompt"], a["tuned"]) for a in answers if a["tuned"].strip())
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"prompt": prompt, "completion": tuned_answer}) + "\n")
    assert cli.main(["eval", str(tb_run), "--data", str(data), "--answer-rows", "5",
                     "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "1 answered by both models" in out
    line = next(x for x in out.splitlines() if "exact match" in x)
    assert line.split()[-2:] == ["1/1", "(100%)"]
    assert next(x for x in out.splitlines() if "contains answer" in x).split()[-2:] == ["1/1", "(100%)"]
    # bad input: one line, exit 1
    assert cli.main(["eval", str(tb_run), "--data", str(tmp_path / "missing.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval failed: --data") and "\n" not in err
    assert cli.main(["eval", str(tb_run), "--lm-eval", "hellaswag"]) == 1 or \
        __import__("importlib").util.find_spec("lm_eval") is not None
    assert "need the network" in capsys.readouterr().err or __import__("importlib").util.find_spec("lm_eval")


def _merged_and_gguf_logits(merged_dir, path):
    """Logits of one sentence from the merged checkpoint and from the GGUF read back by
    transformers (it dequantizes on load), both in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = torch.tensor([tok("The capital of Canada is Ottawa.").input_ids])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                   dtype=torch.float32)(ids).logits
    return ref, got
