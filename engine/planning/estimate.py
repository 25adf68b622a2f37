"""Pre-flight peak-VRAM estimate from config.json alone, and the fit planner.

Nothing here loads weights or imports torch: ``estimate()`` works from the model's
config.json (a dict) and the run ``Config``. The model is the one TRL 1.16's
``SFTTrainer`` + PEFT 0.21 + bitsandbytes 0.50 actually run: NF4 base, bf16 LoRA adapters
(TRL casts trainable params of 4-bit models to bf16), non-reentrant per-layer gradient
checkpointing, and TRL's fused LM head (``add_fused_lm_head``: per-token log-probs in
4096-token x 32768-vocab tiles, the ``(batch, seq, vocab)`` logits never exist; TRL 1.16
uses it for every SFT loss, and turns Liger's fused-linear-cross-entropy off).

Notation: h hidden, q = heads*head_dim, kv = kv_heads*head_dim, i intermediate, L layers,
V vocab, r LoRA rank, N = micro-batch x max_length tokens (every row assumed full length:
the worst case; padded or packed batches never hold more), d = compute dtype bytes (2).

``peak_bytes`` is comparable to ``torch.cuda.max_memory_reserved()`` and is the sum of:

  weights_quantized    Σ nn.Linear params of the decoder x 4.127 bit / 8 (NF4 + double quant;
                       4.5 bit without double quant; d bytes when load_in_4bit = false)
  weights_unquantized  (V*h embeddings + V*h lm_head unless tied + norms) x d
  lora_params          P_lora x adapter bytes; P_lora = L x Σ_targeted r*(in+out)
                       (LoRA-FA: r*out; DoRA: + out per module, fp32). Adapter bytes: 2 (bf16)
                       over a 4-bit base, 4 (PEFT upcasts to fp32) over a 16-bit base.
  lora_grads           P_lora x adapter bytes
  optimizer_state      adamw_torch(_fused): 2 moments in the param dtype; paged_/adamw_32bit:
                       8 B/param; adamw_8bit / paged_adamw_8bit: 2 B/param (+ block absmax);
                       adafactor: 4*(rows+cols) per matrix; sgd: 0
  activations          gc on : N x (2h*L  [one checkpointed layer input per layer]
                                    + A_layer [one layer recomputed during its backward])
                       gc off: N x L x A_layer
                       A_layer (bytes/token, d=2), measured with saved-tensor hooks on the
                       HF Llama + PEFT graph:
                         HF   : 8h (two fp32 RMSNorm inputs) + 4q (rotated q, attention out)
                                + 4kv (k, v) + 6i (gate out, silu out, up out)
                         Liger: 4h (bf16 norm inputs) + 4q + 4kv + 4i (SwiGLU keeps gate, up)
                         + 2h if any of q/k/v is targeted, + 2h if gate/up is, + 2i if down is
                           (the inputs LoRA-A saves), + 2r per targeted module, + 4*heads (lse)
                       all-linear HF = 16h+4kv+8i (landscape.md's figure), Liger = 12h+4kv+6i.
                       Selective checkpointing (k of L layers, train.checkpoint_layers): the
                       k checkpointed layers keep 2h each, the L-k others A_layer each, plus
                       one recomputed layer. Offloaded (train.activation_offload): the k
                       inputs live in pinned host memory; two stay on the GPU (the one being
                       recomputed, the one prefetched). Six H200 budget runs (10/16/24 GiB,
                       full and chat rows) were within -7.6% .. +9.3% (bench/RESULTS.md).
  logits               TRL fused head: tile min(N,4096) x min(V,32768) x d, + N x 8h (compact
                       hidden copy 2h, fp32 grad 4h, its cast 2h). HF's own loss (loss_impl="hf")
                       instead: N x V x (d + 4 + 4 + 4) (logits, fp32 upcast, softmax, grad).
  backward_workspace   N x c*h, fitted on the four H200 runs: c = 0.6 (Liger), 2.6 (HF: the
                       fp32 RMSNorm backward).
  allocator_overhead   2% of the sum above + 0.6 x one layer's activations with gradient
                       checkpointing (the recompute churns those blocks and the caching
                       allocator keeps them); fitted on five H200 reserved peaks.

Long context (issue 27; replaces the seed's "add 30% above 2,048 tokens"): every term above is
bytes per token x N, so memory grows linearly with seq at a given micro-batch, except the logits
tile (fixed past 4,096 tokens: the chunked LM head keeps only its 8h a token) and, with eager
attention only, the attention probabilities (heads x seq a token per layer with activations: seq
x seq). The terms at seq >= 8K still need device calibration: the backward workspace c, the
allocator's overhead and recompute fragmentation (fitted at seq 2,048), and the offload's two
in-flight layer inputs.

``cuda_context`` (0.5 GiB; outside the caching allocator, so not in max_memory_reserved) is
reported in the breakdown but not in ``peak_bytes``; ``device_bytes`` = peak_bytes +
cuda_context is what nvidia-smi would show and what ``fits`` compares with the GPU memory.

Calibration (docs/ESTIMATE.md has the table): the five plain_trl_baseline.py runs on the H200
(seq 2048, batch 8, r=32, all-linear, adamw_torch) are predicted within 1.0%; two constants
(backward workspace c, allocator overhead) were fitted on them, the no-gc run was not.
FSDP divides weights, adapters and optimizer state by the GPU count; DoRA, MoE models,
fp32 compute and 16-bit bases follow the same terms but were not measured.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

from engine.core.config import AUTO, Config
from engine.core.units import GIB
from engine import methods
from engine.methods.base import FULL, PREFERENCE

NF4_DQ_BITS = 4.127      # 4 bit + 8-bit absmax per 64 + fp32 absmax per 256 blocks
NF4_BITS = 4.5           # 4 bit + fp32 absmax per 64
LOGIT_TOKEN_TILE = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
LOGIT_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
CUDA_CONTEXT = int(0.5 * GIB)
ALLOCATOR_OVERHEAD = 0.02          # reserved over allocated, steady part
RECOMPUTE_FRAGMENTATION = 0.6      # x one layer's activations, with gradient checkpointing
# Weight streaming, over the window of resident layers: the side stream's cached copies (freed
# blocks wait for the compute stream before reuse) and the dequantized 16-bit weights (with FP8
# base GEMMs their e4m3 copies too) of the fused LoRA linear. Fitted on the two H200 runs of
# bench/seventy_b.py with the fused linear and FP8 GEMMs (70B shape, micro-batch 1 and 4: 6.07 and
# 6.21 GiB above the terms above): 14.6 four-bit layers + 1.55 x hidden x dtype bytes per token.
# (The earlier fit, 11 layers + 7.2 x hidden, was for PEFT's unfused path: fused LoRA was off
# under streaming then.)
# A 16-bit base (train.method = "lora"): PEFT's LoRA path with fp32 adapters keeps more per
# layer than the fused 4-bit path (the inputs cast for the adapters). Fitted on two H200 runs
# (bench/galore_calibration.py's lora rows, 1B and 3B, seq 1024, no checkpointing: 10% and 17% low
# without it): x hidden, in units of d/2 bytes a token a layer.
LORA16_HIDDEN = 10.5
STREAM_BUFFER_LAYERS = 14.6
STREAM_TOKEN_HIDDEN = 1.55
BACKWARD_WS_LIGER = 0.6  # x h bytes per token
BACKWARD_WS_HF = 2.6
HEADROOM = 0.10          # the planner keeps 10% of the GPU free

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOSS_IMPLS = ("trl", "hf")


class EstimateError(ValueError):
    """The estimate cannot be made (one line naming the model or the missing key)."""


@dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int = 1           # MoE: experts per layer (1 = dense)
    experts_per_token: int = 1

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder projection."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def shape_of(model_config: dict) -> Shape:
    """The dimensions the estimate needs from a config.json dict (Llama/Mistral/Qwen keys)."""
    mc = model_config
    if "hidden_size" not in mc and isinstance(mc.get("text_config"), dict):
        mc = {**mc["text_config"], "tie_word_embeddings": mc.get("tie_word_embeddings",
                                                                   mc["text_config"].get("tie_word_embeddings"))}
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if not isinstance(mc.get(k), int)]
    if missing:
        raise EstimateError("config.json lacks " + ", ".join(missing) + " (not a decoder-only LLM config?)")
    h = mc["hidden_size"]
    heads = mc["num_attention_heads"]
    experts = mc.get("num_local_experts") or mc.get("num_experts") or 1
    inter = mc.get("moe_intermediate_size") if experts > 1 and mc.get("moe_intermediate_size") else None
    inter = inter or mc.get("intermediate_size") or 4 * h
    return Shape(hidden=h, intermediate=int(inter), layers=mc["num_hidden_layers"], heads=heads,
                 kv_heads=mc.get("num_key_value_heads") or heads,
                 head_dim=mc.get("head_dim") or h // heads, vocab=mc["vocab_size"],
                 tied=bool(mc.get("tie_word_embeddings", False)), experts=int(experts),
                 experts_per_token=int(mc.get("num_experts_per_tok") or 1))


@dataclass
class Estimate:
    peak_bytes: int                          # comparable to torch.cuda.max_memory_reserved()
    breakdown: dict[str, int]                # bytes; all but cuda_context sum to peak_bytes
    trainable_params: int
    total_params: int
    fits: bool | None                        # device_bytes <= gpu_mem_bytes; None without a GPU size
    gpu_mem_bytes: int | None
    notes: list[str] = field(default_factory=list)
    # the inputs the numbers were computed for
    batch_size: int = 0
    seq_len: int = 0
    gradient_checkpointing: bool = True
    liger: bool = False
    method: str = "qlora"                    # train.method (the breakdown's labels follow it)
    checkpoint_layers: int = 0               # decoder layers checkpointed (of ``layers``)
    layers: int = 0
    offload: bool = False                    # checkpointed layers' inputs in pinned host memory
    offload_host_bytes: int = 0              # pinned host memory those inputs take
    streaming: bool = False                  # 4-bit layers streamed from host RAM (engine/training/streaming.py)
    host_bytes: int = 0                      # predicted peak host RAM of the training process
    host_breakdown: dict[str, int] = field(default_factory=dict)
    base_quantized_bytes: int = 0            # the whole 4-bit base (what streaming keeps on the host)

    @property
    def allocated_bytes(self) -> int:
        """Predicted peak of torch.cuda.max_memory_allocated() (peak without the allocator's slack)."""
        return self.peak_bytes - self.breakdown["allocator_overhead"]

    @property
    def device_bytes(self) -> int:
        """Predicted whole-process GPU memory: reserved peak + CUDA context."""
        return self.peak_bytes + self.breakdown["cuda_context"]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["allocated_bytes"] = self.allocated_bytes
        d["device_bytes"] = self.device_bytes
        return d


def _tri(value) -> bool | None:
    """true/false/"auto" → True/False/None."""
    return None if value == AUTO else bool(value)


def _targets(cfg: Config, notes: list[str]) -> list[str]:
    tm = cfg.lora.target_modules
    if isinstance(tm, str):
        if tm == "all-linear":
            return list(MODULES)
        tm = [tm]
    known = [m for m in tm if m in MODULES]
    unknown = [m for m in tm if m not in MODULES]
    if unknown:
        notes.append("target modules not in the Llama layout, not counted: " + ", ".join(unknown))
    return known


def _compute_bytes(cfg: Config) -> int:
    dt = cfg.quant.compute_dtype
    if dt == AUTO:
        return 4 if cfg.train.device == "cpu" else 2
    return 4 if dt == "fp32" else 2


def _optimizer(cfg: Config) -> str:
    opt = cfg.train.optimizer
    if opt == AUTO:
        return "adamw_torch" if cfg.train.device == "cpu" else "paged_adamw_8bit"
    return opt


@dataclass
class _Setting:
    """What one estimate is computed for, resolved from the config and the planner's overrides."""
    batch: int
    seq: int
    liger: bool
    checkpointed: int            # decoder layers checkpointed (0: checkpointing off)
    offload: bool
    d: int                       # compute dtype bytes
    galore: bool
    four: bool                   # 4-bit base (train.method = qlora and load_in_4bit)
    streaming: bool
    targets: list[str]
    r: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass
class _Trainable:
    """Trainable parameters and the bytes they take: values, gradients, optimizer state."""
    params: int
    values: int
    grads: int
    optimizer: int
    magnitude: int               # DoRA magnitude vectors (params)
    terms: dict | None = None    # the method's own trainable terms (GaLore: gradients, optimizer step)


def _setting(cfg: Config, s: Shape, notes: list[str], batch_size, seq_len, gradient_checkpointing,
             liger, checkpoint_layers, offload, streaming) -> _Setting:
    gc = gradient_checkpointing if gradient_checkpointing is not None else _tri(cfg.train.gradient_checkpointing)
    gc = True if gc is None else gc
    lg = liger if liger is not None else _tri(cfg.train.liger_kernel)
    k_ck, off = _checkpointing(cfg, s.layers, gc, checkpoint_layers, offload)
    m = methods.of(cfg)
    four = m.four_bit(cfg)
    stream = bool(streaming if streaming is not None else cfg.train.weight_streaming is True) and four
    return _Setting(batch=int(batch_size or cfg.train.batch_size), seq=int(seq_len or cfg.data.max_length),
                    liger=False if lg is None else lg, checkpointed=k_ck, offload=off,
                    d=_compute_bytes(cfg), galore=m.artifact == FULL, four=four, streaming=stream,
                    targets=_targets(cfg, notes), r=cfg.lora.r)


def _weights(cfg: Config, s: Shape, st: _Setting, notes: list[str]) -> dict[str, int]:
    """Base weights: the decoder's nn.Linear params (4-bit or d bytes) and the rest at d bytes;
    with streaming only a window of 4-bit layers is on the GPU."""
    dims, L, h = s.module_dims(), s.layers, s.hidden
    attn_lin = sum(a * o for m, (a, o) in dims.items() if m in MODULES[:4])
    mlp_lin = sum(a * o for m, (a, o) in dims.items() if m in MODULES[4:]) * s.experts
    router = h * s.experts if s.experts > 1 else 0
    linear = L * (attn_lin + mlp_lin)
    other = s.vocab * h * (1 if s.tied else 2) + (2 * L + 1) * h + L * router
    bits = (NF4_DQ_BITS if cfg.quant.double_quant else NF4_BITS) if st.four else 8 * st.d
    w_q = int(linear * bits / 8) if st.four else 0
    w_u = other * st.d + (0 if st.four else linear * st.d)
    from engine.planning import streaming_plan
    base_q = w_q
    if st.streaming:
        w_q = streaming_plan.resident_bytes(w_q, L)
        notes.append(f"weight streaming: {streaming_plan.RESIDENT_LAYERS} of {L} layers' 4-bit weights on the GPU, "
                     f"{base_q / GIB:.1f} GiB pinned in host RAM")
    if s.experts > 1:
        notes.append(f"MoE ({s.experts} experts, {s.experts_per_token} per token): LoRA and activations "
                     "counted for the active experts only; not calibrated")
    return {"linear": linear, "other": other, "quantized": w_q, "unquantized": w_u, "base_quantized": base_q}


def _lora(cfg: Config, s: Shape, st: _Setting, notes: list[str]) -> _Trainable:
    """LoRA (or LoRA-FA, DoRA) adapters: params, their bytes and gradients, the optimizer state."""
    dims, L, r = s.module_dims(), s.layers, st.r
    dora = methods.of(cfg).dora(cfg)
    per_layer = magnitude = 0
    for m in st.targets:
        a, o = dims[m]
        mult = s.experts if m in MODULES[4:] else 1
        per_layer += (r * o if cfg.lora.lora_fa else r * (a + o)) * mult
        magnitude += o * mult if dora else 0
    lora_n, mag_n = L * per_layer, L * magnitude
    ab = 2 if st.four else 4          # TRL casts adapters of 4-bit models to bf16; PEFT upcasts to fp32
    values = lora_n * ab + mag_n * 4
    if dora:
        notes.append("DoRA: magnitude vectors kept in fp32; its extra activations are approximate")
    t = _Trainable(params=lora_n + mag_n, values=values, grads=values, optimizer=0, magnitude=mag_n)
    t.optimizer = _optimizer_state(cfg, s, st, t, notes)
    return t


def _optimizer_state(cfg: Config, s: Shape, st: _Setting, t: _Trainable, notes: list[str]) -> int:
    opt = _optimizer(cfg)
    if opt in ("adamw_torch", "adamw_torch_fused"):
        state = 2 * t.values
    elif opt in ("paged_adamw_32bit",):
        state = 8 * t.params
    elif opt in ("adamw_8bit", "paged_adamw_8bit"):
        state = int(t.params * (2 + 8 / 256))   # two uint8 moments + fp32 absmax per 256
    elif opt == "adafactor":
        dims, r, rows_cols = s.module_dims(), st.r, 0
        for m in st.targets:
            a, o = dims[m]
            rows_cols += (o + r) if cfg.lora.lora_fa else (r + a) + (o + r)
        state = 4 * s.layers * rows_cols + 4 * t.magnitude
    elif opt == "sgd":
        state = 0
    else:
        state = 8 * t.params
        notes.append(f"optimizer {opt!r} not modelled: assumed 8 B/param of state")
    if opt.startswith("paged_"):
        notes.append(f"{opt}: optimizer state can page to host RAM under pressure (counted on the GPU here)")
    return state


def _galore(cfg: Config, s: Shape, st: _Setting, notes: list[str]) -> _Trainable:
    """GaLore: full-rank targeted weights (counted in the 16-bit weights), projected state; no adapter."""
    gt = methods.of(cfg).trainable_terms(cfg, s.module_dims(), st.targets, s.layers, st.d)
    opt = _optimizer(cfg)
    notes[:] = [n for n in notes if not n.startswith(f"{opt}:")]
    notes.append(f"GaLore rank {cfg.galore.rank}: full gradients of the targeted weights, Adam "
                 "moments of their projected gradients (calibrated on two H200 runs, 1B and 3B)")
    return _Trainable(params=gt["trainable"], values=0, grads=gt["grads"], optimizer=gt["optimizer_state"],
                      magnitude=0, terms=gt)


def _layer_activations(cfg: Config, s: Shape, st: _Setting) -> int:
    """One decoder layer's saved activations, bytes per token (A_layer in the module doc)."""
    h, q, kv, targets = s.hidden, s.q_dim, s.kv_dim, st.targets
    ffn_i = s.intermediate * s.experts_per_token
    if st.liger:
        act = 4 * h + 4 * q + 4 * kv + 4 * ffn_i
    else:
        act = 8 * h + 4 * q + 4 * kv + 6 * ffn_i
    if any(m in targets for m in ("q_proj", "k_proj", "v_proj")):
        act += 2 * h
    if any(m in targets for m in ("gate_proj", "up_proj")):
        act += 2 * h
    if "down_proj" in targets:
        act += 2 * ffn_i
    act += 2 * st.r * len(targets) + 4 * s.heads
    if methods.of(cfg).dora(cfg):
        dims = s.module_dims()
        act += 2 * sum(dims[m][1] for m in targets)    # DoRA keeps the base output per module
    if not st.four and not st.galore:
        act += int(LORA16_HIDDEN * h)
    return act * st.d // 2


def _activations(s: Shape, st: _Setting, act: int, notes: list[str]) -> dict[str, int]:
    """Saved activations (checkpointed, offloaded or not), their pinned host copy, the backward workspace."""
    N, h, d = st.tokens, s.hidden, st.d
    activations = N * _activation_bytes_per_token(h * d, act, s.layers, st.checkpointed, st.offload)
    offload_host = st.checkpointed * N * h * d if st.offload else 0
    if st.offload:
        notes.append(f"activation offload: {offload_host / GIB:.2f} GiB of layer inputs in pinned host memory")
    workspace = int(N * h * (BACKWARD_WS_LIGER if st.liger else BACKWARD_WS_HF) * d / 2)
    return {"activations": activations, "offload_host": offload_host, "workspace": workspace}


def _logits(s: Shape, st: _Setting, loss_impl: str, notes: list[str]) -> int:
    """The LM head: TRL's fused per-tile log-probs, or HF's full fp32 logits."""
    N, V, d = st.tokens, s.vocab, st.d
    if loss_impl == "trl":
        return min(N, LOGIT_TOKEN_TILE) * min(V, LOGIT_VOCAB_TILE) * d + N * 8 * s.hidden
    notes.append("HF loss: full logits in fp32 (about %.1f MB per token)" % (V * (d + 12) / 1e6))
    return N * V * (d + 12)


def _shard(cfg: Config, w: dict[str, int], t: _Trainable, notes: list[str]) -> None:
    """Multi-GPU: FSDP divides weights, adapters and optimizer state by the GPU count (in place)."""
    gpus = cfg.distributed.gpus
    if gpus > 1 and cfg.distributed.strategy == "fsdp":
        w["quantized"], w["unquantized"] = w["quantized"] // gpus, w["unquantized"] // gpus
        t.values, t.grads, t.optimizer = t.values // gpus, t.grads // gpus, t.optimizer // gpus
        notes.append(f"FSDP over {gpus} GPUs: weights, adapters and optimizer state sharded (rough)")
    elif gpus > 1:
        notes.append(f"DDP over {gpus} GPUs: the figures are per GPU")


def _vision(model_config: dict, st: _Setting, notes: list[str]) -> dict:
    """Image-text models: the 16-bit vision tower and one image's activations per row."""
    from engine.modalities.vision import estimate_terms
    vis = estimate_terms(model_config, st.batch, st.d) or {"params": 0, "weights": 0, "activations": 0}
    if vis["weights"]:
        notes.append(f"vision tower: {vis['params'] / 1e6:,.0f} M params in 16 bits (frozen, not quantized); "
                     f"activations for one {vis['patches_per_image']}-patch image per row "
                     f"({vis['visual_tokens_per_image']} visual tokens, inside max_length)")
    return vis


def estimate(cfg: Config, model_config: dict, *, batch_size: int | None = None,
             seq_len: int | None = None, gradient_checkpointing: bool | None = None,
             liger: bool | None = None, gpu_mem_bytes: int | None = None,
             loss_impl: str = "trl", checkpoint_layers: int | None = None,
             offload: bool | None = None, streaming: bool | None = None) -> Estimate:
    """Predict the training peak for ``cfg`` on the model described by ``model_config``.

    The keyword arguments override the config (the planner uses them); ``"auto"`` in the
    config reads as gradient checkpointing on and Liger off (the conservative side).
    """
    if loss_impl not in LOSS_IMPLS:
        raise EstimateError(f"loss_impl must be one of {LOSS_IMPLS}, not {loss_impl!r}")
    s = shape_of(model_config)
    notes: list[str] = []
    st = _setting(cfg, s, notes, batch_size, seq_len, gradient_checkpointing, liger, checkpoint_layers,
                  offload, streaming)
    pairs = _preference(cfg, s, st, notes)          # a preference method: 2 sequences per pair
    w = _weights(cfg, s, st, notes)
    t = _lora(cfg, s, st, notes)
    if st.galore:
        t = _galore(cfg, s, st, notes)
        st.r = 0                                  # no adapter activations
    act = (_layer_activations(cfg, s, st) + _packed_mask_bytes_per_token(cfg, st.seq, st.d, notes)
           + _eager_scores_bytes_per_token(cfg, s, st, notes))
    a = _activations(s, st, act, notes)
    logits = methods.of(cfg).logits_bytes(st.tokens, st.seq, s.vocab, st.d)
    logits = _logits(s, st, loss_impl, notes) if logits is None else logits
    if t.terms is not None:     # GaLore: gradients grow as the backward frees activations; the step runs after
        t.grads = methods.of(cfg).gradient_peak(t.terms, a["activations"] + logits + a["workspace"], notes)
    _shard(cfg, w, t, notes)
    w["checkpoint_file"] = _checkpoint_bytes(model_config, w["linear"], w["other"])
    vis = _vision(model_config, st, notes)
    _rope_notes(cfg, model_config, st.seq, notes)
    est = _assemble(cfg, s, st, w, t, a, logits, vis, act, gpu_mem_bytes, notes)
    if pairs is not None:
        est.batch_size = pairs                    # what train.batch_size counts: pairs (KTO: rows)
    return est


def _rope_notes(cfg: Config, model_config: dict, seq: int, notes: list[str]) -> None:
    """model.rope_scaling: the positions it reaches and its problems against config.json; without
    it, a max_length past the pretrained length says to set it (engine.models.rope)."""
    from engine.models import rope
    r = cfg.model.rope_scaling
    if r:
        notes.append(rope.describe(r, model_config))
        notes += [f"problem: {p}" for p in rope.check(r, model_config, seq, cfg.model.name)]
        return
    n = rope.pretrained_length(model_config)
    if n and seq > n and rope.length_warning(cfg, model_config, seq):
        notes.append(f"data.max_length {seq} is past the model's pretrained length ({n} positions): rows "
                     f"longer than {n} tokens need model.rope_scaling")


def _preference(cfg: Config, s: Shape, st: _Setting, notes: list[str]) -> int | None:
    """Preference methods (engine.methods.preference_base): the micro-batch as sequences. DPO, ORPO
    and SimPO run chosen and rejected of each pair in one forward (2 sequences per pair); KTO
    runs each row with a mismatched completion for its KL estimate (2 sequences, the KL one with
    no graph: counted as one with a graph, the safe side). DPO and KTO also run the reference
    (the base, adapter disabled) with no graph before the policy's forward: its logits are freed
    before the policy's are made, so it costs a forward's time but raises no peak. Returns the
    micro-batch as the config counts it (pairs, KTO rows), None where a row is one sequence."""
    m = methods.of(cfg)
    pairs = st.batch
    st.batch = m.sequences(pairs)
    if st.batch == pairs:
        return None
    notes.append(m.batch_note(pairs, st.seq))
    ref = m.reference_bytes(st.tokens, s.vocab, st.d)
    if ref:
        notes.append(f"reference pass (adapter off, no graph): {ref / GIB:.2f} GiB of logits, freed before "
                     "the policy's forward; one more forward of time, no more peak")
    return pairs


def _lora_init_extra(cfg: Config, s: Shape, w: dict, t: _Trainable, training_peak: float,
                     notes: list[str]) -> int:
    """lora.init = loftq | pissa: before training starts, one weight at a time is decomposed in
    fp32 (the method's init_transient_bytes) on top of the weights and adapters. Only
    the part above the training peak adds to the peak."""
    init = getattr(cfg.lora, "init", "default")
    m = methods.of(cfg)
    transient = max(m.init_transient_bytes(init, o, i) for i, o in s.module_dims().values())
    if not transient:
        return 0
    at_init = w["quantized"] + w["unquantized"] + t.values + transient
    extra = max(0, int(at_init * (1 + ALLOCATOR_OVERHEAD) - training_peak))
    per_layer = len(s.module_dims())
    notes.append(f"lora.init = {init}: one fp32 SVD per adapted weight before step 1 "
                 f"({s.layers * per_layer} SVDs; {transient / GIB:.2f} GiB transient for the largest"
                 f"{'; reads the 16-bit weights from the checkpoint files' if init == 'loftq' else ''})")
    return extra


def _assemble(cfg: Config, s: Shape, st: _Setting, w: dict, t: _Trainable, a: dict, logits: int, vis: dict,
              act: int, gpu_mem_bytes: int | None, notes: list[str]) -> Estimate:
    """The breakdown, the allocator's overhead on top of it, host RAM, and the closing notes."""
    allocated = (w["quantized"] + w["unquantized"] + t.values + t.grads + t.optimizer + a["activations"]
                 + logits + a["workspace"] + vis["weights"] + vis["activations"])
    # The caching allocator keeps freed blocks: with checkpointing each layer's recompute
    # churns one layer's activations, and those blocks stay reserved (fitted on 5 H200 runs).
    overhead = int(allocated * ALLOCATOR_OVERHEAD
                   + (RECOMPUTE_FRAGMENTATION * st.tokens * act if st.checkpointed else 0))
    stream_buffers = (int(STREAM_BUFFER_LAYERS * w["base_quantized"] / s.layers
                          + st.tokens * STREAM_TOKEN_HIDDEN * s.hidden * st.d) if st.streaming else 0)
    breakdown = {
        "weights_quantized": int(w["quantized"]), "weights_unquantized": int(w["unquantized"]),
        "lora_params": int(t.values), "lora_grads": int(t.grads),
        "optimizer_state": int(t.optimizer), "activations": int(a["activations"]), "logits": int(logits),
        "backward_workspace": int(a["workspace"]), "allocator_overhead": overhead,
        "streaming_buffers": stream_buffers,
        "vision_weights": int(vis["weights"]), "vision_activations": int(vis["activations"]),
        "cuda_context": CUDA_CONTEXT,
    }
    init_extra = _lora_init_extra(cfg, s, w, t, allocated + overhead + stream_buffers, notes)
    breakdown["lora_init"] = init_extra
    peak = allocated + overhead + stream_buffers + init_extra
    total = w["linear"] + w["other"] + (0 if st.galore else t.params) + vis["params"]
    if not st.four and not st.galore:
        notes.append("16-bit base (load_in_4bit = false): adapters in fp32")
    if st.d == 4:
        notes.append("fp32 compute: activations and unquantized weights at 4 bytes")
    notes.append(f"assumes every row is {st.seq} tokens (padding/packing never exceeds it)")
    fits = None if gpu_mem_bytes is None else peak + CUDA_CONTEXT <= gpu_mem_bytes
    from engine.planning import streaming_plan
    host = streaming_plan.host_breakdown(w["base_quantized"], w["unquantized"], s.layers, st.streaming,
                                         cfg.train.device, checkpoint_bytes=w["checkpoint_file"],
                                         offloaded=int(a["offload_host"]))
    return Estimate(peak_bytes=int(peak), breakdown=breakdown, trainable_params=int(t.params),
                    total_params=int(total), fits=fits, gpu_mem_bytes=gpu_mem_bytes, notes=notes,
                    batch_size=st.batch, seq_len=st.seq, gradient_checkpointing=st.checkpointed > 0,
                    liger=st.liger, checkpoint_layers=st.checkpointed, layers=s.layers, offload=st.offload,
                    offload_host_bytes=int(a["offload_host"]), streaming=st.streaming,
                    host_bytes=streaming_plan.host_peak(host), host_breakdown=host,
                    base_quantized_bytes=int(w["base_quantized"]), method=methods.of(cfg).name)

def _checkpoint_bytes(model_config: dict, linear: int, other: int) -> int:
    """The weight files' size, which loading maps into the process (it shows in its RSS): a
    pre-quantized checkpoint holds the packed 4-bit layers, any other its dtype's bytes."""
    q = model_config.get("quantization_config") or {}
    if q.get("load_in_4bit") or q.get("_load_in_4bit"):
        return int(linear * NF4_DQ_BITS / 8 + other * 2)
    width = {"float32": 4, "float16": 2, "bfloat16": 2}.get(
        str(model_config.get("torch_dtype") or model_config.get("dtype") or "bfloat16"), 2)
    return int((linear + other) * width)


def _checkpointing(cfg: Config, layers: int, gc: bool, k: int | None, offload: bool | None):
    """(decoder layers checkpointed, inputs offloaded) from the overrides or the config."""
    if not gc:
        return 0, False
    if k is None:
        k = cfg.train.checkpoint_layers if cfg.train.checkpoint_layers >= 0 else layers
    k = max(0, min(int(k), layers))
    off = offload if offload is not None else _tri(cfg.train.activation_offload)
    return k, bool(off) and k > 0


def attention_for(cfg: Config, packing: bool) -> str:
    """The attention kernel a run of ``cfg`` will use, from the config alone: ``auto`` is
    flash-attention where installed, else torch's varlen kernel for packed rows on the GPU
    (the trainer checks it on the GPU first and keeps sdpa if it fails), else sdpa."""
    attn = cfg.model.attn_implementation
    if attn != AUTO:
        return attn
    if _flash_attn_available():
        return "flash_attention_2"
    if packing and cfg.train.device != "cpu" and _varlen_available():
        return "varlen"
    return "sdpa"


def _packed_mask_bytes_per_token(cfg: Config, seq: int, d: int, notes: list[str]) -> int:
    """Packed rows under sdpa: the block-diagonal mask becomes a ``seq x seq`` bias in the compute
    dtype that every layer's backward keeps (64 MiB a layer at micro-batch 8 x 2,048 in bf16;
    fitted: 0.25 GiB more than full rows for 4 layers with activations, bench/RESULTS.md).
    varlen and flash-attention take the samples' lengths instead: nothing."""
    if _tri(cfg.data.packing) is not True:
        return 0
    attn = attention_for(cfg, True)
    if attn not in ("sdpa", "eager"):
        notes.append(f"packed rows with {attn} attention: no mask (the samples' lengths), micro-batches "
                     "of real tokens only")
        return 0
    notes.append(f"packed rows with {attn}: a {seq}x{seq} block-diagonal bias per layer with activations "
                 f"({seq * d} B a token)")
    return seq * d


def _eager_scores_bytes_per_token(cfg: Config, s: Shape, st: _Setting, notes: list[str]) -> int:
    """Eager attention keeps each layer's attention probabilities: heads x seq per token (the fp32
    softmax output, 4 B, and its cast to the compute dtype, d B), the one term that grows with
    seq x seq; sdpa, flash-attention and varlen keep only the log-sum-exp (in A_layer). Not measured."""
    if cfg.model.attn_implementation != "eager":
        return 0
    per_token = s.heads * st.seq * (4 + st.d)
    notes.append(f"eager attention: {s.heads} heads x {st.seq} scores per token per layer with activations "
                 f"({per_token / 2 ** 20:.2f} MiB a token; sdpa keeps none; not measured)")
    return per_token


def _activation_bytes_per_token(input_bytes: int, act: int, layers: int, k: int, offload: bool) -> int:
    """Activation bytes per token: k checkpointed layers keep only their input (none on the GPU
    when offloaded, but two in flight: the one being recomputed and the one prefetched), one
    layer is recomputed at a time, the other layers keep all their activations."""
    if k == 0:
        return layers * act
    inputs = 2 * input_bytes if offload else k * input_bytes
    return inputs + (layers - k) * act + act


# ---------------------------------------------------------------------------------------------
# config.json and GPU memory


def model_config_for(cfg: Config) -> dict:
    """The model's config.json as a dict (``engine.models.source.model_config``), its errors as
    the planner's."""
    from engine.models.source import ModelError, model_config
    try:
        return model_config(cfg)
    except ModelError as e:
        raise EstimateError(str(e)) from None


def gpu_budget(cfg, gpu_mem_gib: float | None = None) -> tuple[int | None, str]:
    """The GPU memory a run of ``cfg`` plans for, and why: the one rule that the run, ``estimate``
    and the Config screen share. The smallest of the GPU's free memory (``gpu_mem_gib`` stands for
    the GPU: ``estimate --gpu-mem``) and ``train.gpu_memory_gib``; None when neither is known (a CPU
    run, or no NVIDIA GPU here and no number given)."""
    limits = []
    if gpu_mem_gib is not None:
        limits.append((int(gpu_mem_gib * GIB), f"the GPU's {gpu_mem_gib:g} GiB (--gpu-mem / --gpu)"))
    elif cfg.train.device != "cpu":
        free = gpu_free_bytes()
        if free is not None:
            limits.append((free, f"{free / GIB:.1f} GiB free on this GPU"))
    if cfg.train.gpu_memory_gib:
        g = cfg.train.gpu_memory_gib
        limits.append((int(g * GIB), f"a {g:g} GiB budget (train.gpu_memory_gib)"))
    if not limits:
        return None, "no GPU here: pass --gpu-mem or set train.gpu_memory_gib"
    return min(limits)


def nvml(query, index: int = 0):
    """``query(pynvml, handle)`` on GPU ``index`` through NVML (initialised and shut down around it, warnings
    of the import silenced); None when there is no NVIDIA GPU or driver, or the query fails."""
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pynvml
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        return query(pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def gpu_free_bytes(index: int = 0) -> int | None:
    """Free memory of GPU ``index`` via NVML; None when there is no NVIDIA GPU or driver."""
    return nvml(lambda nv, h: int(nv.nvmlDeviceGetMemoryInfo(h).free), index)


# ---------------------------------------------------------------------------------------------
# the planner

@dataclass
class Plan:
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    liger: bool
    packing: bool
    estimate: Estimate
    reasons: list[str] = field(default_factory=list)
    checkpoint_layers: int = 0       # decoder layers checkpointed (0 with checkpointing off)
    offload: bool = False            # their inputs in pinned host memory
    streaming: bool = False
    expected_tokens_per_s: float | None = None    # streaming: the link/FLOP floor (streaming_plan)
    fp8: bool = False                # planned for FP8 base GEMMs (decided at run start from the GPU)

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "gradient_checkpointing": self.gradient_checkpointing, "liger": self.liger,
                "checkpoint_layers": self.checkpoint_layers, "offload": self.offload,
                "packing": self.packing, "peak_bytes": self.estimate.peak_bytes,
                "device_bytes": self.estimate.device_bytes, "fits": self.estimate.fits,
                "streaming": self.streaming, "host_bytes": self.estimate.host_bytes,
                "expected_tokens_per_s": self.expected_tokens_per_s, "fp8": self.fp8,
                "reasons": list(self.reasons)}


def _liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _varlen_available() -> bool:
    """torch >= 2.10 (torch.nn.attention.varlen), read from the installed version: no torch import."""
    from importlib import metadata
    try:
        major, minor = (int(x) for x in metadata.version("torch").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (2, 10)


def _divisors_desc(n: int) -> list[int]:
    return [k for k in range(n, 0, -1) if n % k == 0]


def _gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


# Speed model of the planner, from side-by-side H200 runs (bench/RESULTS.md, Llama-3.1-8B shape,
# seq 2048). Micro-batch fill: a fixed cost per micro-batch, fill(t) = t/(t+c) normalised to 1 at
# 16,384 tokens; c = 2,180 tokens fits micro-batch 1 at 0.55 of micro-batch 8 (no checkpointing:
# 7,622 vs 13,840 tokens/s) and puts micro-batch 4 at 0.90 (measured 0.965 with offloaded
# checkpointing: 9,861 vs 10,220). Checkpointing: 0.705 of the no-checkpointing speed with every
# layer recomputed (9,908 vs 14,051 in landscape.md); k of L layers add k/L of that recompute time.
# Offloading the checkpointed inputs (side-stream copies) cost about 1% (10,220 tokens/s with 31
# layers offloaded vs 10,451 with 29 kept on the GPU, 0.978 measured vs 0.980 modelled at 1%).
SPEED_GC = 0.705
SPEED_TOKENS_FULL = 16384
SPEED_FILL_TOKENS = 2180
OFFLOAD_COST = 1.01


def relative_speed(gradient_checkpointing, tokens_per_micro_batch: int, offload: bool = False) -> float:
    """Relative tokens/s of a setting (1.0 = no checkpointing, a full micro-batch).

    ``gradient_checkpointing`` is a bool (all layers or none) or the share of layers checkpointed."""
    share = float(gradient_checkpointing)
    time = (1 + share * (1 / SPEED_GC - 1)) * (OFFLOAD_COST if offload and share else 1.0)
    return fill(tokens_per_micro_batch) / time


def fill(tokens_per_micro_batch: int) -> float:
    """The micro-batch fill factor: a fixed cost per micro-batch, 1.0 at SPEED_TOKENS_FULL tokens."""
    t = min(tokens_per_micro_batch, SPEED_TOKENS_FULL)
    c = SPEED_FILL_TOKENS
    return (t / (t + c)) / (SPEED_TOKENS_FULL / (SPEED_TOKENS_FULL + c))


def _speed(e: Estimate) -> float:
    share = e.checkpoint_layers / e.layers if e.layers else float(e.gradient_checkpointing)
    return relative_speed(share, e.batch_size * e.seq_len, e.offload)


def _candidates(cfg: Config, model_config: dict, lg: bool, gpu_mem_bytes: int, budget: float, offload_ok: bool):
    """Every (micro-batch, checkpointing, offload) the explicit settings allow: for each micro-batch
    and offload choice, no checkpointing and the fewest checkpointed layers that fit."""
    t = cfg.train
    gc_set, off_set = _tri(t.gradient_checkpointing), _tri(t.activation_offload)
    layers = shape_of(model_config).layers
    k_set = t.checkpoint_layers if t.checkpoint_layers >= 0 else None
    offs = [off_set] if off_set is not None else ([False, True] if offload_ok else [False])
    eff = t.batch_size * t.grad_accum
    tried, fitting = [], []

    def one(b, gc, k=None, off=False):
        e = estimate(cfg, model_config, batch_size=b, gradient_checkpointing=gc, liger=lg,
                     gpu_mem_bytes=gpu_mem_bytes, checkpoint_layers=k, offload=off)
        tried.append(e)
        ok = e.device_bytes <= budget
        if ok:
            fitting.append(e)
        return ok

    for b in _divisors_desc(eff):
        if gc_set is not True and k_set in (None, 0):
            one(b, False)
        if gc_set is False:
            continue
        for off in offs:
            if k_set is not None:
                one(b, True, k_set, off)
                continue
            lo, hi = 1, layers          # the fewest checkpointed layers that fit (memory falls with k)
            if not one(b, True, layers, off):
                continue
            while lo < hi:
                mid = (lo + hi) // 2
                e = estimate(cfg, model_config, batch_size=b, gradient_checkpointing=True, liger=lg,
                             gpu_mem_bytes=gpu_mem_bytes, checkpoint_layers=mid, offload=off)
                lo, hi = (lo, mid) if e.device_bytes <= budget else (mid + 1, hi)
            if lo < layers:
                one(b, True, lo, off)
    return tried, fitting


def _checkpoint_reason(e: Estimate, gc_set, why_off: str) -> str:
    if not e.checkpoint_layers:
        why = "set in the config" if gc_set is False else "fits without it: fastest"
        return f"gradient checkpointing off ({why})"
    part = ("all " if e.checkpoint_layers == e.layers else "") + f"{e.checkpoint_layers} of {e.layers} layers"
    why = "the fewest that fit" if e.checkpoint_layers < e.layers else (
        "set in the config" if gc_set is True else "needed to fit")
    text = f"gradient checkpointing on for {part} ({why})"
    if e.offload:
        text += (f"; their saved inputs offloaded to pinned CPU memory ({_gib(e.offload_host_bytes)} of host "
                 "memory, copied on side streams)")
    elif why_off:
        text += f"; activation offload off ({why_off})"
    return text


def plan(cfg: Config, model_config: dict, gpu_mem_bytes: int | None) -> Plan:
    """Choose micro-batch, accumulation, gradient checkpointing (how many layers, offloaded or
    not), Liger and packing to fit.

    Only ``"auto"`` fields are decided; explicit values are kept. The effective batch
    (batch_size x grad_accum) is kept: the micro-batch is a divisor of it. The fastest by
    ``relative_speed`` among every setting that fits with 10% headroom wins: e.g. micro-batch 8
    with 10 of 32 layers checkpointed and their inputs offloaded beats micro-batch 2 without.
    """
    t = cfg.train
    gc_set, lg_set, pk_set = _tri(t.gradient_checkpointing), _tri(t.liger_kernel), _tri(cfg.data.packing)
    reasons: list[str] = []
    cuda = gpu_mem_bytes is not None and t.device != "cpu"
    if not cuda:
        gc = True if gc_set is None else gc_set
        lg = False if lg_set is None else lg_set
        pk = False if pk_set is None else pk_set
        est = estimate(cfg, model_config, gradient_checkpointing=gc, liger=lg)
        reasons.append("CPU: no memory planning")
        return Plan(t.batch_size, t.grad_accum, est.gradient_checkpointing, lg, pk, est, reasons,
                    checkpoint_layers=est.checkpoint_layers, offload=est.offload)

    if methods.get(t.method).family == PREFERENCE:     # TRL's preference trainers: no packing, no Liger here
        lg, pk = False, False
        reasons.append(f"packing and Liger off ({t.method}: each side of a pair is its own sequence)")
    else:
        lg = _choose_liger(lg_set, reasons, model_config.get("model_type"))
        pk = _choose_packing(cfg, pk_set, reasons)
    eff = t.batch_size * t.grad_accum
    seq = cfg.data.max_length
    budget = gpu_mem_bytes * (1 - HEADROOM)
    offload_ok = cfg.distributed.processes == 1
    why_off = "" if offload_ok else "one GPU only"
    ws = _tri(t.weight_streaming)
    tried, fitting = ([], []) if ws is True else _candidates(cfg, model_config, lg, gpu_mem_bytes, budget, offload_ok)
    if _consider_streaming(cfg, model_config, ws, gc_set, bool(fitting), budget):
        fitting += _streaming_options(cfg, model_config, gpu_mem_bytes, lg, eff, budget, tried, offload_ok)
    fp8 = _fp8_expected(cfg)
    chosen = max(fitting, key=lambda e: _speed(e) * _streaming_speed(e, model_config, fp8), default=None)
    if chosen is None:
        # nothing fits: report the smallest-memory option the explicit settings allow
        chosen = min(tried, key=lambda e: e.peak_bytes)
        reasons.append(f"does not fit: even micro-batch {chosen.batch_size} with gradient "
                       f"checkpointing {'on' if chosen.gradient_checkpointing else 'off'} needs "
                       f"{_gib(chosen.device_bytes)} of {_gib(gpu_mem_bytes)}; lower data.max_length "
                       f"(now {seq}), lora.r, or use a smaller model")
    else:
        reasons.append(_checkpoint_reason(chosen, gc_set, why_off))
        reasons.append(f"micro-batch {chosen.batch_size} x accumulation {eff // chosen.batch_size} = "
                       f"effective batch {eff} (fastest option that fits with "
                       f"{int(HEADROOM * 100)}% headroom)")
        reasons.append(f"predicted {_gib(chosen.device_bytes)} of {_gib(gpu_mem_bytes)}")
    expected = None
    if chosen.streaming and chosen in fitting:
        why, expected = _streaming_reason(chosen, model_config, gpu_mem_bytes, fp8)
        reasons.append(why)
    b = chosen.batch_size
    return Plan(batch_size=b, grad_accum=eff // b, gradient_checkpointing=chosen.gradient_checkpointing,
                liger=lg, packing=pk, estimate=chosen, reasons=reasons,
                checkpoint_layers=chosen.checkpoint_layers, offload=chosen.offload,
                streaming=chosen.streaming, expected_tokens_per_s=expected, fp8=fp8)


def _consider_streaming(cfg: Config, model_config: dict, ws, gc_set, others_fit: bool, budget: float) -> bool:
    """Weight streaming is a candidate when the config forces it, or (auto, 4-bit, checkpointing
    allowed) when the base does not fit: nothing fits without it, or the 4-bit layers alone take
    over half the budget (then the speed model weighs micro-batch 1 resident against micro-batch 8
    streamed, e.g. a 70B at 48 GiB)."""
    if ws is True:
        return True
    if ws is False or gc_set is False or not cfg.quant.load_in_4bit:
        return False
    return not others_fit or estimate(cfg, model_config, batch_size=1).base_quantized_bytes > budget / 2


def _choose_liger(lg_set, reasons: list[str], model_type: str | None = None) -> bool:
    """Liger: faster and smaller where it exists, so on when auto and it can patch this model."""
    if lg_set is None:
        lg = _liger_available()
        why = "liger_kernel installed, CUDA" if lg else "liger_kernel not installed"
        if lg and not liger_patches(model_type):
            lg, why = False, f"liger_kernel has no working patch for {model_type} here"
        reasons.append(f"Liger kernels {'on' if lg else 'off'} ({why})")
    else:
        lg = lg_set
        reasons.append(f"Liger kernels {'on' if lg else 'off'} (set in the config)")
    if lg_set and not _liger_available():
        reasons.append("warning: train.liger_kernel = true but liger_kernel is not installed")
    return lg


def liger_patches(model_type: str | None) -> bool:
    """Whether Liger's module for this model type imports (its patch fails at trainer start
    otherwise, e.g. Qwen2-VL with liger-kernel 0.8.5 and transformers 5.24 on the H200)."""
    if not model_type:
        return True
    try:
        importlib.import_module(f"liger_kernel.transformers.model.{model_type}")
        return True
    except Exception:
        return False


def _choose_packing(cfg: Config, pk_set, reasons: list[str]) -> bool:
    """Packing does not change the worst-case peak; correct only where attention isolates samples."""
    if pk_set is not None:
        return pk_set
    from engine.models.runtime import packing_isolated
    attn = attention_for(cfg, True)
    pk, why = packing_isolated(attn)
    reasons.append(f"packing {'on' if pk else 'off'} ({why})")
    if pk and attn == "varlen":
        reasons.append("attention varlen for packed rows: faster than sdpa's block-diagonal mask (which "
                       "leaves sdpa's flash kernel and attends over whole rows) and no mask memory")
    return pk


def _streaming_options(cfg, model_config, gpu_mem_bytes, lg, eff, budget, tried, offload_ok) -> list[Estimate]:
    """Weight streaming (always with gradient checkpointing of every layer): the micro-batches that
    fit, with the layers' saved inputs on the GPU or offloaded to host memory (the offload's
    GPU-to-host copies go the other way on the link; its copies back add ~4% to the streamed bytes)."""
    off_set = _tri(cfg.train.activation_offload)
    offs = [off_set] if off_set is not None else ([False, True] if offload_ok else [False])
    out = []
    for b in _divisors_desc(eff):
        for off in offs:
            est = estimate(cfg, model_config, batch_size=b, gradient_checkpointing=True, liger=lg,
                           gpu_mem_bytes=gpu_mem_bytes, streaming=True, offload=off)
            tried.append(est)
            if est.device_bytes <= budget:
                out.append(est)
    return out


def _fp8_expected(cfg: Config) -> bool:
    """Whether the run will take FP8 base GEMMs (train.fp8_base auto: on GPUs that have them, which
    the planner cannot see from config.json; it plans for the GPU it was measured on, an H200)."""
    return cfg.train.fp8_base is not False and cfg.train.fused_lora is not False and cfg.quant.load_in_4bit


def _streaming_speed(e: Estimate, model_config: dict, fp8: bool = False) -> float:
    """The streaming floor factor (transfers that compute cannot hide); 1 without streaming."""
    v = 1.0
    if e.streaming:
        from engine.planning import streaming_plan
        v *= streaming_plan.stream_cost(shape_of(model_config), e.base_quantized_bytes, e.batch_size * e.seq_len,
                                        e.seq_len, fp8).factor
    return v


def _streaming_reason(e: Estimate, model_config: dict, gpu_mem_bytes: int, fp8: bool) -> tuple[str, float]:
    from engine.planning import streaming_plan
    c = streaming_plan.stream_cost(shape_of(model_config), e.base_quantized_bytes, e.batch_size * e.seq_len,
                                   e.seq_len, fp8)
    room = ("does not fit in" if e.base_quantized_bytes > gpu_mem_bytes else
            "leaves too little for the rest of the run in")
    return (f"weight streaming on: the 4-bit base ({_gib(e.base_quantized_bytes)}) {room} "
            f"{_gib(gpu_mem_bytes)}; it stays pinned in host RAM ({_gib(e.host_bytes)} host RAM in all) "
            f"and each micro-batch moves it twice: {streaming_plan.PASSES} x {_gib(e.base_quantized_bytes)} / "
            f"{streaming_plan.LINK_BYTES_PER_S * streaming_plan.LINK_EFFICIENCY / 1e9:.1f} GB/s (the link's "
            f"{streaming_plan.LINK_EFFICIENCY:.0%} while training) = {c.transfer_s:.2f} s against ~{c.compute_s:.2f} s "
            f"of compute ({streaming_plan.mfu(fp8):.0%} of {streaming_plan.PEAK_FLOPS / 1e12:.0f} TFLOP/s"
            f"{' with FP8 base GEMMs' if fp8 else ''}): expected "
            f">= {c.factor:.0%} of the speed without streaming, ~{c.tokens_per_s_floor:,.0f} tokens/s "
            f"at that MFU"), c.tokens_per_s_floor


def apply_plan(cfg: Config, p: Plan) -> Config:
    """A copy of ``cfg`` with the plan's choices applied (booleans instead of "auto")."""
    out = cfg.copy()
    out.train.batch_size = p.batch_size
    out.train.grad_accum = p.grad_accum
    out.train.gradient_checkpointing = bool(p.gradient_checkpointing)
    out.train.checkpoint_layers = p.checkpoint_layers if p.gradient_checkpointing else -1
    out.train.activation_offload = bool(p.offload)
    out.train.liger_kernel = bool(p.liger)
    out.data.packing = bool(p.packing)
    out.train.weight_streaming = bool(p.streaming)
    return out


# ---------------------------------------------------------------------------------------------
# the report (printed by engine/cli/cmd_estimate.py)

BREAKDOWN_LABELS = [
    ("weights_quantized", "base weights, 4-bit"),
    ("weights_unquantized", "embeddings, lm_head, norms"),
    ("lora_params", "LoRA adapters"),
    ("lora_grads", "LoRA gradients"),
    ("optimizer_state", "optimizer state"),
    ("activations", "activations"),
    ("logits", "LM head / logits"),
    ("backward_workspace", "backward workspace"),
    ("vision_weights", "vision tower, 16-bit"),
    ("vision_activations", "vision activations, 1 image/row"),
    ("allocator_overhead", "allocator overhead"),
    ("streaming_buffers", "streaming buffers"),
    ("lora_init", "LoftQ/PiSSA init, beyond training"),
]


def _gc_text(k: int, layers: int, offload: bool) -> str:
    if not k:
        return "off"
    return ("on" if k >= layers else f"on for {k} of {layers} layers") + (", offloaded" if offload else "")


def plan_summary(p: Plan, budget_gib: float) -> str:
    """One line for the Config screen: what the planner picks for a budget, and why."""
    why = next((r for r in p.reasons if r.startswith(("gradient checkpointing", "does not fit"))), "")
    return (f"planner at {budget_gib:g} GiB: micro-batch {p.batch_size} x {p.grad_accum}; {why}; "
            f"predicted {_gib(p.estimate.device_bytes)}"
            + ("; FP8 base GEMMs on GPUs that have them (train.fp8_base)" if p.fp8 else ""))


def _breakdown_lines(est: Estimate) -> list[str]:
    """The estimate's terms, its totals and host RAM (one block of the report)."""
    lines = []
    relabel = {"weights_unquantized": "weights, 16-bit", "lora_params": "(no adapter)",
               "lora_grads": "gradients beyond activations",
               "optimizer_state": "GaLore optimizer state"} if methods.get(est.method).artifact == FULL else {}
    for key, label in BREAKDOWN_LABELS:
        label = relabel.get(key, label)
        if key.startswith(("vision_", "streaming_", "lora_init")) and not est.breakdown.get(key):
            continue
        lines.append(f"  {label:<30}{est.breakdown[key] / GIB:>9.2f} GiB")
    lines.append(f"  {'-' * 30}{'-' * 13}")
    lines.append(f"  {'peak reserved (PyTorch)':<30}{est.peak_bytes / GIB:>9.2f} GiB")
    lines.append(f"  {'+ CUDA context':<30}{est.breakdown['cuda_context'] / GIB:>9.2f} GiB")
    lines.append(f"  {'= on the GPU':<30}{est.device_bytes / GIB:>9.2f} GiB")
    lines.append(f"  trainable {est.trainable_params / 1e6:,.1f} M of {est.total_params / 1e9:,.2f} B params")
    from engine.planning.streaming_plan import host_needed
    hb = est.host_breakdown
    lines.append(f"  host RAM {host_needed(hb) / GIB:.2f} GiB needed (" + ", ".join(
        f"{k.replace('_', ' ')} {v / GIB:.2f}" for k, v in hb.items() if v and k != "checkpoint_mapped") + ")"
        + (", 4-bit layers streamed from host RAM" if est.streaming else ""))
    if est.host_bytes > host_needed(hb):
        lines.append(f"  peak RSS {est.host_bytes / GIB:.2f} GiB while loading maps the weight files "
                     f"({hb['checkpoint_mapped'] / GIB:.2f} GiB of page cache the kernel can drop)")
    return lines


def _setting_text(e: Estimate) -> str:
    return (f"micro-batch {e.batch_size} x {e.seq_len} tokens, gradient checkpointing "
            f"{_gc_text(e.checkpoint_layers, e.layers, e.offload)}, Liger {'on' if e.liger else 'off'}")


def _plan_text(pl: Plan) -> str:
    return (f"micro-batch {pl.batch_size}, accumulation {pl.grad_accum}, gradient "
            f"checkpointing {_gc_text(pl.checkpoint_layers, pl.estimate.layers, pl.offload)}, Liger "
            f"{'on' if pl.liger else 'off'}, packing {'on' if pl.packing else 'off'}, "
            f"weight streaming {'on' if pl.streaming else 'off'}")


def _fits_line(e: Estimate, what: str = "") -> str:
    if e.gpu_mem_bytes is None:
        return "Fits: unknown (no GPU found; pass --gpu-mem GIB or --gpu NAME, or set train.gpu_memory_gib)"
    if e.fits:
        return f"Fits: yes ({what}{_gib(e.device_bytes)} of {_gib(e.gpu_mem_bytes)})"
    return f"Fits: NO ({what}{_gib(e.device_bytes)} needed, {_gib(e.gpu_mem_bytes)} available)"


def format_report(est: Estimate, pl: Plan | None, time_lines: list[str] | tuple = ()) -> str:
    """The estimate's report. With a plan for a GPU size, what will run comes first (the plan's
    verdict, choices, reasons and breakdown); the config as written, without the planner's
    choices, second: its need is what the plan avoided, not the verdict. ``time_lines``
    (engine.planning.timing.for_config) follow the verdict."""
    if pl is not None and est.gpu_mem_bytes is not None:
        return _format_planned(est, pl, list(time_lines))
    lines = list(time_lines) + ([""] if time_lines else [])
    lines += [f"Peak VRAM estimate: {_setting_text(est)}", ""]
    lines += _breakdown_lines(est)
    lines.append("")
    lines.append(_fits_line(est))
    for n in est.notes:
        lines.append(f"  note: {n}")
    if pl is not None:
        lines.append("")
        lines.append(f"Planner: {_plan_text(pl)}")
        for r in pl.reasons:
            lines.append(f"  - {r}")
    return "\n".join(lines)


def _format_planned(est: Estimate, pl: Plan, time_lines: list[str]) -> str:
    pe = pl.estimate
    lines = [_fits_line(pe, "the plan: "), *time_lines, f"Planner: {_plan_text(pl)}"]
    lines += [f"  - {r}" for r in pl.reasons]
    lines += ["", f"Peak VRAM estimate of the plan: {_setting_text(pe)}", ""]
    lines += _breakdown_lines(pe)
    for n in pe.notes:
        lines.append(f"  note: {n}")
    lines.append("")
    same = (est.batch_size, est.checkpoint_layers, est.offload, est.liger, est.streaming) == (
        pe.batch_size, pe.checkpoint_layers, pe.offload, pe.liger, pe.streaming)
    if same:
        lines.append("The config as written: the same settings as the plan.")
    else:
        need = (f"fits: {_gib(est.device_bytes)} of {_gib(est.gpu_mem_bytes)}" if est.fits else
                f"would not fit: {_gib(est.device_bytes)} needed, {_gib(est.gpu_mem_bytes)} available")
        lines.append(f"The config as written, without the planner's choices ({_setting_text(est)}): {need}"
                     + ("" if est.fits else "; the plan above is what runs"))
    return "\n".join(lines)
