"""``train.method = "galore"``: full-rank training of the targeted linear layers over a 16-bit base,
with gradients projected into a low-rank subspace for the optimizer (galore-torch through the
Hugging Face Trainer's ``galore_*`` optimizers; engine.training.galore sets it up).

The result is a full checkpoint (``artifact = "full"``: RUN_DIR/model), not an adapter. Here: the
method's checks, its memory terms for the planner (engine.planning.estimate asks for them), and its
checkpoint (the marker beside it, finding it, and what merge, generate and serve-cmd do with it).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from engine.core import files as _files
from engine.methods.base import FULL, FULL_DIR, Method

MARKER = "qlora_tui.json"           # written beside RUN_DIR/model: method and base
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

BACKWARD_OVERLAP = int(0.47 * 2**30)   # fitted: what is in flight where gradients and activations meet


@dataclass(frozen=True)
class GaLore(Method):
    def fsdp_refusal(self) -> str:
        return "GaLore needs whole weight matrices on each GPU: use distributed.strategy = \"ddp\" or " \
               "train.method = \"qlora\""

    def init_problems(self, cfg) -> list[tuple[str, object, str]]:
        if cfg.lora.init == "default":
            return []
        return [("lora.init", cfg.lora.init, "GaLore trains full-rank weights, no adapter: use "
                 "lora.init = \"default\"")]

    def trainable_terms(self, cfg, dims: dict, targets: list[str], layers: int, d: int) -> dict:
        return memory_terms(cfg, dims, targets, layers, d)

    def gradient_peak(self, terms: dict, freed: int, notes: list[str]) -> int:
        return gradient_term(terms, freed, notes)


METHOD = GaLore(name="galore", summary="full-rank training of the targeted layers with GaLore's projected "
                "gradients over a 16-bit base (a full checkpoint, no adapter)",
                artifact=FULL, quantized=False, fsdp=False, setup="engine.training.galore:setup",
                optimizer="engine.training.galore:hf_optimizer")


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


# ------------------------------------------------------------------- the full checkpoint

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
