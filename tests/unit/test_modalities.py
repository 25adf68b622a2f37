"""engine/modalities: the registry of modalities, the chooser a run asks once, and each hook's
answer on builtin:tiny (text) and builtin:tiny-vl (image+text). The recipe asks the chosen
modality instead of testing whether it holds a processor."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine import modalities
from engine.core import config
from engine.dataset.rows import read_rows
from engine.core.registry import load
from engine.modalities import vision as vision_rows
from engine.modalities.base import Modality
from engine.models.runtime import runtime
from engine.models.source import ModelError, model_path

ROOT = Path(__file__).resolve().parents[2]
TEXT = ['model.name="builtin:tiny"', 'data.train="builtin:sample"', "data.max_length=128"]
VL = ['model.name="builtin:tiny-vl"', 'data.train="builtin:vl-sample"', "data.max_length=256"]


def _cfg(sets, *extra):
    return config.load(None, [*sets, *extra])


def test_registry_names_both_and_names_nothing_imports():
    assert modalities.names() == ("text", "vision") and modalities.DEFAULT == "text"
    for name in modalities.names():
        m = modalities.get(name)
        assert isinstance(m, Modality) and m.name == name and m.summary
        for spec in (m.training_set, m.collator, m.lora_targets, m.model_class):   # every string resolves
            assert callable(load(spec)) or hasattr(load(spec), "from_pretrained")
        assert not m.quant_skip or callable(load(m.quant_skip))
    with pytest.raises(KeyError, match="unknown modality 'audio'; valid: text, vision"):
        modalities.get("audio")
    # reading the names and getting a modality loads no torch and nothing of the training side
    code = ("import sys; from engine import modalities; modalities.names(); "
            "[modalities.get(n) for n in modalities.names()]; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('engine.training', 'engine.dataset', "
            "'engine.planning', 'engine.outputs'))]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_chooser_picks_by_the_model_and_refuses_images_for_a_text_model():
    text_cfg, vl_cfg = _cfg(TEXT), _cfg(VL)
    text_path, vl_path = model_path(text_cfg), model_path(vl_cfg)
    assert modalities.for_model(text_cfg, text_path) is modalities.get("text")
    assert modalities.for_model(vl_cfg, vl_path) is modalities.get("vision")
    assert modalities.for_run(text_cfg, text_path, "auto").name == "text"
    assert modalities.for_run(vl_cfg, vl_path, vision_rows.FORMAT).name == "vision"
    assert modalities.for_run(vl_cfg, vl_path, "conversational").name == "vision"   # text rows on a VL model
    with pytest.raises(ModelError) as e:
        modalities.for_run(text_cfg, text_path, vision_rows.FORMAT)
    assert str(e.value) == ("data.train has images but model.name = 'builtin:tiny' is a text-only model; "
                            "use an image-text model (e.g. Qwen/Qwen2-VL-7B-Instruct, or builtin:tiny-vl)")


def test_text_hooks_on_builtin_tiny():
    cfg = _cfg(TEXT)
    m = modalities.get("text")
    assert m.packs and m.lengths_known and not m.no_packing and not m.data_format and not m.quant_skip
    assert m.plan_line(cfg, 7) is None
    proc, tok, warnings = m.load_processing(cfg, model_path(cfg))
    assert proc is tok and hasattr(tok, "apply_chat_template") and isinstance(warnings, list)
    rows = read_rows(cfg)
    train, ev, w = load(m.training_set)(cfg, proc, rows)
    assert len(train) == len(rows.train) and w == []
    assert (ev is None) == (not rows.eval)
    assert set(train.column_names) == {"input_ids", "labels"} and all(len(x) > 0 for x in train["input_ids"])
    rt = runtime(cfg)
    args = SimpleNamespace()
    cfg.data.packing = False
    assert load(m.collator)(cfg, rt, tok, args) is None and vars(args) == {}     # TRL's own collator
    cfg.data.packing = True
    a, b = train[0], train[1]                     # two rows packed into one, as TRL packs them
    batch = load(m.collator)(cfg, rt, tok, args)([{"input_ids": a["input_ids"] + b["input_ids"],
                                                   "labels": a["labels"] + b["labels"],
                                                   "seq_lengths": [len(a["input_ids"]), len(b["input_ids"])]}])
    k = len(a["input_ids"])
    assert "attention_mask" not in batch and batch["position_ids"][0, k].item() == 0   # kept apart
    assert load(m.model_class).__name__ == "AutoModelForCausalLM"


def test_vision_hooks_on_builtin_tiny_vl():
    cfg = _cfg(VL)
    m = modalities.get("vision")
    assert not m.packs and not m.lengths_known and m.data_format == vision_rows.FORMAT
    assert m.no_packing == "packing off (image rows: each keeps its own visual tokens)"
    assert m.plan_line(cfg, 14) == "vision: frozen 16-bit vision tower; LoRA on 14 language-model layers"
    thawed = _cfg(VL, "model.freeze_vision_tower=false")
    assert m.plan_line(thawed, 20) == "vision: LoRA on the vision tower too; LoRA on 20 language-model layers"
    proc, tok, warnings = m.load_processing(cfg, model_path(cfg))
    assert proc is not tok and proc.tokenizer is tok and hasattr(proc, "image_processor") and warnings == []
    rows = read_rows(cfg)
    train, ev, w = load(m.training_set)(cfg, proc, rows)
    assert len(train) == len(rows.train) and w == [] and (ev is None) == (not rows.eval)
    item = train[0]                                   # encoded as the loader asks: pixels and all
    assert "pixel_values" in item and len(item["input_ids"]) == len(item["labels"])
    args = SimpleNamespace()
    collate = load(m.collator)(cfg, runtime(cfg), tok, args)
    assert args.remove_unused_columns is False and args.dataset_kwargs == {"skip_prepare_dataset": True}
    batch = collate([train[0], train[1]])
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] >= 2
    assert load(m.quant_skip)() == vision_rows.quant_skip_modules() and "lm_head" in load(m.quant_skip)()
    assert load(m.lora_targets) is vision_rows.lora_targets
    assert load(m.model_class).__name__ == "AutoModelForImageTextToText"


def test_the_recipe_asks_the_modality_and_never_tests_which_one_it_is():
    """engine/training/recipe.py and model.py name no modality and test for no processor: what
    differs by kind of row comes from the run's ``Modality``."""
    import re
    for rel in ("engine/training/recipe.py", "engine/training/model.py"):
        src = (ROOT / rel).read_text(encoding="utf-8")
        found = re.findall(r"proc is (?:not )?None|is_vision\w*|model_is_vision|modalities import vision|"
                           r"training import vision|ImageTextToText", src)
        assert found == [], (rel, found)
        assert "self.modality" in src or "modalities.for_model" in src
