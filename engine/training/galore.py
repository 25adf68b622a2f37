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
tokenizer and ``qlora_tui.json`` naming the base). The method itself (its checks, its memory terms
for the planner) and that checkpoint's reading and writing (``merge`` has nothing to merge,
``generate`` compares the base with the checkpoint, ``serve-cmd`` prints a plain ``vllm serve`` of
it) are engine/methods/galore.py; here is its training side.
"""
from __future__ import annotations

OPTIMIZERS = {"adamw": "galore_adamw", "adamw_8bit": "galore_adamw_8bit",
              "adafactor": "galore_adafactor"}


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
