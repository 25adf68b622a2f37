"""Weight streaming: train a 4-bit base larger than the GPU budget (docs/ESTIMATE.md, "Weight
streaming").

The frozen 4-bit weights of the decoder layers (each ``Linear4bit``'s packed weight and its
``absmax``) live in pinned host memory. Everything else (embeddings, lm_head, norms, LoRA
adapters, the small double-quant tables) lives on the GPU. A forward pre-hook on every
``Linear4bit`` makes its layer resident before the layer computes and queues the copies of the
next ``ahead`` layers on a side CUDA stream, so the transfers overlap the current layer's
compute. The 4-bit matmul itself runs through ``StreamedMatmul4bit`` instead of bitsandbytes'
own autograd function: bitsandbytes keeps the packed weight on its autograd node (``ctx.tensors``,
not ``save_for_backward``), so gradient checkpointing cannot drop it and every layer's streamed
copy would stay alive on the GPU from the forward until the backward (the whole base on the GPU:
seen on the H200, 50.7 GiB reserved under a 24 GiB budget). Our function keeps no tensor; its
backward asks the streamer for the layer (``require``) and dequantizes the weight then. The order a step visits layers is cyclic: forward 0..L-1, then (gradient
checkpointing) recompute + backward L-1..0; inside the autograd engine
(``torch._C._current_graph_task_id() != -1``) a hook counts as the backward half. A layer's
backward runs right after its recompute, with the weights the recompute made resident, so each
layer crosses the link twice per micro-batch (forward, recompute). Layers outside the window
are evicted: the packed weight and ``absmax`` point at empty (0-element) placeholders on the
device, never at stale memory; a forward with gradients but without checkpointing (whose
backward would need every layer at once) is refused up front.

Why our own and not an existing mechanism (checked against torch 2.x / accelerate 1.x):
accelerate's ``cpu_offload``/``AlignDevicesHook`` copies a module's weights synchronously in
its pre-forward hook on the compute stream (no prefetch, no overlap) and cannot see the
checkpoint recompute of HF decoder layers, whose checkpoint wraps ``forward`` not
``__call__``, so module hooks on the layer itself do not fire in the recompute; FSDP's
``CPUOffload`` on one rank offloads parameters *and gradients* and requires flat, uniformly
typed parameters (bnb's ``Params4bit`` with a Python-side ``quant_state`` needs
``bnb_4bit_quant_storage`` tricks and the FSDP-QLoRA wrapping), and it prefetches only in
backward (``BackwardPrefetch``), never in the recompute.

On the CPU (``device = cpu``, the degenerate case used by the tests) the "transfer" is an
assignment of the host tensor: the placeholders, hooks, window and eviction run the same.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

AHEAD = 2      # layers prefetched ahead of the one computing


def _is_4bit(module) -> bool:
    """A module that owns a bitsandbytes 4-bit weight (bnb's Linear4bit; not PEFT's wrapper,
    which shares its name and exposes the base layer's weight as a property)."""
    w = module._parameters.get("weight")
    return w is not None and type(w).__name__ == "Params4bit"


def decoder_layers(model):
    """The model's decoder layer list (PEFT-wrapped or not; an image-text model's language model
    layers, the vision tower's blocks are 16-bit and stay put), or None."""
    m = model
    for attr in ("base_model", "model"):          # PeftModel -> LoraModel -> *ForCausalLM
        while hasattr(m, attr) and not hasattr(m, "layers") and getattr(m, attr) is not m:
            m = getattr(m, attr)
    layers = getattr(m, "layers", None)
    if layers is None and hasattr(m, "model"):
        layers = getattr(m.model, "layers", None)
    lm = getattr(m, "language_model", None)           # image-text models: Qwen2-VL, LLaVA, Gemma 3
    if layers is None and lm is not None:
        layers = decoder_layers(lm)
    return layers


@dataclass
class _Slot:
    """One decoder layer's streamed tensors: (owner, attribute, host tensor, placeholder)."""
    entries: list = field(default_factory=list)
    bytes: int = 0

    def attach(self, tensors) -> None:
        for (owner, attr, _host, _ph), t in zip(self.entries, tensors):
            _assign(owner, attr, t)

    def detach(self) -> None:
        for owner, attr, _host, ph in self.entries:
            _assign(owner, attr, ph)


def _pinned(t):
    """A page-locked host copy of ``t``, registered in place with cudaHostRegister: torch's
    pinned allocator rounds each block up to a power of two (a 117 MB gate_proj would take
    128 MB; a 70B base ~1.3x its size). Falls back to ``pin_memory()`` where registering fails."""
    import torch
    from engine.training.probe_results import passed
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    host.copy_(t.detach())
    if not passed("pinned_buffers"):       # failed its check here: pageable memory (slower copies)
        return host
    try:
        rc = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel() * host.element_size(), 0)
        if int(getattr(rc, "value", rc)) == 0:
            _REGISTERED.append(host)        # never freed while registered (process lifetime)
            return host
    except Exception:
        pass
    return host.pin_memory()


_REGISTERED: list = []


def _assign(owner, attr, t) -> None:
    if attr == "data":
        owner.data = t
    else:
        setattr(owner, attr, t)


class WeightStreamer:
    """Keeps at most ``ahead + 1`` decoder layers' 4-bit weights on ``device``."""

    def __init__(self, layers, device, ahead: int = AHEAD):
        import torch
        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.L = len(layers)
        self.ahead = min(ahead, max(0, self.L - 2))   # a window over every layer would stream nothing
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.layers = list(layers)
        self.slots = [self._make_slot(layer) for layer in layers]
        self.resident: dict[int, list] = {}
        self.pending: dict[int, tuple] = {}
        self.loads = 0               # layer copies issued (2 per layer per micro-batch in training)
        self.handles = []
        self.forwards = []           # (module, its own forward) while ours is installed
        for i, layer in enumerate(layers):
            for m in layer.modules():
                if _is_4bit(m):
                    self.handles.append(m.register_forward_pre_hook(self._hook(i)))
                    self.forwards.append((m, m.__dict__.get("forward")))
                    m.forward = functools.partial(streamed_forward, m, self, i)
                    m._stream_require = functools.partial(self.require, i)   # fused LoRA's backward

    # -- setup
    def _make_slot(self, layer) -> _Slot:
        torch = self.torch
        slot = _Slot()
        for m in layer.modules():
            if not _is_4bit(m):
                continue
            m.support_avx512bf16_for_cpu = False     # bnb would repack the weight in place on CPU
            w = m.weight
            qs = getattr(w, "quant_state", None)
            pairs = [(w, "data", w.data)]
            if qs is not None:
                pairs.append((qs, "absmax", qs.absmax))
                for name in ("code", "offset"):
                    if isinstance(getattr(qs, name, None), torch.Tensor):
                        setattr(qs, name, getattr(qs, name).to(self.device))
                s2 = getattr(qs, "state2", None)
                if s2 is not None:
                    s2.absmax, s2.code = s2.absmax.to(self.device), s2.code.to(self.device)
            for owner, attr, t in pairs:
                host = _pinned(t) if self.cuda else t.detach().to("cpu")
                # 0 elements on the device: bnb's QuantState.to() (Trainer, accelerate) still works
                ph = torch.empty(0, dtype=t.dtype, device=self.device)
                slot.entries.append((owner, attr, host, ph))
                slot.bytes += host.numel() * host.element_size()
                _assign(owner, attr, ph)
        return slot

    @property
    def streamed_bytes(self) -> int:
        return sum(s.bytes for s in self.slots)

    def remove(self) -> None:
        """Put every layer back on the host tensors (e.g. before handing the model elsewhere)."""
        for h in self.handles:
            h.remove()
        for m, own in self.forwards:
            if own is None:
                del m.forward
            else:
                m.forward = own
            m.__dict__.pop("_stream_require", None)
        self.forwards.clear()
        for i in list(self.resident):
            self._evict(i)
        self.pending.clear()
        for s in self.slots:
            s.attach([host for _o, _a, host, _p in s.entries])

    # -- the window
    def _order(self, q: int) -> int:
        q %= 2 * self.L
        return q if q < self.L else 2 * self.L - 1 - q

    def _hook(self, i: int):
        def pre(_module, _args):
            if i in self.resident and self._last == (i, self._in_backward()):
                return None
            self.step(i)
            return None
        return pre

    _last = (-1, False)

    def _in_backward(self) -> bool:
        return self.torch._C._current_graph_task_id() != -1

    def step(self, i: int) -> None:
        back = self._in_backward()
        layer = self.layers[i]
        if not back and self.torch.is_grad_enabled() and not (
                getattr(layer, "gradient_checkpointing", False) and layer.training):
            raise RuntimeError("weight streaming needs gradient checkpointing in training mode: the "
                               "backward would need every layer's weights at once (call "
                               "gradient_checkpointing_enable() and train(), or run under no_grad)")
        self._last = (i, back)
        p = 2 * self.L - 1 - i if back else i
        want = []
        for q in range(p, p + self.ahead + 1):
            j = self._order(q)
            if j not in want:
                want.append(j)
        for j in list(self.resident):
            if j not in want:
                self._evict(j)
        for j in list(self.pending):
            if j not in want:
                del self.pending[j]
        self._make_resident(i)
        for j in want[1:]:
            if j not in self.resident and j not in self.pending:
                self._load(j)

    def require(self, i: int) -> None:
        """Layer ``i`` resident now (a backward that needs its weights), without moving the window."""
        self._make_resident(i)

    def _load(self, i: int) -> None:
        torch = self.torch
        hosts = [host for _o, _a, host, _p in self.slots[i].entries]
        self.loads += 1
        if not self.cuda:            # a copy, as a transfer makes: a reference kept too long shows
            self.pending[i] = ([h.clone() for h in hosts], None)
            return
        with torch.cuda.stream(self.stream):
            ts = [h.to(self.device, non_blocking=True) for h in hosts]
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.pending[i] = (ts, ev)

    def _make_resident(self, i: int) -> None:
        if i in self.resident:
            return
        if i not in self.pending:
            self._load(i)
        ts, ev = self.pending.pop(i)
        if ev is not None:
            cur = self.torch.cuda.current_stream(self.device)
            cur.wait_event(ev)
            for t in ts:
                t.record_stream(cur)     # the allocator reuses it only after the compute stream is done
        self.slots[i].attach(ts)
        self.resident[i] = ts

    def _evict(self, i: int) -> None:
        self.slots[i].detach()
        del self.resident[i]


def streamed_forward(module, streamer: WeightStreamer, i: int, x):
    """bitsandbytes' ``Linear4bit.forward`` with the matmul through ``StreamedMatmul4bit``."""
    from bitsandbytes.nn import modules as bnb_modules
    fix = getattr(bnb_modules, "fix_4bit_weight_quant_state_from_module", None)
    if fix is not None:
        fix(module)
    if not module.compute_type_is_set:
        module.set_compute_type(x)
        module.compute_type_is_set = True
    inp_dtype = x.dtype
    if module.compute_dtype is not None:
        x = x.to(module.compute_dtype)
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return matmul_function().apply(x, bias, streamer, i, module).to(inp_dtype)


_FUNCTION = None


def matmul_function():
    """The autograd function (built on first use: this module imports torch lazily)."""
    global _FUNCTION
    if _FUNCTION is None:
        import torch

        class StreamedMatmul4bit(torch.autograd.Function):
            """``x @ W.T (+ bias)`` for a streamed 4-bit ``W`` that keeps no reference to ``W``:
            the backward makes the layer resident and dequantizes it (what bitsandbytes' own
            backward computes, ``grad @ dequantize(W)``)."""

            @staticmethod
            def forward(ctx, x, bias, streamer, i, module):
                import bitsandbytes as bnb
                ctx.streamer, ctx.i, ctx.module = streamer, i, module
                ctx.bias_grad = bias is not None and bias.requires_grad
                w = module.weight
                return bnb.matmul_4bit(x, w, bias=bias, quant_state=w.quant_state)

            @staticmethod
            def backward(ctx, grad):
                import bitsandbytes.functional as F
                gx = gb = None
                if ctx.needs_input_grad[0]:
                    ctx.streamer.require(ctx.i)
                    w = ctx.module.weight
                    gx = torch.matmul(grad, F.dequantize_4bit(w.data, w.quant_state).to(grad.dtype))
                if ctx.bias_grad:
                    gb = grad.reshape(-1, grad.shape[-1]).sum(0)
                return gx, gb, None, None, None

        _FUNCTION = StreamedMatmul4bit
    return _FUNCTION


def place_on_device(model, device, streamed_ids: set[int]) -> None:
    """Move every parameter and buffer that is not streamed to ``device`` (LoRA, norms, embeddings)."""
    import torch
    dev = torch.device(device)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or id(p) in streamed_ids or p.device == dev:
                continue
            p.data = p.data.to(dev)
            if p.grad is not None:
                p.grad = p.grad.to(dev)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device != dev:
                mod._buffers[name] = b.to(dev)


def attach(model, device) -> WeightStreamer:
    """Stream ``model``'s decoder 4-bit weights from host memory; everything else goes to ``device``.

    Call after PEFT has wrapped the model and before the optimizer exists. Gradient
    checkpointing must be on: without it the backward would need every layer at once."""
    import torch
    layers = decoder_layers(model)
    if layers is None or len(layers) == 0:
        raise ValueError("weight streaming: the model has no decoder layer list (model.layers)")
    streamed = {id(m.weight) for layer in layers for m in layer.modules() if _is_4bit(m)}
    if not streamed:
        raise ValueError("weight streaming needs a 4-bit base (quant.load_in_4bit = true)")
    place_on_device(model, device, streamed)
    streamer = WeightStreamer(layers, device)
    dev = torch.device(device)
    for m in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        if m is not None and getattr(m, "hf_device_map", None) is not None:
            m.hf_device_map = {"": dev.index if dev.type == "cuda" and dev.index is not None else
                               (0 if dev.type == "cuda" else "cpu")}
    return streamer
