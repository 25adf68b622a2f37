"""Commands: ``train``, ``init``, ``runs``, ``stop``; and the headless printer (an event subscriber)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from engine.core import events
from engine.core.units import fmt_eta


def register(sub) -> None:
    from engine.cli import add_config_args
    p = sub.add_parser("train", help="train from a config (headless, or --detach to run in the background)")
    add_config_args(p)
    p.add_argument("--headless", action="store_true",
                   help="print one line per logging step instead of opening the TUI")
    p.add_argument("--detach", action="store_true",
                   help="start the run in its own session (survives SSH closing), print its directory, return")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest complete checkpoint "
                   "(a multi-node job: on every node, with its --set distributed.node_rank=K)")
    p.add_argument("--join", metavar="RUN_DIR", help="take part in the multi-node job of this run directory "
                   "(made by `qlora-tui launch` or node 0) as node distributed.node_rank (--set it)")
    p.add_argument("--run-dir", help=argparse_hidden())
    p.add_argument("--no-check", action="store_true", help=argparse_hidden())
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("launch", help="a multi-node job: make its run directory and print the command "
                       "each node runs (runs nothing)")
    add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="print the commands that resume this multi-node run instead")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("init", help="write a commented starter config")
    p.add_argument("path", nargs="?", default="qlora.toml", metavar="PATH",
                   help="where to write it (default: qlora.toml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("runs", help="list runs and their state (live, finished, stopped, failed, crashed)")
    add_config_args(p)
    p.add_argument("--dir", help="runs directory (default: output.dir of the config, 'runs')")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("stop", help="ask a live run to stop gracefully (saves checkpoint + adapter)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's directory (see `qlora-tui runs`)")
    p.add_argument("--wait", action="store_true", help="wait until the run has stopped")
    p.set_defaults(func=cmd_stop, command_name="stop")

    p = sub.add_parser("save", help="ask a live run to write a checkpoint now (it goes on training)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the live run's directory (see `qlora-tui runs`)")
    p.add_argument("--wait", action="store_true", help="wait until the checkpoint is written")
    p.set_defaults(func=cmd_stop, command_name="save")


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


class HeadlessPrinter:
    """Prints one line per step event (and hints, checkpoints, the final outcome); warnings and
    failures go to stderr. What it says at the end comes from the run's fold (``summary``)."""
    shows_warnings = True          # the bus need not print a failing sink's warning itself

    def __init__(self, out=None, err=None):
        from engine.core.summary import RunSummary
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.summary = RunSummary()

    def __call__(self, ev: events.Event) -> None:
        try:
            self._print(ev)
        except BrokenPipeError:        # `train --headless | head`: the reader left; the run goes on
            from engine.cli import quiet_broken_pipe
            quiet_broken_pipe()        # (its log is events.jsonl) and its exit status stays the run's

    def _print(self, ev: events.Event) -> None:
        self.summary.apply(ev)
        w = self.out.write
        match ev:
            case events.Status(phase=phase, message=message):
                w(f"[{phase}] {message}\n")
            case events.RunStarted():
                self._started(ev)
            case events.Resumed(from_step=k, checkpoint=ckpt):
                w(f"resumed from {Path(ckpt).name if ckpt else 'the start'}: what was logged past step {k} "
                  "is redone\n")
            case events.Step():
                w(f"step {ev.step}/{ev.total_steps}  loss {_num(ev.loss, '.4f')}  lr {_num(ev.learning_rate, '.2e')}"
                  f"  grad {_num(ev.grad_norm, '.3f')}  tok/s {_num(ev.tokens_per_second, ',.0f')}"
                  f"  epoch {_num(ev.epoch, '.2f')}  eta {fmt_eta(ev.eta_seconds)}\n")
            case events.Eval(step=s, eval_loss=loss):
                w(f"eval  step {s}  eval_loss {_num(loss, '.4f')}\n")
            case events.Preference():
                w(f"{ev.method:<5} {'eval' if ev.split == 'eval' else 'train'} step {ev.step}  accuracy "
                  f"{_num(ev.accuracy, '.2f')}  margin {_num(ev.margin, '.3f')}  chosen {_num(ev.rewards_chosen, '.3f')}"
                  f"  rejected {_num(ev.rewards_rejected, '.3f')}" + (f"  kl {_num(ev.kl, '.3f')}" if ev.kl is not None else "")
                  + "\n")
            case events.Checkpoint(step=s, path=path):
                w(f"checkpoint step {s}: {path}\n")
            case events.Hint():
                at = f"step {ev.step}: " if ev.step else ""
                w(f"hint [{ev.severity}] {at}{ev.symptom} — {ev.cause}. Fix: {ev.fix}\n")
            case events.RunWarning(message=message):
                self._err(f"warning: {message}\n")
            case events.NumericsCheck():
                w(f"check {ev.path} at step {ev.step}: loss {_num(ev.fast_loss, '.6f')} vs "
                  f"{_num(ev.reference_loss, '.6f')} on the reference path, {_num(ev.relative_difference, '.3%')} "
                  f"apart (limit {ev.threshold:.1%}): {'kept' if ev.kept else 'turned off'}\n")
            case events.RunFinished():
                s = self.summary
                loss = s.final_loss if s.final_loss is not None else s.last_loss
                w(f"{s.state} at step {s.step}: {ev.reason}; "
                  f"{'model' if ev.adapter_dir.endswith('/model') else 'adapter'}: {ev.adapter_dir}"
                  + (f"; final loss {loss:.4f}" if loss is not None else "")
                  + (f"; {s.time_text}" if s.time_text else "") + "\n")
            case events.RunFailed(reason=reason):
                self._err(f"failed: {reason}\n")
        self.out.flush()

    def _started(self, ev: events.RunStarted) -> None:
        w = self.out.write
        w(f"run {ev.run_dir}: {ev.model} on {ev.device}, {ev.total_steps} steps, "
          f"{ev.train_rows} train / {ev.eval_rows} eval rows, "
          f"{ev.trainable_params:,} trainable of {ev.total_params:,} params"
          + (f", resumed at step {ev.resumed_from_step}" if ev.resumed_from_step else "") + "\n")
        for line in ev.plan:
            w(f"  plan: {line}\n")
        if ev.prediction:
            from engine.core.safe_text import visible     # read back from a log: shown literally
            w(f"  {visible(str(ev.prediction))}\n")

    def _err(self, text: str) -> None:
        self.out.flush()
        self.err.write(text)
        self.err.flush()


def cmd_train(args) -> int:
    from engine.core import config as config_mod
    from engine.training import runner
    from engine.cli import load_config_or_exit
    from engine.core import perms

    perms.use_private_umask()       # this process and its children write run files: private ones
    if args.resume and args.join:
        print("error: give --resume RUN_DIR or --join RUN_DIR, not both", file=sys.stderr)
        return 2
    if args.resume:
        run = _resume_run(args)
        if isinstance(run, int):
            return run
    elif args.join:
        return _join(args)
    else:
        cfg = load_config_or_exit(args)
        d = cfg.distributed
        if d.nodes > 1 and d.node_rank != 0 and not args.run_dir:
            print(f"error: distributed.node_rank = {d.node_rank}: nodes other than 0 join the run directory node 0 "
                  f"made: qlora-tui train --join RUN_DIR --set distributed.node_rank={d.node_rank} "
                  "(qlora-tui launch CONFIG prints every node's command)", file=sys.stderr)
            return 2
        if args.detach:
            try:
                d = runner.start_detached(cfg, check="child")   # the cheap checks here, the rest in the child
            except (runner.PreflightError, config_mod.ConfigError, OSError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            print(d)
            _say_how_to_follow(d, cfg)
            return 0
        if not args.headless:
            print("error: train without --headless or --detach opens nothing; use `qlora-tui CONFIG` "
                  "for the TUI", file=sys.stderr)
            return 2
        from engine.training import distributed as distributed_mod
        if distributed_mod.needs_launch(cfg):
            try:
                return runner.launch_distributed(cfg, run_dir=Path(args.run_dir) if args.run_dir else None,
                                             check=not args.no_check)
            except (runner.PreflightError, OSError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        run = runner.Run(cfg, run_dir=args.run_dir)
    from engine.training import distributed as distributed_mod
    pinned = distributed_mod.pin_single_gpu(run.cfg)
    if pinned is not None:            # before anything initialises CUDA in this process
        print(f"note: distributed.gpus = 1: training on GPU {pinned} only "
              "(set distributed.gpus to use more)", file=sys.stderr)
    try:
        run.prepare(check=not args.no_check)
    except (runner.PreflightError, config_mod.ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from engine.training import distributed as distributed_mod
    if distributed_mod.is_main():
        run.bus.subscribe(HeadlessPrinter())
    else:                              # other ranks write no log: their failures go to stderr
        def rank_failure(ev, rank=distributed_mod.rank()):
            if isinstance(ev, events.RunFailed):
                print(f"rank {rank} failed: {ev.reason}\n{ev.detail}", file=sys.stderr, flush=True)
        run.bus.subscribe(rank_failure)
    runner.install_signal_handlers(run, headless=True)
    run.start()
    while not run.join(timeout=0.5):   # short joins keep the main thread free for signals
        pass
    from engine.core import exitcodes
    if distributed_mod.in_worker():    # a worker's non-zero status is a failure to the launcher: it maps stops itself
        return exitcodes.OK if isinstance(run.result, events.RunFinished) else exitcodes.FAILED
    return exitcodes.for_run(run.result)


def _resume_run(args):
    """``train --resume``: the Run to continue, or an exit status (refused, detached, launched)."""
    from engine import service
    from engine.core import config as config_mod
    from engine.training import runner
    run_dir = Path(args.resume)
    if args.config:
        print("error: give either CONFIG or --resume RUN_DIR (a resumed run uses its own config.toml; "
              "change keys with --set)", file=sys.stderr)
        return 2
    if not (run_dir / "config.toml").exists():
        print(f"error: {run_dir}: not a run directory (no config.toml)", file=sys.stderr)
        return 2
    if args.detach:
        try:
            d = runner.start_detached(None, resume=run_dir, overrides=args.overrides)
        except (runner.PreflightError, config_mod.ConfigError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(d)
        _say_how_to_follow(d)
        return 0
    from engine.training import distributed as distributed_mod
    try:
        resumed_cfg = service.resume_config(run_dir, args.overrides)[0]   # frozen keys refused
    except (runner.PreflightError, config_mod.ConfigError, OSError) as e:   # the documented refusals
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not distributed_mod.in_worker() and resumed_cfg.distributed.processes > 1:
        try:
            return runner.launch_distributed(None, run_dir=run_dir, resume=True, overrides=args.overrides)
        except (runner.PreflightError, config_mod.ConfigError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    run = runner.Run(None, run_dir=run_dir, resume=True, overrides=args.overrides)
    run.cfg = resumed_cfg
    return run


def _join(args) -> int:
    """``train --join RUN_DIR``: this node's part of a multi-node job (its config is the run's
    config.toml with this node's --set, e.g. distributed.node_rank)."""
    from engine.core import config as config_mod
    from engine.core import rundir
    from engine.training import distributed as distributed_mod
    from engine.training import runner
    run_dir = Path(args.join).expanduser().resolve()
    if args.config:
        print("error: give either CONFIG or --join RUN_DIR (a joined run uses its own config.toml; "
              "change keys with --set)", file=sys.stderr)
        return 2
    if not (run_dir / rundir.CONFIG).exists():
        print(f"error: {run_dir}: not a run directory (no {rundir.CONFIG}); node 0 or `qlora-tui launch` "
              "makes it, on storage every node shares", file=sys.stderr)
        return 2
    try:
        cfg = config_mod.load(run_dir / rundir.CONFIG, args.overrides)
        if args.detach:
            d = runner.start_detached(cfg, join=run_dir, overrides=args.overrides)
            print(d)
            _say_how_to_follow(d)
            return 0
        if not args.headless:
            print("error: train --join without --headless or --detach opens nothing", file=sys.stderr)
            return 2
        if distributed_mod.needs_launch(cfg):
            return runner.launch_distributed(cfg, run_dir=run_dir, overrides=args.overrides,
                                             check=cfg.distributed.node_rank == 0 and not args.no_check)
    except (runner.PreflightError, config_mod.ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.join, args.run_dir, args.config = None, str(run_dir), str(run_dir / rundir.CONFIG)
    return cmd_train(args)          # one process (distributed.gpus = nodes = 1): an ordinary run of that directory


def cmd_launch(args) -> int:
    """``launch CONFIG``: the run directory of a multi-node job (on shared storage) and each
    node's command; ``launch --resume RUN_DIR``: each node's command to resume it. Runs nothing."""
    from engine import service
    from engine.cli import load_config_or_exit
    from engine.core import config as config_mod
    from engine.core import perms, rundir
    from engine.training import runner
    try:
        if args.resume:
            run_dir = Path(args.resume)
            if args.config:
                print("error: give either CONFIG or --resume RUN_DIR", file=sys.stderr)
                return 2
            cfg = service.resume_config(run_dir, args.overrides)[0]
        else:
            cfg = load_config_or_exit(args)
            runner.quick_preflight(cfg)
            cfg = runner.absolutise(cfg)
            with perms.private_files():
                run_dir = rundir.create(cfg.output.dir, cfg.output.name or cfg.model.name)
                config_mod.save(cfg, run_dir / rundir.CONFIG)
        # a fresh run's --set are in its config.toml already; a resume's change it on every node
        lines = runner.join_commands(cfg, run_dir, args.overrides if args.resume else [], resume=bool(args.resume))
    except (runner.PreflightError, config_mod.ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    d = cfg.distributed
    print(f"# run directory: {run_dir}")
    print(f"# {d.nodes} node(s) × {d.gpus} process(es) ({d.strategy}); the run directory must be on storage "
          "every node shares. Run each line on its node:")
    for line in lines:
        print(line)
    print(f"# then: qlora-tui attach {run_dir}    stop: qlora-tui stop {run_dir}")
    return 0


def _say_how_to_follow(run_dir, cfg=None) -> None:
    print(f"started in the background (survives closing this terminal)\n"
          f"  watch:  qlora-tui attach {run_dir}\n"
          f"  log:    tail -f {run_dir}/stdout.log\n"
          f"  state:  qlora-tui runs        stop: qlora-tui stop {run_dir}", file=sys.stderr)
    if cfg is not None and cfg.distributed.nodes > 1 and cfg.distributed.node_rank == 0:
        from engine.training import runner
        print("  the other nodes (same run directory, shared storage):", file=sys.stderr)
        for line in runner.join_commands(cfg, Path(run_dir), first=1):
            print(f"    {line}", file=sys.stderr)


def cmd_init(args) -> int:
    from engine.core.config import starter_toml
    from engine.core import files
    p = Path(args.path)
    if p.is_symlink():
        print(f"error: {p} is a symlink; give a new file name (nothing is written through a link)",
              file=sys.stderr)
        return 2
    if p.is_dir():
        print(f"error: {p} is a directory; give a file name, e.g. {p / 'qlora.toml'}", file=sys.stderr)
        return 2
    if p.exists() and not args.force:
        print(f"error: {p} exists; pass --force to overwrite", file=sys.stderr)
        return 2
    if not p.parent.is_dir():
        print(f"error: {p.parent} does not exist; create it first (mkdir -p {p.parent})", file=sys.stderr)
        return 2
    if p.exists() and not p.is_file():
        print(f"error: {p} is not a regular file; give a file name", file=sys.stderr)
        return 2
    try:                             # whole or not at all; a temporary file of our own, renamed in
        files.write_atomic(p, starter_toml())
    except OSError as e:
        print(f"error: cannot write {p}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {p}")
    return 0


def cmd_runs(args) -> int:
    from engine import service
    from engine.core import rundir
    from engine.cli import load_config_or_exit
    if args.dir:
        runs_dir = args.dir
        if not Path(args.dir).expanduser().is_dir():
            what = "is not a directory" if Path(args.dir).expanduser().exists() else "does not exist"
            print(f"error: --dir {args.dir} {what}; give the folder that holds the runs (output.dir)",
                  file=sys.stderr)
            return 2
    else:       # a config's runs go next to it (output.dir is relative to the config file)
        cfg = load_config_or_exit(args)
        runs_dir = cfg.resolve_path(cfg.output.dir)
    runs = service.runs(runs_dir)
    if not runs:
        print(f"no runs under {runs_dir} (a config's runs are next to it: `qlora-tui runs "
              f"examples/demo.toml` lists examples/runs/; or pass --dir DIR)")
        return 0
    print(f"{'STATE':9} {'STEP':>11} {'LOSS':>8}  RUN")
    for ri in runs:
        loss = ri.final_loss if ri.final_loss is not None else ri.last_loss
        print(f"{ri.state:9} {ri.step:>5}/{ri.total_steps:<5} {_num(loss, '8.4f'):>8}  {ri.path}"
              + (f"  ({ri.reason})" if ri.state in (rundir.State.FAILED, rundir.State.CRASHED,
                                                    rundir.State.DAMAGED) and ri.reason else ""))
        if ri.nodes:
            for line in node_lines(ri.nodes, live=ri.state == rundir.State.LIVE):
                print("    " + line)
    return 0


def node_lines(snapshots: dict, live: bool = True) -> list[str]:
    """A multi-process job's processes, grouped by node (``engine.core.nodes``): a line per node
    with its tokens/s, then one per process (its GPU's gauges when it has one)."""
    from engine.core import nodes
    now = time.time()
    rows = nodes.by_node(snapshots)
    total = [r.tokens_per_second for r in rows if r.tokens_per_second is not None]
    out = [f"job: {len(rows)} node(s), {len(snapshots)} process(es)"
           + (f", {sum(total):,.0f} tok/s" if total else "")]
    for r in rows:
        state = "silent" if r.stale(now) and live else ("done" if all(p.done for p in r.procs) else "")
        out.append(f"node {r.node} {r.host}: {r.ranks}, {_num(r.tokens_per_second, ',.0f')} tok/s"
                   + (f"  [{state}]" if state else ""))
        for p in r.procs:
            g = p.gpu or {}
            gauge = ""
            if g:
                used, total_b = g.get("mem_used_bytes"), g.get("mem_total_bytes")
                gauge = (f"  GPU{g.get('index', '?')} {_num(g.get('util_percent'), '3.0f')}%"
                         + (f" mem {used / 2**30:.1f}/{total_b / 2**30:.0f}G" if used and total_b else ""))
            out.append(f"  rank {p.rank} (local {p.local_rank}): step {p.step}  {_num(p.tokens_per_second, ',.0f')} tok/s"
                       f"{gauge}  heartbeat {max(0.0, now - p.time):.0f} s ago" + ("  done" if p.done else ""))
    return out


def cmd_stop(args) -> int:
    """``stop`` / ``save``: drop a request into the run's control channel (engine.core.control)."""
    from engine.core import control
    from engine.core import rundir
    d = Path(args.run_dir)
    cmd = args.command_name
    if not (d / rundir.EVENTS).exists() and not (d / rundir.RUN_JSON).exists():
        print(f"error: {d}: not a run directory (no {rundir.EVENTS})", file=sys.stderr)
        return 2
    ri = rundir.info(d)
    if ri.state != rundir.State.LIVE:          # what `runs` says: an ended log is not live
        print(f"error: {d}: no live run there (state: {ri.state}); see `qlora-tui runs`", file=sys.stderr)
        return 1
    req = control.request(d, cmd)
    print(f"{cmd} requested: {d}")
    if not args.wait:
        return 0
    while True:
        if cmd == "save" and req.with_suffix(".done").exists():
            ck = rundir.checkpoints(d)
            print(f"checkpoint written: {ck[-1] if ck else '?'}")
            return 0
        if not rundir.process_alive(d):
            ri = rundir.info(d)
            print(f"run {ri.state} at step {ri.step}" + (f": {ri.reason}" if ri.reason else ""))
            return 0 if ri.state in (rundir.State.STOPPED, rundir.State.FINISHED) else 1
        time.sleep(0.3)
