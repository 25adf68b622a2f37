"""Check a run's adapter the way a user would use it: files, tensor shapes, and that plain PEFT
loads it onto the base model and changes the logits.

    python bench/check_adapter.py RUN_DIR

Prints one line `ADAPTER {...}` (JSON). Used after multi-GPU runs (FSDP shards the adapter
while training; what is saved must be the whole, unsharded adapter).
"""
import json
import sys
from pathlib import Path


def main() -> int:
    run = Path(sys.argv[1])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from engine.core import config as config_mod
    from engine.models.source import model_path
    base_path = model_path(config_mod.load(str(run / "config.toml")))     # builtin:tiny resolves to its cache
    ad = run / "adapter"
    files = {p.name: p.stat().st_size for p in sorted(ad.iterdir())} if ad.is_dir() else {}
    out = {"adapter_dir": str(ad), "files": files}
    st = ad / "adapter_model.safetensors"
    if not st.exists():
        print("ADAPTER " + json.dumps(out), flush=True)
        return 1
    import torch
    from safetensors.torch import load_file
    w = load_file(str(st))
    a = [k for k in w if "lora_A" in k]
    b = [k for k in w if "lora_B" in k]
    out.update(tensors=len(w), lora_A=len(a), lora_B=len(b),
               shapes={k: list(w[k].shape) for k in (a[:1] + b[:1])},
               dtypes=sorted({str(t.dtype) for t in w.values()}),
               lora_B_max_abs=max(float(w[k].abs().max()) for k in b) if b else None)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16).to(dev)
    x = torch.randint(4, base.config.vocab_size - 1, (1, 64), device=dev)
    with torch.no_grad():
        before = base(x).logits.float()
        model = PeftModel.from_pretrained(base, str(ad)).to(dev)
        after = model(x).logits.float()
    out["logits_max_abs_change"] = float((after - before).abs().max())
    print("ADAPTER " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
