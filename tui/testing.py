"""Deterministic inputs for tests, snapshots and the docs screenshots.

Fixed hardware readings (snapshots must not show live numbers) and a finished run written
through the engine's own ``JsonlWriter``, shaped like a real builtin:tiny run's log.
"""
from __future__ import annotations

import math
from pathlib import Path

from engine.core.units import GIB


class FixedGpuSampler:
    """Returns the same readings every time (``gpus=[]`` reads as "no NVIDIA GPU")."""

    def __init__(self, gpus=None, reason: str = "no NVIDIA GPU (NVML: NVML Shared Library Not Found)"):
        self.gpus = list(gpus or [])
        self.available = bool(self.gpus)
        self.reason = "" if self.gpus else reason

    def sample(self):
        return list(self.gpus)


class FixedHostSampler:
    def __init__(self, cpu: float = 37.0, used: int = 5 * GIB, total: int = 16 * GIB):
        from engine.training.gpu import HostStat
        self.stat = HostStat(cpu_percent=cpu, ram_used_bytes=used, ram_total_bytes=total)

    def sample(self):
        return self.stat


def fixed_samplers(gpus: int = 0):
    from engine.training.gpu import GpuStat
    stats = [GpuStat(index=i, name="NVIDIA H100 80GB HBM3", util_percent=91.0 - 7 * i,
                     mem_used_bytes=(61 + 3 * i) * GIB, mem_total_bytes=80 * GIB,
                     temperature_c=64.0 + i, power_w=512.0 - 20 * i, power_limit_w=700.0)
             for i in range(gpus)]
    gpu = FixedGpuSampler(stats)
    return gpu, FixedHostSampler(), gpu.reason


def loss_curve(step: int) -> float:
    return 2.1 + 4.8 * math.exp(-step / 9.0) + 0.08 * math.sin(step * 1.7)


def write_run(runs_dir: str | Path, name: str = "20260101-120000-tiny", steps: int = 60,
              finished: bool = True, hints: list[dict] | None = None,
              stop_at: int | None = None, method: str = "") -> Path:
    """A run directory whose events.jsonl reads like a finished builtin:tiny demo run
    (``method``: a preference method, whose metrics are logged beside each step)."""
    from engine.core import events
    run_dir = Path(runs_dir) / name
    (run_dir / "control").mkdir(parents=True, exist_ok=True)
    w = events.JsonlWriter(run_dir / "events.jsonl")
    t = 1_767_268_800.0
    w(events.Status(phase="data", message="reading data", time=t))
    w(events.Status(phase="model", message="loading builtin:tiny (4-bit nf4) on cpu", time=t + 1))
    w(events.RunStarted(run_dir=str(run_dir.name), model="builtin:tiny", device="cpu", total_steps=steps,
                   train_rows=285, eval_rows=15, trainable_params=131072, total_params=688768,
                   plan=["device: cpu (no CUDA)", "optimizer: adamw_torch (CPU)"], pid=0, time=t + 2))
    last = stop_at or steps
    for s in range(1, last + 1):
        w(events.Step(step=s, total_steps=steps, loss=loss_curve(s), learning_rate=2e-3 * (1 - s / steps),
                 grad_norm=1.5 + 0.5 * math.cos(s), tokens_per_second=640.0 + s, epoch=s / 72,
                 eta_seconds=(steps - s) * 0.4, tokens_seen=165 * s, time=t + 3 + s))
        if method:
            w(events.Preference(step=s, method=method, rewards_chosen=0.02 * s, rewards_rejected=-0.05 * s,
                                margin=0.07 * s, accuracy=min(1.0, 0.5 + 0.02 * s), loss=loss_curve(s),
                                kl=0.01 * s if method == "kto" else None, time=t + 3 + s))
        if s % 20 == 0:
            w(events.Eval(step=s, eval_loss=loss_curve(s) + 0.25 + 0.004 * s, time=t + 3 + s))
            if method:
                w(events.Preference(step=s, method=method, split="eval", accuracy=0.875, margin=0.05 * s,
                                    rewards_chosen=0.01 * s, rewards_rejected=-0.04 * s, time=t + 3 + s))
        if s % 30 == 0:
            w(events.Checkpoint(step=s, path=f"runs/{name}/checkpoints/checkpoint-{s}", time=t + 3 + s))
        for h in hints or []:
            if h.get("step") == s:
                w(events.Hint(time=t + 3 + s, **h))
    if finished:
        w(events.RunFinished(step=last, adapter_dir=f"runs/{name}/adapter", final_loss=loss_curve(last),
                        stopped=stop_at is not None,
                        reason="stop requested" if stop_at else "completed", time=t + 5 + last))
    w.close()
    return run_dir


HOSTILE_HINT = {
    "rule": "plateau", "severity": "warning", "step": 40,
    "symptom": "Loss plateaus [red]x[/red] [/ \x1b[31mred\x1b[0m",
    "cause": "LR too low or rank too low [bold]",
    "fix": "Increase one: train.learning_rate or lora.r [/]",
}
