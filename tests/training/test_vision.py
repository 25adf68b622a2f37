"""Vision-language QLoRA on builtin:tiny-vl: the two data formats, image checks by line, the
label mask (visual tokens never trained), a real CPU run headless, and the Dataset screen."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.core import config
from engine.core.summary import State
from engine.dataset import data as data_mod
from engine.modalities import vision
from engine.models.builtin import tiny_vl_model_dir, vl_sample_dir
from engine.training.vision import longest_row
from tui_helpers import anyio_backend, plain  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
SAMPLE = vl_sample_dir()


def _vl_cfg(*extra):
    return config.load(None, ['model.name="builtin:tiny-vl"', 'data.train="builtin:vl-sample"',
                         "data.max_length=256", *extra])


def _write_mixed(d: Path) -> Path:
    """Both formats, plus a missing image, a corrupt one and a placeholder-count mismatch."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "imgs").mkdir()
    for name in ("00-red-circle.png", "13-red-square.png", "30-blue-triangle.png"):
        shutil.copy(SAMPLE / name, d / "imgs" / name)
    (d / "imgs" / "corrupt.png").write_bytes((SAMPLE / "01-red-circle.png").read_bytes()[:60])
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/00-red-circle.png"},
                                                   {"type": "text", "text": "What is it?"}]},
                      {"role": "assistant", "content": "A red circle."}]},
        {"conversations": [{"from": "human", "value": "<image>Which shape?"}, {"from": "gpt", "value": "A square."}],
         "images": ["imgs/13-red-square.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/nope.png"},
                                                   {"type": "text", "text": "And this?"}]},
                      {"role": "assistant", "content": "Missing."}]},
        {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Broken."}],
         "images": ["imgs/corrupt.png"]},
        {"messages": [{"role": "user", "content": "<image> and <image>?"}, {"role": "assistant", "content": "Two."}],
         "images": ["imgs/30-blue-triangle.png"]},
        {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Yellow."}],
         "images": ["imgs/30-blue-triangle.png"]},
    ]
    p = d / "vl.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_both_formats_detected_and_every_image_checked_by_line(tmp_path):
    p = _write_mixed(tmp_path / "data")
    ds = data_mod.load(str(p))
    assert ds.format == "vision" and "image" in ds.reason
    assert [r.line for r in ds.rows] == [1, 2, 6]
    by_line = {pr.line: pr for pr in ds.problems}
    assert by_line[3].kind == "bad_image" and "does not exist" in by_line[3].message
    assert by_line[4].kind == "bad_image" and "corrupt.png" in by_line[4].message
    assert by_line[5].kind == "image_count"
    # paths are relative to the data file, and both formats normalise to the same shape
    r1, r2 = ds.rows[0].data, ds.rows[1].data
    assert r1["images"] == [str((p.parent / "imgs" / "00-red-circle.png").resolve())]
    assert r2["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "Which shape?"}]
    assert r2["image_info"][0]["format"] == "PNG" and r2["image_info"][0]["width"] == 56


def test_openai_inline_images_are_decoded_and_urls_refused_by_line(tmp_path):
    """OpenAI's image parts: a base64 data URI is decoded once into the cache (named by its
    hash) and trained; a URL is one line (nothing is downloaded at run time)."""
    import base64
    raw = (SAMPLE / "00-red-circle.png").read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(raw).decode()

    def row(src, answer):
        return {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                          {"type": "image_url", "image_url": {"url": src}}]},
                             {"role": "assistant", "content": answer}]}
    p = tmp_path / "oa.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [
        row(uri, "A red circle."), row("https://example.com/cat.jpg", "A cat."), row(uri, "Red."),
        row("data:image/png;base64,@@@", "Broken.")]))
    ds = data_mod.load(str(p))
    assert ds.format == "vision" and [r.line for r in ds.rows] == [1, 3]
    cached = Path(ds.rows[0].data["images"][0])
    assert cached.read_bytes() == raw and cached == Path(ds.rows[1].data["images"][0])
    assert ds.rows[0].data["image_info"][0]["format"] == "PNG"
    by_line = {pr.line: pr.message for pr in ds.problems}
    assert set(by_line) == {2, 4}
    assert "is a URL: nothing is downloaded" in by_line[2] and "base64" not in by_line[2]
    assert len(by_line[4]) < 200


def test_image_paths_relative_to_the_project_root_are_found(tmp_path):
    """LLaMA-Factory v1 writes image paths relative to its project root (data/imgs/a.png beside
    data/file.jsonl): not beside the data file, they are looked for in its parent folders."""
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    shutil.copy(SAMPLE / "00-red-circle.png", tmp_path / "data" / "imgs" / "a.png")
    p = tmp_path / "data" / "v1.jsonl"
    p.write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image_url", "value": "data/imgs/a.png"}, {"type": "text", "value": "?"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "A circle."}]}]}) + "\n")
    ds = data_mod.load(str(p))
    assert not ds.problems and ds.rows[0].data["images"] == [str(tmp_path / "data" / "imgs" / "a.png")]


def test_label_mask_never_trains_visual_tokens(tmp_path):
    cfg = _vl_cfg()
    ds = data_mod.load(cfg.resolve_path(cfg.data.train))
    assert len(ds.rows) == 36 and not ds.problems
    proc = vision.processor_for(cfg)
    item = vision.encode_row(proc, ds.rows[0].data, 256)
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    img = vision.image_token_id(proc)
    n_img = ids.count(img)
    assert n_img == vision.visual_token_counts(proc, ds.rows[0].data["image_info"])[0] > 1
    assert all(lab == -100 for t, lab in zip(ids, labels) if t == img)
    trained = proc.tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert trained == ds.rows[0].data["messages"][1]["content"] + "<|im_end|>"
    assert item["pixel_values"].shape[0] == int(item["image_grid_thw"].prod())
    # the inspector counts the visual tokens in the lengths and lists images in its JSON
    from engine.dataset import inspect as inspect_mod
    rep = inspect_mod.inspect(cfg)
    assert rep.images["count"] == 36 and rep.images["bad_images"] == 0
    assert rep.stats["max"] >= len(ids) and rep.to_dict()["images"]["visual_tokens_total"] >= 36 * 4
    many = tmp_path / "many.jsonl"          # four images: their visual tokens pass max_length = 24
    parts = [{"type": "image", "image": str(SAMPLE / f"{i:02d}-red-circle.png")} for i in range(3)]
    many.write_text(json.dumps({"messages": [{"role": "user", "content": parts + parts[:1]},
                                             {"role": "assistant", "content": "Circles."}]}) + "\n")
    small = inspect_mod.inspect(_vl_cfg("data.max_length=24", f'data.train="{many}"'))
    assert (1, "image_tokens") in [(p.line, p.kind) for p in small.problems]
    assert small.truncated_rows == 1


def test_vlm_qlora_headless_run_trains_the_language_model_only(tmp_path, capsys):
    from reliability_helpers import cli
    sets = ['model.name="builtin:tiny-vl"', 'data.train="builtin:vl-sample"', f'output.dir="{tmp_path / "runs"}"',
            "train.max_steps=6", "train.eval_steps=0", "train.save_steps=3", "train.learning_rate=5e-3",
            "train.logging_steps=1"]
    # the CLI in this process (no Python start-up of its own; other tests run it as a process)
    p = cli(capsys, "train", REPO / "examples" / "demo.toml", "--headless", *[a for s in sets for a in ("--set", s)])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    run_dir = next((tmp_path / "runs").iterdir())
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    acfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    targets = acfg["target_modules"]
    assert targets and not any(vision.is_vision_module(t) for t in targets)
    from safetensors import safe_open
    with safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("visual" not in k for k in keys) and any("language_model" in k for k in keys)
    assert (run_dir / "adapter" / "processor_config.json").exists()     # the processor travels along


@pytest.mark.anyio
async def test_dataset_screen_shows_image_problems_tokens_and_a_preview_then_trains(tmp_path, monkeypatch):
    from tui_helpers import demo_cfg, make_app, until
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    p = _write_mixed(tmp_path / "data")
    app = make_app(demo_cfg(tmp_path, 'model.name="builtin:tiny-vl"', f'data.train="{p}"', "train.max_steps=3",
                            "train.eval_steps=0", "train.save_steps=0", "train.batch_size=1"))
    async with app.run_test(size=(110, 44)) as pilot:
        await pilot.press("f2")
        await until(pilot, lambda: app.screen.report is not None and app.screen.report.done,
                    timeout=180, what="report")
        summary = plain(app.screen.query_one("#ds-summary"))
        assert "vision" in summary and "images" in summary and "missing/unreadable 2" in summary
        table = app.screen.query_one("#problems")
        cells = [" ".join(map(str, table.get_row_at(i))) for i in range(table.row_count)]
        assert any("3" in c and "does not exist" in c for c in cells)
        assert any("4" in c and "corrupt.png" in c for c in cells)
        await until(pilot, lambda: "tokens" in plain(app.screen.query_one("#row-header")),
                    timeout=120, what="preview")
        view = app.screen.query_one("#row-view").render()
        text = str(view)
        assert "[image 1: 48x48 PNG, 4 tokens]" in text
        info = str(app.screen.query_one("#row-images .image-info").render())
        assert "00-red-circle.png" in info and "visual tokens (not trained)" in info
        assert app.screen.query_one("#row-images Thumbnail").pic.blocks      # its picture (tests/screens/test_images.py)
        # the image placeholder is shown as context, the answer as trained
        spans = {text[s.start:s.end]: str(s.style) for s in view.spans}
        from rich.color import Color
        r, g, b = Color.parse(app.get_css_variables()["success"].split()[0]).get_truecolor()
        trained = f"rgb({r},{g},{b})"                  # the theme's $success, as the screen resolves it
        assert any("A red circle." in k and trained in v for k, v in spans.items()), spans
        assert all(trained not in v for k, v in spans.items() if "[image 1" in k)
        # and the same config trains from the Train screen (the bad rows skipped)
        await pilot.press("f4", "ctrl+r")
        await until(pilot, lambda: app.run_state is not None and app.run_state.ended, timeout=300,
                    what="end of run")
        assert app.run_state.state == State.FINISHED, app.run_state.message
        assert (app.run_state.run_dir / "adapter" / "adapter_model.safetensors").exists()
        await pilot.press("ctrl+q")
        await pilot.pause()



def test_estimate_counts_the_vision_tower_and_per_image_activations():
    from engine.planning import estimate as estimate_mod
    q7 = {"model_type": "qwen2_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
          "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
          "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "hidden_size": 3584,
                            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}}
    text_only = {k: v for k, v in q7.items() if k != "vision_config"}
    cfg = config.load(None, ['train.device="cuda"', "data.max_length=2048"])
    vl, txt = estimate_mod.estimate(cfg, q7), estimate_mod.estimate(cfg, text_only)
    b = vl.breakdown
    assert 600e6 * 2 < b["vision_weights"] < 750e6 * 2          # Qwen2-VL-7B's ~675 M-param tower, 16-bit
    assert b["vision_activations"] > 0 and txt.breakdown["vision_weights"] == 0
    assert vl.peak_bytes > txt.peak_bytes + b["vision_weights"]
    bigger = estimate_mod.estimate(config.load(None, ['train.device="cuda"', "data.max_length=2048", "train.batch_size=4"]), q7)
    assert bigger.breakdown["vision_activations"] == 2 * b["vision_activations"]     # per image, per row
    report = estimate_mod.format_report(vl, None)
    assert "vision tower, 16-bit" in report and "vision tower" not in estimate_mod.format_report(txt, None)


def test_4bit_load_keeps_the_vision_tower_16_bit_and_lora_off_it():
    from engine.training import model as model_mod
    from engine.models.runtime import runtime
    cfg = _vl_cfg()
    rt = runtime(cfg)
    if not rt.load_in_4bit:
        pytest.skip("bitsandbytes 4-bit unavailable on this CPU")
    model = model_mod.load_model(cfg, rt)
    kinds = {(vision.is_vision_module(n), type(m).__name__) for n, m in model.named_modules()
             if type(m).__name__ in ("Linear", "Linear4bit")}
    assert (True, "Linear") in kinds and (True, "Linear4bit") not in kinds
    assert (False, "Linear4bit") in kinds
    targets = vision.lora_targets(cfg, model)
    assert len(targets) == 14 and not any(vision.is_vision_module(t) for t in targets)
    thawed = vision.lora_targets(config.load(None, ['model.name="builtin:tiny-vl"', "model.freeze_vision_tower=false"]), model)
    assert any(vision.is_vision_module(t) for t in thawed) and set(targets) < set(thawed)


def test_checkpointing_offload_and_streaming_act_on_the_language_models_layers():
    """The planner counts the language model's layers; checkpoint_layers / activation offload and
    weight streaming must act on those, not on the vision blocks (which come first in the model)."""
    from transformers import AutoModelForImageTextToText
    from engine.training import offload, streaming
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_vl_model_dir()))
    assert any(type(m).__name__ == "Qwen2VLVisionBlock" for m in model.modules())
    for layers in (offload.decoder_layers(model), list(streaming.decoder_layers(model) or [])):
        assert [type(m).__name__ for m in layers] == ["Qwen2VLDecoderLayer"] * 2


def test_planner_plans_image_rows_for_their_longest_row_and_stays_sane_under_a_small_budget():
    from engine.planning import estimate as estimate_mod
    from engine.training import trainer
    cfg = _vl_cfg("data.max_length=4096")
    ds = data_mod.load("builtin:vl-sample", "auto")
    proc = vision.processor_for(cfg)
    longest = longest_row(cfg, ds.format, [r.data for r in ds.rows])
    assert longest == max(vision.row_tokens(proc, r.data)["total"] for r in ds.rows) < 4096
    text = data_mod.load("builtin:sample", "auto")
    assert longest_row(cfg, text.format, [r.data for r in text.rows]) is None       # text rows
    reasons = []
    planned = trainer._planned_rows(cfg, longest, reasons)
    assert planned.data.max_length == longest and cfg.data.max_length == 4096 and "longest image row" in reasons[0]
    assert trainer._planned_rows(cfg, 5000, []) is cfg
    # Qwen2-VL-7B at plain TRL's measured 8.73 GiB, ~600-token image rows, effective batch 4
    q7 = {"model_type": "qwen2_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
          "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
          "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "hidden_size": 3584,
                            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}}
    gpu = int(8.73 * 2**30)
    base = ['train.device="cuda"', "train.batch_size=4", "train.grad_accum=1", "lora.r=32"]
    short = estimate_mod.plan(config.load(None, base + ["data.max_length=600"]), q7, gpu)
    full = estimate_mod.plan(config.load(None, base + ["data.max_length=4096"]), q7, gpu)
    assert short.estimate.device_bytes <= gpu * (1 - estimate_mod.HEADROOM)
    assert short.estimate.breakdown["vision_weights"] > 2**30 and short.estimate.breakdown["vision_activations"] > 0
    assert short.gradient_checkpointing and short.checkpoint_layers == 28           # every LM layer, not more
    assert short.batch_size * short.grad_accum == 4 == full.batch_size * full.grad_accum
    assert full.streaming and not short.streaming     # planned for 4096-token rows it would stream the base
