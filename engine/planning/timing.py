"""Time to train, before launch: a small GPU catalog and the predicted wall time of a run.

No torch here. The prediction is a compute model, calibrated on our measured runs:

    tokens/s = MFU x peak FLOP/s x fill(tokens per micro-batch) / FLOPs per token / offload cost
               (/ FP8_GAIN where the card or the config has no FP8 base GEMMs)
    FLOPs per token = (4 + 2 x share recomputed) x N_linear + attention + 4 V h + LoRA
                      (``streaming_plan.flops_per_token``; the LoRA adapters 6 + 2 x share per param)
    wall time = tokens the run processes / tokens/s (training steps only: loading the model,
                evaluations and checkpoint saves are not counted)

MFU is taken from the engine's measured run on the H200 (``CALIBRATION``: the whole-GPU 8B row of
bench/RESULTS.md, FP8 base GEMMs, no checkpointing) against the catalog's dense bf16 peak, and the
same fraction is assumed on every card of the catalog: on the H200 and H100 (same architecture)
the range is RANGE_HOPPER, elsewhere RANGE_OTHER. Constants that need device calibration (the
lead's measurements, issue 27): MFU_ENGINE on other cards and shapes, FP8_GAIN (one A/B at 24
GiB), the micro-batch fill (``estimate.fill``, fitted without FP8) at long sequences, and the
attention term at 8K-64K tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.core.config import effective_batch
from engine.core.units import GIB


@dataclass(frozen=True)
class Gpu:
    key: str                     # what --gpu takes
    name: str
    memory_gib: float            # total, as nvidia-smi reports it
    bf16_tflops: float           # dense tensor-core bf16 (fp32 accumulate), no sparsity
    fp8_tflops: float | None     # dense FP8 (fp32 accumulate); None: no FP8 tensor cores
    bandwidth_gbs: float         # memory bandwidth, GB/s
    host_link: str
    host_link_gbs: float         # host <-> GPU, one direction, GB/s (nominal)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


# The one catalog (vendors' datasheets and whitepapers; dense figures, no sparsity).
GPUS: dict[str, Gpu] = {g.key: g for g in (
    Gpu("rtx3090", "RTX 3090", 24.0, 71.0, None, 936, "PCIe 4.0 x16", 32),
    Gpu("rtx4090", "RTX 4090", 24.0, 165.2, 330.3, 1008, "PCIe 4.0 x16", 32),
    Gpu("rtx5090", "RTX 5090", 31.8, 209.5, 419.0, 1792, "PCIe 5.0 x16", 64),
    Gpu("a100-40", "A100 40GB", 40.0, 312.0, None, 1555, "PCIe 4.0 x16", 32),
    Gpu("a100-80", "A100 80GB", 80.0, 312.0, None, 2039, "PCIe 4.0 x16", 32),
    Gpu("l40s", "L40S", 45.0, 362.0, 733.0, 864, "PCIe 4.0 x16", 32),
    Gpu("h100", "H100 SXM", 79.6, 989.4, 1978.9, 3350, "PCIe 5.0 x16", 64),
    Gpu("h200", "H200 SXM", 140.4, 989.4, 1978.9, 4800, "PCIe 5.0 x16", 64),
)}

# (what, tokens/s, shape keys, seq, micro-batch, share recomputed, GPU, LoRA r on every projection):
# the measured run MFU is
# fitted on (bench/RESULTS.md, "Full rows, final build (call 3)": engine_auto, whole H200)
CALIBRATION = ("8B seq 2048 whole H200, micro-batch 8, no checkpointing, fused + FP8 (bench/RESULTS.md)",
               18974.0, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
               2048, 8, 0.0, "h200", 32)
# FP8 base GEMMs over bf16 ones: engine_24g 13,658 vs engine_nofp8_24g 10,922 tokens/s (call 1)
FP8_GAIN = 13658 / 10922
RANGE_HOPPER = 0.15
RANGE_OTHER = 0.25
# CPU training (a rough figure): the share of a float32 matmul's rate here (``cpu_flops``) that a
# run reaches. builtin:tiny's demo on the 2-core dev VM ran 3,593 tokens/s x 3.3 MFLOP a token
# (bench/RESULTS.md, tui_overhead) against ~20 GFLOP/s from the probe: about 0.6; taken as 0.5.
# Short runs of tiny models are dominated by per-step costs this ignores, and a shared machine's
# load moves it several-fold: the range is a factor CPU_SPREAD either way
CPU_EFFICIENCY = 0.5
CPU_SPREAD = 3.0
CPU_KEY = "cpu"


class GpuError(ValueError):
    """--gpu names no card of the catalog (one line listing them)."""


def gpu_named(name: str) -> Gpu:
    """The catalog's card for ``name``: its key or name (case, spaces and dashes ignored), or a
    driver's name that holds its model ("NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-40GB")."""
    want = "".join(name.lower().split()).replace("-", "").replace("_", "")
    for g in GPUS.values():
        if want in (g.key.replace("-", ""), "".join(g.name.lower().split())):
            return g
    for g in GPUS.values():
        model = g.key.split("-")[0]
        if want and model in want:
            if model == "a100":
                return GPUS["a100-80" if "80g" in want else "a100-40"]
            return g
    raise GpuError(f"unknown GPU {name!r}: the catalog has " + ", ".join(GPUS))


_CPU_FLOPS: list[float] = []


def cpu_flops() -> float:
    """FLOP/s of a float32 1024x1024 matmul on this machine (numpy; about 0.1 s once a process)."""
    if not _CPU_FLOPS:
        import time

        import numpy as np
        n = 1024
        a = np.ones((n, n), dtype=np.float32)
        a @ a
        t0, k = time.perf_counter(), 0
        while k < 2 or time.perf_counter() - t0 < 0.1:
            a @ a
            k += 1
        _CPU_FLOPS.append(2 * n ** 3 * k / (time.perf_counter() - t0))
    return _CPU_FLOPS[0]


def cpu_device() -> Gpu:
    """This machine's CPU as a pseudo-card of the model (its matmul rate measured here)."""
    return Gpu(CPU_KEY, "this CPU", 0.0, cpu_flops() / 1e12, None, 0, "", 0)


def local_gpu() -> tuple[str, Gpu | None] | None:
    """(NVML's name of GPU 0, its catalog card or None); None when there is no NVIDIA GPU."""
    from engine.planning.estimate import nvml

    def name_of(nv, handle):
        name = nv.nvmlDeviceGetName(handle)
        return name.decode() if isinstance(name, bytes) else str(name)
    name = nvml(name_of)
    if name is None:
        return None
    try:
        return name, gpu_named(name)
    except GpuError:
        return name, None


@dataclass
class Workload:
    """What a run processes: its optimizer steps and the tokens each step's rows hold."""
    steps: int
    rows_per_step: int           # effective batch (micro-batch x accumulation x GPUs)
    tokens_per_row: float        # mean tokens a row takes in the forward (max_length when packed)
    attention_span: float        # mean tokens a row attends over (a packed sample's own length)
    basis: str = ""

    @property
    def tokens(self) -> float:
        return self.steps * self.rows_per_step * self.tokens_per_row


@dataclass
class Prediction:
    seconds: float
    low: float
    high: float
    tokens_per_s: float
    tokens: float
    gpu: Gpu
    modelled: bool               # True: a catalog card, not the one this runs on
    fp8: bool
    notes: list[str]

    def label(self) -> str:
        if self.gpu.key == CPU_KEY:
            return (f"a rough CPU figure (a matmul here runs {self.gpu.bf16_tflops * 1e3:,.0f} GFLOP/s; "
                    "calibrated on builtin:tiny only; per-step costs and other load not modelled)")
        return (f"modelled for {self.gpu.name} (catalog figures, not measured here)" if self.modelled
                else f"on this GPU ({self.gpu.name}, catalog figures)")

    def line(self) -> str:
        return (f"Time to train: ~{fmt_duration(self.seconds)} ({fmt_duration(self.low)} - "
                f"{fmt_duration(self.high)}), {self.tokens:,.0f} tokens at ~{self.tokens_per_s:,.0f} tokens/s, "
                f"{self.label()}")

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "low": self.low, "high": self.high,
                "tokens_per_s": round(self.tokens_per_s, 1), "tokens": int(self.tokens), "gpu": self.gpu.key,
                "modelled": self.modelled, "fp8": self.fp8, "notes": list(self.notes)}


def fmt_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h``, ``2.1 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _lora_params(s, cfg) -> int:
    from engine.planning.estimate import _targets
    return _adapter_params(s, cfg.lora.r, _targets(cfg, []))


def _adapter_params(s, r: int, targets) -> int:
    dims = s.module_dims()
    return s.layers * sum(r * (dims[m][0] + dims[m][1]) for m in targets if m in dims)


def flops_per_token(s, span: float, recompute: float, lora_params: int = 0) -> float:
    """Hardware FLOPs per trained token: the frozen base (``streaming_plan.flops_per_token``) and
    the adapters (forward 2, input and weight gradients 4, recompute 2 x share, per param)."""
    from engine.planning.streaming_plan import flops_per_token as base
    return base(s, span, recompute) + (6 + 2 * recompute) * lora_params


def mfu_engine() -> float:
    """The engine's MFU against the dense bf16 peak, from the CALIBRATION run (FP8 base GEMMs)."""
    from engine.planning.estimate import fill, shape_of
    _, tps, shape, seq, mb, share, gpu, r = CALIBRATION
    s = shape_of(shape)
    lora = _adapter_params(s, r, s.module_dims())          # r = 32 on every projection
    return tps * flops_per_token(s, seq, share, lora) / (GPUS[gpu].bf16_tflops * 1e12 * fill(mb * seq))


def tokens_per_s(s, gpu: Gpu, *, row_tokens: int, span: float, micro_batch: int, recompute: float,
                 offload: bool = False, fp8: bool = True, lora_params: int = 0) -> float:
    """Modelled tokens/s of one GPU for a planned setting: ``row_tokens`` a row holds (the
    micro-batch's fill), ``span`` the tokens a row attends over, ``recompute`` the share of layers
    checkpointed."""
    from engine.planning.estimate import OFFLOAD_COST, fill
    if gpu.key == CPU_KEY:
        rate = CPU_EFFICIENCY * gpu.bf16_tflops * 1e12
    else:
        rate = mfu_engine() * gpu.bf16_tflops * 1e12 * fill(micro_batch * row_tokens)
        if not (fp8 and gpu.fp8_tflops):
            rate /= FP8_GAIN
    if offload and recompute:
        rate /= OFFLOAD_COST
    return rate / flops_per_token(s, span, recompute, lora_params)


def predict(cfg, model_config: dict, plan, work: Workload, gpu: Gpu, modelled: bool) -> Prediction:
    """The wall time of ``work`` under ``plan`` (``estimate.plan``) on ``gpu``."""
    from engine.planning.estimate import shape_of
    s = shape_of(model_config)
    e = plan.estimate
    share = e.checkpoint_layers / e.layers if e.layers else 0.0
    fp8 = bool(plan.fp8) and gpu.fp8_tflops is not None
    # the micro-batch's fill counts the tokens its rows hold (short rows fill less than max_length)
    tps = tokens_per_s(s, gpu, row_tokens=max(1, round(min(work.tokens_per_row, e.seq_len))),
                       span=min(work.attention_span, e.seq_len),
                       micro_batch=plan.batch_size, recompute=share, offload=plan.offload, fp8=fp8,
                       lora_params=_lora_params(s, cfg))
    notes = []
    gpus = max(1, cfg.distributed.processes)
    if gpus > 1:
        tps *= gpus
        notes.append(f"{gpus} GPUs: {gpus} x one GPU's rate (not calibrated)")
    if plan.streaming and plan.expected_tokens_per_s:
        tps = min(tps, plan.expected_tokens_per_s)
        notes.append("weight streaming: the link's floor caps the rate")
    if plan.fp8 and not fp8 and gpu.key != CPU_KEY:
        notes.append(f"no FP8 base GEMMs on {gpu.name}: bf16 ones (x1/{FP8_GAIN:.2f}, measured A/B)")
    notes.append("training steps only: loading, evaluations and checkpoint saves not counted")
    secs = work.tokens / tps if tps > 0 else 0.0
    if gpu.key == CPU_KEY:
        return Prediction(secs, secs / CPU_SPREAD, secs * CPU_SPREAD, tps, work.tokens, gpu, modelled, fp8, notes)
    r = RANGE_HOPPER if gpu.key in ("h100", "h200") else RANGE_OTHER
    return Prediction(secs, secs * (1 - r), secs * (1 + r), tps, work.tokens, gpu, modelled, fp8, notes)


def workload_from_report(cfg, rep) -> Workload | None:
    """The run's workload from the inspector's report (``engine.dataset.inspect``) of the config
    the plan resolved (packing decided); None when the report counted no tokens."""
    if not rep.total_steps or not rep.rows_tokenized or not rep.tokens_within_max_total:
        return None
    max_len = cfg.data.max_length
    per_row = rep.tokens_within_max_total / rep.rows_tokenized
    rows = effective_batch(cfg.train.batch_size, cfg.train.grad_accum, cfg.distributed.processes)
    if cfg.data.packing is True:
        return Workload(rep.total_steps, rows, float(max_len), per_row, rep.steps_basis)
    return Workload(rep.total_steps, rows, per_row, per_row, rep.steps_basis)


_WORK: dict = {}            # workload_for's last few answers (the Config screen asks on every edit)
_WORK_KEEP = 4


def _work_key(cfg):
    import json
    import os
    d = cfg.to_dict()
    tr = {k: d["train"][k] for k in ("batch_size", "grad_accum", "epochs", "max_steps", "seed")}
    stats = []
    for path in (cfg.data.train, cfg.data.eval):
        try:
            st = os.stat(cfg.resolve_path(path))
            stats.append((path, st.st_size, st.st_mtime_ns))
        except (OSError, TypeError, ValueError):
            stats.append((path, None, None))
    return json.dumps([d["data"], d["model"], tr, cfg.distributed.gpus, stats], sort_keys=True, default=str)


def workload_for(cfg) -> Workload | str:
    """The workload of ``cfg`` (its ``auto`` resolved), counted from its data with the inspector;
    the reason as a string when the data cannot be counted here. The last few answers are kept
    (keyed by the data, model and step settings, and the files' size and time)."""
    key = _work_key(cfg)
    if key in _WORK:
        return _WORK[key]
    out = _count_workload(cfg)
    if len(_WORK) >= _WORK_KEEP:
        _WORK.pop(next(iter(_WORK)))
    _WORK[key] = out
    return out


def _count_workload(cfg) -> Workload | str:
    from engine.dataset import inspect as inspect_mod
    try:
        rep = inspect_mod.inspect(cfg)
    except Exception as e:          # no tokenizer here, unreadable data: no time, one line why
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"the data could not be counted ({first[:160]})"
    work = workload_from_report(cfg, rep)
    return work if work is not None else "the data has no rows to train on"


def for_config(cfg, model_config: dict, pl, gpu: Gpu | None, modelled: bool,
               local_name: str | None = None, work: "Workload | str | None" = None) -> tuple[list[str], dict]:
    """The time lines of the estimate report and the Config screen, and their JSON: the prediction
    for ``gpu`` (a catalog card; ``modelled`` when it is not the one here), or why there is none.
    ``work``: the workload when already counted (else the data is counted here)."""
    if gpu is None:
        if local_name:
            why = (f"Time to train: no prediction: this GPU ({local_name}) is not in the catalog; "
                   f"pass --gpu NAME of the nearest card ({', '.join(GPUS)})")
        else:
            why = "Time to train: no prediction: no NVIDIA GPU found here; pass --gpu NAME to plan for a card"
        return [why], {"seconds": None, "reason": why}
    from engine.planning.estimate import apply_plan
    if work is None:
        work = workload_for(apply_plan(cfg, pl))
    if isinstance(work, str):
        why = f"Time to train: unknown ({work})"
        return [why], {"seconds": None, "reason": why}
    p = predict(cfg, model_config, pl, work, gpu, modelled)
    lines = [p.line(), f"  - {work.steps:,} steps x {work.rows_per_step} rows x ~{work.tokens_per_row:,.0f} "
                       f"tokens ({work.basis})"]
    lines += [f"  - {n}" for n in p.notes]
    return lines, p.to_dict()


def local_time_line(cfg, model_config: dict) -> str:
    """The Config screen's line: the predicted time of ``cfg`` on this machine's GPU (planned for
    train.gpu_memory_gib, else the GPU's free memory), a rough figure on the CPU, or why there is none."""
    from engine.planning import estimate as estimate_mod
    local = None if cfg.train.device == "cpu" else local_gpu()
    if local is None:
        if cfg.train.device == "cuda":
            return "Time to train: no prediction: no NVIDIA GPU found here (`estimate --gpu NAME` plans for a card)"
        pl = estimate_mod.plan(cfg, model_config, None)
        return for_config(cfg, model_config, pl, cpu_device(), False)[0][0]
    name, gpu = local
    mem = int(cfg.train.gpu_memory_gib * GIB) if cfg.train.gpu_memory_gib else estimate_mod.gpu_free_bytes()
    if gpu is None or mem is None:
        return for_config(cfg, model_config, None, None, False, local_name=name)[0][0]
    pl = estimate_mod.plan(cfg, model_config, mem)
    return for_config(cfg, model_config, pl, gpu, False)[0][0]


def run_predictor(cfg, device: str, mean_row_tokens: float):
    """For a run of the resolved ``cfg`` on ``device`` ("cuda": GPU 0, a catalog card; "cpu": the
    rough figure): a function of the steps left -> (seconds, the prediction's line); None when
    this GPU is not in the catalog. ``mean_row_tokens``: the tokenised rows' mean length."""
    from engine.planning import estimate as estimate_mod
    mc = estimate_mod.model_config_for(cfg)
    if device == "cuda":
        local = local_gpu()
        if local is None or local[1] is None:
            return None
        gpu, mem = local[1], local[1].memory_bytes
    else:
        gpu, mem = cpu_device(), None
    pl = estimate_mod.plan(cfg, mc, mem)
    rows = effective_batch(cfg.train.batch_size, cfg.train.grad_accum, cfg.distributed.processes)
    per_row = float(cfg.data.max_length) if cfg.data.packing is True else mean_row_tokens

    def predict_steps(steps: int) -> tuple[float, str]:
        work = Workload(max(0, steps), rows, per_row, mean_row_tokens, "the run's tokenised rows")
        p = predict(cfg, mc, pl, work, gpu, False)
        return p.seconds, p.line()
    return predict_steps
