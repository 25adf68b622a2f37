"""The fast paths' checks (engine/training/probes.py) on this GPU: each probe's error against
its reference and its time, then each fallback under fault injection (the plan lines a run would
show). One JSON line per case to $OUT/probe_check.jsonl (or stdout).

    python bench/probe_check.py
"""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    import torch
    from engine.core import config
    from engine.training import probe_results, probes
    from engine.models.runtime import Runtime
    out = Path(os.environ.get("OUT", ".")) / "probe_check.jsonl"
    lines = []
    dev = torch.device("cuda", 0)
    for name in probes.PROBES:
        r = probes.check(name, dev, torch.bfloat16)
        lines.append(dict(case="probe", name=name, ok=r.ok, error=r.error, tolerance=r.tolerance,
                          why=r.why, seconds=round(r.seconds, 4), gpu=torch.cuda.get_device_name()))
    cfg = config.from_dict({"model": {"name": "builtin:tiny"},
                            "train": {"fused_lora": True, "fp8_base": True, "liger_kernel": True,
                                      "activation_offload": True, "weight_streaming": False}})
    rt = Runtime("cuda", "bf16", True)
    for fault in [None] + [f"probe:{n}" for n in probes.PROBES] + ["probewrong:fp8_base"]:
        probe_results.RESULTS.clear()
        if fault:
            os.environ["QLORA_TUI_FAULTS"] = fault
        else:
            os.environ.pop("QLORA_TUI_FAULTS", None)
        c = cfg.copy()
        plan, warnings = probes.verify(c, rt)
        lines.append(dict(case="verify", fault=fault, plan=plan, warnings=warnings,
                          after={k: getattr(c.train, k) for k in ("fused_lora", "fp8_base", "liger_kernel",
                                                                  "activation_offload")},
                          triton_ok=probes.passed("triton_quant"), pinned_ok=probes.passed("pinned_buffers")))
    with open(out, "a") as f:
        for ln in lines:
            f.write(json.dumps(ln) + "\n")
            print("PROBE " + json.dumps(ln), flush=True)


if __name__ == "__main__":
    main()
