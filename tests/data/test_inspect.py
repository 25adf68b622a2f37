"""The dataset inspector: formats, problems by physical line, token statistics that match the
trainer's encoder, the label-mask preview against what TRL trains on, duplicates and PII."""
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from engine.core import config
from engine.dataset import inspect as inspect_mod
from engine.dataset import quality

REPO = Path(__file__).resolve().parents[2]


def cfg_for(*overrides):
    return config.load(None, ["model.name=\"builtin:tiny\"", *overrides])


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines),
                    encoding="utf-8")
    return path


def conv(u, a, system=None):
    m = [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    if system:
        m.insert(0, {"role": "system", "content": system})
    return {"messages": m}


def problems_by_kind(rep):
    out = {}
    for p in rep.problems:
        out.setdefault(p.kind, []).append(p.line)
    return out


# ---- formats ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,row", [
    ("messages", conv("hi there", "hello!")),
    ("sharegpt", {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}),
    ("alpaca", {"instruction": "say hi", "input": "", "output": "hi"}),
    ("prompt_completion", {"prompt": "2+2=", "completion": " 4"}),
    ("text", {"text": "plain language modelling text"}),
])
def test_each_format_detected_with_evidence(tmp_path, fmt, row):
    path = write_lines(tmp_path / "d.jsonl", [row] * 3)
    rep = inspect_mod.inspect(cfg_for(), path=str(path))
    assert rep.done and rep.format == fmt
    assert rep.format_reason.startswith("3 of 3 rows have")
    assert set(rep.fields_seen) == set(row) and all(v == 3 for v in rep.fields_seen.values())
    assert rep.rows == 3 and rep.stats["min"] > 0 and rep.trained_tokens_total > 0
    assert rep.to_dict()["format"]["name"] == fmt


def test_csv_and_json_array_files(tmp_path):
    csvp = tmp_path / "d.csv"
    csvp.write_text("prompt,completion\nhello,world\nfoo,bar\n", encoding="utf-8")
    rep = inspect_mod.inspect(cfg_for(), path=str(csvp))
    assert rep.format == "prompt_completion" and rep.rows == 2
    js = tmp_path / "d.json"
    js.write_text('[\n {"text": "a b c"},\n {"text": 5}\n]\n', encoding="utf-8")
    rep = inspect_mod.inspect(cfg_for(), path=str(js))
    assert rep.format == "text" and rep.rows == 1
    assert [(p.line, p.kind) for p in rep.problems] == [(3, "wrong_type")]


def test_mixed_formats_reported(tmp_path):
    rows = [conv("q%d" % i, "a%d" % i) for i in range(5)] + [{"prompt": "p", "completion": "c"}] * 2
    rep = inspect_mod.inspect(cfg_for(), path=str(write_lines(tmp_path / "m.jsonl", rows)))
    assert rep.format == "messages" and rep.formats_seen == {"messages": 5, "prompt_completion": 2}
    mixed = [p for p in rep.problems if p.kind == "mixed_format"]
    assert len(mixed) == 1 and mixed[0].line == 6 and "prompt_completion (2 rows" in mixed[0].message


# ---- problems by physical line -----------------------------------------------------------

def test_each_problem_kind_with_its_physical_line(tmp_path):
    good = conv("hello", "hi")
    lines = [
        good,                                                                      # 1
        '{"messages": [oops',                                                      # 2 invalid_json
        "",                                                                        # 3 blank: skipped
        '["not", "an", "object"]',                                                 # 4 not_object
        {"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]},   # 5 missing_field
        {"messages": "not a list"},                                                # 6 wrong_type
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 7
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]},                     # 8 role_order
        {"messages": [{"role": "user", "content": "a"}]},                          # 9 role_order (no assistant)
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},  # 10
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]},  # 11
        {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "y"}]},   # 12
        conv("word " * 300, "short answer"),                                       # 13 no_trained_tokens
        good,                                                                      # 14
    ]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    rep = inspect_mod.inspect(cfg_for("data.max_length=64"), path=str(path))
    kinds = problems_by_kind(rep)
    assert kinds == {"invalid_json": [2], "not_object": [4], "missing_field": [5], "wrong_type": [6],
                     "unknown_role": [7], "role_order": [8, 9, 10], "empty_content": [11],
                     "non_string_content": [12], "no_trained_tokens": [13]}
    msgs = {p.line: p.message for p in rep.problems}
    assert "two user turns" in msgs[8] and "no assistant turn" in msgs[9] and "assistant speaks first" in msgs[10]
    assert "max_length = 64" in msgs[13]
    assert rep.rows == 3 and rep.zero_trained_rows == 1 and rep.truncated_rows == 1
    d = rep.to_dict()
    assert all(set(p) == {"line", "kind", "message"} for p in d["problems"])
    assert d["problem_counts"]["role_order"] == 3


def test_thousand_rows_ten_percent_malformed(tmp_path):
    lines, bad = [], []
    for i in range(1, 1001):
        if i % 10 == 0:
            lines.append('{"messages": [{"role": "user", "content": "broken' if i % 20 else
                         {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]})
            bad.append(i)
        else:
            lines.append(conv(f"question number {i}", f"answer number {i} " * (1 + i % 7)))
    rep = inspect_mod.inspect(cfg_for(), path=str(write_lines(tmp_path / "k.jsonl", lines)))
    assert rep.done and rep.raw_count == 1000 and rep.rows == 900
    assert sorted(p.line for p in rep.problems) == bad
    assert {p.kind for p in rep.problems} == {"invalid_json", "non_string_content"}
    assert rep.stats["min"] > 0 and rep.stats["max"] >= rep.stats["p95"] >= rep.stats["median"]
    assert sum(c for _, _, c in rep.histogram) == 900
    assert rep.steps_per_epoch > 0 and rep.trained_tokens_total > 0


# ---- statistics agree with the trainer's encoder ------------------------------------------

def exact_stats(cfg, path):
    """The statistics recomputed row by row through engine.modalities.text.encode_dataset."""
    from engine.dataset import data as data_mod
    from engine.modalities.text import encode_dataset
    tok, _ = inspect_mod.tokenizer_for(cfg)
    ds = data_mod.load(str(path), cfg.data.format)
    enc = encode_dataset(tok, [r.data for r in ds.rows])
    L = cfg.data.max_length
    lengths = [len(x) for x in enc["input_ids"]]
    kept = [sum(1 for t in lab[:L] if t != -100) for lab in enc["labels"]]
    return lengths, kept


def varied_rows():
    rows = []
    pieces = ["héllo wörld", "🙂🙂 emoji", "日本語のテキスト", "  spaced  out  ", "tabs\tand\nnewlines\n",
              "<|im_end|> literal", "x" * 120, "capital of Canada?"]
    for i in range(60):
        p = pieces[i % len(pieces)]
        q = pieces[(i * 3 + 1) % len(pieces)]
        if i % 3 == 0:
            rows.append(conv(p, q, system="sys " + q))
        elif i % 3 == 1:
            rows.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": q},
                                      {"role": "user", "content": q + p}, {"role": "assistant", "content": p}]})
        else:
            rows.append(conv(q * 3, p))
    return rows


@pytest.mark.parametrize("max_length", [32, 4096])
def test_fast_counts_equal_trainer_encoding(tmp_path, max_length):
    cfg = cfg_for(f"data.max_length={max_length}")
    path = write_lines(tmp_path / "v.jsonl", varied_rows())
    rep = inspect_mod.inspect(cfg, path=str(path))
    lengths, kept = exact_stats(cfg, path)
    assert rep.stats["min"] == min(lengths) and rep.stats["max"] == max(lengths)
    assert rep.trained_tokens_total == sum(kept)
    assert rep.zero_trained_rows == sum(1 for k in kept if k == 0)
    assert rep.truncated_rows == sum(1 for n in lengths if n > max_length)
    assert not any("disagreed" in w for w in rep.warnings)


def test_fast_counts_with_bos_adding_tokenizer(tmp_path):
    """prompt/completion and text rows take add_special_tokens=True: a zero-width BOS is never trained."""
    from tokenizers import processors
    cfg = cfg_for()
    tok, _ = inspect_mod.tokenizer_for(cfg)
    backend = tok.backend_tokenizer
    saved = backend.post_processor
    try:
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.convert_tokens_to_ids("<|begin_of_text|>"))])
        rows = [{"prompt": f"prompt {i} 🙂", "completion": f" completion {i} é" * (i % 4 + 1)} for i in range(30)]
        path = write_lines(tmp_path / "pc.jsonl", rows)
        rep = inspect_mod.inspect(cfg, path=str(path))
        lengths, kept = exact_stats(cfg, path)
        assert lengths[0] == len(tok(rows[0]["prompt"] + rows[0]["completion"] + tok.eos_token)["input_ids"])
        assert rep.trained_tokens_total == sum(kept) and rep.stats["max"] == max(lengths)
        assert not any("disagreed" in w for w in rep.warnings)
    finally:
        backend.post_processor = saved


# ---- the preview is the trainer's mask ------------------------------------------------------

def _trl_trainer(cfg, tok, rows, out_dir):
    """An SFTTrainer on builtin:tiny fed exactly as engine.training.trainer feeds it."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    from engine.models.source import model_path
    from engine.modalities.text import encode_dataset
    model = AutoModelForCausalLM.from_pretrained(model_path(cfg))
    args = SFTConfig(output_dir=str(out_dir), max_length=cfg.data.max_length, packing=False,
                     report_to=[], use_cpu=True, per_device_train_batch_size=1, disable_tqdm=True,
                     dataset_num_proc=None)
    return SFTTrainer(model=model, args=args, train_dataset=encode_dataset(tok, rows), processing_class=tok)


@pytest.mark.parametrize("kind", ["conversational", "prompt_completion"])
def test_preview_mask_is_what_trl_trains_on(tmp_path, kind):
    from engine.dataset import data as data_mod
    from engine.modalities.text import IGNORE
    if kind == "conversational":
        rows = varied_rows()[:12] + [conv("word " * 200, "late answer")]    # last: truncated away
    else:
        rows = [{"prompt": f"Q{i}: héllo? ", "completion": f"answer {i} 🙂" * (1 + i % 3)} for i in range(8)]
        rows.append({"prompt": "word " * 200, "completion": "late"})
    cfg = cfg_for("data.max_length=48")
    path = write_lines(tmp_path / "p.jsonl", rows)
    tok, _ = inspect_mod.tokenizer_for(cfg)
    ds = data_mod.load(str(path))
    trainer = _trl_trainer(cfg, tok, [r.data for r in ds.rows], tmp_path / "out")
    rep = inspect_mod.inspect(cfg, path=str(path))
    dropped = {p.line for p in rep.problems if p.kind == "no_trained_tokens"}
    assert len(rows) in dropped        # the long-prompt row; the walk below checks TRL drops exactly these
    assert len(trainer.train_dataset) == len(ds.rows) - len(dropped)
    k = 0
    for i, row in enumerate(ds.rows):
        pv = inspect_mod.preview(cfg, i, path=str(path))
        if row.line in dropped:
            assert pv.n_trained == 0
            continue
        got = trainer.train_dataset[k]
        assert pv.input_ids == list(got["input_ids"])
        assert pv.labels == list(got["labels"])
        trained_text = "".join(t for t, tr in pv.segments if tr)
        if pv.truncated_at is None:        # a cut can split a character's bytes: decode differs there
            assert trained_text == tok.decode([t for t in got["labels"] if t != IGNORE])
        assert pv.n_trained == sum(1 for t in got["labels"] if t != IGNORE)
        k += 1
    assert k == len(trainer.train_dataset)


def test_preview_segments_and_truncation(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [conv("what is up?", "the sky"), conv("word " * 100, "done")])
    cfg = cfg_for("data.max_length=40")
    pv = inspect_mod.preview(cfg, 0, path=str(path))
    assert "".join(t for t, _ in pv.segments) == pv.text
    assert [t for t, tr in pv.segments if tr] == ["the sky<|im_end|>"]
    assert pv.truncated_at is None and pv.line == 1
    pv2 = inspect_mod.preview(cfg, 1, path=str(path))
    assert pv2.truncated_at == 40 and pv2.n_tokens > 40 and pv2.n_trained == 0 and pv2.n_trained_untruncated > 0
    assert sum(len(t) for t, _ in pv2.segments if True) == len(pv2.text)
    assert inspect_mod.row_index_for_line(cfg, 2, path=str(path)) == 1
    with pytest.raises(IndexError):
        inspect_mod.preview(cfg, 5, path=str(path))


def test_chatml_fast_render_equals_jinja():
    from engine.modalities import text as chat
    cfg = cfg_for()
    tok, _ = inspect_mod.tokenizer_for(cfg)
    for row in varied_rows():
        fast = chat.render_spans(tok, row)
        saved = tok.chat_template
        try:
            tok.chat_template = saved + "{# same template, another string: the Jinja path #}"
            slow = chat.render_spans(tok, row)
        finally:
            tok.chat_template = saved
        assert fast == slow


# ---- quality ---------------------------------------------------------------------------

def test_duplicates_and_near_duplicates(tmp_path):
    rows = [conv("What is the capital of Canada?", "Ottawa."),        # 1
            conv("tell me a joke", "no"),                              # 2
            conv("What is the capital of Canada?", "Ottawa."),        # 3 exact dup of 1
            conv("what is the capital of canada", "Ottawa"),          # 4 near dup of 1
            conv("tell   me a JOKE!", "no."),                          # 5 near dup of 2
            conv("something else", "entirely")]                        # 6
    rep = inspect_mod.inspect(cfg_for(), path=str(write_lines(tmp_path / "d.jsonl", rows)))
    assert rep.duplicates == [[1, 3]]
    assert rep.near_duplicates == [[1, 4], [2, 5]]


def test_pii_found_masked_never_printed(tmp_path):
    secrets = {
        "email": "jane.doe@example.com",
        "phone": "+1 (555) 123-4567",
        "card": "4111 1111 1111 1111",
        "api_key": "sk-proj-AbCdEfGhIjKlMnOpQrStUv9876",
        "private_key": "-----BEGIN RSA PRIVATE KEY-----",
    }
    rows = [conv("hello", "nothing here, version 1.2.3 from 2024-01-05")]
    for kind, value in secrets.items():
        rows.append(conv(f"my {kind} is {value}", "noted"))
    rows.append(conv("card 4111 1111 1111 1112 fails Luhn", "ok"))
    rows.append(conv("aws AKIAIOSFODNN7EXAMPLE", "ok"))
    path = write_lines(tmp_path / "pii.jsonl", rows)
    rep = inspect_mod.inspect(cfg_for(), path=str(path))
    found = {(f.line, f.kind) for f in rep.pii}
    assert found == {(2, "email"), (3, "phone"), (4, "card"), (5, "api_key"), (6, "private_key"), (8, "api_key")}
    masked = {f.kind: f.masked for f in rep.pii if f.line < 8}
    assert masked["email"] == "j***@e***.com"
    assert masked["card"].endswith("1111") and masked["card"].count("*") == 12
    assert masked["api_key"] == "sk-proj-…9876"
    out = json.dumps(rep.to_dict())
    for kind, value in secrets.items():
        if kind != "private_key":
            assert value not in out
    assert all(set(p) == {"line", "kind", "masked"} for p in rep.to_dict()["quality"]["pii"])


def test_luhn_and_masks():
    assert quality.luhn_ok("4111111111111111") and not quality.luhn_ok("4111111111111112")
    assert quality.mask_key("AKIAIOSFODNN7EXAMPLE") == "AKIA…MPLE"
    assert quality.mask_digits("+44 20 7946 0958", 2) == "+** ** **** **58"


def test_outliers():
    lines = list(range(1, 101))
    lengths = [100] * 98 + [5, 2000]
    assert quality.outliers(lines, lengths) == [(99, "short", 5), (100, "long", 2000)]


# ---- streaming, cancel, steps ----------------------------------------------------------------

def test_partial_reports_stay_a_small_share_of_the_time_when_each_is_costly(tmp_path, monkeypatch):
    """A partial report that takes long to build spaces the next ones out to ten times its cost
    (up to PARTIAL_MAX_GAP), so reports never take most of the scan; cheap ones keep their
    PARTIAL_EVERY pace. A fake clock: each call comes 0.1 s after the last one returned."""
    path = write_lines(tmp_path / "s.jsonl", [conv("q", "a")] * 3)
    now = [100.0]
    monkeypatch.setattr(inspect_mod.time, "monotonic", lambda: now[0])
    got = []
    scan = inspect_mod._Scan(cfg_for(), str(path), got.append)

    def gaps_at(cost: float) -> list[float]:
        def costly(**_):
            now[0] += cost
            return inspect_mod.Report()
        monkeypatch.setattr(scan, "snapshot", costly)
        calls, n = [], len(got)
        for _ in range(200):                     # 20 s of calls, one every 0.1 s (plus the reports' cost)
            t = now[0]
            scan.emit()
            if len(got) - n > len(calls):
                calls.append(t)
            now[0] += 0.1
        return [b - a for a, b in zip(calls, calls[1:])]
    # the gap from one report's end to the next one's start (calls come every 0.1 s)
    idle = [g - 0.2 for g in gaps_at(0.2)]
    assert idle and all(2.0 - 1e-9 <= g <= 2.1 + 1e-9 for g in idle)      # 10 x 0.2 s
    idle = [g - 1.0 for g in gaps_at(1.0)][1:]
    cap = inspect_mod.PARTIAL_MAX_GAP                                     # ... but never over 3 s
    assert idle and all(cap - 1e-9 <= g <= cap + 0.1 + 1e-9 for g in idle)
    cheap = inspect_mod._Scan(cfg_for(), str(path), got.append)
    monkeypatch.setattr(cheap, "snapshot", lambda **_: inspect_mod.Report())
    n = len(got)
    for _ in range(30):                          # 3 s of calls: a cheap report every PARTIAL_EVERY
        cheap.emit()
        now[0] += 0.1
    every = inspect_mod.PARTIAL_EVERY                   # calls land 0.1 s apart: every 0.3-0.4 s
    assert 3 / (every + 0.1) - 1 <= len(got) - n <= 3 / every + 1


def test_partial_reports_stream_and_cancel(tmp_path, monkeypatch):
    monkeypatch.setattr(inspect_mod, "BATCH", 200)
    monkeypatch.setattr(inspect_mod, "PARTIAL_EVERY", 0.0)
    rows = [conv(f"q{i} " * (1 + i % 5), f"a{i} " * (1 + i % 9)) for i in range(1500)]
    path = write_lines(tmp_path / "s.jsonl", rows)
    parts = []
    rep = inspect_mod.inspect(cfg_for(), path=str(path), on_partial=parts.append)
    assert parts[-1] is rep and rep.done
    early = [p for p in parts if not p.done]
    assert early and all(p.rows_read <= 1500 for p in early)
    tokenised = [p.rows_tokenized for p in early]
    assert tokenised == sorted(tokenised) and 0 < max(tokenised) < 1500
    assert any(p.histogram for p in early)
    stop = threading.Event()

    def cancel_after_first(p):
        if p.rows_tokenized:
            stop.set()
    cut = inspect_mod.inspect(cfg_for(), path=str(path), on_partial=cancel_after_first, cancel=stop)
    assert not cut.done and cut.phase == "cancelled" and cut.rows_read < 1500


def test_gc_paused_during_a_scan_and_restored(tmp_path):
    import gc
    path = write_lines(tmp_path / "g.jsonl", [conv(f"q{i}", f"a{i}") for i in range(50)])
    seen = []
    assert gc.isenabled()
    inspect_mod.inspect(cfg_for(), path=str(path), on_partial=lambda p: seen.append(gc.isenabled()))
    assert seen and not any(seen) and gc.isenabled()
    gc.disable()
    try:                                  # a caller that had it off keeps it off
        inspect_mod.inspect(cfg_for(), path=str(path))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_vectorised_labels_equal_the_loop():
    import random
    from bisect import bisect_right
    from engine.modalities.text import IGNORE, labels_for

    def loop(ids, offsets, spans):        # the rule, written out as the trainer first had it
        if not spans:
            return [IGNORE] * len(ids)
        starts = [a for a, _ in spans]
        out = []
        for tid, (s, e) in zip(ids, offsets):
            j = bisect_right(starts, s) - 1
            out.append(IGNORE if e == s else tid if j >= 0 and s < spans[j][1] else IGNORE)
        return out
    r = random.Random(0)
    for _ in range(3000):
        n = r.randint(0, 100)
        offs, pos = [], 0
        for _ in range(n):
            a = max(0, pos + r.randint(-3, 4))
            offs.append((a, a + r.choice([0, 0, 1, 2, 5])))
            pos = offs[-1][1]
        spans = sorted((a, a + r.randint(0, 30)) for a in (r.randint(0, pos + 5) for _ in range(r.randint(0, 4))))
        ids = [r.randint(0, 5000) for _ in range(n)]
        got = labels_for(ids, [list(o) for o in offs], spans)
        assert got == loop(ids, offs, spans) and all(type(x) is int for x in got)


def test_steps_per_epoch_follow_batch_settings(tmp_path):
    rows = [conv(f"q{i}", f"a{i}") for i in range(100)]
    path = write_lines(tmp_path / "t.jsonl", rows)
    cfg = cfg_for("train.batch_size=4", "train.grad_accum=2", "data.eval_fraction=0.1", "train.epochs=2")
    cfg.data.train = str(path)
    rep = inspect_mod.inspect(cfg)
    assert rep.splits == {"train": 90, "eval": 10}
    assert rep.steps_per_epoch == 12 and rep.total_steps == 24      # ceil(ceil(90/4)/2) = 12


# ---- command line ---------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", "inspect", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def test_cli_json_strict_and_show(tmp_path, capsys):
    """The CLI's modes, in process (`engine.cli.main`: the same parser, sanitiser and exit codes
    as `python -m engine`, without a Python start per call; test_cli covers the real process)."""
    from types import SimpleNamespace
    from engine import cli

    def run_cli(*args):
        rc = cli.main(["inspect", *args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)
    rows = [conv("what is up?", "the sky"), '{"broken', conv("mail me: bob@corp.io", "ok")]
    path = write_lines(tmp_path / "c.jsonl", rows)
    r = run_cli(str(path), "--json", "--model", "builtin:tiny", "--max-length", "128")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"schema", "path", "done", "phase", "format", "rows", "problems", "problem_counts",
                        "tokens", "training", "quality", "warnings", "elapsed_s"}
    assert doc["problems"] == [{"line": 2, "kind": "invalid_json", "message": doc["problems"][0]["message"]}]
    assert doc["tokens"]["max_length"] == 128 and doc["quality"]["pii"][0]["masked"] == "b***@c***.io"
    assert "bob@corp.io" not in r.stdout
    assert run_cli(str(path), "--strict").returncode == 1
    show = run_cli(str(path), "--show", "1", "--color", "never")
    assert show.returncode == 0 and "⟦the sky<|im_end|>⟧" in show.stdout and "line 1" in show.stdout
    show_line = run_cli(str(path), "--show-line", "3", "--color", "never")
    assert "row 2 (line 3)" in show_line.stdout
    assert run_cli(str(path), "--show-line", "2").returncode == 2
    human = run_cli(str(path))
    assert human.returncode == 0 and "line 2: [invalid_json]" in human.stdout and "b***@c***.io" in human.stdout



def _keys(d, prefix=""):
    for k, v in d.items():
        yield prefix + k
        if isinstance(v, dict) and k not in ("formats_seen", "fields_seen", "splits", "problem_counts",
                                             "pii_counts", "stats"):
            yield from _keys(v, prefix + k + ".")


def test_json_keys_documented_in_readme_and_inspect_md(tmp_path):
    """Every key of the --json document (list items' keys too) is in docs/INSPECT.md's table;
    every key name also in the README's summary."""
    rows = [conv("hi", "hello", system="s")] * 3 + ["{bad"] + [conv("mail me: bob@example.com", "ok " * i) for i in range(1, 30)]
    path = write_lines(tmp_path / "d.jsonl", rows + [conv("x", "word " * 400)])
    doc = inspect_mod.inspect(cfg_for(), path=str(path)).to_dict()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = (REPO / "docs" / "INSPECT.md").read_text(encoding="utf-8")
    row_of = {line.split("`")[1]: line for line in table.splitlines() if line.startswith("| `")}
    for key in _keys(doc):
        assert any(k == key or k.startswith(key + ".") or k.startswith(key + "[]") for k in row_of), key
        assert f"`{key.split('.')[-1]}`" in readme, key
    items = {"problems[]": doc["problems"][0], "tokens.histogram[]": doc["tokens"]["histogram"][0],
             "quality.outliers[]": doc["quality"]["outliers"][0], "quality.pii[]": doc["quality"]["pii"][0]}
    for name, item in items.items():
        for k in item:
            assert f"{name}.{k}" in row_of or k in row_of.get(name, ""), (name, k)
            assert f"`{k}`" in readme, (name, k)
