"""bench/dpo_vs_plain.py's inputs: both sides read the same rows as exactly SEQ tokens a side.

(The whole CPU path, `DPO_STEPS=2 DPO_WARM=1 python bench/dpo_vs_plain.py tiny 64 2 plain engine_auto`,
starts two training processes: it is run by hand, not in the suite.)"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_rows_are_seq_tokens_a_side_in_the_benchs_tokenizer(monkeypatch, tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import dpo_vs_plain as b
    from transformers import AutoTokenizer
    monkeypatch.setattr(b, "STEPS", 1)
    monkeypatch.setattr(b, "WARM", 1)
    tok = AutoTokenizer.from_pretrained(b.model_dir("tiny"))
    rows = [json.loads(x) for x in b.data_file("tiny", 64, 2).read_text().splitlines()]
    assert len(rows) == 2 * (1 + 1 + 2)
    for r in rows:
        for side in ("chosen", "rejected"):
            ids = tok(r["prompt"] + r[side], add_special_tokens=False)["input_ids"]
            assert len(ids) + 1 == 64 and tok.unk_token_id not in ids       # + EOS = 64 tokens a side
