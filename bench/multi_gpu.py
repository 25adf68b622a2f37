"""Multi-GPU on one host: the engine on 1 GPU, then DDP and FSDP-QLoRA on 2, same data and seed.

    python bench/multi_gpu.py llama1b 2048 8
    python bench/multi_gpu.py llama8b 2048 8 engine_1gpu engine_ddp4 engine_ddp8     # 4/8-GPU hosts

Per-device micro-batch 8, so a 2-GPU step sees twice the rows; tokens/s is for the whole job
(TRL gathers the token count across ranks). The loss curves are printed side by side.
Appends JSON lines to $OUT/multi_gpu.jsonl.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_plain import engine_variant  # noqa: E402

VARIANTS = {
    "engine_1gpu": {},
    "engine_ddp2": {"distributed": {"gpus": 2, "strategy": "ddp"}},
    "engine_fsdp2": {"distributed": {"gpus": 2, "strategy": "fsdp"},
                     "train": {"liger_kernel": False, "gradient_checkpointing": True}},
    # issue 18 (4 and 8 GPUs; not run yet: no such machine was lent)
    "engine_ddp4": {"distributed": {"gpus": 4, "strategy": "ddp"}},
    "engine_ddp8": {"distributed": {"gpus": 8, "strategy": "ddp"}},
    "engine_fsdp4": {"distributed": {"gpus": 4, "strategy": "fsdp"},
                     "train": {"liger_kernel": False, "gradient_checkpointing": True}},
    "engine_fsdp8": {"distributed": {"gpus": 8, "strategy": "fsdp"},
                     "train": {"liger_kernel": False, "gradient_checkpointing": True}},
}


def main():
    shape, seq, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    names = sys.argv[4:] or list(VARIANTS)
    out = Path(os.environ.get("OUT", "/tmp/bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    for v in names:
        r = engine_variant(v, shape, seq, batch, out / f"runs-{v}", extra=VARIANTS[v])
        res[v] = r
        print("RESULT " + json.dumps(r), flush=True)
        with open(out / "multi_gpu.jsonl", "a") as fh:
            fh.write(json.dumps(r) + "\n")
    one = res.get("engine_1gpu", {}).get("tokens_per_s")
    for v, r in res.items():
        if one and r.get("tokens_per_s"):
            print(f"RATIO {v}: {r['tokens_per_s'] / one:.2f}x one GPU", flush=True)


if __name__ == "__main__":
    main()
