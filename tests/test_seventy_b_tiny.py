"""bench/seventy_b.py --tiny: the NF4 checkpoint make_70b writes loads through from_pretrained in
plain TRL and in the engine, and the engine told it has less memory than the weights streams
them and trains exactly like plain TRL (same data, seed and first loss)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_seventy_b_tiny_plain_and_streamed_engine(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), MODEL_DIR=str(tmp_path / "nf4"), RUNS_DIR=str(tmp_path / "runs"))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "seventy_b.py"), "--tiny",
                        "--variants", "plain,engine_24", "--steps", "2", "--warm", "1", "--timeout", "240"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "nf4" / "COMPLETE").exists()
    cfg = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_4bit"] is True
    res = {d["variant"]: d for d in map(json.loads, (tmp_path / "out" / "seventy_b.jsonl").read_text().splitlines())}
    plain, eng = res["plain"], res["engine_24"]
    assert "error" not in plain and "error" not in eng
    assert eng["pred_streaming"] is True
    assert any(p.startswith("weight streaming on") for p in eng["plan"]), eng["plan"]
    assert len(plain["losses"]) == len(eng["losses"]) == 2
    for a, b in zip(plain["losses"], eng["losses"]):
        assert abs(a - b) <= 1e-4 * abs(a)
    assert plain["tokens_per_s"] and eng["tokens_per_s"] and eng["host_rss_gib"] > 0
    assert "RATIO engine_24" in r.stdout and "HOST engine_24" in r.stdout
