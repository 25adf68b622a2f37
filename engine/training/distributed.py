"""Multi-GPU runs: the engine relaunches itself through ``accelerate launch``.

``[distributed] gpus = N`` (N > 1) makes ``qlora-tui train`` create the run directory, then
start N worker processes with ``accelerate launch`` running ``python -m engine train`` on
that directory. Every worker trains; only rank 0 writes ``events.jsonl``, ``run.json``,
checkpoints' markers and the adapter, so the TUI follows a multi-GPU run exactly like a
single-GPU one (the attach path). Stop and save requests are read by rank 0 and broadcast
to all ranks at each step, so every rank stops on the same step; a request is marked done once
its checkpoint is complete (``engine.training.sft.EventCallback``: the one-GPU path too).

- ``ddp``: each GPU holds its own copy of the 4-bit base; gradients of the LoRA weights are
  all-reduced. Throughput scales with the GPUs; memory per GPU is the one-GPU figure.
- ``fsdp``: FSDP-QLoRA. The 4-bit weights are stored in the compute dtype
  (``bnb_4bit_quant_storage``) so FSDP can shard them: for models that don't fit one GPU.
  Checkpoints are sharded; the final adapter is gathered from the shards into PEFT's format
  (``engine.training.trainer.save_fsdp_adapter``).

Multi-node: run ``accelerate config`` on each node and start ``python -m engine train
RUN_DIR/config.toml --run-dir RUN_DIR --headless`` with ``accelerate launch`` yourself;
the engine only writes from global rank 0.
"""
from __future__ import annotations

import os
import sys


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


LAUNCHED = "QLORA_TUI_LAUNCHED"     # set for the workers: a worker never launches again


def in_worker() -> bool:
    """True inside a process started by accelerate/torchrun for a multi-process job."""
    return bool(os.environ.get(LAUNCHED)) or ("LOCAL_RANK" in os.environ and world_size() > 1)


def is_main() -> bool:
    return rank() == 0


def needs_launch(cfg) -> bool:
    return cfg.distributed.gpus > 1 and not in_worker()


def pin_single_gpu(cfg) -> str | None:
    """A one-GPU run on a host with several GPUs: make only the first visible one visible
    (the Trainer refuses to split one process over several GPUs with DataParallel). Must run
    before CUDA is initialised; returns the device it pinned, or None."""
    if cfg.distributed.gpus != 1 or in_worker() or cfg.train.device == "cpu":
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        first = visible.split(",")[0].strip()
        if "," in visible:
            os.environ["CUDA_VISIBLE_DEVICES"] = first
            return first
        return None
    from engine.training.gpu import GpuSampler      # NVML: counts GPUs without initialising CUDA here
    sampler = GpuSampler()
    try:
        if sampler.available and sampler.count > 1:
            os.environ["CUDA_VISIBLE_DEVICES"] = "0"
            return "0"
    finally:
        sampler.close()
    return None


def launch_argv(cfg, engine_args: list[str], port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command line that runs ``python -m engine ENGINE_ARGS`` on N GPUs."""
    n = cfg.distributed.gpus
    if cfg.train.device == "cpu" or not _cuda():
        # processes on the CPU (gloo): how the tests exercise the multi-process path here
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                "--master_port", str(port or 29517), "-m", "engine", *engine_args]
    mp = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.quant.compute_dtype, "bf16")
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", mp, "--dynamo_backend", "no"]
    if port:
        argv += ["--main_process_port", str(port)]
    if cfg.distributed.strategy == "fsdp":
        argv += ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
                 "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                 "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_offload_params", "false",
                 "--fsdp_cpu_ram_efficient_loading", "true", "--fsdp_sync_module_states", "true",
                 "--fsdp_use_orig_params", "false", "--fsdp_backward_prefetch", "BACKWARD_PRE"]
    else:
        argv += ["--multi_gpu"]
    return argv + ["-m", "engine", *engine_args]


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def all_reduce_flags(flags: list[int]) -> list[int]:
    """Element-wise max of small integer flags across ranks (identity on one process)."""
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor(flags, dtype=torch.int32, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(x) for x in t.tolist()]
