"""The inspector's memory does not grow with the row count: token statistics come from
per-value tallies, row hashes go to a fixed buffer spilled to a temporary file, and every list
(problems, duplicate groups, PII) keeps its first N by line and counts the rest, saying
"the first N" in the report, on the CLI and on the Dataset screen's warnings line."""
import json
import random

import numpy as np
import pytest

from engine.core import config
from engine.dataset import inspect as inspect_mod
from engine.dataset import quality


def cfg_for(*overrides):
    return config.load(None, ["model.name=\"builtin:tiny\"", *overrides])


def conv(u, a):
    return {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}


def many_duplicates(path, n=1500, seed=0):
    """n short rows; about a third repeat one of 200 earlier rows exactly, a sixth differ from
    one only in case, and every 50th line is broken JSON."""
    r = random.Random(seed)
    words = "sun rain snow wind cloud river stone tree bird fish".split()
    base, out = [], []
    for i in range(n):
        if i % 50 == 49:
            out.append('{"broken')
            continue
        x = r.random()
        if base and x < 0.33:
            out.append(json.dumps(r.choice(base)))
        elif base and x < 0.5:
            row = r.choice(base)
            out.append(json.dumps(conv(row["messages"][0]["content"].upper(), row["messages"][1]["content"])))
        else:
            row = conv(f"q{i} " + " ".join(r.choice(words) for _ in range(r.randint(1, 12))), r.choice(words))
            if len(base) < 200:
                base.append(row)
            out.append(json.dumps(row))
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return str(path)


def test_hash_buffer_spills_past_its_size_with_the_same_groups_and_outliers():
    rng = np.random.default_rng(1)
    n = 5000
    lines = np.arange(1, n + 1) * 2
    kinds = rng.integers(0, 400, n)                                   # 400 distinct rows: many exact groups
    exact = rng.integers(-2**63, 2**63 - 1, 400, dtype=np.int64)[kinds]
    near = rng.integers(-2**63, 2**63 - 1, 400, dtype=np.int64)[kinds // 3]   # 3 variants a near hash
    tokens = rng.integers(5, 60, n)
    tokens[[17, 4000]] = [1, 900]
    small, whole = quality.Duplicates(buffer_rows=300), quality.Duplicates(buffer_rows=10_000)
    for a in range(0, n, 700):
        for d in (small, whole):
            d.add_hashed(lines[a:a + 700], exact[a:a + 700], near[a:a + 700], tokens[a:a + 700])
    assert len(small.buf) == 300 and small.spilled_rows == n - small.used and small.spilled_rows >= 4800
    assert whole.spilled_rows == 0
    bounds = quality.outlier_bounds(quality.Tally.of(tokens))
    got, want = small.quality(100, bounds), whole.quality(100, bounds)
    assert got.exact.listed() == want.exact.listed() and got.near.listed() == want.near.listed()
    assert got.exact.total == want.exact.total > 100 and got.near.total == want.near.total > 0
    assert got.outliers == want.outliers and (36, "short", 1) in got.outliers and (8002, "long", 900) in got.outliers
    assert got.outliers == quality.outliers(lines, tokens)
    assert small.quality(100, bounds, max_outliers=3).outliers == got.outliers[:3]
    # each group: its lines ascending, first lines ascending across groups, every row counted once
    groups = want.exact.listed()
    assert all(g == sorted(g) for g in groups) and [g[0] for g in groups] == sorted(g[0] for g in groups)
    assert want.exact.rows == n - len(np.unique(exact))
    assert len({int(x) >> 56 for x in near}) > 50          # spread over the partitions


def test_duplicate_lists_keep_their_first_groups_and_say_so(tmp_path, monkeypatch):
    path = many_duplicates(tmp_path / "d.jsonl")
    full = inspect_mod.inspect(cfg_for(), path=path)
    assert full.duplicates_total > 20 and full.near_duplicates_total > 5 and not any(
        "are listed" in w for w in full.warnings)
    monkeypatch.setattr(inspect_mod, "MAX_GROUPS", 5)
    monkeypatch.setattr(quality, "GROUP_LINES_MAX", 3)
    monkeypatch.setattr(quality.Duplicates, "BUFFER_ROWS", 256)      # spilled to disk as well
    capped = inspect_mod.inspect(cfg_for(), path=path)
    assert capped.duplicates == [g[:3] for g in full.duplicates[:5]]
    assert capped.near_duplicates == [g[:3] for g in full.near_duplicates[:5]]
    assert (capped.duplicates_total, capped.near_duplicates_total) == (full.duplicates_total, full.near_duplicates_total)
    assert capped.duplicate_rows == full.duplicate_rows == sum(len(g) - 1 for g in full.duplicates)
    assert capped.stats == full.stats and capped.histogram == full.histogram and capped.outliers == full.outliers
    said = [w for w in capped.warnings if w.startswith("duplicate groups: the first 5 of")]
    assert said and f"of {full.duplicates_total:,} are listed" in said[0]
    text = inspect_mod.format_report(capped)
    assert f"duplicates: {full.duplicates_total} groups (first 5 listed: lines" in text
    assert "warning: near-duplicate groups: the first 5 of" in text
    doc = capped.to_dict()["quality"]
    assert doc["duplicate_rows"] == full.duplicate_rows and len(doc["duplicates"]) == 5
    from tui.screens.dataset import summary_text                          # said on the Dataset screen too
    assert "duplicate groups: the first 5 of" in summary_text(capped, cfg_for()).plain


def test_lines_listed_over_all_groups_are_capped(tmp_path, monkeypatch):
    path = many_duplicates(tmp_path / "d.jsonl")
    full = inspect_mod.inspect(cfg_for(), path=path)
    monkeypatch.setattr(quality, "LISTED_LINES_MAX", 40)
    capped = inspect_mod.inspect(cfg_for(), path=path)
    listed = sum(len(g) for g in capped.duplicates)
    assert 0 < listed <= 40 and capped.duplicates == full.duplicates[:len(capped.duplicates)]
    assert listed + len(full.duplicates[len(capped.duplicates)]) > 40      # the next group did not fit


def test_problems_keep_the_first_by_line_and_count_all(tmp_path, monkeypatch):
    path = many_duplicates(tmp_path / "d.jsonl")
    monkeypatch.setattr(inspect_mod, "MAX_PROBLEMS", 10)
    rep = inspect_mod.inspect(cfg_for(), path=path)
    assert [p.line for p in rep.problems] == list(range(50, 501, 50)) and rep.n_problems == 30
    doc = rep.to_dict()
    assert doc["problem_counts"] == {"invalid_json": 30} and doc["rows"]["with_problems"] == 30
    assert "problems: the first 10 of 30 are listed (by line; problem_counts counts all)" in rep.warnings
    text = inspect_mod.format_report(rep, max_problems=5)
    assert "problems: 30 (invalid_json 30)" in text and "… 25 more (--json lists the first 10)" in text


def test_tally_statistics_equal_numpys_on_every_value_including_the_rare_huge_ones():
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.integers(0, 3000, 20_000), [70_000, 70_000, 1_000_000, 0]])
    t = quality.Tally()
    for part in np.array_split(values, 7):
        t.add(part)
    assert t.n == len(values) and t.total == int(values.sum()) and (t.min(), t.max()) == (0, 1_000_000)
    assert len(t.dense) <= quality.Tally.DENSE and len(t.sparse) == 2
    for q in (0, 5, 25, 50, 95, 99.9, 100):
        assert t.percentiles([q])[0] == pytest.approx(float(np.percentile(values, q)), abs=1e-9)
    assert t.count_above(2048) == int((values > 2048).sum()) and t.sum_min(512) == int(np.minimum(values, 512).sum())
    hist = inspect_mod.histogram(t, 2048)
    edges = [lo for lo, _, _ in hist] + [hist[-1][1]]
    assert [c for _, _, c in hist] == np.histogram(values, bins=edges)[0].tolist() and 2048 in edges


def test_listed_groups_are_made_once_per_grouping():
    """A running scan's partial reports share one listing (up to 100,000 groups) until the groups
    change, instead of converting it again for every report."""
    g = quality.Groups(10)
    lines = np.array([3, 5, 7, 9])
    g.offer(lines, np.array([0, 1, 2, 3]), np.array([0, 2]), np.array([2, 4]))
    first = g.listed()
    assert first == [[3, 5], [7, 9]] and g.listed() is first and g.listed_lines() == 4
    g.offer(np.array([11, 12]), np.array([0, 1]), np.array([0]), np.array([2]))
    assert g.listed() == [[3, 5], [7, 9], [11, 12]] and g.listed_lines() == 6
