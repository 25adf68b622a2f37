"""The arithmetic of weight streaming (engine/training/streaming.py) and of host RAM, from config.json alone.

No torch here (``engine.planning.estimate`` imports it). docs/ESTIMATE.md, "Weight streaming", has the
formulas; the figures below are the lent H200's, measured (shared/reference/landscape.md and
issue 14): pinned host-to-GPU 55.2 GB/s, bf16 matmul 752 TFLOP/s.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from engine.core.units import GIB
LINK_BYTES_PER_S = 55.2e9       # pinned host -> GPU, one direction (H200, PCIe Gen5)
# what the streamer achieves while the GPU trains: 2 x 32.9 GiB per micro-batch in 2.16 s when
# the link is the bottleneck (70B at micro-batch 1, bench/seventy_b.py on the H200): 60% of the link
LINK_EFFICIENCY = 0.6
PEAK_FLOPS = 752e12             # bf16 dense matmul, measured on the H200
# the engine's rate, counting 6 FLOPs/param/token (fwd, recompute, bwd), as a share of PEAK_FLOPS:
# measured on the 70B with every layer recomputed (bench/seventy_b.py, 48 GiB): 73% with bf16 base
# GEMMs, 97% with FP8 ones (FP8 GEMMs run faster than the bf16 peak)
MFU_ASSUMED = 0.73
MFU_FP8 = 0.97
PASSES = 2                      # a layer crosses the link in forward and in recompute (its backward
                                # runs on the recompute's copy)
AHEAD = 2                       # engine.training.streaming.AHEAD: layers prefetched ahead
RESIDENT_LAYERS = AHEAD + 2     # current + prefetched + the one whose kernels may still be queued
HOST_BASE = {"cpu": int(0.6 * GIB),   # Python + torch + transformers/TRL: measured 0.60 GiB peak RSS
             "cuda": int(2.5 * GIB)}  # (tiny, bench/seventy_b.py --tiny); + CUDA runtime: not measured yet


@dataclass
class StreamCost:
    compute_s: float            # per micro-batch
    transfer_s: float           # per micro-batch
    tokens: int

    @property
    def factor(self) -> float:
        """Tokens/s with streaming over tokens/s without, at the same micro-batch (floor model)."""
        return self.compute_s / max(self.compute_s, self.transfer_s)

    @property
    def tokens_per_s_floor(self) -> float:
        return self.tokens / max(self.compute_s, self.transfer_s)


def flops_per_token(s, seq: int, recompute: float = 1.0) -> float:
    """Frozen-base LoRA: 2 FLOPs/param forward, 2 for the input gradient, 2 more for the share
    ``recompute`` of layers recomputed under gradient checkpointing (1.0: every layer); causal
    attention 2*q*seq per layer per pass (fwd, 2 bwd, recompute); the LM head 4*V*h (never
    recomputed). ``seq``: the attention span (each row's own length when rows are packed)."""
    dims = s.module_dims()
    attn = sum(a * o for m, (a, o) in dims.items() if m in ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp = sum(a * o for m, (a, o) in dims.items() if m in ("gate_proj", "up_proj", "down_proj"))
    linear = s.layers * (attn + mlp * s.experts_per_token)
    return ((4 + 2 * recompute) * linear + (6 + 2 * recompute) * s.q_dim * seq * s.layers
            + 4 * s.vocab * s.hidden)


def stream_cost(s, quantized_bytes: int, tokens_per_micro_batch: int, seq: int, fp8: bool = False) -> StreamCost:
    compute = tokens_per_micro_batch * flops_per_token(s, seq) / (mfu(fp8) * PEAK_FLOPS)
    transfer = PASSES * quantized_bytes / (LINK_BYTES_PER_S * LINK_EFFICIENCY)
    return StreamCost(compute, transfer, tokens_per_micro_batch)


def mfu(fp8: bool) -> float:
    return MFU_FP8 if fp8 else MFU_ASSUMED


def resident_bytes(quantized_bytes: int, layers: int) -> int:
    """The 4-bit weights on the GPU while streaming: a window of layers, not the whole base."""
    return int(quantized_bytes / max(1, layers) * min(layers, RESIDENT_LAYERS))


LOAD_PHASE = ("process_base", "checkpoint_mapped")     # host_breakdown keys that add up while loading


def host_breakdown(quantized_bytes: int, unquantized_bytes: int, layers: int, streaming: bool,
                   device: str = "cuda", checkpoint_bytes: int = 0, offloaded: int = 0) -> dict:
    """Host RAM of the training process (bytes), in two phases whose larger is the peak
    (``host_peak``). Loading maps the weight files into the process (``checkpoint_mapped``: page
    cache, counted in its RSS: 37 GiB for the 70B on the H200, engine and plain TRL alike).
    Training: streaming keeps the 4-bit layers pinned (plus the 16-bit embeddings while they are
    moved to the GPU); offloaded checkpointing keeps the layer inputs pinned."""
    out = {"process_base": HOST_BASE["cpu" if device == "cpu" else "cuda"],
           "checkpoint_mapped": int(checkpoint_bytes), "pinned_weights": 0, "loading": 0,
           "offloaded_activations": int(offloaded)}
    if streaming:
        out["pinned_weights"] = int(quantized_bytes)
        out["loading"] = int(max(unquantized_bytes, quantized_bytes / max(1, layers)))
    return out


def host_peak(breakdown: dict) -> int:
    """The larger of the loading phase and the training phase of ``host_breakdown``."""
    base = breakdown.get("process_base", 0)
    load = sum(breakdown.get(k, 0) for k in LOAD_PHASE)
    train = sum(v for k, v in breakdown.items() if k not in LOAD_PHASE) + base
    return max(load, train)


def host_needed(breakdown: dict) -> int:
    """What the machine must be able to give: the peak without the mapped weight files (page
    cache the kernel can drop and read again), which decides a refusal."""
    return host_peak({**breakdown, "checkpoint_mapped": 0})


def host_ram_available() -> tuple[int | None, int | None]:
    """(available, total) host RAM in bytes (psutil; None where it cannot tell)."""
    try:
        import psutil
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except Exception:  # noqa: BLE001 - advice only: unknown RAM never stops a run
        return None, None


def host_ram_problem(host_bytes: int, available: int | None, total: int | None) -> str | None:
    """One line when the run needs more host RAM than the machine can give, else None."""
    if available is None:
        return None
    if host_bytes <= available:
        return None
    return (f"this run needs {host_bytes / GIB:.1f} GiB of host RAM (weight streaming pins the 4-bit "
            f"layers in host memory) but only {available / GIB:.1f} GiB is available "
            f"({(total or 0) / GIB:.1f} GiB total); free memory, use a machine with more RAM, set "
            f"train.weight_streaming = false with a larger train.gpu_memory_gib, or use a smaller model")


def budget_bytes(cfg) -> int | None:
    """train.gpu_memory_gib in bytes (None when 0 = unlimited)."""
    g = cfg.train.gpu_memory_gib
    return int(g * GIB) if g else None


def env_host_ram_override() -> int | None:
    """QLORA_TUI_HOST_RAM_GIB: what the host-RAM check assumes is available (tests, containers)."""
    v = os.environ.get("QLORA_TUI_HOST_RAM_GIB")
    try:
        return int(float(v) * GIB) if v else None
    except ValueError:
        return None


