"""bench/seventy_b.py --tiny: the NF4 checkpoint make_70b writes loads through from_pretrained in
plain TRL and in the engine, and the engine told it has less memory than the weights streams
them and trains exactly like plain TRL (same data, seed and first loss)."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_seventy_b_tiny_plain_and_streamed_engine(tmp_path, monkeypatch, capsys):
    # the bench's driver in this process (no Python start-up of its own); each variant still runs
    # in its own process, as on the GPU (its peak RSS is that process tree's)
    for k, v in (("OUT", "out"), ("MODEL_DIR", "nf4"), ("RUNS_DIR", "runs")):
        monkeypatch.setenv(k, str(tmp_path / v))
    monkeypatch.syspath_prepend(str(ROOT / "bench"))   # sys.path is put back after, the bench's own entries too
    monkeypatch.chdir(ROOT)
    import seventy_b
    rc = seventy_b.main(["--tiny", "--variants", "plain,engine_24", "--steps", "2", "--warm", "1", "--timeout", "240"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
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
    assert "RATIO engine_24" in out and "HOST engine_24" in out
