"""GaLore (``train.method = "galore"``): full-rank training of the targeted linear layers over a
16-bit base, with gradients projected into a low-rank subspace for the optimizer.

The optimizer is ``galore-torch``'s (the paper's code) through the Hugging Face Trainer's
``galore_adamw`` / ``galore_adamw_8bit`` / ``galore_adafactor`` names: the Trainer builds one
param group of the targeted ``nn.Linear`` weights with ``rank``, ``update_proj_gap`` and
``scale``, and one plain group for the rest. Everything that is not targeted (embeddings, norms,
lm_head) is frozen here, so the memory is: 16-bit weights + full gradients of the targeted
weights + the optimizer state of the *projected* gradients (``2 x r x max(m, n)`` moments and an
``r x min(m, n)`` projection per matrix) instead of Adam's ``2 x m x n``.

The result is a full checkpoint, not an adapter: ``RUN_DIR/model`` (config, safetensors,
tokenizer and ``qlora_tui.json`` naming the base). ``merge`` has nothing to merge, ``generate``
compares the base with the checkpoint, ``serve-cmd`` prints a plain ``vllm serve`` of it.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from engine.core import files as _files

METHODS = ("qlora", "lora", "galore")
FULL_DIR = "model"                  # RUN_DIR/model: the full checkpoint of a GaLore run
MARKER = "qlora_tui.json"           # written beside it: method and base
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
OPTIMIZERS = {"adamw": "galore_adamw", "adamw_8bit": "galore_adamw_8bit",
              "adafactor": "galore_adafactor"}


def is_full(cfg) -> bool:
    """True when the run trains full weights (no adapter): GaLore."""
    return getattr(getattr(cfg, "train", None), "method", "qlora") == "galore"


def output_dir_name(cfg) -> str:
    from engine.core import rundir
    return FULL_DIR if is_full(cfg) else rundir.ADAPTER


def hf_optimizer(cfg, device: str) -> tuple[str, str]:
    """(Trainer optim name, why) for ``galore.optimizer``; auto = 8-bit AdamW on CUDA (the
    paper's 7B recipe), 32-bit AdamW on the CPU (bitsandbytes' 8-bit states need CUDA)."""
    opt = cfg.galore.optimizer
    if opt == "auto":
        opt = "adamw_8bit" if device == "cuda" else "adamw"
        why = "GPU: 8-bit GaLore-AdamW" if device == "cuda" else "CPU: 8-bit states need CUDA"
    else:
        why = "galore.optimizer"
    return OPTIMIZERS[opt], why


def target_names(cfg, model) -> list[str]:
    """Leaf names of the targeted linear layers (``lora.target_modules``; all-linear = every
    nn.Linear of the decoder but lm_head)."""
    from engine.training import model as model_mod
    targets = model_mod.resolve_target_modules(cfg, model)
    return model_mod.linear_module_names(model) if targets == "all-linear" else list(targets)


def freeze_untargeted(model, names: list[str]) -> tuple[int, int]:
    """Train only the weights of the targeted linear layers; (trainable, total) params."""
    import torch
    wanted = set(names)
    trainable = total = 0
    linear_weights = {f"{n}.weight" for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in wanted}
    for n, p in model.named_parameters():
        keep = n in linear_weights
        p.requires_grad_(keep)
        total += p.numel()
        trainable += p.numel() if keep else 0
    return trainable, total


def setup(cfg, model, args, rt) -> list[str]:
    """Freeze what is not targeted and point the Trainer's optimizer at GaLore (on ``args``)."""
    from transformers.training_args import OptimizerNames
    names = target_names(cfg, model)
    trainable, total = freeze_untargeted(model, names)
    optim, why = hf_optimizer(cfg, rt.device)
    g = cfg.galore
    args.optim = OptimizerNames(optim)
    args.optim_target_modules = names
    args.optim_args = f"rank={g.rank},update_proj_gap={g.update_proj_gap},scale={g.scale}"
    return [f"GaLore: full-rank {', '.join(names)} ({trainable:,} of {total:,} params), rank "
            f"{g.rank}, projection refreshed every {g.update_proj_gap} steps, scale {g.scale:g}; "
            f"{optim} ({why})"]


def write_marker(out_dir: Path, cfg, base_path: str) -> None:
    (Path(out_dir) / MARKER).write_text(json.dumps(
        {"method": "galore", "base": base_path, "model_name": cfg.model.name}, indent=1), encoding="utf-8")


def has_weights(d: Path) -> bool:
    return any((Path(d) / n).is_file() for n in FULL_WEIGHTS)


def full_checkpoint_dir(src) -> Path | None:
    """The full checkpoint of ``src`` (a GaLore run dir or its ``model`` dir), else None."""
    p = Path(src).expanduser()
    for cand in (p / FULL_DIR, p):
        if (cand / MARKER).is_file() and (cand / "config.json").is_file():
            return cand
    return None


def read_marker(full_dir: Path) -> dict:
    try:
        data = _files.read_json(full_dir / MARKER)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def merge_message(full_dir: Path) -> str:
    return (f"nothing to merge: {full_dir} is already a full checkpoint (train.method = galore "
            f"trains the weights themselves, there is no adapter); load, copy or serve it as it is")


def serve_command(full_dir: Path, port: int = 8000) -> str:
    """A plain ``vllm serve`` of the checkpoint (no LoRA flags) and an example request."""
    import shlex
    path = str(full_dir.resolve())
    body = json.dumps({"model": path, "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 64})
    return "\n".join([
        "# a GaLore run is a full checkpoint: serve it directly (no adapter, no LoRA flags)",
        f"vllm serve {shlex.quote(path)} \\",
        f"  --port {int(port)}",
        "",
        "# example request (\"model\" is the served path)",
        f"curl http://localhost:{int(port)}/v1/chat/completions \\",
        "  -H 'Content-Type: application/json' \\",
        f"  -d {shlex.quote(body)}",
    ])


class FullPair:
    """Base and full checkpoint behind the interface ``generate.compare`` uses for a PEFT model:
    ``generate`` runs the checkpoint, inside ``disable_adapter()`` the base."""

    def __init__(self, tuned, base):
        self.tuned, self.base = tuned, base
        self._active = tuned

    def parameters(self):
        return self.tuned.parameters()

    def generate(self, **kw):
        return self._active.generate(**kw)

    @contextlib.contextmanager
    def disable_adapter(self):
        self._active = self.base
        try:
            yield
        finally:
            self._active = self.tuned


def load_pair(full_dir: Path, err):
    """(FullPair, tokenizer, info) for ``generate``: the run's base and its full checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    marker = read_marker(full_dir)
    base = str(marker.get("base") or "")
    if not base:
        raise err(f"{full_dir / MARKER}: names no base model; cannot compare against the base")
    if torch.cuda.is_available():
        kw = {"device_map": {"": 0}, "dtype": torch.bfloat16 if torch.cuda.is_bf16_supported()
              else torch.float16}
        mode = "cuda, 16-bit, full checkpoint"
    else:
        kw, mode = {"dtype": torch.float32}, "cpu, fp32, full checkpoint"
    models = []
    for path in (str(full_dir), base):
        try:
            models.append(AutoModelForCausalLM.from_pretrained(path, **kw).eval())
        except Exception as e:  # noqa: BLE001
            raise err(f"model {path}: loading failed: {str(e).splitlines()[0][:200]}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(full_dir))
    except Exception as e:  # noqa: BLE001
        raise err(f"tokenizer of {full_dir}: cannot load: {str(e).splitlines()[0][:200]}") from None
    return FullPair(models[0], models[1]), tok, {"base": base, "adapter": str(full_dir), "mode": mode}


# ------------------------------------------------------------------------------- estimate

def memory_terms(cfg, dims: dict, targets: list[str], layers: int, d: int) -> dict:
    """GaLore's trainable memory for the estimate (bytes): the targeted weights' full
    gradients (param dtype d) and the optimizer state of the projected gradients.

    Per targeted (in, out) matrix with rank r' = min(r, in, out): the projection
    ``r' x min(in, out)`` and Adam's two moments of the ``r' x max(in, out)`` projected gradient
    (in the param dtype; 1 byte each with the 8-bit optimizer); Adafactor keeps row + column
    factors of the projected gradient.

    ``step_transient``: what galore-torch's optimizer step allocates for one matrix at a time
    (after backward, when the activations are gone): at a projection refresh (step 0, then every
    ``update_proj_gap``) ``torch.linalg.svd`` of the gradient in fp32 (the fp32 copy, the
    solver's working copy, U and Vh: 8mn + 4k(m+n) bytes, k = min(m, n)), and the update
    projected back to a full m x n matrix and scaled (two m x n tensors in the param dtype, three
    with the 8-bit optimizer, which also clones the weight); the largest targeted matrix sets it.
    """
    r = cfg.galore.rank
    opt = cfg.galore.optimizer
    if opt == "auto":
        opt = "adamw" if cfg.train.device == "cpu" else "adamw_8bit"
    copies = 3 if opt == "adamw_8bit" else 2      # the 8-bit step also clones the weight (p.saved_data)
    trainable = grads = state = transient = 0
    for m in targets:
        a, o = dims[m]
        rr = min(r, a, o)
        big, small = max(a, o), min(a, o)
        transient = max(transient, 8 * a * o + 4 * small * (a + o) + copies * a * o * d)
        trainable += a * o
        grads += a * o * d
        proj = rr * small * d
        if opt == "adamw_8bit":
            moments = 2 * rr * big * (1 + 8 / 256)
        elif opt == "adafactor":
            moments = 4 * (rr + big)
        else:
            moments = 2 * rr * big * d
        state += proj + moments
    return {"trainable": layers * trainable, "grads": layers * grads, "optimizer_state": int(layers * state),
            "step_transient": int(transient)}


BACKWARD_OVERLAP = int(0.47 * 2**30)   # fitted: what is in flight where gradients and activations meet


def gradient_term(terms: dict, freed: int, notes: list[str]) -> int:
    """GaLore's gradient bytes on top of the activations at the peak. The full gradients of the
    targeted weights build up layer by layer while the backward frees the activations (and
    logits, workspace: ``freed``), and the optimizer step (``step_transient``: SVD and update
    buffers) runs once they are gone, so the peak is the larger of the two sides plus what is in
    flight where they meet. Measured on the H200 (bench/galore_calibration.py, 1B and 3B Llama
    shapes, seq 1024): the sum of both sides over-predicted by 22% and 28%; this model is within
    2% of both, with ``BACKWARD_OVERLAP`` fitted on those two runs."""
    beyond = max(0, terms["grads"] + terms["step_transient"] - freed)
    if beyond:
        notes.append(f"GaLore: gradients {terms['grads'] / 2**30:.2f} GiB + optimizer step "
                     f"{terms['step_transient'] / 2**30:.2f} GiB outgrow the activations they replace")
    return beyond + BACKWARD_OVERLAP