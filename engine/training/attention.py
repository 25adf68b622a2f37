"""``varlen`` attention: packed rows kept apart at flash-attention speed, without flash-attn.

With ``sdpa``, packed rows (several samples in one row, ``position_ids`` restarting at 0) are
kept apart by a dense block-diagonal mask that transformers builds from the position ids. A
dense mask makes sdpa leave its flash kernel for the memory-efficient one, which computes every
block of the row's ``seq x seq`` square (a 2,048-token row of ~330-token samples does ~6x the
attention work it needs) and saves a ``seq x seq`` bias for the backward of every layer
(64 MiB a layer at micro-batch 8 x 2,048).

Here the attention function registered as ``varlen`` (transformers' ``AttentionInterface``)
calls PyTorch's own variable-length flash kernel (``torch.nn.attention.varlen.varlen_attn``,
in torch >= 2.10; no flash-attn wheel needed) with the samples' cumulative lengths: each
sample attends causally to itself only, and no mask is built. The lengths come from TRL's
padding-free collator (``cu_seq_lens_q``, computed on the CPU) or, for any other batch, from
the restarting ``position_ids`` and the 2D padding mask (pad tokens are dropped).

Off CUDA (or where the kernel cannot run) the same function computes each sample with sdpa,
one sample at a time: the same result, slower, so the CPU tests exercise every step but the
kernel call, and the kernel call itself is checked on the ``meta`` device (its fake kernel)
and, before a GPU run uses it, against sdpa on the GPU (``self_check``).
"""
from __future__ import annotations

import functools
import inspect

NAME = "varlen"
MIN_CAPABILITY = (8, 0)          # flash-attention 2 kernels: Ampere and newer
MAX_HEAD_DIM = 256


def kernel():
    """torch's ``varlen_attn``, or None when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def unavailable_reason(device: str, dtype: str | None = None, head_dim: int | None = None) -> str | None:
    """Why the varlen kernel cannot run here (None: it can)."""
    import torch
    if device != "cuda":
        return "CPU: the varlen flash kernel is CUDA-only"
    if kernel() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10)"
    if dtype not in (None, "bf16", "fp16"):
        return f"the varlen flash kernel needs bf16 or fp16, not {dtype}"
    if head_dim is not None and (head_dim > MAX_HEAD_DIM or head_dim % 8):
        return f"head dim {head_dim}: the flash kernel takes multiples of 8 up to {MAX_HEAD_DIM}"
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < MIN_CAPABILITY:
        return "the flash kernel needs compute capability 8.0 or newer"
    return None


def register() -> None:
    """Make ``attn_implementation="varlen"`` known to transformers (idempotent). The mask
    function is flash-attention's: None, or the 2D padding mask when a batch has padding."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    AttentionInterface.register(NAME, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)


# ---------------------------------------------------------------------------------------------
# sample boundaries

class Segments:
    """The samples of a batch flattened to ``B*S`` tokens: which tokens are kept (None: all),
    the cumulative lengths (int32, on the device) and the longest sample."""

    def __init__(self, keep, cu_seqlens, max_len: int):
        self.keep, self.cu_seqlens, self.max_len = keep, cu_seqlens, max_len


_CACHE: list = [None, None, None, None]   # (position_ids, attention_mask, shape, Segments) of the last batch


def segments(batch: int, seq: int, device, position_ids=None, attention_mask=None, cu_seq_lens=None,
             max_length=None) -> Segments:
    """Sample boundaries from the collator's ``cu_seq_lens`` (padding-free rows), else from
    ``position_ids`` restarting (a new sample wherever a position is not the previous + 1) and
    the 2D padding mask. Computed once per batch: every layer gets the same tensors."""
    import torch
    if cu_seq_lens is not None and max_length is not None and batch == 1 and attention_mask is None:
        return Segments(None, cu_seq_lens.to(device=device, dtype=torch.int32), int(max_length))
    key = (batch, seq, str(device))
    if _CACHE[0] is position_ids and _CACHE[1] is attention_mask and _CACHE[2] == key:
        return _CACHE[3]
    if position_ids is None:
        pos = torch.arange(seq, device=device).expand(batch, seq)
    else:
        pos = position_ids.to(device).expand(batch, seq)
    start = torch.ones(batch, seq, dtype=torch.bool, device=device)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    seg = start.reshape(-1).cumsum(0)
    keep = None
    if attention_mask is not None:
        keep = attention_mask.to(device).reshape(-1).bool().nonzero().squeeze(1)
        seg = seg[keep]
    _, counts = torch.unique_consecutive(seg, return_counts=True)
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=device)
    cu[1:] = counts.cumsum(0)
    out = Segments(keep, cu, int(counts.max()) if counts.numel() else 0)
    _CACHE[:] = [position_ids, attention_mask, key, out]
    return out


# ---------------------------------------------------------------------------------------------
# the kernel call

@functools.lru_cache(maxsize=16)
def _call_kwargs(fn, scale: float, gqa: bool) -> tuple[dict, bool]:
    """Keyword arguments for this torch's ``varlen_attn`` (causal, scale, GQA), and whether the
    key/value heads must be repeated first (a kernel without ``enable_gqa``). torch 2.10 takes
    ``is_causal``; later versions a ``window_size`` where (-1, 0) is causal."""
    params = inspect.signature(fn).parameters
    kw = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        kw["is_causal"] = True
    if "scale" in params:
        kw["scale"] = scale
    repeat = False
    if gqa:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            repeat = True
    return kw, repeat


def varlen_call(q, k, v, seg: Segments, scale: float):
    """``(T, Hq, D)``, ``(T, Hkv, D)`` tokens -> ``(T, Hq, D)``: torch's varlen flash kernel."""
    fn = kernel()
    kw, repeat = _call_kwargs(fn, scale, q.shape[1] != k.shape[1])
    kw = dict(kw)
    if repeat:
        n = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
    if "scale" not in kw:
        q = q * (scale * q.shape[-1] ** 0.5)        # the kernel's default scale is 1/sqrt(D)
    return fn(q, k, v, seg.cu_seqlens, seg.cu_seqlens, seg.max_len, seg.max_len, **kw)


def reference_call(q, k, v, seg: Segments, scale: float):
    """The same attention with sdpa, one sample at a time (any device; the CPU's path)."""
    import torch
    import torch.nn.functional as F
    cu = seg.cu_seqlens.tolist()
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for a, b in zip(cu[:-1], cu[1:]):
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                           v[a:b].transpose(0, 1), is_causal=True, scale=scale,
                                           enable_gqa=gqa)
        out[a:b] = o.transpose(0, 1)
    return out


def use_kernel(t) -> bool:
    return t.device.type in ("cuda", "meta") and kernel() is not None


def _half():
    import torch
    return (torch.bfloat16, torch.float16)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers' attention interface: ``(B, H, S, D)`` in, ``(B, S, H, D)`` out."""
    import torch
    if dropout:
        raise ValueError("varlen attention has no attention dropout (the model's attention_dropout "
                         "must be 0); use attn_implementation = sdpa")
    b, hq, s, d = query.shape
    if key.shape[2] != s:
        raise ValueError("varlen attention is for training (no KV cache): query and key lengths differ")
    scale = scaling if scaling is not None else d ** -0.5
    seg = segments(b, s, query.device, kwargs.get("position_ids"), attention_mask,
                   kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"))
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
    if seg.keep is not None:
        q, k, v = q[seg.keep], k[seg.keep], v[seg.keep]
    if use_kernel(q):
        dtype = q.dtype
        if dtype not in _half():                 # fp32 on the GPU: the flash kernel takes bf16/fp16
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        out = varlen_call(q, k, v, seg, scale).to(dtype)
    else:
        out = reference_call(q, k, v, seg, scale)
    if seg.keep is not None:                     # padded positions get zeros (their loss is masked)
        full = out.new_zeros(b * s, hq, d)
        full[seg.keep] = out
        out = full
    return out.reshape(b, s, hq, d), None


# ---------------------------------------------------------------------------------------------
# choosing it, and checking it on the GPU before a run relies on it

def self_check(device=None, dtype=None) -> str | None:
    """Forward and backward of a small GQA batch of three samples through the kernel, against
    sdpa per sample. None when they agree; else why not (the run then keeps sdpa)."""
    import os
    import torch
    device = device or torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dtype = dtype or torch.bfloat16
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        lens = [37, 64, 155]
        T = sum(lens)
        mk = lambda h: torch.randn(T, h, 64, generator=g).to(device, dtype).requires_grad_(True)
        q, k, v = mk(8), mk(2), mk(2)
        cu = torch.tensor([0, 37, 101, 256], dtype=torch.int32, device=device)
        seg = Segments(None, cu, max(lens))
        outs = []
        for call in (varlen_call, reference_call):
            o = call(q, k, v, seg, 0.125)
            grads = torch.autograd.grad((o.float() ** 2).sum(), (q, k, v))
            outs.append([o.float()] + [x.float() for x in grads])
        for name, a, b in zip(("output", "dq", "dk", "dv"), *outs):
            err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
            if not err < 0.05:           # bf16 rounding is ~0.01; a leak or a wrong mask is O(1)
                return f"{name} differs from sdpa by {err:.3f} (relative)"
    except Exception as e:        # a kernel that cannot run here: say why, keep sdpa
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"{type(e).__name__}: {first[:160]}"
    return None


def attention_work(lengths: list[int], seq: int) -> float:
    """The attention work varlen does on packed rows, as a share of causal attention over whole
    ``seq``-token rows: the samples' squared lengths over (packed rows x seq^2). (sdpa's
    masked kernel does more than whole causal rows: it skips no block of the square.)"""
    ls = [min(n, seq) for n in lengths]
    rows = max(1, -(-sum(ls) // seq))
    return sum(n * n for n in ls) / (rows * seq * seq)


def choose(cfg, rt, lengths: list[int] | None = None) -> list[str]:
    """``model.attn_implementation = auto`` with packing on, on the GPU: varlen when this torch
    and GPU can run it and it passes ``self_check``; plan lines saying why (or why not).
    Sets ``cfg.model.attn_implementation``; does nothing when packing is off or the kernel is set."""
    from engine.models.runtime import attn_implementation
    if cfg.model.attn_implementation != "auto" or cfg.data.packing is not True:
        return []
    current = attn_implementation(cfg, rt.device)
    if current == "flash_attention_2":
        return []
    why = unavailable_reason(rt.device, rt.dtype)
    if why is None:
        why = self_check()
    if why is not None:
        return [f"attention {current} for packed rows (block-diagonal mask); varlen not used: {why}"]
    cfg.model.attn_implementation = NAME
    work = ""
    if lengths:
        work = (f"; samples of ~{sorted(lengths)[len(lengths) // 2]} tokens: "
                f"{attention_work(lengths, cfg.data.max_length):.0%} of the attention "
                f"work of whole {cfg.data.max_length}-token rows")
    return [f"attention varlen for packed rows (torch's variable-length flash kernel: each sample "
            f"attends to itself only, no {cfg.data.max_length}x{cfg.data.max_length} mask, which would "
            f"take sdpa off its flash kernel{work}; checked against sdpa on this GPU)"]
