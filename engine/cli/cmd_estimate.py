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
    p.add_argument("--gpu", default=None, metavar="NAME",
                   help="plan for a GPU of the catalog you are not on (memory and speed from the catalog: "
                        "rtx3090, rtx4090, rtx5090, a100-40, a100-80, l40s, h100, h200); the time is labelled "
                        "modelled")
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
    from engine import service
    from engine.cli import load_config_or_exit
    from engine.core.units import GIB
    from engine.planning import estimate as estimate_mod
    from engine.planning import timing
    cfg = load_config_or_exit(args)
    gpu, local_name = None, None
    if args.gpu is not None:
        try:
            gpu = timing.gpu_named(args.gpu)
        except timing.GpuError as e:
            print(f"estimate: --gpu: {e}", file=sys.stderr)
            return 2
        cfg = cfg.copy()
        cfg.train.device = "cuda"            # planning for that card
    else:
        local = None if cfg.train.device == "cpu" else timing.local_gpu()
        if local is not None:
            local_name, gpu = local
        elif cfg.train.device != "cuda":
            gpu = timing.cpu_device()           # a CPU run: a rough figure, labelled so
    try:
        named = args.gpu_mem if args.gpu_mem is not None else (
            gpu.memory_bytes / GIB if args.gpu is not None else None)
        verdict = service.plan(cfg, named)          # the run's own budget rule and planner
        mc, gpu_mem, est, pl = verdict.model_config, verdict.budget, verdict.estimate, verdict.plan
    except estimate_mod.EstimateError as e:
        print(f"estimate: {e}", file=sys.stderr)
        return 2
    cpu = gpu is not None and gpu.key == timing.CPU_KEY
    time_lines, time_json = timing.for_config(cfg, mc, pl, gpu if gpu_mem is not None or cpu else None,
                                              modelled=args.gpu is not None, local_name=local_name)
    mixture = None
    if getattr(cfg.data, "sources", None):      # count the mixture the run would train on
        from engine.dataset import data as data_mod
        from engine.dataset import sources
        try:
            train, ev, shares = sources.load_mixture(cfg)
        except data_mod.DataError as e:
            print(f"estimate: {e}", file=sys.stderr)
            return 2
        per_step = service.config_effective_batch(cfg)
        total = len(train.rows)
        mixture = {"train_rows": total, "eval_rows": len(ev.rows) if ev else 0,
                   "steps_per_epoch": max(1, -(-total // per_step)) if total else 0,
                   "sources": [{"name": x.name, "format": x.format, "train": x.train, "eval": x.eval,
                                "share": round(x.share(total), 6), "problems": x.problems} for x in shares]}
    if args.json:
        out = {"model": cfg.model.name, "peak_bytes": est.peak_bytes,
               "allocated_bytes": est.allocated_bytes, "device_bytes": est.device_bytes,
               "fits": est.fits, "gpu_mem_bytes": est.gpu_mem_bytes, "breakdown": est.breakdown,
               "trainable_params": est.trainable_params, "total_params": est.total_params,
               "batch_size": est.batch_size, "seq_len": est.seq_len,
               "gradient_checkpointing": est.gradient_checkpointing, "liger": est.liger,
               "checkpoint_layers": est.checkpoint_layers, "offload": est.offload,
               "notes": est.notes, "plan": pl.to_dict(), "host_bytes": est.host_bytes,
               "host_breakdown": est.host_breakdown, "streaming": est.streaming, "time": time_json}
        if mixture is not None:
            out["data"] = mixture
        print(json.dumps(out))
    else:
        print(verdict.report(time_lines))
        if mixture is not None:
            from engine.core.safe_text import visible
            from engine.dataset import sources
            print(f"data: mixture of {len(shares)} sources, {mixture['train_rows']:,} training "
                  f"rows, {mixture['eval_rows']:,} eval; about {mixture['steps_per_epoch']:,} steps per "
                  "epoch (rows / effective batch; `inspect` counts tokens)\n"
                  + "\n".join(f"  {visible(line)}" for line in sources.describe(shares)))
    return 0
