"""``lora.init = "loftq" | "pissa"``: adapters that do not start at zero, and the adapter a run leaves.

PiSSA (PEFT's ``init_lora_weights="pissa"``, on a 16-bit base): A and B start as the top-r
singular directions of each weight and the base weight becomes the residual ``W - s·B0·A0``.

LoftQ (on the 4-bit base of QLoRA): A and B start as the rank-r SVD of the quantisation error
``W - dequant(NF4(W))``, read from the checkpoint's 16-bit weights, so that the 4-bit base plus the
adapter starts closer to the original model. PEFT's ``replace_lora_weights_loftq`` does the same but
only on CUDA and without the LoRA scale (it is right only for alpha = r); this one runs where the
4-bit base runs (CPU included) and divides the scale out.

Either way the base the adapter trained against is not the checkpoint on disk. The adapter as it
starts is saved to ``RUN_DIR/adapter_init`` and the final ``RUN_DIR/adapter`` is written with PEFT's
conversion (``save_pretrained(path_initial_model_for_weight_conversion=...)``): a plain LoRA of rank
2r whose ΔW = s·(B·A − B0·A0), so merge, export, vLLM and llama.cpp apply it to the original base.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

INIT_DIR = "adapter_init"
MARKER = "qlora_init.json"          # next to the final adapter: it was converted


def apply(cfg, model, lora, model_path: str, run_dir: Path, lines: list[str]):
    """Wrap ``model`` in the adapter ``lora`` initialised as ``cfg.lora.init``; the initial adapter
    goes to RUN_DIR/adapter_init (kept from the first start on a resume)."""
    from peft import get_peft_model
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.lora.init == "pissa":
        lora.init_lora_weights = "pissa"          # the exact SVD: the same residual on a resume
        model = get_peft_model(model, lora)
        lines.append("PiSSA: A, B = the top-r singular directions of each weight; the base keeps the residual")
    else:
        model = get_peft_model(model, lora)
        n, before, after = loftq(model, model_path)
        lines.append(f"LoftQ: A, B absorb the 4-bit quantisation error of {n} weights "
                     f"(mean relative error {before:.4f} -> {after:.4f})")
        # TRL keeps a 4-bit model's adapter in bf16 (the QLoRA paper's choice) once the trainer is
        # built; cast now so the saved start is exactly the start training has
        import torch
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    save_initial(model, Path(run_dir))
    return model


def _safetensors_weights(model_path: str):
    """name -> a loader of that 16-bit weight, from the checkpoint's safetensors files."""
    from safetensors import safe_open
    p = Path(model_path)
    if not p.is_dir():
        from huggingface_hub import snapshot_download
        p = Path(snapshot_download(model_path, allow_patterns=["*.safetensors", "*.json"], local_files_only=True))
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ValueError(f"lora.init = \"loftq\" reads the 16-bit weights from safetensors files; {p} has none")
    where = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                where[k] = f
    return where


def loftq(model, model_path: str) -> tuple[int, float, float]:
    """LoftQ's first step on every 4-bit LoRA layer: B·A·s = the rank-r SVD of W - dequant(Q(W)).
    Returns (layers, mean relative error of the 4-bit base alone, of base + adapter)."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import Linear4bit
    from safetensors import safe_open
    where = _safetensors_weights(model_path)
    prefix = "base_model.model."
    n, before, after = 0, 0.0, 0.0
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        key = name[len(prefix):] + ".weight" if name.startswith(prefix) else name + ".weight"
        if key not in where:
            raise ValueError(f"lora.init = \"loftq\": {key} is not in the checkpoint's safetensors files")
        with safe_open(str(where[key]), "pt") as h:
            w = h.get_tensor(key)
        weight = module.get_base_layer().weight
        dev = weight.device
        w = w.to(device=dev, dtype=torch.float32)
        deq = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
        err = w - deq
        r, scale = module.r["default"], module.scaling["default"]
        U, S, Vh = torch.linalg.svd(err, full_matrices=False)
        root = S[:r].sqrt()
        B = U[:, :r] * root / scale ** 0.5
        A = root[:, None] * Vh[:r] / scale ** 0.5
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        a.data = A.to(a.dtype).contiguous()
        b.data = B.to(b.dtype).contiguous()
        norm = float(w.norm()) or 1.0
        before += float(err.norm()) / norm
        after += float((err - scale * (B @ A)).norm()) / norm
        n += 1
        del w, deq, err, U, S, Vh
    if not n:
        raise ValueError("lora.init = \"loftq\" found no 4-bit LoRA layer (it needs train.method = \"qlora\")")
    return n, before / n, after / n


def save_initial(model, run_dir: Path) -> None:
    """The adapter as it starts, as PEFT's conversion wants it (init_lora_weights = true)."""
    final = run_dir / INIT_DIR
    if (final / "adapter_model.safetensors").is_file():
        return
    tmp = run_dir / (INIT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = model.peft_config["default"]
    was = cfg.init_lora_weights
    cfg.init_lora_weights = True
    try:
        model.save_pretrained(str(tmp))
    finally:
        cfg.init_lora_weights = was
    tmp.rename(final)


def uses_init(run_dir: Path) -> bool:
    return (Path(run_dir) / INIT_DIR / "adapter_model.safetensors").is_file()


def save_converted(model, out: Path, run_dir: Path, init: str) -> None:
    """The final adapter as a plain LoRA over the original base (rank 2r: [B, -B0] @ [A; A0])."""
    import copy
    import warnings
    init_dir = Path(run_dir) / INIT_DIR
    keep = copy.deepcopy(model.peft_config["default"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(init_dir))
    model.peft_config["default"] = keep                 # PEFT doubles r in place while writing
    (Path(out) / MARKER).write_text(json.dumps({
        "init": init, "initial_adapter": str(init_dir),
        "what": "a plain LoRA over the original base: its first r ranks are the trained A, B; the last r "
                "are the initial A0, -B0, so dW = s*(B*A - B0*A0)"}, indent=2) + "\n", encoding="utf-8")
