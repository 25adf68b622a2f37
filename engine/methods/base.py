"""The method protocol: what ``train.method`` is, asked by every layer instead of its name.

A ``Method`` is a frozen dataclass of plain attributes plus a few hooks with defaults; a method
file makes one instance (``METHOD``) of it or of a subclass (``PreferenceMethod`` for the
preference family). The training side's builders are named, not imported: ``trainer``,
``trl_config``, ``setup`` and ``optimizer`` are ``"module:attr"`` strings (TRL's trainer class that
the engine's mixin goes over, its config class, GaLore's model setup and optimizer choice) that
``load`` imports on first use, like Axolotl's adapter builders, so importing a method never loads
torch, TRL or ``engine.training``.

``validate`` and ``init_problems`` return ``(field, value, message)`` triples; ``engine.core.config``
words them as its ``Problem`` lines. Of the engine, this package imports only ``engine.core.rundir``
and ``engine.core.files`` (tests/unit/test_methods.py checks what it must never import).
"""
from __future__ import annotations

from dataclasses import dataclass

SFT, PREFERENCE = "sft", "preference"          # family
ADAPTER, FULL = "adapter", "full"              # artifact: a LoRA adapter, or a full checkpoint
SFT_ROWS, PAIRS, UNPAIRED = "sft", "preference", "kto"   # rows: data.format kinds (dataset/preference)
FULL_DIR = "model"                             # RUN_DIR/model: a full checkpoint (RUN_DIR/adapter: an adapter)


def init_transient_bytes(init: str, out_features: int, in_features: int) -> int:
    """``lora.init``: extra device memory while one weight is initialised (fp32): PiSSA's SVD of the
    weight (the weight, U, S, Vh); LoftQ's original weight, its dequantised 4-bit copy, the error
    and its SVD (engine.training.lora_init does the work)."""
    if init not in ("pissa", "loftq"):
        return 0
    k = min(out_features, in_features)
    svd = out_features * k + k + k * in_features
    full = out_features * in_features
    return 4 * ((2 * full if init == "pissa" else 3 * full) + svd)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str                        # one line: what it trains, on what
    family: str = SFT                   # sft | preference
    artifact: str = ADAPTER             # adapter (RUN_DIR/adapter) | full (RUN_DIR/model)
    quantized: bool = True              # over the 4-bit base of [quant] (when quant.load_in_4bit)
    rows: tuple[str, ...] = (SFT_ROWS,)     # the data kinds it trains on (the first is its own)
    fsdp: bool = True                   # runs with distributed.strategy = "fsdp"
    min_batch: int = 1                  # the smallest train.batch_size it can train
    trainer: str = "trl:SFTTrainer"     # "module:attr": the TRL trainer the engine's mixin goes over
    trl_config: str = "trl:SFTConfig"   # "module:attr": its config class
    setup: str = ""                     # "module:attr": f(cfg, model, args, rt) -> plan lines, run on the
                                        # loaded model before the trainer is built ("" = LoRA's adapter)
    optimizer: str = ""                 # "module:attr": f(cfg, device) -> (Trainer optim name, why) that
                                        # replaces train.optimizer ("" = train.optimizer as set)

    # ------------------------------------------------------------- config
    def four_bit(self, cfg) -> bool:
        """True when the base is loaded in 4 bits (QLoRA and the preference methods)."""
        return bool(self.quantized and cfg.quant.load_in_4bit)

    def output_dir(self) -> str:
        """The run directory's entry of the result: ``adapter``, or ``model`` for a full checkpoint."""
        from engine.core import rundir
        return FULL_DIR if self.artifact == FULL else rundir.ADAPTER

    def dora(self, cfg) -> bool:
        """``lora.use_dora`` as it applies to this method (the one reader of it): an adapter only."""
        return self.artifact == ADAPTER and bool(getattr(cfg.lora, "use_dora", False))

    def validate(self, cfg) -> list[tuple[str, object, str]]:
        """The config's problems that come from this method: (field, value, message) each
        (``init_problems``, lora.init's, are asked where the config checks the [lora] options)."""
        out = []
        dist = cfg.distributed
        if not self.fsdp and dist.processes > 1 and dist.strategy == "fsdp":
            out.append(("train.method", self.name, self.fsdp_refusal()))
        if cfg.train.batch_size < self.min_batch:
            out.append(("train.batch_size", cfg.train.batch_size, self.batch_refusal()))
        if cfg.model.adapter.strip() and self.family != PREFERENCE:
            from engine import methods
            pref = methods.family(PREFERENCE)
            out.append(("model.adapter", cfg.model.adapter, "continues an SFT run with a preference method: set "
                        f"train.method = {', '.join(pref[:-1])} or {pref[-1]}, or leave model.adapter empty"))
        return out

    def fsdp_refusal(self) -> str:
        return "runs with distributed.strategy = \"ddp\""

    def batch_refusal(self) -> str:
        return f"{self.name} needs a micro-batch of {self.min_batch} or more"

    def init_problems(self, cfg) -> list[tuple[str, object, str]]:
        """lora.init: LoftQ needs the 4-bit base it corrects for, PiSSA a 16-bit base to keep the residual in."""
        init = cfg.lora.init
        if init == "default":
            return []
        four = self.four_bit(cfg) and self.family == SFT
        if init == "loftq" and not four:
            return [("lora.init", init, "LoftQ corrects a 4-bit base's quantisation error: use train.method = "
                     "\"qlora\" with quant.load_in_4bit = true, or lora.init = \"pissa\"")]
        if init == "pissa" and four:
            return [("lora.init", init, "PiSSA rewrites the base weights to the residual, which a 4-bit base "
                     "cannot hold: use train.method = \"lora\" (16-bit base), or lora.init = \"loftq\" for QLoRA")]
        return []

    # ------------------------------------------------------------- planner terms
    def sequences(self, micro_batch: int) -> int:
        """Sequences one forward runs for a micro-batch of ``train.batch_size`` rows."""
        return micro_batch

    def batch_note(self, micro_batch: int, seq: int) -> str:
        return ""

    def trainable_terms(self, cfg, dims: dict, targets: list[str], layers: int, d: int) -> dict | None:
        """The trainable memory when it is not a LoRA adapter's (GaLore); None = LoRA adapters."""
        return None

    def gradient_peak(self, terms: dict, freed: int, notes: list[str]) -> int:
        """The gradient bytes at the peak of ``trainable_terms``' method, given the activations,
        logits and workspace the backward frees meanwhile (``freed``)."""
        return terms["grads"]

    def logits_bytes(self, tokens: int, seq: int, vocab: int, d: int) -> int | None:
        """The LM head's bytes when the method's loss is not the SFT loss's; None = the SFT loss's."""
        return None

    def reference_bytes(self, tokens: int, vocab: int, d: int) -> int:
        """Logits of a reference pass (no graph, freed before the policy's forward); 0 = none."""
        return 0

    def init_transient_bytes(self, init: str, out_features: int, in_features: int) -> int:
        """lora.init's transient bytes for one weight (0 where the method has no adapter)."""
        if self.artifact != ADAPTER:
            return 0
        return init_transient_bytes(init, out_features, in_features)
