"""Text renderers for the Train screen's panels (pure functions: easy to test, no widgets)."""
from __future__ import annotations

from rich.text import Text

from tui.safe import clean, one_line

from engine.core.units import GIB


def gauge(fraction: float | None, width: int = 10) -> Text:
    if fraction is None:
        return Text("·" * width, style="dim")
    fraction = max(0.0, min(1.0, fraction))
    full = int(round(fraction * width))
    style = "bold $error" if fraction >= 0.95 else "$warning" if fraction >= 0.8 else "$success"
    return Text("█" * full, style=style) + Text("░" * (width - full), style="dim")


def _gib(b) -> str:
    return "?" if b is None else f"{b / GIB:.1f}"


def gpu_text(gpus: list, host, reason: str) -> Text:
    """One row per GPU; without an NVIDIA GPU a clear notice plus CPU and RAM use."""
    out = Text()
    if gpus:
        for i, g in enumerate(gpus):
            if i:
                out.append("\n")
            util = g.util_percent
            mem_frac = (g.mem_used_bytes / g.mem_total_bytes) if g.mem_total_bytes else None
            name = clean(g.name).replace("NVIDIA ", "")
            out.append(f"GPU{g.index} ", style="bold")
            out.append(name[:9].ljust(9) + " ", style="dim")
            out.append_text(gauge(None if util is None else util / 100, 6))
            out.append(f" {util:3.0f}% " if util is not None else "   ?% ")
            out.append("mem ", style="dim")
            out.append_text(gauge(mem_frac, 6))
            out.append(f" {_gib(g.mem_used_bytes)}/{_gib(g.mem_total_bytes)}G")
            if g.temperature_c is not None:
                out.append(f" {g.temperature_c:.0f}°C")
            if g.power_w is not None:
                lim = f"/{g.power_limit_w:.0f}" if g.power_limit_w else ""
                out.append(f" {g.power_w:.0f}{lim}W")
        return out
    out.append("no NVIDIA GPU", style="bold")      # information on a CPU demo, not an alarm
    if reason:
        why = reason[len("no NVIDIA GPU"):].strip(" ()") if reason.startswith("no NVIDIA GPU") else reason
        if why:
            out.append(f"  ({one_line(why, 60)})", style="dim")
    out.append("  training runs on the CPU", style="dim")
    out.append("\n")
    if host is None:
        out.append("CPU ? · RAM ?", style="dim")
        return out
    out.append("CPU  ")
    cpu = host.cpu_percent
    out.append_text(gauge(None if cpu is None else cpu / 100, 12))
    out.append(f" {cpu:3.0f}%   " if cpu is not None else "   ?%   ")
    out.append("RAM  ")
    ram = (host.ram_used_bytes / host.ram_total_bytes) if host.ram_total_bytes else None
    out.append_text(gauge(ram, 12))
    out.append(f" {_gib(host.ram_used_bytes)}/{_gib(host.ram_total_bytes)} GiB")
    return out


SEVERITY = {"error": ("✖", "bold $error"), "warning": ("⚠", "bold $warning"), "info": ("ℹ", "bold $primary")}


def hints_text(hints: list, warnings: list = ()) -> Text:
    """Newest first: symptom, likely cause, fix; then the run's warnings (``RunWarning``)."""
    if not hints and not warnings:
        return Text("No hints yet. The engine's rules watch loss, grad norm, eval loss, "
                    "tokens/s and GPU use, and explain what they see here.", style="dim")
    out = Text()
    for i, h in enumerate(reversed(hints)):
        if i:
            out.append("\n")
        icon, style = SEVERITY.get(h.severity, SEVERITY["warning"])
        out.append(f"{icon} ", style=style)
        out.append(f"step {h.step}: " if h.step else "")
        out.append(clean(h.symptom), style="bold")
        out.append("\n   cause: ", style="dim")
        out.append(clean(h.cause))
        out.append("\n   fix:   ", style="dim")
        out.append(clean(h.fix), style="$success")
    for w in reversed(warnings):
        if out:
            out.append("\n")
        icon, style = SEVERITY["warning"]
        out.append(f"{icon} ", style=style)
        out.append(f"step {w.step}: " if w.step else "")
        out.append(clean(w.message))
    return out


def generations_text(generations: list, history: bool = False, width: int = 200) -> Text:
    """The eval generations (``Generations`` events, folded as ``[(step, samples)]``): the latest
    answers (the Train screen), or each prompt with its answer at every eval (the run detail:
    how it changed over the run). Model output is untrusted: shown literally, one line each."""
    out = Text()
    if not generations:
        return out
    if not history:
        step, samples = generations[-1]
        out.append(f"answers at step {step} (greedy):", style="bold")
        for x in samples:
            out.append("\n› ", style="dim")
            out.append(one_line(x.get("prompt", ""), max(20, width // 3)), style="dim")
            out.append(" → ")
            out.append(one_line(x.get("answer", "") or "(empty)", width))
        return out
    prompts: list[str] = []
    for _, samples in generations:
        for x in samples:
            if x.get("prompt") not in prompts:
                prompts.append(x.get("prompt", ""))
    for i, prompt in enumerate(prompts):
        if i:
            out.append("\n")
        out.append("› ", style="dim")
        out.append(one_line(prompt, width), style="bold")
        for step, samples in generations:
            answer = next((x.get("answer", "") for x in samples if x.get("prompt") == prompt), None)
            if answer is None:
                continue
            out.append(f"\n  step {step:>5}: ", style="dim")
            out.append(one_line(answer or "(empty)", width))
    return out


def nodes_text(rows, job_tps: float | None) -> Text:
    """A multi-process job (``engine.core.nodes``): a line for the job, then each node with one
    row per process (its GPU's gauges when it has one), grouped by node. ``rows``:
    ``(node, host, tokens/s, silent, ((rank, local_rank, step, tokens/s, util, mem used, mem total, done), ...))``."""
    out = Text()
    procs = sum(len(r[4]) for r in rows)
    out.append("job ", style="bold")
    out.append(f"{len(rows)} node{'s' if len(rows) != 1 else ''} · {procs} processes")
    if job_tps is not None:
        out.append(f" · {job_tps:,.0f} tok/s")
    for node, host, tps, silent, ps in rows:
        out.append("\n")
        out.append(f"node {node} ", style="bold")
        out.append(one_line(clean(host), 24), style="dim")
        out.append(f"  {tps:,.0f} tok/s" if tps is not None else "  — tok/s")
        if silent:
            out.append("  no heartbeat", style="bold $error")
        for rank, local, step, ptps, util, used, total, done in ps:
            out.append("\n  ")
            out.append(f"rank {rank:<3}", style="bold")
            out.append(f" step {step:<6}")
            if util is not None or total:
                out.append(f"GPU{local} ")
                out.append_text(gauge(None if util is None else util / 100, 6))
                out.append(f" {util:3.0f}% " if util is not None else "   ?% ")
                out.append("mem ", style="dim")
                out.append_text(gauge(used / total if used is not None and total else None, 6))
                out.append(f" {_gib(used)}/{_gib(total)}G ")
            out.append(f"{ptps:,.0f} tok/s" if ptps is not None else "— tok/s", style="dim")
            if done:
                out.append("  done", style="dim")
    return out
