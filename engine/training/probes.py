"""Every fast path checks itself on the device it runs on before a run relies on it.

At plan time (``verify``, called by ``engine.training.trainer.resolve_auto`` once every ``auto`` is
resolved), each fast path the plan turned on runs once on a tiny problem on this device, and its
result is compared with the reference path's (plain torch / PEFT's own code). If it raises, or
its result is further from the reference than the path's tolerance, the run falls back to the
reference path and the plan line, the run's warning events and the Config screen say why. The
attention kernel does the same in ``engine.training.attention.self_check``.

| probe | guards | reference | tolerance (relative Frobenius error) |
|---|---|---|---|
| ``fused_lora`` | ``train.fused_lora`` | dequantised NF4 weight + LoRA in autograd | 3e-2: bf16 rounding of the GEMMs (~4e-3); a wrong layout or a missing gradient term is O(1) |
| ``fp8_base`` | ``train.fp8_base`` | the same GEMMs in fp32 | 0.1: e4m3 keeps 3 mantissa bits (~3.7% on random data, measured); a wrong scale is O(1) |
| ``triton_quant`` | FP8's Triton quantisation kernels (CUDA) | the torch quantisation | 0: the codes and scales are bit-identical on the H200 (bench/fp8_kernels.py) |
| ``liger`` | ``train.liger_kernel`` | torch RMSNorm and cross-entropy | 1e-2: fp32 reductions in another order |
| ``activation_offload`` | ``train.activation_offload`` | the same layers without checkpointing | 1e-3: the recompute repeats the same ops |
| ``pinned_buffers`` | pinned host buffers (weight streaming, offload) | the tensor itself | 0: a copy |

A failed ``triton_quant`` keeps FP8 on with the torch quantisation; a failed ``pinned_buffers``
keeps streaming and offload on pageable host memory (slower copies, same numbers); the others turn
their path off. Results are kept per process and device (a probe runs once). Fault injection
(``QLORA_TUI_FAULTS=probe:NAME`` or ``probewrong:NAME``, engine.core.faults) makes a probe raise or
come out wrong, so the fallbacks are tested on any machine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from engine.training import probe_results
from engine.training.probe_results import Result, passed


@dataclass(frozen=True)
class Probe:
    name: str
    label: str                       # what the plan line calls the path
    tolerance: float
    fn: Callable                     # (device, dtype) -> list of (fast, reference) tensor pairs


def _rel(fast, ref) -> float:
    import torch
    fast, ref = fast.detach().float(), ref.detach().float()
    if fast.shape != ref.shape:
        return float("inf")
    err = torch.linalg.vector_norm(fast - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-12)
    e = float(err)
    return e if e == e else float("inf")             # NaN counts as wrong


def _gen():
    import torch
    return torch.Generator(device="cpu").manual_seed(1234)


# ---------------------------------------------------------------------------------------------
# the probes

def _fused_lora(device, dtype):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch
    from engine.training import fused_lora
    g = _gen()
    k, n, r, tokens, s = 128, 96, 8, 24, 2.0
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(n, k, generator=g) * 0.05, requires_grad=False, quant_type="nf4")
    base = base.to(device)
    mk = lambda *shape: (torch.randn(*shape, generator=g) * 0.1).to(device, dtype).requires_grad_(True)
    x, a, b = mk(2, tokens // 2, k), mk(r, k), mk(n, r)
    dy = torch.randn(2, tokens // 2, n, generator=g).to(device, dtype)
    out = fused_lora._function().apply(x, a, b, base, s, False)
    fast = [out, *torch.autograd.grad(out, (x, a, b), dy)]
    w = F.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)
    ref_out = x @ w.t() + (x @ a.t()) @ b.t() * s
    ref = [ref_out, *torch.autograd.grad(ref_out, (x, a, b), dy)]
    return list(zip(fast, ref))


def _fp8_base(device, dtype):
    import torch
    from engine.training import fp8
    g = _gen()
    x, w, dy = (torch.randn(*sh, generator=g).to(device, torch.bfloat16) for sh in ((64, 128), (256, 128), (64, 256)))
    return [(fp8.matmul_nt(x, w), x.float() @ w.float().t()), (fp8.matmul_nn(dy, w), dy.float() @ w.float())]


def _triton_quant(device, dtype):
    import torch
    from engine.training import fp8
    g = _gen()
    x = (torch.randn(37, 320, generator=g) * torch.logspace(-2, 2, 37)[:, None]).to(device, torch.bfloat16)
    q, sc = fp8.quantize_rows(x)                               # the Triton kernel on CUDA
    ref_s = fp8._pow2_scale(x.abs().amax(dim=1, keepdim=True))
    ref_q = (x.float() / ref_s).to(torch.float8_e4m3fn)
    qt, st = fp8.quantize_cols_transposed(x)
    ref_st = fp8._pow2_scale(torch.linalg.vector_norm(x, ord=float("inf"), dim=0)).unsqueeze(1)
    ref_qt = (x.t().float() / ref_st).to(torch.float8_e4m3fn)
    return [(q.float(), ref_q.float()), (sc, ref_s), (qt.float(), ref_qt.float()), (st, ref_st)]


def _liger(device, dtype):
    import torch
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerRMSNorm
    g = _gen()
    h, v, t = 64, 128, 32
    x = torch.randn(t, h, generator=g).to(device, dtype)
    norm = LigerRMSNorm(h, eps=1e-6).to(device, dtype)
    ref_norm = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)) * norm.weight.float()
    w = (torch.randn(v, h, generator=g) * 0.1).to(device, dtype)
    target = torch.randint(0, v, (t,), generator=g).to(device)
    ce = LigerFusedLinearCrossEntropyLoss()(w, x, target)
    ref_ce = torch.nn.functional.cross_entropy(x.float() @ w.float().t(), target)
    return [(norm(x), ref_norm), (ce.reshape(1), ref_ce.reshape(1))]


def _activation_offload(device, dtype):
    import torch
    from engine.training import offload
    g = _gen()
    layers = [torch.nn.Linear(32, 32).to(device, dtype) for _ in range(3)]
    with torch.no_grad():
        for lin in layers:
            lin.weight.copy_(torch.randn(32, 32, generator=g) * 0.2)
    x0 = torch.randn(4, 8, 32, generator=g).to(device, dtype)

    def run(offloaded: bool):
        x = x0.clone().requires_grad_(True)
        for lin in layers:
            lin.weight.grad = None
        h = x
        for lin in layers:
            f = lambda t, lin=lin: torch.tanh(lin(t))
            h = offload.offloaded_checkpoint(f, h) if offloaded else f(h)
        (h.float() ** 2).sum().backward()         # the recompute accumulates the weights' gradients
        return [h.detach(), x.grad] + [lin.weight.grad.clone() for lin in layers]
    with offload.own_stash():
        fast = run(True)
    return list(zip(fast, run(False)))


def _pinned_buffers(device, dtype):
    import torch
    from engine.training import offload, streaming
    t = torch.randn(1 << 14, generator=_gen()).to(device, dtype)
    host = streaming._pinned(t) if device.type == "cuda" else t.detach().to("cpu")
    back = host.to(device, non_blocking=True)
    stash = offload.HostStash()
    got = stash.get(stash.put(t))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return [(back, t), (got, t)]


PROBES = {p.name: p for p in (
    Probe("fused_lora", "fused NF4+LoRA linear", 3e-2, _fused_lora),
    Probe("fp8_base", "FP8 base GEMMs", 0.1, _fp8_base),
    Probe("triton_quant", "FP8's Triton quantisation kernels", 0.0, _triton_quant),
    Probe("liger", "Liger kernels", 1e-2, _liger),
    Probe("activation_offload", "offloaded checkpointing", 1e-3, _activation_offload),
    Probe("pinned_buffers", "pinned host buffers", 0.0, _pinned_buffers),
)}


# ---------------------------------------------------------------------------------------------
# running them

def _device(rt):
    import torch
    from engine.models.runtime import torch_dtype, train_device
    return torch.device(train_device(rt)), torch_dtype(rt.dtype)


def check(name: str, device, dtype) -> Result:
    """Run probe ``name`` on ``device`` (once a process; later calls return the same result)."""
    key = (name, str(device), str(dtype))
    if key in probe_results.RESULTS:
        return probe_results.RESULTS[key]
    from engine.core import faults as faults_mod
    probe = PROBES[name]
    faults = faults_mod.from_env()
    t0 = time.perf_counter()
    error, why = None, None
    try:
        if name in faults.probe_raise:
            raise RuntimeError("injected fault (QLORA_TUI_FAULTS)")
        pairs = probe.fn(device, dtype)
        if name in faults.probe_wrong:
            pairs = [(fast * 1.5 + 1, ref) for fast, ref in pairs]
        error = max(_rel(f, r) for f, r in pairs)
        if not error <= probe.tolerance:
            why = f"its result is {error:.3g} off the reference path (tolerance {probe.tolerance:g})"
    except Exception as e:   # a kernel that cannot run here: say why, take the reference path
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        why = f"{type(e).__name__}: {first[:160]}"
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)
    res = Result(name, probe.label, why is None, error, probe.tolerance, why, time.perf_counter() - t0)
    probe_results.RESULTS[key] = res
    return res


def verify(cfg, rt) -> tuple[list[str], list[str]]:
    """Probe each fast path ``cfg`` (every ``auto`` resolved) turns on, on ``rt``'s device; turn
    off those that fail. Returns (plan lines, warnings): one line for the paths that passed, one
    line and one warning for each that failed."""
    tr = cfg.train
    device, dtype = _device(rt)
    cuda = device.type == "cuda"
    wanted = []
    if tr.fused_lora is True:
        wanted.append("fused_lora")
    if tr.fp8_base is True:
        wanted += ["triton_quant", "fp8_base"] if cuda else ["fp8_base"]
    if tr.liger_kernel is True:
        wanted.append("liger")
    if tr.activation_offload is True:
        wanted.append("activation_offload")
    if cuda and (tr.activation_offload is True or tr.weight_streaming is True):
        wanted.append("pinned_buffers")
    lines, warnings, ok, seconds = [], [], [], 0.0
    for name in wanted:
        if name == "fp8_base" and tr.fp8_base is not True:        # the fused linear failed first
            continue
        r = check(name, device, dtype)
        seconds += r.seconds
        if r.ok:
            ok.append(f"{r.label} {r.error:.1e}")
            continue
        instead = _fall_back(cfg, name)
        msg = f"{r.label} off: its check on this {device.type.upper()} failed ({r.why}); {instead}"
        lines.append(msg)
        warnings.append(msg)
    if ok:
        lines.append(f"checked on this {device.type.upper()} against the reference path ({seconds:.2f} s; "
                     f"relative error): " + ", ".join(ok))
    return lines, warnings


def _fall_back(cfg, name: str) -> str:
    tr = cfg.train
    if name == "fused_lora":
        tr.fused_lora = False
        if tr.fp8_base is True:
            tr.fp8_base = False
            return "PEFT's own LoRA path runs instead (and the base GEMMs stay bf16: FP8 runs in the fused linear)"
        return "PEFT's own LoRA path runs instead"
    if name == "fp8_base":
        tr.fp8_base = False
        return "the base GEMMs run in bf16"
    if name == "triton_quant":
        return "FP8 quantises with torch ops instead (slower, the same numbers)"
    if name == "liger":
        tr.liger_kernel = False
        return "transformers' own RMSNorm, SwiGLU, RoPE and cross-entropy run instead"
    if name == "activation_offload":
        tr.activation_offload = False
        return "checkpointed layers keep their inputs on the GPU"
    if name == "pinned_buffers":
        return "host copies use pageable memory (slower, the same numbers)"
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# FP8's own numerics on the run's data (engine.training.sft runs the guard; kept per machine)

FP8_GUARD_THRESHOLD = 0.005
"""Largest relative difference of the first micro-batch's loss, FP8 base GEMMs against bf16, that
keeps FP8 on. Measured: 0.1% on the 8B shape (random weights, H200) and at most 0.25% on a real
pretrained model (stories260K, CPU); 0.5% is twice the largest, while a broken scale or an
overflow moves the loss by 10% or more."""


def _numerics_file():
    from engine.models.builtin import cache_dir
    return cache_dir() / "numerics.json"


def device_name(rt_device: str) -> str:
    if rt_device == "cuda":
        import torch
        return torch.cuda.get_device_name()
    return "cpu"


def record_numerics(device: str, path: str, relative_difference: float, kept: bool) -> None:
    """Keep the last measured difference of a fast path on this machine (the Config screen's note)."""
    import json
    f = _numerics_file()
    try:
        data = json.loads(f.read_text(encoding="utf-8")) if f.is_file() and f.stat().st_size < 65536 else {}
        if not isinstance(data, dict):
            data = {}
        data.setdefault(device, {})[path] = {"relative_difference": relative_difference, "kept": kept,
                                             "time": time.time()}
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        tmp.replace(f)
    except (OSError, ValueError):
        pass                     # a note for the screen: never a reason to fail the run


def fp8_note(device: str | None = None) -> str:
    """The Config screen's words on FP8 base GEMMs: an approximation, and the last measured
    difference on this machine once a run has measured it."""
    import json
    text = "FP8 base GEMMs are an approximation (e4m3 operands, bf16 results; LoRA stays bf16)"
    try:
        f = _numerics_file()
        data = json.loads(f.read_text(encoding="utf-8")) if f.is_file() and f.stat().st_size < 65536 else {}
        entries = [v.get("fp8_base") for k, v in data.items() if isinstance(v, dict)
                   and (device is None or k == device)] if isinstance(data, dict) else []
        last = max((e for e in entries if isinstance(e, dict)), key=lambda e: e.get("time", 0), default=None)
    except (OSError, ValueError):
        last = None
    if last and isinstance(last.get("relative_difference"), (int, float)):
        verdict = "kept" if last.get("kept") else "turned off"
        text += (f": the last run here measured {last['relative_difference']:.2%} loss difference on its "
                 f"first step ({verdict}; the limit is {FP8_GUARD_THRESHOLD:.1%})")
    else:
        text += f": each run measures its first step's loss both ways and turns FP8 off above {FP8_GUARD_THRESHOLD:.1%}"
    return text


def planner_notes(fp8_planned: bool) -> list[str]:
    """The Config screen's planner lines: on a CUDA machine the fast paths the planner counts on,
    checked here (once a process), with why one is off; and FP8's words where it is planned."""
    out, dev = [], "cpu"
    try:
        import torch
        if torch.cuda.is_available():
            dev = device_name("cuda")
            device = torch.device("cuda", 0)
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            for name in ["fused_lora"] + (["triton_quant", "fp8_base"] if fp8_planned else []):
                r = check(name, device, dtype)
                if not r.ok:
                    out.append(f"{r.label} off on this GPU: {r.why}")
    except Exception as e:       # advice for the screen: never an error there
        out.append(f"fast-path checks unavailable: {type(e).__name__}")
    if fp8_planned and passed("fp8_base") and passed("fused_lora"):
        out.append(fp8_note(dev))
    return out
