"""A fused NF4 + LoRA linear: one autograd function per projection instead of PEFT's chain.

PEFT's 4-bit LoRA forward is ``base(x).clone() + lora_B(lora_A(x)) * scaling``: a copy, a
scaling multiply and an add over the whole ``tokens x out`` output, and in the backward the
same again for the two input-gradient paths (base and LoRA) that autograd sums. On the H200
those element-wise passes were 14% of a decoder layer's CUDA time (bench/RESULTS.md). Here the
LoRA product is accumulated into the base GEMM's output by the GEMM itself (``addmm_`` with
beta = 1, alpha = scaling), and likewise the LoRA input gradient into the base input gradient;
the 4-bit weight is dequantised in the forward and again in the backward (never stored).

Used for vanilla LoRA only (one active adapter, no dropout, no DoRA/variants, not merged, no
bias); anything else falls back to PEFT's own forward on each call. With ``train.fp8_base`` the
two base GEMMs run in FP8 (engine.training.fp8). Under weight streaming the function runs the
base layer's pre-hooks itself (the streamer's window) and asks the streamer for the layer before
its backward dequantizes it.
"""
from __future__ import annotations

import types


def _dequantize(base):
    import bitsandbytes.functional as F
    w = base.weight
    return F.dequantize_4bit(w.data, w.quant_state)


class _Fn:
    fn = None


def _function():
    if _Fn.fn is not None:
        return _Fn.fn
    import torch
    from engine.training.fp8 import matmul_nn as fp8_matmul_nn, matmul_nt as fp8_matmul_nt

    class FusedLoRA4bit(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, a, b, base, scaling, fp8):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            w = _dequantize(base).to(x2.dtype)
            xa = x2 @ a.to(x2.dtype).t()
            out = fp8_matmul_nt(x2, w) if fp8 else x2 @ w.t()
            del w
            out.addmm_(xa, b.to(x2.dtype).t(), alpha=scaling)
            ctx.save_for_backward(x2, xa, a, b)
            ctx.base, ctx.scaling, ctx.shape, ctx.fp8 = base, scaling, shape, fp8
            return out.view(*shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, dy):
            x2, xa, a, b = ctx.saved_tensors
            s = ctx.scaling
            dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
            dyb = dy2 @ b.to(x2.dtype)                          # tokens x r
            dx = None
            if ctx.needs_input_grad[0]:
                require = getattr(ctx.base, "_stream_require", None)
                if require is not None:        # a streamed layer (engine.training.streaming)
                    require()
                w = _dequantize(ctx.base).to(x2.dtype)
                dx = fp8_matmul_nn(dy2, w) if ctx.fp8 else dy2 @ w
                del w
                dx.addmm_(dyb, a.to(x2.dtype), alpha=s)
                dx = dx.view(ctx.shape)
            da = (dyb.t() @ x2).mul_(s).to(a.dtype) if ctx.needs_input_grad[1] else None
            db = (dy2.t() @ xa).mul_(s).to(b.dtype) if ctx.needs_input_grad[2] else None
            return dx, da, db, None, None, None

    _Fn.fn = FusedLoRA4bit
    return FusedLoRA4bit


def _eligible_now(m) -> str | None:
    """The active adapter when this call can take the fused path, else None. With the adapters
    disabled (the reference pass of DPO/KTO: ``model.disable_adapter()``) a no-grad call still
    takes it with the LoRA scaled by 0, so the reference uses the very base GEMMs (FP8 included)
    the policy uses: at a fresh adapter the policy and the reference agree exactly (DPO's loss is
    log 2), instead of differing by the FP8 rounding summed over every token of a sequence."""
    import torch
    if m.merged or m.base_layer.bias is not None:
        return None
    if m.disable_adapters and torch.is_grad_enabled():
        return None       # a graph through a disabled adapter: PEFT's path (no zero gradients)
    active = [a for a in m.active_adapters if a in m.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(m, "lora_variant", {}) or not isinstance(m.lora_dropout[name], torch.nn.Identity):
        return None
    return name


def _forward(self, x, *args, **kwargs):
    name = None if args or kwargs else _eligible_now(self)
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    base = self.base_layer
    kw_ids = base._forward_pre_hooks_with_kwargs
    for hid, hook in base._forward_pre_hooks.items():  # what calling the base layer would run first
        hook(base, (x,), {}) if hid in kw_ids else hook(base, (x,))   # (streaming: the layer resident)
    scale = 0.0 if self.disable_adapters else float(self.scaling[name])
    return _function().apply(x, self.lora_A[name].weight, self.lora_B[name].weight, base, scale, self._fp8)


def eligible_reason(cfg) -> str | None:
    """Why the fused path cannot be used with this config (None when it can)."""
    from engine import methods
    method = methods.of(cfg)
    if not method.four_bit(cfg):
        return "16-bit base: PEFT's own path"
    if cfg.lora.dropout:
        return "lora.dropout > 0: PEFT's own path"
    if method.dora(cfg):
        return "DoRA: PEFT's own path"
    if cfg.lora.lora_fa:
        return "LoRA-FA: PEFT's own path"
    return None


def patch(model, fp8: bool = False) -> int:
    """Route every PEFT 4-bit LoRA linear of ``model`` through the fused function; returns how many.
    ``fp8``: the frozen base's GEMMs in FP8 (engine.training.fp8) where the dimensions allow."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, Linear4bit) and not hasattr(m, "_peft_forward"):
            from engine.training.fp8 import fits
            m._fp8 = bool(fp8) and fits(m.in_features, m.out_features)
            m._peft_forward = m.forward
            m.forward = types.MethodType(_forward, m)
            n += 1
    return n


def FusedLoRACallback(fp8: bool = False):
    """Patches the Trainer's model when training starts (after TRL has wrapped it with PEFT)."""
    from transformers import TrainerCallback

    class _Cb(TrainerCallback):
        patched = 0

        def on_train_begin(self, args, state, control, model=None, **kw):
            if model is not None:
                self.patched = patch(model, fp8)
    return _Cb()
