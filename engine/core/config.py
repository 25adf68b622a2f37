"""The run configuration: typed sections, the seed guide's defaults, TOML I/O, validation.

Every field carries its help text and what is allowed, so the CLI, the validator and the
TUI's form all read the same source. Validation collects *all* problems at once; each
names the field (``section.key``), the bad value and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import methods         # the registry's names only (imports no method)

AUTO = "auto"


def _f(default, help: str, *, choices=None, lo=None, hi=None, kind=None, group=None, form=True):
    """A config field with its help text and allowed values (``choices`` or ``lo``..``hi``);
    ``form`` False: set in the TOML file only (the TUI's form does not show it)."""
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "kind": kind, "form": form}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = _f("builtin:tiny", "Hugging Face hub id, a local model directory, or builtin:tiny "
                   "(a tiny offline Llama for demos and tests), builtin:tiny-vl (a tiny "
                   "offline Qwen2-VL).", kind="path")
    revision: str = _f("", "Hub revision (branch, tag or commit); empty = the default branch.")
    trust_remote_code: bool = _f(False, "Run Python code shipped with the model. Off unless you "
                                 "trust the repository.")
    chat_template: str = _f("", "Jinja chat template (inline) or a path to a .jinja file; empty = "
                            "the tokenizer's own, or ChatML if it has none.")
    freeze_vision_tower: bool = _f(True, "Vision-language models: keep the vision encoder and its "
                                   "projector frozen (16-bit, no LoRA); all-linear = the language "
                                   "model's linear layers. Off = LoRA on the vision tower too.")
    adapter: str = _f("", "Continue from a finished SFT run: its run directory (or its adapter "
                      "directory). Preference methods (train.method = dpo, orpo, kto, simpo) train that "
                      "adapter further, and the reference model is the SFT model; empty = a fresh adapter "
                      "over the base.", kind="path")
    rope_scaling: dict = _f({}, "Train past the model's pretrained length: a table {type = T, factor = F} "
                            "with T linear, dynamic, yarn or llama3 (llama3 also takes "
                            "low_freq_factor, high_freq_factor; yarn and llama3 original_max_position_embeddings, "
                            "default the model's max_position_embeddings); positions reach factor x the pretrained "
                            "length. Empty = the model's own RoPE.", kind="rope", form=False)
    attn_implementation: str = _f(AUTO, "Attention kernel: auto picks flash_attention_2 when "
                                  "installed, else varlen for packed rows on the GPU (torch's "
                                  "variable-length flash kernel), else sdpa.",
                                  choices=[AUTO, "sdpa", "eager", "flash_attention_2", "varlen"])


@dataclass
class QuantConfig:
    load_in_4bit: bool = _f(True, "Quantize the frozen base to 4 bits (QLoRA). Off = plain LoRA "
                            "over a 16-bit base.")
    quant_type: str = _f("nf4", "4-bit data type: nf4 (QLoRA paper) or fp4.", choices=["nf4", "fp4"])
    double_quant: bool = _f(True, "Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: str = _f(AUTO, "Dtype of the LoRA maths: auto = bf16 where the GPU supports "
                            "it, else fp16; fp32 on the CPU.", choices=[AUTO, "bf16", "fp16", "fp32"])


@dataclass
class LoraConfigSection:
    r: int = _f(32, "Rank: higher = more capacity, more memory; usually 8 to 128.", lo=1, hi=1024)
    alpha: float = _f(64, "Scaling factor, usually 2×r (r to 4×r).", lo=0.0001)
    dropout: float = _f(0.0, "Regularization for small datasets (0 to 0.1).", lo=0.0, hi=0.9)
    target_modules: Any = _f("all-linear", "all-linear, or a list of module names that exist in "
                             "the model (e.g. q_proj, v_proj).", kind="modules")
    use_dora: bool = _f(False, "DoRA: magnitude × direction decomposition (~1% better, slower).")
    use_rslora: bool = _f(False, "rsLoRA: scale by alpha/sqrt(r) instead of alpha/r.")
    lora_fa: bool = _f(False, "LoRA-FA: freeze A, train only B (PEFT's LoRA-FA optimizer); "
                       "halves trainable parameters.")
    bias: str = _f("none", "Train biases: none, all or lora_only.", choices=["none", "all", "lora_only"])
    init: str = _f("default", "Adapter start: default (B = 0), loftq (A, B absorb the 4-bit base's "
                   "quantisation error; QLoRA), pissa (A, B = the top-r singular directions, the base "
                   "keeps the residual; 16-bit LoRA). Merge/export correct for the changed base.",
                   choices=["default", "loftq", "pissa"])


@dataclass
class GaloreConfig:
    rank: int = _f(128, "GaLore (train.method = galore): rank of the gradient projection; the "
                   "optimizer state is rank × the larger side per matrix (paper: 128 to 1024).",
                   lo=1, hi=65536)
    update_proj_gap: int = _f(200, "Steps between refreshes of the projection (an SVD of the "
                              "gradient); the paper's default is 200.", lo=1, hi=1_000_000)
    scale: float = _f(0.25, "Scale of the projected update (the paper's alpha, 0.25); like a "
                      "learning-rate factor for the GaLore weights.", lo=0.0001, hi=100.0)
    optimizer: str = _f(AUTO, "GaLore optimizer: auto = adamw_8bit on GPU (the paper's 7B "
                        "recipe), adamw on CPU.", choices=[AUTO, "adamw", "adamw_8bit", "adafactor"])


@dataclass
class PreferenceConfig:
    beta: float = _f(0.1, "DPO and KTO: how far the policy may move from the reference (the β of "
                     "the DPO and KTO papers, 0.1); higher = closer to the reference (0.01 to 0.5). "
                     "CPO: the β of its reference-free preference loss (the paper's 0.1).",
                     lo=0.0001, hi=100.0)
    loss_type: str = _f("sigmoid", "DPO loss: sigmoid (the DPO paper), ipo (IPO: β is its τ), hinge "
                        "(SLiC), robust (robust DPO, with label_smoothing).",
                        choices=["sigmoid", "ipo", "hinge", "robust"])
    label_smoothing: float = _f(0.0, "DPO: the assumed share of pairs whose labels are flipped (robust "
                                "DPO / cDPO; the paper suggests 0.1); 0 = trust every pair.", lo=0.0, hi=0.49)
    orpo_lambda: float = _f(0.1, "ORPO: weight of the odds-ratio term against the SFT loss on the chosen "
                            "answer (the paper's λ, 0.1; 0.05 to 0.5).", lo=0.0001, hi=100.0)
    simpo_beta: float = _f(2.0, "SimPO: reward scale on the length-normalised log-probabilities (the "
                           "paper's β, 2.0 to 2.5).", lo=0.0001, hi=100.0)
    simpo_gamma: float = _f(0.5, "SimPO: the target reward margin γ (the paper's γ/β ratio is 0.5, so "
                            "0.5 to 1.6 here).", lo=0.0, hi=100.0)
    desirable_weight: float = _f(1.0, "KTO: weight of the desirable answers' loss (the paper's λ_D); keep "
                                 "λ_D·n_D / λ_U·n_U between 1 and 4/3 when one kind outnumbers the other.",
                                 lo=0.0, hi=100.0)
    undesirable_weight: float = _f(1.0, "KTO: weight of the undesirable answers' loss (the paper's λ_U).",
                                   lo=0.0, hi=100.0)


@dataclass
class DataConfig:
    train: str = _f("builtin:sample", "Training data: .jsonl, .json, .csv, .tsv (or .gz/.bz2/.xz of them), .parquet, a saved "
                    "datasets directory, builtin:sample, or builtin:vl-sample (images).", kind="path")
    eval: str = _f("", "Held-out eval data (same formats); empty = split off eval_fraction.", kind="path")
    eval_fraction: float = _f(0.05, "Share of train rows held out for eval loss when no eval file "
                              "is given (0 = no eval).", lo=0.0, hi=0.5)
    format: str = _f(AUTO, "Row format; auto detects it from the fields (preference: chosen/rejected "
                     "pairs; kto: answers with a true/false label).",
                     choices=[AUTO, "messages", "sharegpt", "alpaca", "prompt_completion", "text", "tokens",
                              "vision", "preference", "kto"])
    max_length: int = _f(4096, "Tokens per example; longer rows are truncated. Memory grows with it "
                         "linearly: activations per token x max_length (fewer with checkpointing) and the "
                         "LM head's per-token terms (its logits are chunked); `qlora-tui estimate` shows each "
                         "term. Past the model's pretrained length, set model.rope_scaling.",
                         lo=16, hi=1_048_576)
    packing: Any = _f(AUTO, "Pack several rows into one sequence (no padding). auto = on where "
                      "the attention kernel isolates samples.", choices=[True, False, AUTO])
    strict: bool = _f(False, "Refuse to train when the dataset has problems (else skip bad rows).")
    sources: list = _f([], "Several sources in one run ([[data.sources]] tables: path, format, "
                       "split, subset, dataset, weight or rows, eval); they replace data.train.",
                       kind="sources", form=False)
    mix: str = _f("concat", "How sources are mixed: concat (in order) or interleave (alternated in "
                  "proportion).", choices=["concat", "interleave"], form=False)


@dataclass
class TrainConfig:
    method: str = _f(methods.DEFAULT, "qlora: LoRA over a 4-bit base; lora: LoRA over a 16-bit base; "
                     "galore: full-rank training of the targeted layers with GaLore's projected "
                     "gradients over a 16-bit base (a full checkpoint, no adapter); the preference "
                     "methods (dpo, orpo, kto, simpo, ...): preference tuning of a LoRA adapter over the "
                     "4-bit base on chosen/rejected pairs (kto: answers labelled good/bad), settings in "
                     "[preference]. Each is one file of engine/methods/.",
                     choices=list(methods.names()))
    epochs: float = _f(3.0, "Passes over the data; too many overfits small data (1 to 5).", lo=0.01, hi=1000)
    max_steps: int = _f(-1, "Stop after this many optimizer steps; -1 = run all epochs.", lo=-1)
    learning_rate: float = _f(2e-4, "Too high = NaN; too low = no learning (1e-4 to 5e-4).", lo=1e-9, hi=1.0)
    batch_size: int = _f(2, "Micro-batch per device (1-4; depends on VRAM).", lo=1, hi=4096)
    grad_accum: int = _f(4, "Gradient accumulation; effective batch = batch × accumulation (4-16).",
                         lo=1, hi=4096)
    warmup_ratio: float = _f(0.03, "Share of steps spent warming the learning rate up.", lo=0.0, hi=0.5)
    scheduler: str = _f("linear", "Learning-rate schedule.",
                        choices=["linear", "cosine", "constant", "constant_with_warmup"])
    optimizer: str = _f(AUTO, "Hugging Face optimizer name; auto = paged_adamw_8bit on GPU, "
                        "adamw_torch on CPU.",
                        choices=[AUTO, "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit",
                                 "adamw_torch", "adamw_torch_fused", "adafactor", "sgd"])
    weight_decay: float = _f(0.0, "AdamW weight decay.", lo=0.0, hi=1.0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", lo=0.0)
    gradient_checkpointing: Any = _f(AUTO, "Recompute activations to save memory; auto = on "
                                     "unless the planner finds room without it.",
                                     choices=[True, False, AUTO])
    checkpoint_layers: int = _f(-1, "Decoder layers recomputed under gradient checkpointing (the "
                                "first ones); -1 = auto: the planner checkpoints the fewest that "
                                "fit, or all of them.", lo=-1)
    activation_offload: Any = _f(AUTO, "Checkpointed layers keep their saved input in pinned CPU "
                                 "memory, copied back one layer ahead of the backward (one GPU); "
                                 "auto = when the planner needs the room.",
                                 choices=[True, False, AUTO])
    fused_lora: Any = _f(AUTO, "One fused autograd function per 4-bit LoRA projection (the LoRA "
                         "product accumulated by the base GEMM); auto = on for GPU runs where it "
                         "applies (4-bit base, no dropout, no DoRA).", choices=[True, False, AUTO])
    fp8_base: Any = _f(AUTO, "The frozen 4-bit base's GEMMs in FP8 (e4m3, per-row scales) inside the "
                       "fused LoRA linear; LoRA, attention and the head stay bf16; auto = on for "
                       "GPUs that run FP8 GEMMs (compute capability 8.9+: Ada, Hopper).",
                       choices=[True, False, AUTO])
    liger_kernel: Any = _f(AUTO, "Liger fused kernels (GPU, liger-kernel installed); auto = on "
                           "where available.", choices=[True, False, AUTO])
    seed: int = _f(42, "Random seed (data order, LoRA init).", lo=0, hi=2**32 - 1)
    logging_steps: int = _f(10, "Emit a step event (loss, lr, tokens/s) every N steps.", lo=1)
    eval_steps: int = _f(50, "Evaluate every N steps (0 = only at the end).", lo=0)
    save_steps: int = _f(100, "Write a checkpoint every N steps (0 = only at the end).", lo=0)
    save_total_limit: int = _f(3, "Checkpoints kept (oldest removed).", lo=1)
    nan_policy: str = _f("halt", "On a non-finite loss or grad norm: halt the run, or only warn.",
                         choices=["halt", "warn"])
    device: str = _f(AUTO, "auto = CUDA when present, else CPU.", choices=[AUTO, "cuda", "cpu"])
    gpu_memory_gib: float = _f(0.0, "GPU memory the planner may use (GiB); 0 = all that is free.", lo=0.0)
    weight_streaming: Any = _f(AUTO, "Keep the frozen 4-bit layers in host RAM and stream them to "
                               "the GPU layer by layer; auto = only when the base does not fit.",
                               choices=[True, False, AUTO])


@dataclass
class EvalConfig:
    prompts: list = _f([], "Prompts the current adapter answers at each eval (greedy), logged and "
                       "shown on the Train screen; empty = the first user turns of eval.samples "
                       "eval rows. In the form: separated by |.", kind="prompts")
    samples: int = _f(2, "How many eval rows give prompts when eval.prompts is empty; 0 = no "
                      "generations during training.", lo=0, hi=16)
    max_new_tokens: int = _f(32, "Tokens each answer may have: bounds the time generation adds to "
                             "an eval.", lo=1, hi=1024)


@dataclass
class OutputConfig:
    dir: str = _f("runs", "Directory that holds one sub-directory per run.", kind="path")
    name: str = _f("", "Run name (appended to the timestamp); empty = the model's name.")
    report_to: str = _f("none", "Also log to external trackers: none, or one or more comma-separated names "
                        "the installed transformers knows (tensorboard, wandb, mlflow, trackio, comet_ml, ...).")
    keep_checkpoints: bool = _f(True, "Keep checkpoints after a successful run (for resume).")


@dataclass
class DistributedConfig:
    gpus: int = _f(1, "GPUs on this host; > 1 launches through accelerate.", lo=1, hi=64)
    strategy: str = _f("ddp", "ddp: each GPU holds the 4-bit base; fsdp: shard it (models that "
                       "don't fit one GPU).", choices=["ddp", "fsdp"])
    nodes: int = _f(1, "Machines in the job, each with distributed.gpus GPUs; > 1: start it on every "
                    "node (qlora-tui launch CONFIG prints each node's command).", lo=1, hi=1024)
    node_rank: int = _f(0, "This machine's number in a multi-node job: 0 (the main node, which writes "
                        "the run directory) to nodes - 1; usually given per node with --set.", lo=0, hi=1023)
    main_address: str = _f("", "Multi-node: host name or IP address of node 0 that every node can "
                           "reach (the rendezvous, torchrun's --master_addr); empty = the first host "
                           "of distributed.hostfile.")
    main_port: int = _f(29500, "Multi-node: a free TCP port on node 0 for the rendezvous.", lo=1, hi=65535)
    hostfile: str = _f("", "Multi-node, optional: a file with one host name per line (node 0 first; "
                       "# comments); qlora-tui launch names each node's host.", kind="path")
    timeout_s: int = _f(1800, "Seconds a collective may wait for another process before the job "
                        "fails (a node that died); nodes also send a heartbeat every tenth of it "
                        "(1 to 10 s).", lo=5, hi=86400)

    @property
    def processes(self) -> int:
        """Worker processes of the whole job (GPUs per node × nodes)."""
        return self.gpus * self.nodes


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "quant": QuantConfig,
    "lora": LoraConfigSection,
    "galore": GaloreConfig,
    "preference": PreferenceConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "output": OutputConfig,
    "distributed": DistributedConfig,
}
SECTION_TITLES = {
    "model": "Model", "quant": "Quantization", "lora": "LoRA", "galore": "GaLore",
    "preference": "Preference tuning", "data": "Data",
    "train": "Training", "eval": "Eval generations", "output": "Output", "distributed": "Multi-GPU and multi-node",
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfigSection = field(default_factory=LoraConfigSection)
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # where the config was read from: relative data/model paths resolve against it
    source: str = field(default="", compare=False, repr=False)

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def get(self, dotted: str):
        section, key = dotted.split(".", 1)
        return getattr(getattr(self, section), key)

    def copy(self) -> "Config":
        return copy.deepcopy(self)

    def resolve_path(self, value: str) -> str:
        """A relative path in a config file is relative to that file's directory."""
        if not value or value.startswith(("builtin:", "hf:")):
            return value
        p = Path(value).expanduser()
        if not p.is_absolute() and self.source:
            cand = Path(self.source).resolve().parent / p
            if cand.exists() or not p.exists():
                return str(cand)
        return str(p)


def plural(n: int, word: str) -> str:
    """``1 problem``, ``2 problems``: every count the user reads goes through here."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class ConfigError(ValueError):
    """One or more config problems; ``problems`` holds one ``Problem`` each."""

    def __init__(self, problems: list["Problem"], source: str = ""):
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        lines = [f"{where}{plural(len(problems), 'config problem')}:"] + [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))

    def one_line(self) -> str:
        """For a toast or a status line: the first problem in full, then how many more."""
        first = self.problems[0] if self.problems else "invalid config"
        more = f" (and {plural(len(self.problems) - 1, 'more problem')})" if len(self.problems) > 1 else ""
        where = f"{self.source}: " if self.source and not str(first).startswith(self.source) else ""
        return f"{where}{first}{more}"


@dataclass
class Problem:
    field: str
    value: Any
    message: str

    def __str__(self) -> str:
        if self.field.startswith("<"):            # the file itself (not a key): no `<file> =`
            return f"{self.value}: {self.message}"
        return f"{self.field} = {self.value!r}: {self.message}"


def field_specs() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Section name → [(key, dataclass field)] in declaration order (for forms and docs)."""
    return {name: [(f.name, f) for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}


def _type_name(default) -> str:
    return type(default).__name__


def _coerce(key: str, f: dataclasses.Field, value, problems: list[Problem]):
    """Check ``value`` against the field's type, choices and range; return the coerced value."""
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    choices = meta.get("choices")
    if choices is not None and any(isinstance(c, bool) for c in choices):
        if isinstance(value, bool) or value == AUTO:
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        problems.append(Problem(key, value, f"allowed: true, false or \"{AUTO}\""))
        return default
    if meta.get("kind") == "sources":
        return _sources(key, value, problems)
    if meta.get("kind") == "rope":
        return _rope_scaling(key, value, problems)
    if meta.get("kind") == "modules":
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return list(value)
        problems.append(Problem(key, value, 'allowed: "all-linear" or a non-empty list of module names'))
        return default
    if meta.get("kind") == "prompts":       # a TOML list of strings, or "a | b" (the form)
        if isinstance(value, str):
            return [p.strip() for p in value.split("|") if p.strip()]
        if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
            return [v.strip() for v in value]
        problems.append(Problem(key, value, 'allowed: a list of non-empty strings, e.g. ["What is '
                                'LoRA?", "Say hi"]'))
        return default
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        problems.append(Problem(key, value, "must be true or false"))
        return default
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(Problem(key, value, f"must be a number ({_type_name(default)})"))
            return default
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            if not value.is_integer():
                problems.append(Problem(key, value, "must be a whole number"))
                return default
            value = int(value)
        if isinstance(default, float):
            value = float(value)
            if not math.isfinite(value):
                problems.append(Problem(key, value, "must be finite"))
                return default
        lo, hi = meta.get("lo"), meta.get("hi")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"{lo if lo is not None else '-inf'} to {hi if hi is not None else 'inf'}"
            problems.append(Problem(key, value, f"out of range: allowed {rng}"))
            return default
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            problems.append(Problem(key, value, "must be a string"))
            return default
        if choices is not None and value not in choices:
            problems.append(Problem(key, value, "allowed: " + ", ".join(map(str, choices))))
            return default
        return value
    return value


def _report_to_check(cfg: Config, problems: list[Problem]) -> None:
    """The names' spelling here; whether transformers knows them is checked before the run starts
    (engine.training.trackers.check_available), where transformers is loaded anyway."""
    import re
    value = cfg.output.report_to
    parts = [p.strip() for p in str(value).split(",")]
    if not all(re.fullmatch(r"[a-z][a-z0-9_]*", p) for p in parts) or ("none" in parts and len(parts) > 1):
        problems.append(Problem("output.report_to", value, "none, or tracker names separated by commas "
                                "(e.g. tensorboard or tensorboard,mlflow)"))


def _init_checks(cfg: Config, problems: list[Problem]) -> None:
    """lora.init: LoftQ needs the 4-bit base it corrects for, PiSSA a 16-bit base to keep the residual in."""
    init = cfg.lora.init
    if init == "default":
        return
    problems += [Problem(*p) for p in methods.of(cfg).init_problems(cfg)]     # what the method allows
    if cfg.lora.use_dora or cfg.lora.lora_fa:
        which = "lora.use_dora" if cfg.lora.use_dora else "lora.lora_fa"
        problems.append(Problem("lora.init", init, f"cannot be combined with {which}"))
    if cfg.distributed.processes > 1:
        problems.append(Problem("lora.init", init, "runs on one GPU here: set distributed.gpus = 1 or "
                                "lora.init = \"default\""))


ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
_ROPE_KEYS = {"type": str, "factor": (int, float), "original_max_position_embeddings": int,
              "low_freq_factor": (int, float), "high_freq_factor": (int, float)}
_ROPE_ONLY = {"original_max_position_embeddings": ("yarn", "llama3"), "low_freq_factor": ("llama3",),
              "high_freq_factor": ("llama3",)}


def _rope_scaling(key: str, value, problems: list[Problem]) -> dict:
    """``model.rope_scaling``: {} (off) or a table with a type and a factor; one problem per bad key.
    Checked against the model's config.json before a run (engine.models.rope.check)."""
    if not isinstance(value, dict):
        problems.append(Problem(key, value, 'must be a table, e.g. {type = "yarn", factor = 4.0}, or {} for none'))
        return {}
    if not value:
        return {}
    n = len(problems)
    for k, v in value.items():
        if k not in _ROPE_KEYS:
            problems.append(Problem(f"{key}.{k}", v, "unknown key; allowed: " + ", ".join(_ROPE_KEYS)))
        elif isinstance(v, bool) or not isinstance(v, _ROPE_KEYS[k]):
            problems.append(Problem(f"{key}.{k}", v, "must be a " + ("string" if k == "type" else
                                    "whole number" if _ROPE_KEYS[k] is int else "number")))
    kind = value.get("type")
    if "type" not in value:
        problems.append(Problem(f"{key}.type", None, "missing; allowed: " + ", ".join(ROPE_TYPES)))
    elif isinstance(kind, str) and kind not in ROPE_TYPES:
        problems.append(Problem(f"{key}.type", kind, "allowed: " + ", ".join(ROPE_TYPES)))
    f = value.get("factor")
    if "factor" not in value:
        problems.append(Problem(f"{key}.factor", None, "missing: how many times the pretrained length "
                                "(e.g. 2.0 to double it)"))
    elif isinstance(f, (int, float)) and not isinstance(f, bool) and not (math.isfinite(f) and 1 < f <= 1024):
        problems.append(Problem(f"{key}.factor", f, "out of range: above 1 (1 is no scaling), at most 1024"))
    o = value.get("original_max_position_embeddings")
    if isinstance(o, int) and not isinstance(o, bool) and o < 1:
        problems.append(Problem(f"{key}.original_max_position_embeddings", o, "must be at least 1"))
    for k, types in _ROPE_ONLY.items():
        if k in value and kind in ROPE_TYPES and kind not in types:
            problems.append(Problem(f"{key}.{k}", value[k], "only for type = " + " or ".join(types)))
    lo, hi = value.get("low_freq_factor", 1.0), value.get("high_freq_factor", 4.0)
    if kind == "llama3" and all(isinstance(x, (int, float)) for x in (lo, hi)) and not 0 < lo < hi:
        problems.append(Problem(f"{key}.high_freq_factor", hi, f"must be above low_freq_factor ({lo}), both above 0"))
    return dict(value) if len(problems) == n else {}


def _node_checks(cfg: Config, problems: list[Problem]) -> None:
    """[distributed] for several machines: a node number inside the job, a rendezvous address."""
    import re
    d = cfg.distributed
    if d.node_rank >= d.nodes:
        problems.append(Problem("distributed.node_rank", d.node_rank, f"must be below distributed.nodes "
                                f"({d.nodes}): 0 to {d.nodes - 1}"))
    addr = d.main_address
    if addr and not re.fullmatch(r"[A-Za-z0-9_.:\[\]-]{1,253}", addr):
        problems.append(Problem("distributed.main_address", addr, "must be a host name or an IP address "
                                "(letters, digits, . - : only)"))
    elif d.nodes > 1 and not addr and not d.hostfile.strip():
        problems.append(Problem("distributed.main_address", addr, "a multi-node job needs node 0's "
                                "address (host name or IP every node reaches), or distributed.hostfile"))
    if d.nodes > 1 and cfg.train.weight_streaming is True:
        problems.append(Problem("train.weight_streaming", True, "runs on one GPU only; set it to auto or "
                                "false with distributed.nodes > 1"))


_SOURCE_KEYS = {"path": str, "format": str, "split": str, "subset": str, "dataset": str,
                "weight": (int, float), "rows": int, "eval": str}


def _sources(key: str, value, problems: list[Problem]) -> list:
    """``[[data.sources]]``: a list of tables, each with a path and at most one of weight / rows."""
    if not isinstance(value, list):
        problems.append(Problem(key, value, "must be a list of tables ([[data.sources]] with a path)"))
        return []
    out = []
    formats = DataConfig.__dataclass_fields__["format"].metadata["choices"]
    for i, src in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(src, dict):
            problems.append(Problem(where, src, "must be a table with a path"))
            continue
        bad = [k for k in src if k not in _SOURCE_KEYS]
        if bad:
            problems.append(Problem(f"{where}.{bad[0]}", src[bad[0]], "unknown key; allowed: " + ", ".join(_SOURCE_KEYS)))
            continue
        wrong = [k for k, v in src.items() if isinstance(v, bool) or not isinstance(v, _SOURCE_KEYS[k])]
        if wrong:
            problems.append(Problem(f"{where}.{wrong[0]}", src[wrong[0]], "must be a "
                                    + ("number" if wrong[0] == "weight" else "whole number" if wrong[0] == "rows" else "string")))
            continue
        if not src.get("path", "").strip():
            problems.append(Problem(f"{where}.path", src.get("path", ""), "each source needs a path (a file, a "
                                    "datasets directory, a dataset_info.json with dataset, or hf:org/name)"))
            continue
        if "weight" in src and "rows" in src:
            problems.append(Problem(f"{where}.rows", src["rows"], "give weight or rows, not both"))
            continue
        if "weight" in src and not (0 < src["weight"] <= 1000):
            problems.append(Problem(f"{where}.weight", src["weight"], "out of range: above 0, up to 1000"))
            continue
        if "rows" in src and src["rows"] < 1:
            problems.append(Problem(f"{where}.rows", src["rows"], "must be 1 or more"))
            continue
        if src.get("format", AUTO) not in formats:
            problems.append(Problem(f"{where}.format", src["format"], "allowed: " + ", ".join(map(str, formats))))
            continue
        out.append(dict(src))
    return out


def _cross_checks(cfg: Config, problems: list[Problem]) -> None:
    if not cfg.model.name.strip():
        problems.append(Problem("model.name", cfg.model.name, "must name a hub id, a directory or builtin:tiny"))
    if not cfg.data.train.strip():
        problems.append(Problem("data.train", cfg.data.train, "must name a data file or directory"))
    if cfg.data.eval and not cfg.data.eval.strip():
        problems.append(Problem("data.eval", cfg.data.eval, 'must name a data file, or be "" for none'))
    if not cfg.output.dir.strip():       # "" would put runs in whatever folder the command runs in
        problems.append(Problem("output.dir", cfg.output.dir, "must name the folder that holds the runs"))
    if cfg.train.max_steps == 0:
        problems.append(Problem("train.max_steps", 0, "0 trains nothing: give the number of steps (1 or "
                                 "more), or -1 to run all epochs"))
    if cfg.lora.lora_fa and cfg.lora.use_dora:
        problems.append(Problem("lora.lora_fa", True, "LoRA-FA cannot be combined with lora.use_dora"))
    _init_checks(cfg, problems)
    _report_to_check(cfg, problems)
    _node_checks(cfg, problems)
    problems += [Problem(*p) for p in methods.of(cfg).validate(cfg)]
    tr = cfg.train
    if tr.activation_offload is True and cfg.distributed.processes > 1:
        problems.append(Problem("train.activation_offload", True, "runs on one GPU only; set it to "
                                "auto or false with distributed.gpus > 1"))
    if tr.gradient_checkpointing is False and (tr.activation_offload is True or tr.checkpoint_layers > 0):
        key = "train.activation_offload" if tr.activation_offload is True else "train.checkpoint_layers"
        problems.append(Problem(key, cfg.get(key), "needs gradient checkpointing; set "
                                "train.gradient_checkpointing to true or auto"))


def from_dict(data: dict, source: str = "") -> Config:
    """Build a validated Config from a (TOML) dict; raise ConfigError listing every problem."""
    problems: list[Problem] = []
    cfg = Config(source=source)
    if not isinstance(data, dict):
        raise ConfigError([Problem("<root>", data, "must be a table")], source)
    for section, value in data.items():
        if section not in SECTIONS:
            problems.append(Problem(section, value, "unknown section; allowed: " + ", ".join(SECTIONS)))
            continue
        if not isinstance(value, dict):
            problems.append(Problem(section, value, "must be a table ([" + section + "])"))
            continue
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        target = getattr(cfg, section)
        for key, v in value.items():
            dotted = f"{section}.{key}"
            if key not in fields:
                problems.append(Problem(dotted, v, "unknown field; allowed: " + ", ".join(fields)))
                continue
            setattr(target, key, _coerce(dotted, fields[key], v, problems))
    _cross_checks(cfg, problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def parse_value(text: str):
    """Parse the right-hand side of ``--set key=value`` as a TOML value, else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _is_text_field(section: str, name: str) -> bool:
    """A plain string field (no true/false/auto choices, not a module list)."""
    cls = SECTIONS.get(section)
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None) if cls else None
    if f is None or f.default is dataclasses.MISSING:
        return False
    choices = f.metadata.get("choices") or []
    return isinstance(f.default, str) and f.metadata.get("kind") != "modules" \
        and not any(isinstance(c, bool) for c in choices)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings onto a config dict (before validation)."""
    data = copy.deepcopy(data)
    problems = []
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            problems.append(Problem("--set", item, "expected section.key=value, e.g. train.learning_rate=1e-4"))
            continue
        key, raw = item.split("=", 1)
        section, name = key.strip().split(".", 1)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            problems.append(Problem(section, data[section], "must be a table"))
            continue
        value = parse_value(raw.strip())
        if _is_text_field(section, name) and not isinstance(value, str):
            value = raw.strip()        # a string field: nan, inf, 1e3, true are its text
        data[section][name] = value
    if problems:
        raise ConfigError(problems, "--set")
    return data


def read_toml(path: str | Path) -> dict:
    from engine.core import files
    p = Path(path)
    try:
        text = files.read_text(p)      # a regular file of sane size; a BOM (Windows editors) is accepted
    except FileNotFoundError:
        raise ConfigError([Problem("<file>", str(p), "config file not found; create one with "
                                   "`qlora-tui init " + str(p) + "`")], str(p)) from None
    except (files.NotRegular, files.TooLarge) as e:
        raise ConfigError([Problem("<file>", str(p), f"cannot read: {e.strerror}")], str(p)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([Problem("<file>", str(p), f"cannot read: {e}")], str(p)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([Problem("<toml>", str(p), f"not valid TOML: {e}")], str(p)) from None
    except RecursionError:
        raise ConfigError([Problem("<toml>", str(p), "not valid TOML: nested too deeply")], str(p)) from None


def effective_batch(batch_size: int, grad_accum: int, processes: int) -> int:
    """Rows per optimizer step (processes: GPUs a node x nodes): the one rule (the planner's timing,
    ``estimate``, the Config screen's form: ``engine.service.effective_batch``)."""
    return batch_size * grad_accum * processes


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data = read_toml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(data, source=str(path) if path else "")


def to_toml(cfg: Config) -> str:
    import tomli_w
    return tomli_w.dumps(cfg.to_dict())


def edit_toml(text: str, cfg: Config) -> str:
    """``text`` (a TOML config someone wrote) holding ``cfg``'s values, changed as little as
    possible: a key whose value differs is rewritten in place (its comment kept), a key the file
    lacks is added to its section only when it differs from the default, and everything else
    (the file's own keys, their order, comments, blank lines) stays as it was. tomlkit keeps
    the document's layout; ``tomlkit.exceptions.ParseError`` when ``text`` is not TOML."""
    import tomlkit
    doc = tomlkit.parse(text)
    defaults = Config().to_dict()
    for section, values in cfg.to_dict().items():
        table = doc.get(section)
        for key, value in values.items():
            if table is not None and key in table:
                old = table[key]
                old = old.unwrap() if hasattr(old, "unwrap") else old
                if old != value:
                    table[key] = value
            elif value != defaults[section][key]:
                if table is None:
                    table = doc[section] = tomlkit.table()
                table[key] = value
    return tomlkit.dumps(doc)


def save(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as TOML atomically (a crash never leaves half a config). An existing file
    keeps its own keys, order and comments (``edit_toml``); a new one gets every key."""
    from engine.core import files
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = to_toml(cfg)
    try:
        text = edit_toml(files.read_text(p), cfg)
    except FileNotFoundError:
        pass
    except Exception:  # noqa: BLE001 - unreadable or not TOML: replaced whole, as before
        pass
    files.write_atomic(p, text)


def starter_toml() -> str:
    """A commented starter config: every field with its default and help text."""
    import tomli_w
    out = ["# qlora-tui run configuration. Every key is optional; shown with its default.",
           "# Override any key on the command line: --set train.learning_rate=1e-4", ""]
    for section, items in field_specs().items():
        out.append(f"[{section}]  # {SECTION_TITLES[section]}")
        for key, f in items:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            meta = f.metadata
            allowed = ""
            if meta.get("choices"):
                allowed = " Allowed: " + ", ".join(str(c).lower() for c in meta["choices"]) + "."
            out.append(f"# {meta['help']}{allowed}")
            # an empty table default ({}) inline: tomli_w would open a [key] section
            out.append(f"{key} = {{}}" if default == {} else tomli_w.dumps({key: default}).strip())
        out.append("")
    return "\n".join(out)
