"""Rows from beyond one local file: mixtures of sources (``[[data.sources]]``),
LLaMA-Factory's dataset_info.json with its column mapping, hub datasets by name (offline: a
save_to_disk directory, the local datasets cache, one line without network), and Axolotl's
``datasets:`` list imported as sources. Every test writes its own rows."""
import json
import os
import subprocess
import sys

import pytest

from engine.core import config
from engine.dataset import data, sources, specs
from engine.dataset.rows import load_for_training
from engine.dataset import inspect as inspect_mod
from tui_helpers import anyio_backend, isolated_settings  # noqa: F401 (fixtures)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def alpaca(n, tag):
    return [{"instruction": f"{tag} question {i}", "output": f"{tag} answer {i}"} for i in range(n)]


def sharegpt(n, tag):
    return [{"conversations": [{"from": "human", "value": f"{tag} q{i}"}, {"from": "gpt", "value": f"{tag} a{i}"}]}
            for i in range(n)]


def cfg_with(sources_, **data_kw):
    d = {"data": {"sources": sources_, **data_kw}, "model": {"name": "builtin:tiny"}}
    return config.from_dict(d)


def test_mixture_weights_rows_eval_per_source_and_interleave(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca(40, "A") + [{"instruction": "x"}])     # one bad row
    b = write_jsonl(tmp_path / "b.jsonl", sharegpt(20, "B"))
    c = write_jsonl(tmp_path / "c.jsonl", alpaca(10, "C"))
    cfg = cfg_with([{"path": a, "weight": 0.5}, {"path": b, "rows": 50}, {"path": c, "format": "alpaca"}],
                   eval_fraction=0.1)
    train, ev, shares = sources.load_mixture(cfg)
    # eval held out per source first: 4 of A's 40, 2 of B's 20, 1 of C's 10
    assert [s.eval for s in shares] == [4, 2, 1] and len(ev.rows) == 7
    # A: half of its 36 training rows; B: 50 drawn from 18 (repeats said); C: all 9
    assert [s.train for s in shares] == [18, 50, 9] and len(train.rows) == 77
    assert "rows repeat" in shares[1].notes[0]
    assert shares[0].problems == 1 and "missing field 'output'" in shares[0].first_problem
    assert [s.format for s in shares] == ["alpaca", "sharegpt", "alpaca"]
    held = {json.dumps(r.data) for r in ev.rows}
    assert not held & {json.dumps(r.data) for r in train.rows}    # no eval row is trained
    # concat keeps sources in order; interleave mixes them (same rows)
    tags = [r.data["messages"][0]["content"][0] for r in train.rows]
    assert tags == ["A"] * 18 + ["B"] * 50 + ["C"] * 9
    cfg2 = cfg_with(cfg.data.sources, eval_fraction=0.1, mix="interleave")
    train2, _, _ = sources.load_mixture(cfg2)
    tags2 = [r.data["messages"][0]["content"][0] for r in train2.rows]
    assert sorted(tags2) == sorted(tags) and tags2 != tags
    # the trainer reads the mixture through load_for_training
    tr, ev3 = load_for_training(cfg)
    assert len(tr.rows) == 77 and len(ev3.rows) == 7


def test_inspect_and_dataset_screen_show_each_source_share(tmp_path):
    from tui.screens.dataset import summary_text
    a = write_jsonl(tmp_path / "a.jsonl", alpaca(30, "A"))
    b = write_jsonl(tmp_path / "b.jsonl", sharegpt(10, "B"))
    (tmp_path / "b.jsonl").write_text((tmp_path / "b.jsonl").read_text() + "{broken\n")     # one bad line
    cfg = cfg_with([{"path": a, "rows": 30}, {"path": b, "weight": 1.0}], eval_fraction=0.0)
    rep = inspect_mod.inspect(cfg)
    assert rep.rows == 40 and rep.splits == {"train": 40, "eval": 0}
    assert [(s["train"], round(s["share"], 2), s["problems"]) for s in rep.sources] == [(30, 0.75, 0), (10, 0.25, 1)]
    text = inspect_mod.format_report(rep)
    assert "source 1 (a.jsonl): alpaca, 30 training rows (75% of the mix)" in text
    assert "source 2 (b.jsonl): sharegpt, 10 training rows (25% of the mix), 0 eval, 1 problems" in text
    shown = summary_text(rep, cfg).plain
    assert "source 2 (b.jsonl)" in shown and "25%" in shown and "invalid JSON" in shown
    # the preview pages through the mixture's rows, with the trainer's mask
    pv = inspect_mod.preview(cfg, 35)
    assert "B q5" in pv.text and any(t and "B a5" in s for s, t in pv.segments)


def test_each_source_lists_its_problems_by_file_and_line_and_findings_in_the_mix_name_their_source(tmp_path):
    from tui.screens.dataset import SourceLine, listed_lines
    a = write_jsonl(tmp_path / "a.jsonl", alpaca(12, "A"))
    rows = sharegpt(6, "B")
    rows[3]["conversations"][0]["value"] = "B q3 \x1b[31m red"       # a control character: the row stays usable
    lines = [json.dumps(r) for r in rows]
    lines[1:1] = ["{broken"]                                               # line 2
    lines.insert(4, json.dumps({"conversations": [{"from": "gpt", "value": "first"}]}))   # line 5: role order
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    cfg = cfg_with([{"path": a}, {"path": str(tmp_path / "b.jsonl")}], eval_fraction=0.0)
    rep = inspect_mod.inspect(cfg)
    b_src = rep.sources[1]
    assert [(p["line"], p["kind"]) for p in b_src["problem_lines"]] == [(2, "invalid_json"), (5, "role_order")]
    assert rep.sources[0]["problem_lines"] == [] and b_src["problems"] == 2
    # a problem found in the mixture's rows names the source file's line (row B q3 is b.jsonl line 6)
    ctrl = [p for p in rep.problems if p.kind == "control_chars"]
    assert len(ctrl) == 1 and ctrl[0].message.endswith("[source 2 (b.jsonl) line 6]")
    text = inspect_mod.format_report(rep)
    assert "    b.jsonl line 2: [invalid_json]" in text and "    b.jsonl line 5: [role_order]" in text
    listed = listed_lines(rep)
    src = [(ln, kind) for ln, kind, _ in listed if isinstance(ln, SourceLine)]
    assert src == [("b.jsonl:2", "invalid_json"), ("b.jsonl:5", "role_order")]
    assert src[0][0].path.endswith("b.jsonl") and src[0][0].line == 2
    assert inspect_mod.raw_line(src[0][0].path, src[0][0].line) == "{broken"
    doc = rep.to_dict()
    assert doc["sources"][1]["problem_lines"][0] == {"line": 2, "kind": "invalid_json",
                                                     "message": doc["sources"][1]["problem_lines"][0]["message"]}


def test_bad_sources_are_config_problems():
    with pytest.raises(config.ConfigError) as e:
        cfg_with([{"path": "a.jsonl", "weight": 1, "rows": 3}, {"format": "alpaca"}, {"path": "x", "colour": 1}])
    msg = str(e.value)
    assert "data.sources[0].rows" in msg and "weight or rows, not both" in msg
    assert "data.sources[1].path" in msg and "data.sources[2].colour" in msg


def test_llamafactory_dataset_info_column_mapping(tmp_path):
    rows = [{"q": f"Q{i}", "ctx": "", "a": f"A{i}", "sys": "Be kind.", "hist": [["hi", "hello"]]} for i in range(3)]
    write_jsonl(tmp_path / "alp.jsonl", rows)
    conv = [{"msgs": [{"role": "user", "content": "Weather?"},
                      {"role": "assistant", "content": json.dumps({"name": "w", "arguments": {}})},
                      {"role": "tool", "content": "sun"}, {"role": "assistant", "content": "Sunny."}],
             "fns": json.dumps([{"name": "w", "parameters": {}}])}]
    write_jsonl(tmp_path / "conv.jsonl", conv)
    info = {"my_alpaca": {"file_name": "alp.jsonl", "columns": {"prompt": "q", "query": "ctx", "response": "a",
                                                                   "system": "sys", "history": "hist"}},
            "my_tools": {"file_name": "conv.jsonl", "formatting": "sharegpt",
                         "columns": {"messages": "msgs", "tools": "fns"},
                         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                  "assistant_tag": "assistant", "observation_tag": "tool",
                                  "function_tag": "function_call"}}}
    # a LLaMA-Factory function turn is tagged function_call; make the second assistant turn one
    conv[0]["msgs"][1]["role"] = "function_call"
    write_jsonl(tmp_path / "conv.jsonl", conv)
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    ds = data.load(str(tmp_path / "dataset_info.json") + "#my_alpaca")
    assert not ds.problems and len(ds.rows) == 3
    assert [m["role"] for m in ds.rows[0].data["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert ds.rows[0].data["messages"][0]["content"] == "Be kind." and ds.rows[0].data["messages"][4]["content"] == "A0"
    ds2 = data.load(str(tmp_path / "dataset_info.json") + "#my_tools")
    assert not ds2.problems, ds2.problems
    m = ds2.rows[0].data["messages"]
    assert m[1]["tool_calls"][0]["function"]["name"] == "w" and m[2]["role"] == "tool"
    assert ds2.rows[0].data["tools"][0]["function"]["name"] == "w"
    # as a source (dataset = name), and a name it does not list: one line naming those it does
    cfg = cfg_with([{"path": str(tmp_path / "dataset_info.json"), "dataset": "my_alpaca"}], eval_fraction=0.0)
    assert len(load_for_training(cfg)[0].rows) == 3
    with pytest.raises(data.DataError) as e:
        data.load(str(tmp_path / "dataset_info.json") + "#nope")
    assert "no dataset 'nope'" in str(e.value) and "my_alpaca" in str(e.value)


def test_hub_dataset_offline_one_line_within_2s_and_save_to_disk_dir(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    code = ("import time; t = time.monotonic()\n"
            "from engine.dataset import data\n"
            "try:\n    data.load('hf:acme/toy@en:train')\nexcept data.DataError as e:\n    print(e)\n"
            "print(round(time.monotonic() - t, 2))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    msg, took = out.stdout.strip().splitlines()
    assert float(took) < 2.0
    assert msg.startswith("hf:acme/toy@en:train: not in the local datasets cache") and "save_to_disk(DIR)" in msg
    assert "data.train = DIR (a local directory)" in msg
    # the local alternative: a save_to_disk directory trains as it is
    from datasets import Dataset
    Dataset.from_list(alpaca(12, "H")).save_to_disk(str(tmp_path / "saved"))
    ds = data.load(str(tmp_path / "saved"))
    assert ds.format == "alpaca" and len(ds.rows) == 12


def test_hub_dataset_from_the_local_datasets_cache(tmp_path, monkeypatch):
    """A hub dataset in the local datasets cache loads offline by name. The cache entry is made
    by datasets itself (a hub-layout repository loaded from a local copy, filed under the
    hub name's cache folder, acme___toy), never from the network."""
    import datasets
    repo = tmp_path / "src" / "toy"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train.jsonl", alpaca(5, "T"))
    cache = tmp_path / "cache"
    datasets.load_dataset(str(repo), split="train", cache_dir=str(cache))
    (cache / "toy").rename(cache / "acme___toy")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    got = list(data.iter_raw("hf:acme/toy:train"))
    assert len(got) == 5 and got[0][1]["output"] == "T answer 0"
    ds = data.load("hf:acme/toy")
    assert ds.format == "alpaca" and len(ds.rows) == 5


def test_import_axolotl_maps_datasets_to_sources(tmp_path):
    from engine.outputs.axolotl import convert, to_toml_text
    yaml_text = ("base_model: builtin:tiny\n"
                 "datasets:\n"
                 "  - path: ./a.jsonl\n    type: alpaca\n"
                 "  - path: acme/chats\n    type: chat_template\n    split: train\n    name: en\n"
                 "  - path: ./c.jsonl\n    type: sharegpt\n")
    cfg_dict, unmapped, notes = convert(yaml_text)
    assert unmapped == []
    assert cfg_dict["data"]["sources"] == [
        {"path": "./a.jsonl", "format": "alpaca"},
        {"path": "hf:acme/chats", "format": "messages", "split": "train", "subset": "en"},
        {"path": "./c.jsonl", "format": "sharegpt"}]
    assert "train" not in cfg_dict["data"] and any("3 sources" in n for n in notes)
    path = tmp_path / "imported.toml"
    path.write_text(to_toml_text(cfg_dict, unmapped, notes))
    cfg = config.load(path)                          # the TOML round-trips through our loader
    assert [s["path"] for s in cfg.data.sources] == ["./a.jsonl", "hf:acme/chats", "./c.jsonl"]
    assert sources.source_spec(cfg, cfg.data.sources[1]) == "hf:acme/chats@en:train"
    assert sources.source_spec(cfg, cfg.data.sources[0]) == str(tmp_path / "a.jsonl")


def test_estimate_counts_the_mixture(tmp_path, capsys):
    from reliability_helpers import cli
    a = write_jsonl(tmp_path / "a.jsonl", alpaca(30, "A"))
    b = write_jsonl(tmp_path / "b.jsonl", sharegpt(10, "B"))
    (tmp_path / "run.toml").write_text(
        '[model]\nname = "builtin:tiny"\n[train]\nbatch_size = 2\ngrad_accum = 2\ndevice = "cpu"\n'
        '[data]\neval_fraction = 0.1\n'
        f'[[data.sources]]\npath = "{a}"\nweight = 2\n[[data.sources]]\npath = "{b}"\nrows = 5\n')
    # the CLI in this process (the same parser and output as `python -m engine`, no Python start-up)
    out = cli(capsys, "estimate", tmp_path / "run.toml", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)["data"]
    assert got["train_rows"] == 54 + 5 and got["eval_rows"] == 3 + 1
    assert got["steps_per_epoch"] == 15                      # 59 rows / (2 × 2)
    assert [s["train"] for s in got["sources"]] == [54, 5]
    text = cli(capsys, "estimate", tmp_path / "run.toml").stdout
    assert "data: mixture of 2 sources, 59 training rows, 4 eval" in text and "source 2 (b.jsonl)" in text


def test_dataset_info_pretraining_columns_read_as_text(tmp_path):
    write_jsonl(tmp_path / "c4.jsonl", [{"text": f"plain text {i}"} for i in range(4)])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"c4": {"file_name": "c4.jsonl",
                                                                    "columns": {"prompt": "text"}}}))
    ds = data.load(str(tmp_path / "dataset_info.json") + "#c4")
    assert ds.format == "text" and [r.data["text"] for r in ds.rows][:2] == ["plain text 0", "plain text 1"]


def test_inspector_rereads_when_the_majority_format_changes_and_splits_large_files_proportionally(tmp_path, monkeypatch):
    """The inspector keeps no record once counted: when the first 200 rows' format is not the
    file's majority, it reads the file again with the right one (same report as a file of the
    majority's rows alone, plus the mixed-format problem). Past SPLIT_EXACT_MAX rows the eval
    hold-out is a proportional share, said in the basis."""
    rows = [{"text": f"t {i}"} for i in range(250)] + alpaca(400, "M")
    p = write_jsonl(tmp_path / "mixed.jsonl", rows)
    cfg = config.from_dict({"model": {"name": "builtin:tiny"}, "data": {"eval_fraction": 0.1}})
    rep = inspect_mod.inspect(cfg, path=p)
    assert rep.format == "alpaca" and rep.rows == 400 and rep.raw_count == 650
    assert any(q.kind == "mixed_format" for q in rep.problems)
    assert rep.lines[0] == 251 and len(rep.lines) == 400
    only = inspect_mod.inspect(cfg, path=write_jsonl(tmp_path / "only.jsonl", alpaca(400, "M")))
    assert rep.stats == only.stats and rep.trained_tokens_total == only.trained_tokens_total
    cfg.data.train = p
    monkeypatch.setattr(inspect_mod, "SPLIT_EXACT_MAX", 100)
    big = inspect_mod.inspect(cfg)
    assert big.splits["eval"] == 40 and "scaled by the share kept for training" in big.steps_basis


def test_import_axolotl_single_hub_dataset_keeps_subset_and_split():
    from engine.outputs.axolotl import convert
    d, unmapped, _ = convert("base_model: builtin:tiny\ndatasets:\n  - path: acme/chats\n    type: alpaca\n"
                             "    name: en\n    split: validation\n")
    assert unmapped == [] and d["data"]["train"] == "hf:acme/chats@en:validation"
    assert specs.parse_hub(d["data"]["train"]) == ("acme/chats", "en", "validation")


def test_percentiles_from_value_counts_equal_numpys():
    import numpy as np
    from engine.dataset.quality import percentiles
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 101, 5000):
        a = rng.integers(0, 300, n).astype(np.int32)
        for q in (0, 25, 50, 75, 95, 100):
            assert percentiles(a, [q])[0] == pytest.approx(float(np.percentile(a, q)), abs=1e-9)


@pytest.mark.anyio
async def test_dataset_screen_opens_a_sources_problem_line_in_its_own_file(tmp_path, anyio_backend, isolated_settings):
    """The Problems tab lists a mixture source's problem as b.jsonl:LINE; Enter shows that line of
    the source file (its row is not in the mix)."""
    from tui_helpers import demo_cfg, make_app, plain, until
    a = write_jsonl(tmp_path / "a.jsonl", alpaca(8, "A"))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sharegpt(3, "B")) + "{broken here\n")
    cfg = demo_cfg(tmp_path, "data.eval_fraction=0.0")
    cfg.data.sources = [{"path": a}, {"path": str(tmp_path / "b.jsonl")}]
    app = make_app(cfg)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("f2")
        await until(pilot, lambda: app.screen.report is not None and app.screen.report.done,
                    timeout=180, what="report")
        table = app.screen.query_one("#problems")
        cells = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        assert "b.jsonl:4" in cells
        table.focus()
        table.move_cursor(row=cells.index("b.jsonl:4"))
        await pilot.press("enter")
        await until(pilot, lambda: "{broken here" in plain(app.screen.query_one("#row-view")),
                    timeout=30, what="the source's line")
        assert "b.jsonl:4" in plain(app.screen.query_one("#row-header"))
        assert "not in the mix" in plain(app.screen.query_one("#row-header"))
