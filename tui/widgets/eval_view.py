"""A run's newest ``qlora-tui eval`` report in its run detail: the base vs fine-tuned table
(``engine.outputs.evaluate.table_rows``: the CLI prints the same rows) and a small plot, each
held-out row's loss under the base and under the fine-tuned model, as two bar lines on one scale
(lower is better: the fine-tuned line should sit under the base one)."""
from __future__ import annotations

from rich.text import Text

from tui.safe import literal, middle

BLOCKS = "▁▂▃▄▅▆▇█"


def columns(pairs: list[tuple[float, float]], width: int) -> list[tuple[float, float]]:
    """At most ``width`` columns: rows averaged in consecutive buckets when there are more."""
    if len(pairs) <= width:
        return list(pairs)
    out = []
    for i in range(width):
        chunk = pairs[i * len(pairs) // width:(i + 1) * len(pairs) // width]
        out.append((sum(p[0] for p in chunk) / len(chunk), sum(p[1] for p in chunk) / len(chunk)))
    return out


def bar_lines(pairs: list[tuple[float, float]], width: int) -> tuple[str, str, float, float]:
    """(base bars, tuned bars, low, high): one block per column, both lines on one scale."""
    cols = columns(pairs, max(1, width))
    lo = min(min(b, t) for b, t in cols)
    hi = max(max(b, t) for b, t in cols)
    span = hi - lo

    def block(v: float) -> str:
        return BLOCKS[round((v - lo) / span * (len(BLOCKS) - 1))] if span > 0 else BLOCKS[len(BLOCKS) // 2]
    return "".join(block(b) for b, _ in cols), "".join(block(t) for _, t in cols), lo, hi


def eval_view(report: dict, width: int = 44) -> Text | None:
    """The table and the plot of a saved report (None when it is malformed)."""
    from engine.service import eval_per_row_losses, eval_rows
    try:
        rows = eval_rows(report)
        lower = float(report["tuned"]["loss"]) < float(report["base"]["loss"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    rows = [(middle(name, 16), middle(b, 12), middle(t, 12)) for name, b, t in rows]
    w0 = max(len(r[0]) for r in rows)
    w1 = max([len(r[1]) for r in rows] + [4])
    w2 = max([len(r[2]) for r in rows] + [5])
    out = Text("did it help? ", style="bold")
    out.append(f"{report.get('rows', '?')} held-out rows", style="dim")
    out.append(f"\n{'':<{w0}} {'base':>{w1}} {'tuned':>{w2}}", style="bold")
    for i, (name, b, t) in enumerate(rows):
        good = (i < 2 and lower) or (2 <= i < 4 and _count(t) > _count(b))
        out.append("\n")
        out.append_text(literal(f"{name:<{w0}}", style="dim"))
        out.append(" ")
        out.append_text(literal(f"{b:>{w1}}"))
        out.append(" ")
        out.append_text(literal(f"{t:>{w2}}", style="$success" if good else ""))
    pairs = eval_per_row_losses(report)
    if pairs:
        base, tuned, lo, hi = bar_lines(pairs, width - 6)
        out.append(f"\nloss per row, one scale ({lo:.2f}-{hi:.2f}):", style="dim")
        out.append("\nbase  ", style="dim")
        out.append(base, style="$warning")
        out.append("\ntuned ", style="dim")
        out.append(tuned, style="$success")
    out.append("\ndata ", style="dim")
    out.append_text(literal(middle(report.get("data", "?"), width - 5), style="dim"))
    return out


def _count(cell: str) -> int:
    """The count of a "3/8 (38%)" cell (-1 for "-")."""
    head = cell.split("/")[0]
    return int(head) if head.isdigit() else -1
