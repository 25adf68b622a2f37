"""engine.dataset.counting: a large file's batches are counted in a worker process as well as the
thread. The report is the one the thread alone gives (rows, tokens, trained tokens, duplicates,
problems), preference files included; a worker that dies mid-file loses no batch; the worker
ends with the scan."""
import json
import random

import pytest

from engine.core import config
from engine.dataset import counting
from engine.dataset import inspect as inspect_mod

WORDS = "the model learns Ottawa capital batch 12 345 gradient, adapter! rate's héllo 日本 loss".split()


def cfg_for(*overrides):
    return config.load(None, ['model.name="builtin:tiny"', *overrides])


def sentence(r: random.Random, k: int) -> str:
    return " ".join(r.choice(WORDS) for _ in range(k))


def write_chat(path, n: int, seed: int = 0):
    r = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            msgs = [{"role": "user", "content": sentence(r, r.randint(3, 30))},
                    {"role": "assistant", "content": sentence(r, r.randint(3, 60))}]
            if i % 3 == 0:
                msgs.insert(0, {"role": "system", "content": "Be brief."})
            if i % 7 == 0:
                msgs += [{"role": "user", "content": "And?"}, {"role": "assistant", "content": sentence(r, 5)}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
            if i % 50 == 0:
                fh.write(json.dumps({"messages": msgs}) + "\n")         # duplicates
            if i % 97 == 0:
                fh.write('{"messages": [{"role": "user"}]}\n')          # a problem
    return path


def write_pairs(path, n: int, seed: int = 1):
    r = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps({"prompt": sentence(r, 8), "chosen": sentence(r, 20),
                                 "rejected": sentence(r, 12)}) + "\n")
    return path


@pytest.fixture
def made(monkeypatch):
    """The Counting of each scan (observed, not replaced), small batches, and the process
    waited for, so that a small file is counted in it."""
    out = []
    orig = counting.Counting.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        out.append(self)
        self.proc = self.worker.proc if self.worker is not None else None
    monkeypatch.setattr(counting.Counting, "__init__", init)
    monkeypatch.setattr(inspect_mod, "BATCH", 150)
    monkeypatch.setattr(counting.Counting, "wait_for_process", True)
    return out


def report(cfg, path, process: bool, monkeypatch) -> dict:
    monkeypatch.setattr(counting, "PROCESS_MIN_BYTES", 0 if process else 1 << 62)
    d = inspect_mod.inspect(cfg, path=str(path)).to_dict()
    d.pop("elapsed_s", None)
    return d


@pytest.mark.parametrize("kind", ["chat", "pairs"])
def test_the_process_counts_what_the_thread_counts(tmp_path, monkeypatch, made, kind):
    if not counting.spare_core():
        pytest.skip("one core: the worker process is never started")
    if kind == "chat":
        path, cfg = write_chat(tmp_path / "chat.jsonl", 1200), cfg_for()
    else:
        path, cfg = write_pairs(tmp_path / "pairs.jsonl", 900), cfg_for('train.method="dpo"')
    alone = report(cfg, path, False, monkeypatch)
    assert made[-1].batches["process"] == 0 and made[-1].proc is None
    both = report(cfg, path, True, monkeypatch)
    c = made[-1]
    assert c.batches["process"] >= 4, c.batches
    assert both == alone
    assert alone["rows"]["usable"] >= 900 and alone["tokens"]["stats"]["mean"] > 5
    assert c.proc.poll() is not None and c.worker is None          # it ended with the scan


def test_a_worker_that_dies_mid_file_loses_no_batch(tmp_path, monkeypatch, made):
    if not counting.spare_core():
        pytest.skip("one core: the worker process is never started")
    path, cfg = write_chat(tmp_path / "chat.jsonl", 1500), cfg_for()
    alone = report(cfg, path, False, monkeypatch)
    sent = []
    orig = counting._Worker.submit

    def submit(self, way, args):
        fut = orig(self, way, args)
        sent.append(fut)
        if len(sent) == 3:
            self.proc.kill()                    # gone with batches in flight
        return fut
    monkeypatch.setattr(counting._Worker, "submit", submit)
    both = report(cfg, path, True, monkeypatch)
    c = made[-1]
    assert both == alone
    assert c.worker is None and c.proc.poll() is not None
    assert len(sent) >= 3 and c.batches["thread"] >= 1, c.batches      # the rest counted here


def test_a_batch_sent_after_the_worker_ended_fails_at_once():
    """Nobody is left to answer a batch submitted after the reader saw the process end: it must
    fail at once (and be counted in the thread), never wait forever."""
    from engine.dataset import inspect as im
    tok, _ = im.tokenizer_for(cfg_for())
    w = counting._Worker(__import__("pickle").dumps(tok), 64)
    try:
        assert w.ready.result(timeout=120) == (None, "")
        w.proc.kill()
        w.threads[1].join(timeout=60)                       # the reader has seen the end
        assert not w.threads[1].is_alive() and w.gone is not None
        fut = w.submit("rows", ([], [], []))
        assert isinstance(fut.exception(timeout=5), counting.WorkerGone)
    finally:
        w.close(kill=True)
