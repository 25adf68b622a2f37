"""After training: merge, side-by-side generation, vLLM serve command, Axolotl import (CPU)."""
from __future__ import annotations

import json
import shutil
import shlex
import tomllib
from pathlib import Path

import pytest

from outputs_fixtures import make_adapter, make_run_dir, make_tiny_model

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO.parent / "shared" / "seed" / "qlora-guide.txt"

# the seed guide's Axolotl Walkthrough YAML, exactly as the guide prints it (its indentation
# was lost: `type: chat_template` sits at the top level)
SEED_AXOLOTL_YAML = """\
base_model: meta-llama/Meta-Llama-3.1-8B-Instruct
model_type: LlamaForCausalLM
load_in_4bit: true
adapter: qlora
lora_r: 32
lora_alpha: 64
lora_dropout: 0.05
lora_target_modules:
- q_proj
- k_proj
- v_proj
- o_proj
- gate_proj
- up_proj
- down_proj
datasets:
- path: ./train.jsonl
type: chat_template
sequence_len: 4096
sample_packing: true
micro_batch_size: 2
gradient_accumulation_steps: 4
num_epochs: 3
learning_rate: 2e-4
warmup_ratio: 0.03
optimizer: paged_adamw_8bit
bf16: auto
flash_attention: true
output_dir: ./qlora_output
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny base model and one finished run directory over it."""
    root = tmp_path_factory.mktemp("outputs")
    base = make_tiny_model(root / "base")
    run = make_run_dir(root / "runs" / "20260101-120000-tiny", base)
    return {"root": root, "base": base, "run": run}


def _logits(model, tok, text):
    import torch
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------- merge

def test_merge_reproduces_base_plus_adapter(tiny, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.outputs.merge import merge

    seen = []
    out = tmp_path / "merged"
    report = merge(tiny["run"], out, dtype="fp32", on_progress=lambda f, m: seen.append((f, m)))

    assert report.max_abs_diff <= report.tolerance and report.max_abs_diff < 1e-4
    assert report.adapter_effect > 1e-3          # the adapter really changes the model
    assert report.top1_agreement == 1.0
    assert seen[0][0] == 0.0 and seen[-1][0] == 1.0
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    assert not list(out.glob("adapter_*"))        # a plain checkpoint, no PEFT files

    # plain transformers loads it, and it equals base + adapter but not the base
    tok = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32),
        str(tiny["run"] / "adapter")).eval()
    text = "what is the capital of canada ?"
    m, b, t = _logits(merged, tok, text), _logits(base, tok, text), _logits(tuned, tok, text)
    assert torch.allclose(m, t, atol=1e-4)
    assert (m - b).abs().max() > 1e-3


def test_merge_bf16_within_tolerance_and_check_rows(tiny, tmp_path):
    from engine.outputs.merge import merge

    rows = [{"messages": [{"role": "user", "content": "hello how are you ?"},
                          {"role": "assistant", "content": "i am fine"}]}, "the capital of france"]
    report = merge(tiny["run"] / "adapter", tmp_path / "m16", dtype="bf16", check_rows=rows)
    assert report.dtype == "bf16" and report.prompts == 2
    assert 0 < report.max_abs_diff <= report.tolerance
    cfg = json.loads((tmp_path / "m16" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_merge_refuses_missing_base(tiny, tmp_path):
    from engine.outputs.merge import MergeError, merge

    adapter = shutil.copytree(tiny["run"] / "adapter", tmp_path / "adapter")
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone" / "base-model")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(MergeError) as e:
        merge(adapter, tmp_path / "out")
    msg = str(e.value)
    assert "gone/base-model" in msg and "--base" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()

    # an unreachable hub id is named too (the tests run with HF_HUB_OFFLINE=1)
    with pytest.raises(MergeError, match="no-such-org/no-such-model"):
        merge(adapter, tmp_path / "out", base="no-such-org/no-such-model")


def test_merge_refuses_target_module_missing_in_base(tiny, tmp_path):
    from engine.outputs.merge import MergeError, merge

    adapter = shutil.copytree(tiny["run"] / "adapter", tmp_path / "adapter")
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "query_key_value"]   # a Falcon/GPT-NeoX name
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(MergeError) as e:
        merge(adapter, tmp_path / "out")
    msg = str(e.value)
    assert "query_key_value" in msg                     # the missing one
    assert "q_proj" in msg and "down_proj" in msg       # the modules the base does have
    assert "\n" not in msg and not (tmp_path / "out").exists()


def test_merge_refuses_base_of_another_size(tiny, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.outputs.merge import MergeError, merge

    other = tmp_path / "small-base"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 vocab_size=50)).save_pretrained(other)
    with pytest.raises(MergeError, match=r"hidden_size 64 vs 32"):
        merge(tiny["run"], tmp_path / "out", base=str(other))


def test_merge_refuses_src_without_adapter(tiny, tmp_path):
    from engine.outputs.merge import MergeError, merge

    empty_run = tmp_path / "run-no-adapter"
    empty_run.mkdir()
    (empty_run / "events.jsonl").write_text("")
    with pytest.raises(MergeError, match="no adapter found.*adapter_config.json"):
        merge(empty_run, tmp_path / "out")


def test_merge_cli_exit_codes(tiny, tmp_path, capsys):
    from engine.cli import main

    assert main(["merge", str(tiny["run"]), "--out", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "[100%] done" in out and "verified: max |logit diff|" in out
    assert main(["merge", str(tiny["run"]), "--out", str(tmp_path / "m")]) == 1   # exists
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("merge failed:") and "not empty" in err[0]


# --------------------------------------------------------------------------- serve-cmd

def test_serve_cmd_two_adapters_same_base(tiny, tmp_path):
    from engine.outputs.serve import serve_command

    runs = tmp_path / "runs"
    legal = make_run_dir(runs / "legal v1", tiny["base"], r=8, seed=2)
    medical = runs / "medical"
    make_adapter(tiny["base"], medical / "adapter", r=40, seed=3)
    text = serve_command([str(legal), str(medical / "adapter")], port=8123)

    command = text.split("\n\n")[0]
    argv = shlex.split(command.replace("\\\n", " "), comments=True)
    assert argv[:3] == ["vllm", "serve", str(tiny["base"].resolve())]
    assert "--enable-lora" in argv
    assert argv[argv.index("--max-loras") + 1] == "2"
    assert argv[argv.index("--max-lora-rank") + 1] == "64"     # 40 rounded up to a vLLM rank
    assert argv[argv.index("--port") + 1] == "8123"
    i = argv.index("--lora-modules")
    assert argv[i + 1:i + 3] == [f"legal-v1={(legal / 'adapter').resolve()}",
                                f"medical={(medical / 'adapter').resolve()}"]
    assert "/v1/chat/completions" in text and '"model": "legal-v1"' in text
    assert "extra_body" in text and "lora_request" in text

    named = serve_command([str(legal), str(medical)], names=["law", "med"])
    assert "law=" in named and "med=" in named and '"model": "law"' in named


def test_serve_cmd_refuses_different_bases(tiny, tmp_path):
    from engine.outputs.serve import ServeError, serve_command

    other = shutil.copytree(tiny["run"] / "adapter", tmp_path / "other" / "adapter")
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen2.5-7B-Instruct"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ServeError) as e:
        serve_command([str(tiny["run"]), str(tmp_path / "other")])
    msg = str(e.value)
    assert str(tiny["base"].resolve()) in msg and "Qwen/Qwen2.5-7B-Instruct" in msg
    with pytest.raises(ServeError, match="one name per adapter"):
        serve_command([str(tiny["run"])], names=["a", "b"])


def test_vllm_rank_rounding():
    from engine.outputs.serve import ServeError, vllm_rank

    assert [vllm_rank(r) for r in (1, 8, 9, 32, 33, 300, 321, 512)] == [8, 8, 16, 32, 64, 320, 512, 512]
    with pytest.raises(ServeError, match="513"):
        vllm_rank(513)


# --------------------------------------------------------------------------- Axolotl

def test_seed_yaml_is_the_guides():
    if not GUIDE.is_file():
        pytest.skip(f"developer check: the QLoRA guide this YAML was copied from is not at {GUIDE}")
    assert SEED_AXOLOTL_YAML.strip() in GUIDE.read_text(encoding="utf-8")


def test_axolotl_seed_yaml_converts(tmp_path):
    from engine.core import config
    from engine.outputs.axolotl import convert, to_toml_text

    cfg_dict, unmapped, notes = convert(SEED_AXOLOTL_YAML)
    assert unmapped == []
    cfg = config.from_dict(cfg_dict)
    assert cfg.model.name == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert cfg.model.attn_implementation == "flash_attention_2"
    assert cfg.quant.load_in_4bit is True and cfg.quant.compute_dtype == "auto"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (32, 64, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj",
                                       "gate_proj", "up_proj", "down_proj"]
    assert cfg.data.train == "./train.jsonl" and cfg.data.format == "messages"
    assert cfg.data.max_length == 4096 and cfg.data.packing is True
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs) == (2, 4, 3.0)
    assert cfg.train.learning_rate == 2e-4 and cfg.train.warmup_ratio == 0.03
    assert cfg.train.optimizer == "paged_adamw_8bit"
    assert cfg.output.dir == "./qlora_output"
    assert any("type" in n and "datasets[0].type" in n for n in notes)

    # the TOML round-trips through our loader
    path = tmp_path / "imported.toml"
    path.write_text(to_toml_text(cfg_dict, unmapped, notes, "config.yml"))
    assert "# Unmapped Axolotl keys: none" in path.read_text()
    assert config.load(path).to_dict() == cfg.to_dict()


def test_axolotl_unmapped_keys_and_cli(tmp_path, capsys):
    from engine.core import config
    from engine.outputs.axolotl import AxolotlError, convert
    from engine.cli import main

    yml = tmp_path / "cfg.yml"
    yml.write_text("""\
base_model: Qwen/Qwen2.5-0.5B
adapter: lora
lora_r: 16
lora_alpha: 32
lora_target_linear: true
peft_use_dora: true
datasets:
  - path: data/chat.jsonl
    type: alpaca
val_set_size: 0.1
max_steps: 200
warmup_steps: 20
lr_scheduler: one_cycle
optimizer: adamw_bnb_8bit
fp16: true
gradient_checkpointing: true
wandb_project: demo
special_tokens:
  pad_token: "<pad>"
""")
    cfg_dict, unmapped, notes = convert(yml)
    cfg = config.from_dict(cfg_dict)
    assert cfg.quant.load_in_4bit is False and cfg.quant.compute_dtype == "fp16"
    assert cfg.lora.target_modules == "all-linear" and cfg.lora.use_dora is True
    assert cfg.data.format == "alpaca" and cfg.data.eval_fraction == 0.1
    assert cfg.train.warmup_ratio == pytest.approx(0.1) and cfg.train.optimizer == "adamw_8bit"
    assert cfg.output.report_to == "wandb"
    assert sorted(unmapped) == ["lr_scheduler", "special_tokens"]
    assert any(n.startswith("unmapped lr_scheduler") for n in notes)

    out = tmp_path / "out.toml"
    assert main(["import-axolotl", str(yml), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Imported from the Axolotl config")
    assert "# Unmapped Axolotl keys: lr_scheduler, special_tokens" in text
    assert tomllib.loads(text)["lora"]["r"] == 16
    assert main(["import-axolotl", str(yml), "-o", str(out)]) == 1          # no overwrite
    assert "--force" in capsys.readouterr().err

    with pytest.raises(AxolotlError, match="line 1"):
        convert("a: b: c\n")
    with pytest.raises(AxolotlError, match="missing.yml: no such file"):
        convert(tmp_path / "missing.yml")


# --------------------------------------------------------------------------- generate

def test_generate_compare_base_and_tuned(tiny):
    from engine.outputs.generate import compare, default_prompts, format_text

    prompts = default_prompts(tiny["run"], n=3)
    assert prompts == ["what is the capital of canada ?", "hello how are you ?", "what is local ai ?"]

    results = compare(tiny["run"], prompts=["hello how are you ?", "what is local ai ?"],
                      max_new_tokens=6)
    assert [r["prompt"] for r in results] == ["hello how are you ?", "what is local ai ?"]
    for r in results:
        assert isinstance(r["base"], str) and isinstance(r["tuned"], str)
        assert r["base"] or r["tuned"]
    assert any(r["base"] != r["tuned"] for r in results)    # the adapter changes the answers
    # greedy decoding is deterministic
    again = compare(tiny["run"] / "adapter", prompts=["hello how are you ?"], max_new_tokens=6)
    assert again[0] == results[0]
    text = format_text(results, width=80)
    assert "--- BASE" in text and "--- TUNED" in text and "hello how are you ?" in text


def test_default_prompts_fallbacks(tmp_path):
    from engine.outputs.generate import BUILTIN_PROMPTS, default_prompts

    assert default_prompts(tmp_path, n=2) == BUILTIN_PROMPTS[:2]      # no config.toml
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": "answer"}]} for i in range(5)]
    (run / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.toml").write_text('[data]\ntrain = "data/train.jsonl"\neval = ""\n')
    assert default_prompts(run, n=2) == ["question 4", "question 3"]    # the last train rows
