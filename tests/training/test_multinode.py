"""Multi-node on localhost without GPUs: two "nodes" of two CPU processes each (torchrun's static
rendezvous, gloo), a real builtin:tiny run. `qlora-tui launch` makes the run directory and
prints each node's command; each node is started detached with `train --join`. Rank 0 alone
writes the run's log, checkpoints and adapter; every process's progress lands in its node's file
and the follower and `runs` merge them; a stop request stops the whole job; kill -9 of node 1's
processes ends the job crashed naming node 1; `--resume` on both nodes runs it to the end with
every step logged once."""
import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from engine.core import config, control, events, nodes, rundir
from engine.core.summary import standing
from reliability_helpers import wait_for
from tui_helpers import anyio_backend, isolated_settings  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*argv) -> int:
    from engine import cli as CLI
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        return CLI.main(list(argv))
    finally:
        os.umask(umask)                  # the CLI sets the run files' private umask


def job_sets(tmp_path, port):
    return ["--set", f"output.dir='{tmp_path / 'runs'}'", "--set", "distributed.nodes=2",
            "--set", "distributed.gpus=2", "--set", "distributed.main_address='127.0.0.1'",
            "--set", f"distributed.main_port={port}", "--set", "distributed.timeout_s=10",
            "--set", f"train.max_steps={MAX_STEPS}", "--set", "train.save_steps=2",
            "--set", "train.save_total_limit=10", "--set", "data.eval_fraction=0", "--set", "eval.samples=0",
            "--set", "train.device='cpu'"]   # (cpu: the launchers need not import torch to find no GPU)


def node_procs(run_dir, node) -> list[psutil.Process]:
    """A node's processes: its workers (their pids in its progress file), torchrun and the launcher."""
    out = {}
    for p in nodes.latest(run_dir).values():
        if p.node != node:
            continue
        try:
            w = psutil.Process(p.pid)
        except psutil.Error:
            continue
        out[w.pid] = w
        for parent in w.parents():
            if parent.pid == os.getpid() or "engine" not in " ".join(parent.cmdline()) \
                    and "torch.distributed.run" not in " ".join(parent.cmdline()):
                break
            out[parent.pid] = parent
    return list(out.values())


def job_gone(run_dir) -> bool:
    return not rundir.process_alive(run_dir) and not any(node_procs(run_dir, k) for k in (0, 1))


def start_nodes(run_dir, *how):
    for k in (0, 1):
        assert cli("train", *how, str(run_dir), "--set", f"distributed.node_rank={k}", "--detach") == 0


def test_config_names_each_bad_field(tmp_path):
    with pytest.raises(config.ConfigError) as e:
        config.load(None, ["distributed.nodes=2", "distributed.node_rank=2"])
    fields = [p.field for p in e.value.problems]
    assert fields == ["distributed.node_rank", "distributed.main_address"]
    assert "0 to 1" in str(e.value.problems[0])
    with pytest.raises(config.ConfigError) as e:
        config.load(None, ["distributed.main_address='a b;rm'", "distributed.main_port=70000"])
    assert sorted(p.field for p in e.value.problems) == ["distributed.main_address", "distributed.main_port"]
    hosts = tmp_path / "hosts"
    hosts.write_text("# the job's machines\ngpu-a slots=8\ngpu-b\ngpu-c\n")
    cfg = config.load(None, ["distributed.nodes=2", f"distributed.hostfile='{hosts}'"])
    from engine.training import distributed
    with pytest.raises(config.ConfigError, match="lists 3 hosts but distributed.nodes = 2"):
        distributed.read_hostfile(cfg)
    hosts.write_text("gpu-a slots=8\ngpu-b\n")
    assert distributed.main_address(cfg) == "gpu-a"
    argv = distributed.launch_argv(cfg, ["train"])
    assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--master_addr") + 1] == "gpu-a"
    assert argv[argv.index("--master_port") + 1] == "29500"


def test_launch_prints_each_nodes_command_and_runs_nothing(tmp_path, capsys):
    port = free_port()
    assert cli("launch", str(REPO / "examples" / "demo.toml"), *job_sets(tmp_path, port)) == 0
    out = capsys.readouterr().out
    run_dir = Path(out.splitlines()[0].split(": ", 1)[1])
    cmds = [line for line in out.splitlines() if line.startswith("qlora-tui train")]
    assert cmds == [f"qlora-tui train --join {run_dir} --set distributed.node_rank={k} --detach" for k in (0, 1)]
    assert config.load(run_dir / "config.toml").distributed.main_port == port
    assert not (run_dir / rundir.EVENTS).exists() and not (run_dir / rundir.RUN_JSON).exists()
    assert cli("train", "--join", str(run_dir), "--set", "distributed.node_rank=2") == 2   # one line, no start
    assert "distributed.node_rank = 2: must be below distributed.nodes (2)" in capsys.readouterr().err
    # a hostfile names each node's host (node 0's is the rendezvous address)
    hosts = tmp_path / "hosts"
    hosts.write_text("gpu-a\ngpu-b  # the second box\n")
    assert cli("launch", str(REPO / "examples" / "demo.toml"), *job_sets(tmp_path, port),
               "--set", "distributed.main_address=''", "--set", f"distributed.hostfile='{hosts}'") == 0
    out = capsys.readouterr().out.splitlines()
    assert "# node 0 (host gpu-a):" in out and "# node 1 (host gpu-b):" in out
    assert cli("launch", "--resume", str(run_dir)) == 0              # the resume commands of a job
    out = capsys.readouterr().out
    assert f"qlora-tui train --resume {run_dir} --set distributed.node_rank=1 --detach" in out


def test_two_nodes_progress_stop_crash_and_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QLORA_TUI_FAULTS", "slow=0.3")           # inherited by every node's workers
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    port = free_port()
    assert cli("launch", str(REPO / "examples" / "demo.toml"), *job_sets(tmp_path, port)) == 0
    run_dir = Path(capsys.readouterr().out.splitlines()[0].split(": ", 1)[1])
    try:
        _job(run_dir, capsys)
    finally:                              # whatever failed: none of the job's processes outlive the test
        for k in (0, 1):
            for p in node_procs(run_dir, k):
                try:
                    p.kill()
                except psutil.Error:
                    pass


def _job(run_dir, capsys):
    # ---- both nodes start; progress of every process, merged
    start_nodes(run_dir, "--join")
    wait_for(lambda: len([p for p in nodes.latest(run_dir).values() if p.step >= 1]) == 4
             and rundir.info(run_dir).step >= 2, what="4 processes past step 1")
    snaps = nodes.latest(run_dir)
    assert {(p.node, p.rank) for p in snaps.values()} == {(0, 0), (0, 1), (1, 2), (1, 3)}
    # the follower (the TUI's attach) merges the node files into the run's events
    from tui.follow import follow_batches
    from tui.runstate import from_events
    got, stop = [], threading.Event()

    def post(batch):
        got.extend(batch)
        if any(isinstance(e, events.Step) for e in got) and len({e.rank for e in got if isinstance(e, events.NodeProgress)}) == 4:
            stop.set()
    follow_batches(run_dir, stop, post, interval=0)
    st = from_events(got, run_dir)
    assert sorted(st.nodes) == [0, 1, 2, 3] and st.step >= 1 and st.tokens_per_second
    assert cli("runs", "--dir", str(run_dir.parent)) == 0
    listing = capsys.readouterr().out
    assert "job: 2 node(s), 4 process(es)" in listing
    assert "node 0 " in listing and "node 1 " in listing and "rank 3 (local 1)" in listing

    # ---- stop: rank 0 reads the request, every rank of both nodes stops on the same step
    control.request(run_dir, "stop")
    wait_for(lambda: rundir.info(run_dir).state == "stopped" and job_gone(run_dir), what="the job to stop")
    ri = rundir.info(run_dir)
    stopped_at = ri.step
    assert stopped_at < MAX_STEPS and (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert all(p.done for p in nodes.latest(run_dir).values())
    assert {p.step for p in nodes.latest(run_dir).values()} == {stopped_at}    # every rank, the same step
    evs = events.read_events(run_dir / rundir.EVENTS)
    # rank 0 alone writes the log: one start, each step once, its pid
    assert sum(isinstance(e, events.RunStarted) for e in evs) == 1
    steps = [e.step for e in evs if isinstance(e, events.Step)]
    assert steps == list(range(1, stopped_at + 1))
    rank0 = nodes.latest(run_dir)[0]
    assert next(e for e in evs if isinstance(e, events.RunStarted)).pid == rank0.pid and rank0.node == 0
    assert "step 1/" not in (run_dir / "nodes" / "node-1.log").read_text()   # node 1 prints no steps
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["adapter", "checkpoints", "config.toml", "control", "events.jsonl", "lock", "nodes", "run.json", "stdout.log"])

    # ---- resume on both nodes; kill -9 of node 1's processes: crashed, node 1 named
    start_nodes(run_dir, "--resume")
    wait_for(lambda: rundir.info(run_dir).state == "live"
             and rundir.info(run_dir).step >= stopped_at + 2 and len(node_procs(run_dir, 1)) >= 3, what="progress after the resume")
    victims = node_procs(run_dir, 1)
    for p in victims:
        p.send_signal(signal.SIGKILL)
    wait_for(lambda: rundir.info(run_dir).state != "live" and job_gone(run_dir), timeout=120, what="the job to end")
    ri = rundir.info(run_dir)
    assert ri.state == "crashed", ri.reason
    assert "node 1 (host" in ri.reason and "ranks 2-3" in ri.reason and "resume" in ri.reason
    fail = [e for e in events.read_events(run_dir / rundir.EVENTS) if isinstance(e, events.RunFailed)][-1]
    assert fail.kind == events.FailKind.NODE_LOST
    from engine.training.distributed import is_comm_error
    assert is_comm_error(RuntimeError(fail.detail.splitlines()[0]))   # gloo: "Connection reset by peer"

    # ---- resume on both nodes again: to the end, every step logged once
    start_nodes(run_dir, "--resume")
    wait_for(lambda: rundir.info(run_dir).state == "finished" and job_gone(run_dir), what="the job to finish")
    evs = standing(events.read_events(run_dir / rundir.EVENTS))
    assert [e.step for e in evs if isinstance(e, events.Step)] == list(range(1, MAX_STEPS + 1))
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert rundir.checkpoints(run_dir)[-1].name == f"checkpoint-{MAX_STEPS}"


@pytest.mark.anyio
async def test_attach_shows_every_gpu_grouped_by_node_and_the_jobs_rate(tmp_path):
    """The TUI's attach merges RUN_DIR/nodes/*.jsonl into the run's state: the Train screen shows
    a row per process (its GPU's gauges) under its node, the job's tokens/s, a silent node."""
    from textual.widgets import Static
    from tui.testing import write_run
    from tui_helpers import demo_cfg, make_app, until
    run = write_run(tmp_path / "runs", finished=False, stop_at=7)
    now = time.time()
    for rank in range(4):
        node = rank // 2
        nodes.append(nodes.node_file(run, node), events.NodeProgress(
            node=node, rank=rank, local_rank=rank % 2, host=f"gpu-{'ab'[node]}", pid=1000 + rank, step=7,
            tokens_per_second=100.0 + rank, heartbeat_s=1.0, time=now if node == 0 else now - 60,
            gpu={"index": rank % 2, "name": "H100", "util_percent": 90.0, "mem_used_bytes": 40 * 2**30,
                 "mem_total_bytes": 80 * 2**30}))
    app = make_app(demo_cfg(tmp_path), attach=run)
    async with app.run_test(size=(100, 40)) as pilot:
        await until(pilot, lambda: len(app.run_state.nodes) == 4, what="the node files merged")
        await pilot.pause()
        panel = app.screen.query_one("#nodes", Static)
        text = str(panel.visual)
        assert panel.display
        assert "job 2 nodes · 4 processes · 647 tok/s" in text            # the Step's job rate
        lines = text.splitlines()
        n0, n1 = lines.index(next(x for x in lines if x.startswith("node 0"))), \
            lines.index(next(x for x in lines if x.startswith("node 1")))
        assert "gpu-a" in lines[n0] and "201 tok/s" in lines[n0] and "no heartbeat" not in lines[n0]
        assert "rank 0" in lines[n0 + 1] and "rank 1" in lines[n0 + 2] and "GPU1" in lines[n0 + 2]
        assert "gpu-b" in lines[n1] and "no heartbeat" in lines[n1]           # node 1 went silent
        assert "rank 2" in lines[n1 + 1] and " 90% " in lines[n1 + 1] and "40.0/80.0G" in lines[n1 + 1]


def test_another_node_sees_the_job_live_while_node_0_beats(tmp_path):
    """On shared storage, node 1 cannot look node 0's pid up: node 0's heartbeats say it lives."""
    from tui.testing import write_run
    run = write_run(tmp_path / "runs", finished=False, stop_at=3)
    (run / rundir.RUN_JSON).write_text(json.dumps({"pid": 4242, "create_time": 1.0, "host": "node-zero",
                                                    "started": 1.0}))
    assert rundir.info(run).state == "crashed"                 # no heartbeat: gone, as before
    beat = dict(node=0, rank=0, host="node-zero", pid=4242, step=3, heartbeat_s=1.0)
    nodes.append(nodes.node_file(run, 0), events.NodeProgress(**beat, time=time.time()))
    assert rundir.info(run).state == "live"
    nodes.append(nodes.node_file(run, 0), events.NodeProgress(**beat, time=time.time() - 10))
    # the newest snapshot counts (by its time, not its place in the file): still fresh
    assert rundir.info(run).state == "live"
    other = tmp_path / "other"
    nodes.append(nodes.node_file(other, 0), events.NodeProgress(**beat, time=time.time() - 10))
    lost = nodes.lost_nodes(nodes.latest(other))
    assert [r.node for r in lost] == [0]
    assert re.fullmatch(r"node 0 \(host node-zero, rank 0\): no heartbeat for 1[01] s", nodes.describe_lost(lost[0]))
