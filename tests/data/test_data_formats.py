"""Data: every format and file type is detected (with the reason) and normalised; bad rows are
reported by physical line without aborting."""
import json

import pytest

from engine.dataset import data as data_mod
from engine.dataset.rows import load_for_training

ROWS = {
    "messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    "alpaca": {"instruction": "Say hi", "input": "to Bob", "output": "hi Bob"},
    "prompt_completion": {"prompt": "2+2=", "completion": "4"},
    "text": {"text": "plain text row"},
    "tokens": {"input_ids": [5, 6, 7, 8]},
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_detected_and_normalised(tmp_path, fmt):
    ds = data_mod.load(str(write_jsonl(tmp_path / "d.jsonl", [ROWS[fmt]] * 3)))
    assert ds.format == fmt
    assert ds.reason and "3 of 3" in ds.reason
    assert len(ds.rows) == 3 and not ds.problems
    row = ds.rows[0].data
    if fmt in ("messages", "sharegpt", "alpaca"):
        assert row["messages"][-1]["role"] == "assistant"
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    if fmt == "alpaca":
        assert row["messages"][0]["content"] == "Say hi\n\nto Bob"
    if fmt == "prompt_completion":
        assert row == {"prompt": "2+2=", "completion": "4"}
    if fmt == "tokens":      # pre-tokenised rows pass through the encoder untouched
        from engine.modalities import text as chat
        enc = chat.encode_batch(None, [row])[0]
        assert enc.input_ids == enc.labels == [5, 6, 7, 8]


def test_file_types(tmp_path):
    rows = [ROWS["prompt_completion"]] * 4
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    import csv
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    import datasets
    hf = datasets.Dataset.from_list(rows)
    hf.to_parquet(str(tmp_path / "d.parquet"))
    hf.save_to_disk(str(tmp_path / "dsdir"))
    for name in ("d.json", "d.csv", "d.parquet", "dsdir"):
        ds = data_mod.load(str(tmp_path / name))
        assert ds.format == "prompt_completion", name
        assert len(ds.rows) == 4, name
    # .json array: physical lines of items
    assert data_mod.load(str(tmp_path / "d.json")).rows[1].line > 2
    assert [r.line for r in data_mod.load(str(tmp_path / "d.csv")).rows] == [2, 3, 4, 5]


def test_compressed_tsv_json_cells_and_parquet_in_batches(tmp_path, monkeypatch):
    """Files as datasets are shipped: .jsonl/.json/.csv compressed with gzip, bz2 or xz (lines
    are the decompressed file's), tab-separated files, CSV cells holding a conversation or pairs
    as JSON, and parquet read a batch at a time (row numbers run on across batches)."""
    import bz2
    import csv
    import gzip
    import lzma
    chat = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]}
            for i in range(5)]
    body = "".join(json.dumps(r) + "\n" for r in chat) + "{broken\n"
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        fh.write(body)
    with bz2.open(tmp_path / "c.jsonl.bz2", "wt") as fh:
        fh.write(body)
    with lzma.open(tmp_path / "c.json.xz", "wt") as fh:
        fh.write(json.dumps(chat))
    for name in ("c.jsonl.gz", "c.jsonl.bz2"):
        ds = data_mod.load(str(tmp_path / name))
        assert ds.format == "messages" and [r.line for r in ds.rows] == [1, 2, 3, 4, 5], name
        assert [(p.line, p.kind) for p in ds.problems] == [(6, "invalid_json")], name
    assert len(data_mod.load(str(tmp_path / "c.json.xz")).rows) == 5
    with open(tmp_path / "a.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["instruction", "input", "output"])
        w.writerows([[f"do {i}", "", f"done, {i}"] for i in range(3)])
    ds = data_mod.load(str(tmp_path / "a.tsv"))
    assert ds.format == "alpaca" and ds.rows[2].data["messages"][1]["content"] == "done, 2"
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["messages", "note"])
        w.writerows([[json.dumps(r["messages"]), "[draft]"] for r in chat])
    ds = data_mod.load(str(tmp_path / "m.csv"))
    assert ds.format == "messages" and not ds.problems and ds.rows[0].data == chat[0]
    with open(tmp_path / "p.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerows([["[INST] Hi? [/INST]", json.dumps([{"role": "assistant", "content": "Hello."}]),
                      json.dumps([{"role": "assistant", "content": "No."}])]])
    row = data_mod.load(str(tmp_path / "p.csv")).rows[0].data
    assert row["prompt"] == [{"role": "user", "content": "[INST] Hi? [/INST]"}]
    assert row["chosen"] == [{"role": "assistant", "content": "Hello."}]
    import datasets
    monkeypatch.setattr(data_mod, "PARQUET_BATCH", 2)
    datasets.Dataset.from_list(chat).to_parquet(str(tmp_path / "c.parquet"))
    ds = data_mod.load(str(tmp_path / "c.parquet"))
    assert [r.line for r in ds.rows] == [1, 2, 3, 4, 5] and ds.rows[4].data == chat[4]
    (tmp_path / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(data_mod.DataError, match="decompress it first"):
        data_mod.load(str(tmp_path / "c.jsonl.zst"))


def test_problems_by_physical_line(tmp_path):
    good = json.dumps(ROWS["messages"])
    lines = [good, "{not json", "", good,
             json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
             json.dumps({"messages": [{"role": "assistant", "content": "a"}]}),
             json.dumps({"messages": [{"role": "wizard", "content": "a"}, {"role": "assistant", "content": "b"}]}),
             json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]}),
             json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}),
             json.dumps({"messages": "nope"}),
             json.dumps([1, 2])]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    ds = data_mod.load(str(p))
    kinds = {(pr.line, pr.kind) for pr in ds.problems}
    assert (2, "invalid_json") in kinds
    assert (5, "role_order") in kinds
    assert (6, "role_order") in kinds
    assert (7, "unknown_role") in kinds
    assert (8, "empty_content") in kinds
    assert (9, "non_string_content") in kinds
    assert (10, "wrong_type") in kinds
    assert (11, "not_object") in kinds or any(pr.line == 11 for pr in ds.problems)
    assert [r.line for r in ds.rows] == [1, 4]


def test_unusable_data_errors(tmp_path):
    from engine.core import config
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(data_mod.DataError, match="no rows"):
        load_for_training(config.load(None, [f'data.train="{empty}"']))
    with pytest.raises(data_mod.DataError, match="no such file"):
        load_for_training(config.load(None, [f'data.train="{tmp_path / "missing.jsonl"}"']))
    bad = tmp_path / "b.txt"
    bad.write_text("x")
    with pytest.raises(data_mod.DataError, match="unsupported file type"):
        data_mod.load(str(bad))
    mixed = write_jsonl(tmp_path / "m.jsonl", [ROWS["messages"], {"messages": []}])
    with pytest.raises(data_mod.DataError, match="strict"):
        load_for_training(config.load(None, [f'data.train="{mixed}"', "data.strict=true"]))


def test_mixed_formats_reported(tmp_path):
    ds = data_mod.load(str(write_jsonl(tmp_path / "m.jsonl", [ROWS["messages"]] * 3 + [ROWS["text"]])))
    assert ds.format == "messages"
    assert any(p.kind == "mixed_format" and p.line == 4 for p in ds.problems)


@pytest.mark.parametrize("rows, says", [
    ([{"prompt": "The sky is"}], "is prompt-only (TRL"),
    ([{"prompt": [{"role": "user", "content": "Hi?"}]}], "is prompt-only (TRL"),
    ([{"prompt": "9.8 or 9.11?", "completions": ["9.8 has .8", "so 9.8"], "labels": [True, True]}],
     "is TRL stepwise supervision"),
    ([{"instruction": "Hi?", "context": "", "response": "Hello.", "category": "qa"}],
     "its fields are category, context, instruction, response: rename them, or map them in a LLaMA-Factory "
     "dataset_info.json"),
])
def test_a_file_of_no_known_format_is_named_in_one_line(tmp_path, rows, says):
    """A file whose rows match no trainable format says what the rows are (TRL's prompt-only and
    stepwise types by name) or which fields they have and how to map them, with the file and line."""
    p = write_jsonl(tmp_path / "u.jsonl", [[1, 2]] + rows * 3)
    with pytest.raises(data_mod.DataError) as e:
        data_mod.load(str(p))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}: line 2") and says in msg, msg
