"""FP8 GEMMs for the frozen 4-bit base (``train.fp8_base``).

The frozen base's two GEMMs per projection, ``x @ W.T`` (forward, recompute) and ``dy @ W``
(input gradient), are most of a QLoRA step's time (68% of a decoder layer's CUDA time on the
H200, bench/RESULTS.md). Hopper and Ada run e4m3 GEMMs faster than bf16 (1.5-1.6x for the 8B
and 70B projections at 16,384 tokens on the H200, bench/fp8_kernels.py). Here both
operands are scaled per row to e4m3 (``x`` and ``dy`` per token, ``W`` per output channel in the
forward and per input channel in the backward) and multiplied by ``torch._scaled_mm`` into a
bf16 result, the rowwise recipe of torchao's float8 training; scales are powers of two, so the
scaling itself is exact. Only the frozen base goes through FP8: the LoRA adapters, their
gradients, attention, norms and the LM head stay in bf16, and the 4-bit weight is dequantised
to bf16 first exactly as before (FP8 rounding of an NF4 value times its block scale is the only
extra error: 3 mantissa bits, at most 2^-4 relative per element, unbiased over a dot product).

Where a projection's dimensions are not multiples of 16 (``_scaled_mm``'s rule) the bf16 path
runs for that projection. The CPU has ``_scaled_mm`` too (no speed, the same numerics): the
tests train builtin:tiny with and without FP8 and compare the losses.
"""
from __future__ import annotations

E4M3_MAX = 448.0


def unsupported_reason(device: str) -> str | None:
    """Why FP8 base GEMMs cannot run on ``device`` (None when they can)."""
    import torch
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no float8 GEMM"
    if device == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        cap = torch.cuda.get_device_capability()
        if cap < (8, 9):
            return f"GPU compute capability {cap[0]}.{cap[1]} < 8.9 (FP8 needs Ada or Hopper)"
    return None


def fits(k: int, n: int) -> bool:
    """``_scaled_mm`` needs the inner and output dimensions to be multiples of 16."""
    return k % 16 == 0 and n % 16 == 0


_KERNEL = None


def _triton_kernel():
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def rowwise_e4m3(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            xr = x_ptr + row * stride_x
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for k in range(0, K, BLOCK):
                offs = k + tl.arange(0, BLOCK)
                v = tl.load(xr + offs, mask=offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            m = tl.maximum(tl.max(amax, 0), 1e-30)
            scale = tl.exp2(tl.ceil(tl.log2(m / 448.0)))
            inv = 1.0 / scale
            qr = q_ptr + row * stride_q
            for k in range(0, K, BLOCK):
                offs = k + tl.arange(0, BLOCK)
                v = tl.load(xr + offs, mask=offs < K, other=0.0).to(tl.float32)
                tl.store(qr + offs, (v * inv).to(tl.float8e4nv), mask=offs < K)
            tl.store(s_ptr + row, scale)

        @triton.jit
        def transpose_e4m3(w_ptr, inv_ptr, q_ptr, R, C, stride_w, stride_q,
                           BR: tl.constexpr, BC: tl.constexpr):
            """q[c, r] = e4m3(w[r, c] * inv[c]) for one BR x BC tile (reads and writes coalesced)."""
            r = tl.program_id(0) * BR + tl.arange(0, BR)
            c = tl.program_id(1) * BC + tl.arange(0, BC)
            mask = (r[:, None] < R) & (c[None, :] < C)
            v = tl.load(w_ptr + r[:, None].to(tl.int64) * stride_w + c[None, :], mask=mask, other=0.0)
            inv = tl.load(inv_ptr + c, mask=c < C, other=0.0)
            v = tl.minimum(tl.maximum(v.to(tl.float32) * inv[None, :], -448.0), 448.0)
            tl.store(q_ptr + c[None, :].to(tl.int64) * stride_q + r[:, None], v.to(tl.float8e4nv), mask=mask)

        _KERNEL = (rowwise_e4m3, transpose_e4m3)
    return _KERNEL


def quantize_rows(x):
    """``x`` (2-D, rows contiguous) -> (e4m3 tensor, float32 scales of shape [rows, 1]) with
    ``x ~= q * scale`` row by row; each scale is the power of two that maps the row's largest
    magnitude to at most 448."""
    import torch
    assert x.dim() == 2
    if x.stride(1) != 1:
        x = x.contiguous()
    if x.is_cuda and _triton_ok():
        q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        s = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
        if x.shape[0]:
            _triton_kernel()[0][(x.shape[0],)](x, q, s, x.shape[1], x.stride(0), q.stride(0), BLOCK=1024)
        return q, s
    s = _pow2_scale(x.abs().amax(dim=1, keepdim=True))
    return (x.float() / s).to(torch.float8_e4m3fn), s


def _triton_ok() -> bool:
    """The Triton kernels passed their check on this device (engine.training.probes), or never ran it."""
    from engine.training.probe_results import passed
    return passed("triton_quant")


def _pow2_scale(amax):
    import torch
    return torch.exp2(torch.ceil(torch.log2(amax.float().clamp(min=1e-30) / E4M3_MAX)))


def quantize_cols_transposed(w):
    """``w`` (out x in, bf16) -> (e4m3 ``w.T`` laid out in x out, float32 scales [in, 1]): each input
    column of ``w`` scaled by its power of two, written transposed in one pass on CUDA (no bf16
    transposed copy: the input gradient's GEMM wants ``w`` column-major)."""
    import torch
    s = _pow2_scale(torch.linalg.vector_norm(w, ord=float("inf"), dim=0)).unsqueeze(1)   # [in, 1]
    if not (w.is_cuda and _triton_ok()):
        return (w.t().float() / s).to(torch.float8_e4m3fn), s
    w = w.contiguous()
    R, C = w.shape
    q = torch.empty((C, R), dtype=torch.float8_e4m3fn, device=w.device)
    inv = (1.0 / s).reshape(-1)
    grid = (_cdiv(R, 64), _cdiv(C, 64))
    _triton_kernel()[1][grid](w, inv, q, R, C, w.stride(0), q.stride(0), BR=64, BC=64)
    return q, s


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def matmul_nt(x2, w):
    """``x2 @ w.T`` in FP8 (x2: tokens x in, w: out x in, both bf16); bf16 result."""
    import torch
    xq, xs = quantize_rows(x2)
    wq, ws = quantize_rows(w)
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=x2.dtype)


def matmul_nn(dy2, w):
    """``dy2 @ w`` in FP8 (dy2: tokens x out, w: out x in): the input gradient; bf16 result."""
    import torch
    dq, ds = quantize_rows(dy2)
    wq, ws = quantize_cols_transposed(w)
    return torch._scaled_mm(dq, wq.t(), scale_a=ds, scale_b=ws.t(), out_dtype=dy2.dtype)
