"""Command: ``estimate`` (engine/planning/estimate.py predicts, plans and writes the report)."""
from __future__ import annotations

import argparse
import json
import math
import sys


def register(subparsers) -> None:
    from engine.cli import add_config_args
    p = subparsers.add_parser(
        "estimate", help="predict peak VRAM from config.json (no weights) and plan what fits",
        description="Predict the training peak GPU memory from the model's config.json alone, "
                    "and let the planner choose micro-batch, gradient checkpointing, Liger and "
                    "packing where the config says auto. Exits 0 even when it does not fit.")
    add_config_args(p)
    p.add_argument("--gpu-mem", type=gib_arg, default=None, metavar="GIB",
                   help="GPU memory to plan for, in GiB (default: free memory of GPU 0 via NVML)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_estimate)


def gib_arg(text: str) -> float:
    """--gpu-mem: a finite number of GiB above 0 (at most 1 PiB)."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and 0 < v <= 2 ** 20):
        raise argparse.ArgumentTypeError(f"{text!r}: give the GPU's memory in GiB, a number above 0 "
                                         "(e.g. 80 for an 80 GB GPU)")
    return v


def cmd_estimate(args) -> int:
    from engine.cli import load_config_or_exit
    from engine.core.units import GIB
    from engine.planning import estimate as estimate_mod
    cfg = load_config_or_exit(args)
    try:
        mc = estimate_mod.model_config_for(cfg)
        gpu_mem = int(args.gpu_mem * GIB) if args.gpu_mem is not None else (
            None if cfg.train.device == "cpu" else estimate_mod.gpu_free_bytes())
        est = estimate_mod.estimate(cfg, mc, gpu_mem_bytes=gpu_mem)
        pl = estimate_mod.plan(cfg, mc, gpu_mem)
    except estimate_mod.EstimateError as e:
        print(f"estimate: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = {"model": cfg.model.name, "peak_bytes": est.peak_bytes,
               "allocated_bytes": est.allocated_bytes, "device_bytes": est.device_bytes,
               "fits": est.fits, "gpu_mem_bytes": est.gpu_mem_bytes, "breakdown": est.breakdown,
               "trainable_params": est.trainable_params, "total_params": est.total_params,
               "batch_size": est.batch_size, "seq_len": est.seq_len,
               "gradient_checkpointing": est.gradient_checkpointing, "liger": est.liger,
               "checkpoint_layers": est.checkpoint_layers, "offload": est.offload,
               "notes": est.notes, "plan": pl.to_dict(), "host_bytes": est.host_bytes,
               "host_breakdown": est.host_breakdown, "streaming": est.streaming}
        print(json.dumps(out))
    else:
        print(estimate_mod.format_report(est, pl))
    return 0
