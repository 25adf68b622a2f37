"""The verbs both faces call: the CLI (``engine/cli``) and the TUI (``tui/``).

Each verb is one rule, a thin function over the engine module that owns it, so that neither face
re-derives an engine decision (the GPU budget, the plan, the effective batch, the keys a resume
may not change, a run's state...). The TUI reaches the engine through this module only (plus
pure value types: ``engine.core.events``, ``engine.core.config.Config``, ``engine.core.units``,
``engine.core.safe_text``). Heavy modules (torch, the planner, the inspector) are imported inside
the verbs, so importing this module stays cheap.

Verbs, by owner:

- config (``engine.core.config``): ``load_config``, ``config_from_form``, ``save_config``,
  ``effective_batch``; the form's schema (``field_specs``, ``SECTION_TITLES``, ``parse_value``).
- planning (``engine.planning.estimate``, ``timing``): ``gpu_budget``, ``plan`` (a ``Verdict``),
  ``time_line``.
- runs (``engine.core.rundir``, ``summary``, ``events``, ``control``; ``engine.training.runner``):
  ``runs``, ``run_info``, ``read_events``, ``follow``, ``run_alive``, ``last_event_is_terminal``,
  ``last_output_line``, ``start_run``, ``resume_run``, ``resume_config``, ``resume_offer``,
  ``stop_run``, ``save_run``, ``config_differences``.
- models (``engine.models.consent``, ``builtin``): ``demo_config``, ``require_consent``,
  ``needs_remote_code``, ``grant_remote_code``.
- datasets (``engine.dataset.inspect``): ``inspect_dataset``, ``preview_row``, ``row_at_line``,
  ``raw_line``.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

from engine.core import config as _config
from engine.core import rundir as _rundir
from engine.core.config import (SECTION_TITLES, Config, ConfigError, field_specs,  # noqa: F401 (the form's schema)
                                parse_value, plural)
from engine.core.summary import RESUMABLE, RunSummary  # noqa: F401 (what a run's state allows)

State = _rundir.State
RunInfo = _rundir.RunInfo


# ---- config ------------------------------------------------------------------------------------
def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """A TOML config (None: the defaults) with ``--set`` style overrides. Raises ConfigError."""
    return _config.load(path, overrides)


def config_from_form(data: dict, source: str = "") -> tuple[Config | None, list]:
    """(Config, []) from a form's values, or (None, problems): what the form shows as invalid is
    exactly what a run would refuse."""
    try:
        return _config.from_dict(data, source=source), []
    except ConfigError as e:
        return None, e.problems


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as TOML (atomically). Raises OSError."""
    _config.save(cfg, path)


def effective_batch(batch_size: int, grad_accum: int, processes: int = 1) -> int:
    """Rows per optimizer step (``engine.core.config.effective_batch``: the one rule)."""
    return _config.effective_batch(batch_size, grad_accum, processes)


def config_effective_batch(cfg: Config) -> int:
    """The effective batch of a valid config (every GPU of every node)."""
    return effective_batch(cfg.train.batch_size, cfg.train.grad_accum, cfg.distributed.processes)


# ---- models --------------------------------------------------------------------------------------
def demo_config(overrides: list[str] | tuple = ()) -> Config:
    """The fast offline demo's config (builtin:tiny on builtin:sample), ``--set`` style overrides
    on top: what "no config given" means in the TUI."""
    from engine.models.builtin import demo_config as demo
    return demo(overrides)


def require_consent() -> None:
    """From now on a model's own code runs only after a yes (``grant_remote_code``)."""
    from engine.models import consent
    consent.require_consent()


def needs_remote_code(cfg: Config) -> bool:
    """Whether a run of ``cfg`` would run the model's own code and has no yes for it yet."""
    from engine.training import runner
    return runner.needs_remote_code_confirmation(cfg)


def grant_remote_code(cfg: Config) -> None:
    """The person said yes: the model's own code may run for ``cfg``."""
    from engine.models import consent
    consent.grant_remote_code(cfg)


# ---- planning ------------------------------------------------------------------------------------
def gpu_budget(cfg: Config, gpu_mem_gib: float | None = None) -> tuple[int | None, str]:
    """The GPU memory a run of ``cfg`` plans for, in bytes, and why (None: no GPU known).
    ``engine.planning.estimate.gpu_budget``: the run, ``estimate`` and the Config screen share it."""
    from engine.planning import estimate
    return estimate.gpu_budget(cfg, gpu_mem_gib)


@dataclass
class Verdict:
    """The planner's verdict for one config: the memory estimate at the run's budget and the fit
    plan (micro-batch, checkpointing, Liger, packing... and why), each computed once (the plan on
    first use: the Config screen of a CPU run never needs it)."""
    cfg: Config
    model_config: dict
    budget: int | None          # bytes (gpu_budget)
    budget_why: str
    estimate: object            # engine.planning.estimate.Estimate

    @cached_property
    def plan(self):
        """The fit plan at the budget (``engine.planning.estimate.Plan``). Raises EstimateError."""
        from engine.planning import estimate
        return estimate.plan(self.cfg, self.model_config, self.budget)

    @property
    def on_gpu(self) -> bool:
        """The plan is a GPU's (a budget is known and the run is not on the CPU)."""
        return self.budget is not None and self.cfg.train.device != "cpu"

    def summary_lines(self) -> list[str]:
        """The plan in words and the fast paths checked on this GPU (the Config screen's lines);
        [] for a CPU run or an unknown budget."""
        if not self.on_gpu:
            return []
        from engine.planning import estimate
        from engine.training.probes import planner_notes
        return [estimate.plan_summary(self.plan, round(self.budget / estimate.GIB, 1)),
                *planner_notes(self.plan.fp8)]

    def report(self, time_lines) -> str:
        """``qlora-tui estimate``'s text report."""
        from engine.planning import estimate
        return estimate.format_report(self.estimate, self.plan, time_lines)


def plan(cfg: Config, gpu_mem_gib: float | None = None) -> Verdict:
    """The planner's verdict for ``cfg`` at its GPU budget (``gpu_mem_gib`` stands for the GPU, as
    ``estimate --gpu-mem`` / ``--gpu``). Raises ``engine.planning.estimate.EstimateError`` (the
    model's config cannot be read)."""
    from engine.planning import estimate
    mc = estimate.model_config_for(cfg)
    budget, why = estimate.gpu_budget(cfg, gpu_mem_gib)
    return Verdict(cfg, mc, budget, why, estimate.estimate(cfg, mc, gpu_mem_bytes=budget))


def time_line(cfg: Config, model_config: dict) -> str:
    """The time a run of ``cfg`` takes on this machine, in one line (``engine.planning.timing``)."""
    from engine.planning import timing
    return timing.local_time_line(cfg, model_config)


# ---- runs: listing, state, log -------------------------------------------------------------------
def runs(runs_dir: str | Path) -> list[RunInfo]:
    """The runs under ``runs_dir``, newest first, each with its state (``rundir.list_runs``)."""
    return _rundir.list_runs(runs_dir)


def is_run_dir(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run (its events.jsonl or run.json)."""
    run_dir = Path(run_dir)
    return (run_dir / _rundir.EVENTS).exists() or (run_dir / _rundir.RUN_JSON).exists()


def run_config(run_dir: str | Path) -> Config | None:
    """The config a run was started with; None when it has none or it no longer loads."""
    path = Path(run_dir) / _rundir.CONFIG
    if not path.exists():
        return None
    try:
        return _config.load(path)
    except ConfigError:
        return None


def newest_live_run(runs_dir: str | Path) -> Path | None:
    """The newest live run under ``runs_dir`` (``rundir.newest_live``)."""
    return _rundir.newest_live(runs_dir)


def run_info(run_dir: str | Path) -> RunInfo:
    """One run's state from its files (never raises: a damaged run is ``damaged``)."""
    return _rundir.info(run_dir)


def read_events(run_dir: str | Path) -> list:
    """A run's whole log as events (bad lines skipped): fold it with ``RunSummary.apply``."""
    from engine.core import events
    return events.read_events(Path(run_dir) / _rundir.EVENTS)


def run_summary(run_dir: str | Path) -> RunSummary:
    """A run's summary folded from its whole log (``engine.core.summary.fold``)."""
    from engine.core import summary
    return summary.fold(read_events(run_dir), run_dir)


def follow(run_dir: str | Path, stop: threading.Event, poll: float,
           alive: Callable[[], bool] | None = None) -> Iterator[list]:
    """Batches of a run's new events until its log ends (a terminal event, or ``alive()`` false)
    or ``stop`` is set; a multi-process job's per-node progress is merged in
    (``engine.core.events.follow_batches``, ``engine.core.nodes``)."""
    from engine.core import events, nodes
    run_dir = Path(run_dir)
    return events.follow_batches(run_dir / _rundir.EVENTS, stop=stop, poll=poll, alive=alive,
                                 side=nodes.nodes_dir(run_dir))


def run_alive(run_dir: str | Path) -> bool:
    """Whether the run's process is alive (``rundir.process_alive``)."""
    return _rundir.process_alive(run_dir)


def run_registered(run_dir: str | Path) -> bool:
    """Whether a started run has written its run.json yet (a just-spawned one may not have)."""
    return (Path(run_dir) / _rundir.RUN_JSON).exists()


def log_size(run_dir: str | Path) -> int:
    """The size of the run's events.jsonl in bytes (0 when there is none)."""
    try:
        return os.stat(Path(run_dir) / _rundir.EVENTS).st_size
    except OSError:
        return 0


def last_event_is_terminal(run_dir: str | Path) -> bool:
    """Whether the last complete line of the run's log is a terminal event (its tail only)."""
    from engine.core import events, files
    lines = files.tail_lines(Path(run_dir) / _rundir.EVENTS, complete=True)
    if not lines:
        return False
    try:
        return isinstance(events.loads(lines[-1]), events.TERMINAL)
    except Exception:
        return False


def last_output_line(run_dir: str | Path) -> str:
    """The last line the run's process printed (stdout.log's tail), or "no output"."""
    from engine.core import files
    lines = files.tail_lines(Path(run_dir) / _rundir.STDOUT)
    return lines[-1] if lines else "no output"


def config_differences(run_dirs) -> list[tuple[str, list]]:
    """The config keys whose values differ between runs (``engine.core.summary``)."""
    from engine.core import summary
    return summary.config_differences(run_dirs)


def log_location(report_to: str, run_dir: str | Path) -> str:
    """Where a run's tracker (tensorboard, wandb...) writes, in words (``engine.training.trackers``)."""
    from engine.training.trackers import log_location as where
    return where(report_to, run_dir)


def node_rows(snapshots: dict) -> list:
    """A multi-process job's processes grouped by node (``engine.core.nodes.by_node``)."""
    from engine.core import nodes
    return nodes.by_node(snapshots)


# ---- runs: start, resume, stop, save -------------------------------------------------------------
def start_run(cfg: Config) -> Path:
    """Start a detached run of ``cfg``; its run directory. Raises PreflightError, ConfigError,
    DataError, OSError (one line each)."""
    from engine.training import runner
    return Path(runner.start_detached(cfg))


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[Config, list[str]]:
    """The config a resume of ``run_dir`` with ``overrides`` would use, and the keys they change.
    Raises PreflightError (finished run, a frozen key changed) or ConfigError."""
    from engine.training import resume
    return resume.resume_config(run_dir, overrides)


def resume_run(run_dir: str | Path, overrides: list[str]) -> int:
    """Resume ``run_dir`` detached with ``overrides``, once its last process has exited; the size
    of its log before the resume (the resumed run's events come after it). Raises as
    ``start_run``."""
    from engine.training import runner
    run_dir = Path(run_dir)
    # the failed process wrote its last event and may still be exiting (torch teardown): a
    # resume while it is alive would be refused as "still live", so let it go first
    _rundir.wait_writer_exit(run_dir)
    old_size = log_size(run_dir)
    runner.start_detached(None, resume=run_dir, overrides=list(overrides))
    return old_size


def stop_run(run_dir: str | Path) -> Path:
    """Ask a live run to stop gracefully (it saves its adapter, then ends). Raises OSError."""
    from engine.core import control
    return control.request(run_dir, "stop")


def save_run(run_dir: str | Path) -> Path:
    """Ask a live run to write a checkpoint now. Raises OSError."""
    from engine.core import control
    return control.request(run_dir, "save")


# the failures whose hint names a fix that a resume applies
FAILED_WHAT = {"oom": "Out of memory", "nan": "Loss became NaN"}


@dataclass
class ResumeOffer:
    """What resuming an ended run would do: the fixes its failure's hint named (applied), the
    ones a resume may not change (``frozen``: they need a new run), each in words with its old and
    new value, and the checkpoint it resumes from (0: a restart)."""
    run_dir: Path
    what: str                       # "Out of memory", "Loss became NaN", "Stopped", "Failed", "Crashed"
    cfg: Config
    fixes: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    fix_lines: list[str] = field(default_factory=list)
    frozen_lines: list[str] = field(default_factory=list)
    from_step: int = 0
    no_fix_left: bool = False       # an OOM/NaN failure for which no automatic fix is left


def resume_fixes(st: RunSummary) -> tuple[list[str], str]:
    """The overrides that answer ``st``'s failure, as its hint named them, and what failed.
    OOM and NaN only; any other end (stopped, crashed, other failure) resumes unchanged."""
    from engine.core.events import RunFailed, RunFinished
    from engine.training import hints
    kind = st.fail_kind if isinstance(st.end, RunFailed) else ""
    if kind not in FAILED_WHAT:
        return [], ("Stopped" if isinstance(st.end, RunFinished) else
                    "Failed" if st.ended else "Crashed")
    named = [h for h in st.hints if getattr(h, "rule", "") == kind and getattr(h, "overrides", None)]
    if named:
        return list(named[-1].overrides), FAILED_WHAT[kind]
    cfg = _config.load(Path(st.run_dir) / _rundir.CONFIG)
    return hints.hint_overrides(kind, cfg, st.fail_step or st.step), FAILED_WHAT[kind]


def resume_offer(st: RunSummary) -> ResumeOffer:
    """The resume offer for an ended run (``st``: its summary). Raises OSError, ValueError,
    ConfigError when its config cannot be read."""
    from engine.core.events import RunFailed
    from engine.training import hints, resume
    fixes, what = resume_fixes(st)
    run_dir = Path(st.run_dir)
    cfg = _config.load(run_dir / _rundir.CONFIG)
    # fixes are ``key=value``: the rule asks about the key (``train.method=orpo`` is frozen too)
    frozen = [f for f in fixes if resume.frozen_keys([f.split("=", 1)[0].strip()])]
    fixes = [f for f in fixes if f not in frozen]
    ckpts = _rundir.checkpoints(run_dir)
    return ResumeOffer(run_dir, what, cfg, fixes, frozen, hints.fix_lines(cfg, fixes),
                       hints.fix_lines(cfg, frozen),
                       _rundir.checkpoint_step(ckpts[-1]) if ckpts else 0,
                       no_fix_left=(not fixes and not frozen and st.fail_kind in FAILED_WHAT
                                    and isinstance(st.end, RunFailed)))


def continue_with_preference(run_dir: str | Path, cfg: Config, method: str = "dpo") -> Config:
    """A config that preference-tunes (DPO...) ``run_dir``'s adapter. Raises ValueError, ConfigError."""
    from engine.training.preference import continue_config
    return continue_config(run_dir, cfg, method)


# ---- datasets ------------------------------------------------------------------------------------
def inspect_dataset(cfg: Config, *, on_partial=None, cancel=None):
    """The dataset inspector's report for ``cfg``'s data (``engine.dataset.inspect.inspect``)."""
    from engine.dataset import inspect
    return inspect.inspect(cfg, on_partial=on_partial, cancel=cancel)


def preview_row(cfg: Config, row_index: int):
    """One row as the model sees it: its text, the trained spans, its tokens."""
    from engine.dataset import inspect
    return inspect.preview(cfg, row_index)


def row_at_line(cfg: Config, line: int) -> int:
    """The row index of a data file's ``line``. Raises ``NoRowAtLine`` (say why)."""
    from engine.dataset import inspect
    return inspect.row_index_for_line(cfg, line)


def raw_line(path: str | Path, line: int) -> str:
    """A data file's raw line (bounded)."""
    from engine.dataset import inspect
    return inspect.raw_line(path, line)


# ---- a run's outputs: chat, eval, jobs, serve (``engine.outputs``) -------------------------------
def chat_sources(run_dir: str | Path) -> list[Path]:
    """What a chat can load from ``run_dir``: its adapter and checkpoints, newest first."""
    from engine.outputs import chat
    return chat.sources(run_dir)


def latest_chat_run(runs_dir: str | Path) -> Path | None:
    """The newest run under ``runs_dir`` that a chat can load."""
    from engine.outputs import chat
    return chat.latest_run(runs_dir)


def chat_owning_run(src: str | Path) -> Path:
    """The run directory an adapter or checkpoint directory belongs to."""
    from engine.outputs import chat
    return chat.owning_run(src)


def chat_model(src: str | Path):
    """A chat session over ``src`` (an adapter or checkpoint): ``.load(progress)``, ``.stream(...)``."""
    from engine.outputs import chat
    return chat.ChatModel(src)


def chat_sampling(temperature: float, top_p: float, max_new_tokens: int):
    """A chat's sampling settings, checked. Raises ChatError (say which is wrong)."""
    from engine.outputs import chat
    return chat.Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)


def append_chat_turn(src: str | Path, role: str, content: str, **kw) -> None:
    """Append a turn to the run's chat history (``engine.outputs.chat.append_turn``)."""
    from engine.outputs import chat
    chat.append_turn(src, role, content, **kw)


def chat_history(src: str | Path) -> list[dict]:
    """The run's chat history (RUN_DIR/chat.jsonl), oldest first."""
    from engine.outputs import chat
    return chat.history(src)


def clear_chat(src: str | Path) -> None:
    """Forget the run's chat history."""
    from engine.outputs import chat
    chat.clear(src)


def latest_eval(run_dir: str | Path) -> dict | None:
    """The newest saved `qlora-tui eval` report of a run (None: none yet)."""
    from engine.outputs import evaluate
    return evaluate.latest(run_dir)


def eval_rows(report: dict) -> list[tuple[str, str, str]]:
    """An eval report as (metric, base, tuned) rows. Raises KeyError, TypeError, ValueError on a
    malformed report."""
    from engine.outputs import evaluate
    return evaluate.table_rows(report)


def eval_per_row_losses(report: dict) -> list[tuple[float, float]]:
    """An eval report's per-row (base, tuned) losses; [] for an older report without them."""
    from engine.outputs import evaluate
    return evaluate.per_row_losses(report)


def run_job(job: str, params: dict, on_event, cancel: threading.Event) -> None:
    """Run an output job (export, merge, eval, push...) in a child process; its typed events are
    handed to ``on_event`` (``engine.outputs.jobs.run_child``)."""
    from engine.outputs import jobs
    jobs.run_child(job, params, on_event, cancel)


def export_targets() -> list:
    """Every export target (``engine.outputs.targets``), in the registry's order."""
    from engine.outputs import targets
    return list(targets.all_targets())


def export_target(name: str = ""):
    """The export target ``name`` (the registry's default when empty)."""
    from engine.outputs import targets
    return targets.get(name or targets.DEFAULT)


def start_export(params: dict):
    """Start an export as its own process (it survives the app); the job to follow."""
    from engine.outputs import jobs
    return jobs.start_export(params)


def follow_export(job, on_event, stop: threading.Event) -> None:
    """Hand the export's typed events (read from its log) to ``on_event`` until it ends or ``stop``."""
    from engine.outputs import jobs
    jobs.follow_export(job, on_event, stop)


def serve_command(run_dir: str | Path) -> tuple[str, str]:
    """(the command that serves ``run_dir``'s adapter, "") or ("", why it cannot)."""
    from engine.artifacts import AdapterError
    from engine.outputs.serve import ServeError
    from engine.outputs.serve import serve_command as command
    try:
        return command([str(Path(run_dir).resolve())]), ""
    except (ServeError, AdapterError) as e:
        return "", str(e)


def thumbnail(path: str, box: tuple[int, int]):
    """An image file decoded into a thumbnail within ``box`` pixels (untrusted input: bounded)."""
    from engine.modalities.vision import thumbnail_image
    return thumbnail_image(path, box)


# ---- readings ------------------------------------------------------------------------------------
def samplers():
    """(gpu_sampler, host_sampler, reason): the GPU's (NVML) and the host's gauges."""
    try:
        from engine.training.gpu import GpuSampler, HostSampler
    except ImportError as e:
        return None, None, f"engine.training.gpu unavailable: {e}"
    gpu = GpuSampler()
    return gpu, HostSampler(), gpu.reason


# ---- the inspector's report, as the TUI draws it (looked up on first use: the inspector is heavy) ---
_LAZY = {
    "NoRowAtLine": ("engine.dataset.inspect", "NoRowAtLine"),        # row_at_line's "no row there"
    "bucket_label": ("engine.dataset.inspect", "bucket_label"),      # a histogram bucket in words
    "marked_segments": ("engine.dataset.inspect", "marked_segments"),  # a preview's trained spans
    "MARK_LABELS": ("engine.modalities.text", "MARK_LABELS"),           # «tool call»... labels
    "DEMO_OVERRIDES": ("engine.models.builtin", "DEMO_OVERRIDES"),  # the offline demo's settings
    "ChatError": ("engine.outputs.chat", "ChatError"),               # a chat that cannot go on
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
