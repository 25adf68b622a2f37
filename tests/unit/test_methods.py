"""engine/methods: the registry of training methods and what each one answers.

Every layer asks the method (``methods.of(cfg)``) instead of testing ``train.method``'s name: the
config's choices and checks, the planner's terms, the data a method takes, the artifact a run
leaves and the TRL classes the training side builds.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from engine import methods
from engine.core import config
from engine.core.registry import load
from engine.methods.base import ADAPTER, FULL, PAIRS, PREFERENCE, SFT, UNPAIRED

ROOT = Path(__file__).resolve().parents[2]
METHODS_DIR = ROOT / "engine" / "methods"


def test_registry_lists_every_method_file_and_is_the_configs_only_list():
    files = {p.stem for p in METHODS_DIR.glob("*.py")} - {"__init__", "base", "preference_base"}
    assert set(methods.names()) == files
    assert {"qlora", "lora", "galore", "dpo", "orpo", "kto", "simpo"} <= set(methods.names())
    assert methods.names()[0] == methods.DEFAULT == config.Config().train.method
    for name in methods.names():
        m = methods.get(name)
        assert m.name == name and m.summary and m.family in (SFT, PREFERENCE) and m.artifact in (ADAPTER, FULL)
    field = next(f for f in config.dataclasses.fields(config.TrainConfig) if f.name == "method")
    assert field.metadata["choices"] == list(methods.names())
    for name in methods.names():          # every registered name is a valid train.method
        assert config.load(None, [f'train.method="{name}"']).train.method == name


def test_an_unknown_method_is_one_line_naming_the_valid_ones():
    with pytest.raises(methods.UnknownMethod) as e:
        methods.get("full")
    msg = str(e.value)
    assert "\n" not in msg and "'full'" in msg and all(n in msg for n in methods.names())
    with pytest.raises(config.ConfigError) as e:
        config.load(None, ['train.method="full"'])
    assert "train.method" in str(e.value) and all(n in str(e.value) for n in methods.names())


def test_each_method_says_its_family_base_artifact_and_rows():
    cfg = config.Config()
    got = {n: (methods.get(n).family, methods.get(n).four_bit(cfg), methods.get(n).artifact) for n in methods.names()}
    assert got["qlora"] == (SFT, True, ADAPTER)
    assert got["lora"] == (SFT, False, ADAPTER)
    assert got["galore"] == (SFT, False, FULL)
    for n in ("dpo", "orpo", "kto", "simpo"):
        assert got[n] == (PREFERENCE, True, ADAPTER), n
        assert methods.get(n).rows[0] == (UNPAIRED if n == "kto" else PAIRS)
    assert methods.family(PREFERENCE) == tuple(n for n in methods.names() if got[n][0] == PREFERENCE)
    assert [methods.get(n).output_dir() for n in ("qlora", "galore")] == ["adapter", "model"]
    no4 = config.load(None, ["quant.load_in_4bit=false"])
    assert not any(methods.get(n).four_bit(no4) for n in methods.names())
    # DoRA is a LoRA option: it applies where there is an adapter
    dora = config.load(None, ["lora.use_dora=true"])
    assert methods.get("qlora").dora(dora) and methods.get("dpo").dora(dora) and not methods.get("galore").dora(dora)
    assert not methods.get("qlora").dora(config.Config())


@pytest.mark.parametrize("sets, field", [
    (['train.method="galore"', "distributed.gpus=2", 'distributed.strategy="fsdp"'], "train.method"),
    (['train.method="dpo"', "distributed.gpus=2", 'distributed.strategy="fsdp"'], "train.method"),
    (['train.method="kto"', "train.batch_size=1"], "train.batch_size"),
    (['train.method="qlora"', 'model.adapter="/somewhere"'], "model.adapter"),
    (['train.method="galore"', 'lora.init="pissa"'], "lora.init"),
    (['train.method="qlora"', 'lora.init="pissa"'], "lora.init"),
    (['train.method="lora"', 'lora.init="loftq"'], "lora.init"),
])
def test_the_method_checks_the_config(sets, field):
    method = sets[0].split('"')[1]
    with pytest.raises(config.ConfigError) as e:
        config.load(None, sets)
    assert [p.field for p in e.value.problems] == [field], e.value.problems
    # the same lines come from the method itself (the config only words them as Problems)
    cfg = config.Config()
    for s in sets:
        key, value = s.split("=", 1)
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value.strip('"') if value.startswith('"') else int(value))
    m = methods.get(method)
    assert [p[0] for p in m.validate(cfg) + m.init_problems(cfg)] == [field]


def test_valid_combinations_pass_every_method_check():
    for sets in (['train.method="kto"', "train.batch_size=2"], ['train.method="dpo"', 'model.adapter="/x"'],
                 ['train.method="galore"', "distributed.gpus=2", 'distributed.strategy="ddp"'],
                 ['train.method="qlora"', 'lora.init="loftq"'], ['train.method="lora"', 'lora.init="pissa"']):
        config.load(None, sets)


def test_planner_terms_come_from_the_method():
    from engine.methods import galore as galore_method
    from engine.methods.base import init_transient_bytes
    cfg = config.Config()
    tokens, seq, vocab, d = 2 * 512, 512, 32000, 2
    for n in methods.names():
        m = methods.get(n)
        if m.family == PREFERENCE:          # chosen + rejected (KTO: + the KL completion) per row
            assert m.sequences(3) == 6 and "6 sequences" in m.batch_note(3, seq)
            assert m.logits_bytes(tokens, seq, vocab, d) == tokens * vocab * 2 * d + seq * vocab * 8
            assert (m.reference_bytes(tokens, vocab, d) > 0) == m.reference == (n in ("dpo", "kto"))
        else:
            assert m.sequences(3) == 3 and m.logits_bytes(tokens, seq, vocab, d) is None
            assert m.reference_bytes(tokens, vocab, d) == 0
        want = 0 if m.artifact == FULL else init_transient_bytes("pissa", 4096, 1024)
        assert m.init_transient_bytes("pissa", 4096, 1024) == want
        assert m.init_transient_bytes("default", 4096, 1024) == 0
    dims = {"q_proj": (64, 64), "down_proj": (128, 64)}
    g = methods.get("galore")
    terms = g.trainable_terms(config.load(None, ['train.method="galore"']), dims, list(dims), 2, 2)
    assert terms["trainable"] == 2 * (64 * 64 + 128 * 64) and terms["grads"] == 2 * terms["trainable"]
    assert methods.get("qlora").trainable_terms(cfg, dims, list(dims), 2, 2) is None
    notes: list[str] = []
    assert g.gradient_peak(terms, 10**12, notes) == galore_method.BACKWARD_OVERLAP and notes == []
    assert g.gradient_peak(terms, 0, notes) == terms["grads"] + terms["step_transient"] + galore_method.BACKWARD_OVERLAP
    assert notes and "outgrow the activations" in notes[0]


def test_each_preference_methods_trl_classes_take_its_settings(tmp_path):
    for n in methods.names():           # every builder a method names resolves to a class or function
        m = methods.get(n)
        assert isinstance(load(m.trainer), type) and isinstance(load(m.trl_config), type)
        assert all(callable(load(spec)) for spec in (m.setup, m.optimizer) if spec)
    assert methods.get("galore").setup and not methods.get("qlora").setup
    from engine.training import sft         # the training side builds every method's trainer one way
    assert sft.trainer_class(methods.get("qlora")) is sft.QLoraTrainer
    for n in methods.names():
        cls, m = sft.trainer_class(methods.get(n)), methods.get(n)
        assert issubclass(cls, sft.QLoraTrainerMixin) and issubclass(cls, load(m.trainer)), n
    p = config.Config().preference
    for n in methods.family(PREFERENCE):
        m = methods.get(n)
        kw = m.trl_kwargs(p)
        args = load(m.trl_config)(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **kw)
        for k, v in kw.items():
            assert getattr(args, k) == v, (n, k)
        assert isinstance(load(m.trainer), type) and m.describe(p)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_methods_sit_below_the_layers_that_ask_them():
    above = ("engine.training", "engine.planning", "engine.outputs", "engine.cli", "engine.dataset", "tui")
    for path in METHODS_DIR.glob("*.py"):
        bad = [m for m in _imports(path) if m.startswith(above)]
        assert not bad, (path.name, bad)
    # the registry's names cost no import of a method; every method together loads no torch or TRL
    code = ("import sys; from engine import methods; assert not [m for m in sys.modules if m.startswith("
            "'engine.methods.') and m != 'engine.methods.base']; [methods.get(n) for n in methods.names()]; "
            "print(sorted(m for m in ('torch', 'trl', 'transformers', 'engine.training') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
