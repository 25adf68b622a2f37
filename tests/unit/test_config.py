"""Config: the seed's defaults, TOML round trip, --set, and validation of every problem at once."""
import tomllib

import pytest

from engine.core import config


def test_defaults_follow_the_seed_guide():
    cfg = config.Config()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (32, 64, 0.0)
    assert cfg.lora.target_modules == "all-linear"
    assert (cfg.train.learning_rate, cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum) == (2e-4, 3.0, 2, 4)
    assert cfg.train.warmup_ratio == 0.03
    assert cfg.data.max_length == 4096
    assert cfg.quant.load_in_4bit and cfg.quant.quant_type == "nf4" and cfg.quant.double_quant
    assert cfg.model.trust_remote_code is False


def test_required_key_names_exist():
    cfg = config.Config()
    for key in ["model.name", "data.train", "data.max_length", "lora.r", "lora.alpha", "train.max_steps",
                "train.learning_rate", "train.batch_size", "train.grad_accum", "train.gradient_checkpointing",
                "train.optimizer", "train.save_steps", "output.dir", "train.liger_kernel",
                "lora.use_dora", "lora.use_rslora", "lora.lora_fa"]:
        cfg.get(key)


def test_toml_round_trip(tmp_path):
    cfg = config.load(None, ["lora.r=8", "train.learning_rate=1e-4", 'lora.target_modules=["q_proj","v_proj"]',
                        "train.gradient_checkpointing=false"])
    p = tmp_path / "c.toml"
    config.save(cfg, p)
    back = config.load(p)
    assert back.to_dict() == cfg.to_dict()
    assert back.lora.target_modules == ["q_proj", "v_proj"]
    assert back.train.gradient_checkpointing is False


def test_all_problems_reported_at_once(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[lora]\nr = 0\nalpha = "big"\nrank = 3\n[train]\nlearning_rate = -1\noptimizer = "adam"\n'
                 '[nope]\nx = 1\n')
    with pytest.raises(config.ConfigError) as ei:
        config.load(p)
    fields = {pr.field for pr in ei.value.problems}
    assert {"lora.r", "lora.alpha", "lora.rank", "train.learning_rate", "train.optimizer", "nope"} <= fields
    text = str(ei.value)
    assert str(p) in text and "allowed" in text and "out of range" in text


def test_set_override_errors_name_the_field():
    with pytest.raises(config.ConfigError) as ei:
        config.load(None, ["train.batch_size=two", "bogus"])
    assert {p.field for p in ei.value.problems} >= {"--set"}
    with pytest.raises(config.ConfigError) as ei:
        config.load(None, ["train.batch_size=two"])
    assert ei.value.problems[0].field == "train.batch_size"


def test_bad_toml_and_missing_file(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("[train\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(p)
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(tmp_path / "missing.toml")


def test_starter_config_is_valid_and_commented(tmp_path):
    text = config.starter_toml()
    assert text.count("# ") > 40
    cfg = config.from_dict(tomllib.loads(text))
    assert cfg.to_dict() == config.Config().to_dict()


def test_init_command_writes_starter(tmp_path, capsys):
    from engine.cli import main
    out = tmp_path / "q.toml"
    assert main(["init", str(out)]) == 0
    assert config.load(out).lora.r == 32
    assert main(["init", str(out)]) == 2   # no silent overwrite


def test_demo_toml_matches_the_tui_demo():
    from engine.models.builtin import DEMO_OVERRIDES
    from pathlib import Path
    demo = config.load(Path(__file__).resolve().parents[2] / "examples" / "demo.toml").to_dict()
    assert demo == config.load(None, DEMO_OVERRIDES).to_dict()


def test_readme_documents_every_config_key():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [f"{s}.{k}" for s, items in config.field_specs().items() for k, _ in items
               if f"`{s}.{k}`" not in readme]
    assert missing == []
