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

Multi-node (``nodes`` > 1): the same launch on every node, with ``--num_machines``,
``--machine_rank`` (``node_rank``), ``--main_process_ip`` / ``--main_process_port`` (torchrun's
static rendezvous underneath; gloo on the CPU). The run directory must be on storage every node
shares: node 0 makes it (``qlora-tui launch CONFIG`` or ``train CONFIG`` on node 0), the
others join it (``train --join RUN_DIR --set distributed.node_rank=K``). Global rank 0 writes the
run directory as above; every process also writes its own progress and a heartbeat to
RUN_DIR/nodes/node-K.jsonl (``NodeReporter``, ``engine.core.nodes``), which the readers merge.
A node that dies fails the next collective (or it times out after ``timeout_s``); rank 0 names
the node whose heartbeats stopped and ends the run ``crashed`` (``FailKind.NODE_LOST``).

The launcher process of node 0 holds the run's lock for the job's life (its workers take none:
``LAUNCHER_OWNS``) and names itself in ``run.json`` until rank 0 starts and names itself there.
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
LAUNCHER_OWNS = "QLORA_TUI_LAUNCHER_OWNS"   # set for the workers: the launcher holds the run's lock


def in_worker() -> bool:
    """True inside a process started by accelerate/torchrun for a multi-process job."""
    return bool(os.environ.get(LAUNCHED)) or ("LOCAL_RANK" in os.environ and world_size() > 1)


def is_main() -> bool:
    return rank() == 0


def needs_launch(cfg) -> bool:
    return cfg.distributed.processes > 1 and not in_worker()


def launcher_owns() -> bool:
    return bool(os.environ.get(LAUNCHER_OWNS))


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


def main_address(cfg) -> str:
    """Node 0's address: ``main_address``, else the first host of ``hostfile``."""
    d = cfg.distributed
    if d.main_address:
        return d.main_address
    if d.hostfile:
        hosts = read_hostfile(cfg)
        return hosts[0] if hosts else ""
    return "127.0.0.1"


def read_hostfile(cfg) -> list[str]:
    """The hosts of ``distributed.hostfile``, node 0 first (one per line; ``#`` comments; an
    MPI-style ``host slots=8`` keeps the host). ConfigError, one line, when it cannot serve."""
    from engine.core import files
    from engine.core.config import ConfigError, Problem
    d = cfg.distributed
    path = cfg.resolve_path(d.hostfile)
    try:
        text = files.read_text(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([Problem("distributed.hostfile", d.hostfile, f"cannot be read "
                                   f"({getattr(e, 'strerror', None) or e}); give a file with one host per line")]) from None
    hosts = [line.split("#", 1)[0].split()[0] for line in text.splitlines() if line.split("#", 1)[0].strip()]
    if len(hosts) != d.nodes:
        raise ConfigError([Problem("distributed.hostfile", d.hostfile, f"lists {len(hosts)} hosts but "
                                   f"distributed.nodes = {d.nodes}: one line per node, node 0 first")])
    return hosts


def launch_argv(cfg, engine_args: list[str], port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command line that runs ``python -m engine ENGINE_ARGS`` on this
    node's GPUs (``gpus``), joined to the other nodes' (``nodes``, ``node_rank``) when there are several."""
    d = cfg.distributed
    n = d.gpus
    multi = d.nodes > 1
    port = d.main_port if multi else port
    if cfg.train.device == "cpu" or not _cuda():
        # processes on the CPU (gloo): how the tests exercise the multi-process path here
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                "--master_port", str(port or 29517)]
        if multi:
            argv += ["--nnodes", str(d.nodes), "--node_rank", str(d.node_rank),
                     "--master_addr", main_address(cfg)]
        return argv + ["-m", "engine", *engine_args]
    mp = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.quant.compute_dtype, "bf16")
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(d.processes),
            "--num_machines", str(d.nodes), "--mixed_precision", mp, "--dynamo_backend", "no"]
    if multi:
        argv += ["--machine_rank", str(d.node_rank), "--main_process_ip", main_address(cfg)]
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


def node_rank(cfg=None) -> int:
    """This process's node: torchrun's GROUP_RANK in a worker, else the config's ``node_rank``."""
    raw = os.environ.get("GROUP_RANK", "")
    if raw.isdigit():
        return int(raw)
    return cfg.distributed.node_rank if cfg is not None else 0


def is_comm_error(e: BaseException) -> bool:
    """The failure of a collective (gloo/NCCL: a peer that closed its connection, a timeout)."""
    import re
    names = " ".join(c.__name__ for c in type(e).__mro__)
    return "DistBackendError" in names or "DistNetworkError" in names or bool(re.search(
        r"gloo|nccl|connection (closed|reset|refused)|peer|timed ?out|broken pipe|socket", str(e), re.I))


REPORTER = None            # this worker's NodeReporter once started (engine.training.sft feeds it)


class NodeReporter:
    """A worker's progress and heartbeat in RUN_DIR/nodes/node-K.jsonl (``engine.core.nodes``):
    a snapshot at each logging step (``update``) and every heartbeat interval from a thread, and a
    last one saying it left (``close``). Rank 0 also watches the other nodes' heartbeats
    (``lost``): a node whose processes all went silent is named when the job fails."""

    def __init__(self, cfg, run_dir):
        import socket
        import threading
        from engine.core import nodes
        self.cfg = cfg
        self.node = node_rank(cfg)
        self.path = nodes.node_file(run_dir, self.node)
        self.run_dir = run_dir
        self.interval = nodes.heartbeat_interval(cfg.distributed.timeout_s)
        self.host = socket.gethostname()
        self.step = 0
        self.tokens_seen = 0
        self.tokens_per_second: float | None = None
        self._sampler = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="qlora-heartbeat", daemon=True)
        self.on_lost = None            # rank 0 of a multi-node job: called with the silent nodes (a watchdog)
        self.local_tokens = 0          # tokens this process trained on (its share of the job's)
        self._rate_at: tuple[float, int] | None = None

    def start(self) -> "NodeReporter":
        if _cuda():
            try:
                from engine.training.gpu import GpuSampler
                self._sampler = GpuSampler.for_cuda_device(local_rank())
            except Exception:  # noqa: BLE001 - gauges are a view; training goes on without them
                self._sampler = None
        import time
        self._rate_at = (time.monotonic(), 0)
        self.write()
        self._thread.start()
        global REPORTER
        REPORTER = self
        return self

    def update(self, step: int) -> None:
        """A logging step: this process's step, its tokens and its own tokens/s since the last one."""
        import time
        now = time.monotonic()
        if self._rate_at is not None and now > self._rate_at[0] and self.local_tokens > self._rate_at[1]:
            self.tokens_per_second = (self.local_tokens - self._rate_at[1]) / (now - self._rate_at[0])
        self._rate_at = (now, self.local_tokens)
        self.step, self.tokens_seen = step, self.local_tokens
        self.write()

    def _gpu(self) -> dict:
        if self._sampler is None:
            return {}
        try:
            g = self._sampler.sample()
        except Exception:  # noqa: BLE001
            return {}
        if not g:
            return {}
        g = g[0]
        return {"index": g.index, "name": g.name, "util_percent": g.util_percent,
                "mem_used_bytes": g.mem_used_bytes, "mem_total_bytes": g.mem_total_bytes}

    def write(self, done: bool = False) -> None:
        from engine.core import events, nodes
        ev = events.NodeProgress(node=self.node, rank=rank(), local_rank=local_rank(), host=self.host,
                                 pid=os.getpid(), step=self.step, tokens_per_second=self.tokens_per_second,
                                 tokens_seen=self.tokens_seen, heartbeat_s=self.interval, gpu=self._gpu(),
                                 done=done)
        with self._lock:
            try:
                nodes.append(self.path, ev)
            except OSError:
                pass                   # the view of a node is not worth failing the job over

    def _beat(self) -> None:
        import time
        silent_since = None
        while not self._stop.wait(self.interval):
            self.write()
            if self.on_lost is None:
                continue
            from engine.core import nodes
            gone = [r for r in nodes.lost_nodes(nodes.latest(self.run_dir)) if r.node != self.node]
            silent_since = (silent_since or time.monotonic()) if gone else None
            # the collective should have failed by now (timeout_s): a hung one must not hang the job
            if gone and time.monotonic() - silent_since > self.cfg.distributed.timeout_s:
                self.on_lost(gone)
                return

    def lost(self, wait: float | None = None) -> list:
        """The other nodes that went silent (``engine.core.nodes.NodeRow``). A collective fails
        within moments of a node's death, before its heartbeats are stale: wait up to ``wait``
        seconds (default: until a heartbeat could be stale) for one to be."""
        import time
        from engine.core import nodes
        wait = (nodes.STALE_BEATS + 1) * self.interval if wait is None else wait
        deadline = time.monotonic() + wait
        while True:
            gone = [r for r in nodes.lost_nodes(nodes.latest(self.run_dir)) if r.node != self.node]
            if gone or time.monotonic() >= deadline:
                return gone
            time.sleep(min(0.5, self.interval / 2))

    def close(self, done: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self.write(done=done)
        if self._sampler is not None:
            self._sampler.close()
