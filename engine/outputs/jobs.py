"""Actions on a finished run in a child process that speaks typed events.

``python -m engine.outputs.jobs JOB PARAMS_JSON`` runs one action (export, merge, compare,
eval, push) and writes ``JobProgress`` events while it works, then one ``JobDone`` with the action's
report (what the CLI's ``--json`` prints) or the one line that says why not: one JSON event a
line on its stdout (everything the libraries print goes to stderr). ``run_child`` starts it and
hands each event to a callback, so a front end (the TUI) never loads torch or a model, and
never parses a child's text.

An export (``engine.outputs.targets``) speaks the export events (``ExportStarted``,
``ExportProgress``, ``ExportFinished`` / ``ExportFailed``). ``start_export`` runs it as a child
of its own session that writes them, JSONL, to a log under the run's ``export/logs/``;
``follow_export`` reads that log with the reader a run's log is read with
(``engine.core.events.follow``), so the export goes on, and is followed again, like a run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from engine.core.child import engine_env
from engine.core.events import (EXPORT_END, Event, ExportFailed, ExportFinished, ExportProgress, ExportStarted,
                                JobDone, JobProgress, dumps, loads)

JOBS = ("export", "merge", "compare", "eval", "push")
EXPORT_EVENTS = (ExportStarted, ExportProgress, ExportFinished, ExportFailed)
LOGS = "logs"                           # RUN_DIR/export/logs/: one export's events a file


def export_request(params: dict) -> tuple[str, dict, dict]:
    """(target, its options, the common arguments) of an export job's parameters. The older
    form (``gguf``, ``adapter``) is read too."""
    from engine.outputs import targets
    target = str(params.get("target") or ("gguf-adapter" if params.get("adapter") else targets.DEFAULT))
    options = params.get("options")
    if not isinstance(options, dict):
        options = {"gguf": str(params["gguf"])} if params.get("gguf") else {}
    common = {k: params[k] for k in targets.COMMON if params.get(k) is not None}
    common.setdefault("force", True)
    return target, options, common


def run(job: str, params: dict, emit: Callable[[Event], None]) -> dict | None:
    """Run ``job`` in this process, emitting its progress; the report, or None after a
    ``JobDone`` with the error (an expected failure: one line; never a traceback)."""
    from engine.artifacts import AdapterError
    from engine.outputs.modelcard import PushError

    def progress(fraction: float, message: str) -> None:
        emit(JobProgress(job=job, fraction=float(fraction), message=str(message)))

    src = str(params.get("src", ""))
    try:
        if job == "export":
            from engine.outputs.targets import run_target
            target, options, common = export_request(params)
            failed: list[str] = []

            def export_emit(ev: Event) -> None:
                if isinstance(ev, ExportFailed):
                    failed.append(ev.error)
                emit(ev)
            report = run_target(target, src, options, export_emit, **common)
            if report is None:
                emit(JobDone(job=job, error=failed[-1] if failed else "export failed"))
                return None
        elif job == "merge":
            from engine.artifacts import ArtifactKind, RunArtifact
            from engine.outputs.merge import merge
            from engine.methods import galore
            art = RunArtifact.open(src, AdapterError)
            full = art.output_dir if art.kind == ArtifactKind.FULL else None
            if full is not None:
                report = {"out": str(full), "lines": [galore.merge_message(full)]}
            else:
                r = merge(src, str(params["out"]), dtype=str(params.get("dtype", "bf16")),
                          on_progress=progress)
                report = r.to_dict() | {"lines": r.lines()}
        elif job == "compare":
            from engine.outputs.generate import compare
            progress(0.05, "loading the base model and the adapter")
            results = compare(src, prompts=params.get("prompts"),
                              max_new_tokens=int(params.get("max_new_tokens", 48)),
                              on_load=lambda info: progress(0.5, f"generating ({info.get('mode', '')})"))
            progress(1.0, "done")
            report = {"results": results}
        elif job == "eval":
            from engine.outputs.evaluate import evaluate
            data = params.get("data")
            r = evaluate(src, data=str(data) if data else None,
                         answer_rows=int(params.get("answer_rows", 32)),
                         max_new_tokens=int(params.get("max_new_tokens", 64)), on_progress=progress)
            report = r.to_dict() | {"lines": r.table()}
        elif job == "push":
            from engine.outputs.modelcard import push
            report = push(src, str(params.get("repo_id", "")), what=str(params.get("what", "adapter")),
                          private=bool(params.get("private", False)),
                          dry_run=bool(params.get("dry_run", True)))
        else:
            raise AdapterError(f"unknown job {job!r}: one of {', '.join(JOBS)}")
    except (AdapterError, PushError, KeyError, OSError, ValueError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        emit(JobDone(job=job, error=f"{job} failed: {text[:400]}"))
        return None
    emit(JobDone(job=job, report=report))
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    events_fd = os.dup(1)                 # the events' channel: the real stdout
    os.dup2(2, 1)                         # anything else printed goes to stderr
    sys.stdout = sys.stderr
    out = os.fdopen(events_fd, "w", encoding="utf-8", buffering=1)
    log = None                            # an export's own log (start_export): its events go there

    def emit(ev: Event) -> None:
        if log is not None and isinstance(ev, EXPORT_EVENTS):
            log(ev)
            return
        try:
            out.write(dumps(ev) + "\n")
            out.flush()
        except (BrokenPipeError, ValueError):    # the reader left (a closed TUI): the job goes on
            pass

    from engine.core import quiet
    quiet.apply()
    if len(argv) != 2:
        emit(JobDone(job="?", error="usage: python -m engine.outputs.jobs JOB PARAMS_JSON"))
        return 2
    try:
        params = json.loads(argv[1])
    except json.JSONDecodeError as e:
        emit(JobDone(job=argv[0], error=f"params: not JSON ({e})"))
        return 2
    params = params if isinstance(params, dict) else {}
    if argv[0] == "export" and params.get("events"):
        from engine.core.events import JsonlWriter
        try:
            log = JsonlWriter(params["events"])
        except OSError as e:
            emit(JobDone(job="export", error=f"export failed: cannot write {params['events']}: {e}"))
            return 1
    try:
        report = run(argv[0], params, emit)
    except Exception as e:  # noqa: BLE001 - an unexpected failure: still one line to the front end
        why = f"{argv[0]} failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if log is not None:
            log(ExportFailed(target=str(params.get("target", "")), error=why))
        emit(JobDone(job=argv[0], error=why))
        return 1
    finally:
        if log is not None:
            log.close()
    return 0 if report is not None else 1


def run_child(job: str, params: dict, on_event: Callable[[Event], None],
              cancel: threading.Event | None = None) -> JobDone:
    """Run ``job`` in a child process; ``on_event`` gets each of its events (on this thread).
    Returns its ``JobDone``; one is made up, with the reason, when the child ended without
    one (killed, crashed) or ``cancel`` was set (the child is then terminated)."""
    proc = subprocess.Popen([sys.executable, "-m", "engine.outputs.jobs", job, json.dumps(params)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", errors="replace", env=engine_env())
    err_tail: list[str] = []

    def drain() -> None:                     # stderr: kept (its last lines) for a crash's reason
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.strip():
                err_tail.append(line.strip())
                del err_tail[:-20]

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    watcher = None
    if cancel is not None:
        def watch() -> None:
            while proc.poll() is None:
                if cancel.wait(0.2):
                    proc.terminate()
                    return
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    done: JobDone | None = None
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            ev = loads(line)
        except (ValueError, TypeError):
            continue                          # not an event: nothing on this channel is text
        if isinstance(ev, JobDone):
            done = ev
        on_event(ev)
    code = proc.wait()
    t.join(timeout=5)
    if done is None:
        why = ("cancelled" if cancel is not None and cancel.is_set() else
               f"the {job} process exited with status {code}"
               + (f": {err_tail[-1][:200]}" if err_tail else ""))
        done = JobDone(job=job, error=why)
        on_event(done)
    return done


class ExportJob:
    """An export running as a child process of its own session (``start_export``): it writes its
    events to ``events`` (JSONL) and anything else it prints beside it (the same name, ``.stderr``);
    it goes on when the front end that started it is gone."""

    def __init__(self, proc: subprocess.Popen, events: Path, target: str):
        self.proc, self.events, self.target = proc, events, target

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self) -> str:
        try:
            lines = [ln.strip() for ln in self.events.with_suffix(".stderr").read_text(
                encoding="utf-8", errors="replace").splitlines()[-50:] if ln.strip()]
        except OSError:
            return ""
        return lines[-1][:200] if lines else ""

    def cancel(self) -> None:
        if self.alive():
            self.proc.terminate()


def export_log_path(src, target: str) -> Path:
    """A new log for an export of ``src``: RUN_DIR/export/logs/TARGET-TIME-PID.jsonl."""
    import time
    from engine.artifacts import RunArtifact
    try:
        root = RunArtifact.open(src).exports_dir
    except ValueError:                     # the export itself says why: its log goes beside the source
        root = Path(src).expanduser().resolve().parent / "export"
    folder = root / LOGS
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{target}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6}.jsonl"


def start_export(params: dict) -> ExportJob:
    """Start the export ``params`` ask for (``export_request``) in a child process of its own
    session; its events are written to the returned job's ``events`` log."""
    target = export_request(params)[0]
    path = Path(params["events"]) if params.get("events") else export_log_path(params.get("src", "."), target)
    path.touch()
    with open(path.with_suffix(".stderr"), "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "engine.outputs.jobs", "export",
                                 json.dumps(params | {"events": str(path)})],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=engine_env(), start_new_session=True)
    return ExportJob(proc, path, target)


def follow_export(job: ExportJob, on_event: Callable[[Event], None],
                  stop: threading.Event | None = None) -> ExportFinished | ExportFailed:
    """Hand each event of ``job``'s log to ``on_event`` until its end (``ExportFinished`` or
    ``ExportFailed``), which is returned; one is made up, with the reason, when the process
    ended without one (killed, crashed) or ``stop`` was set."""
    from engine.core.events import follow
    end = None
    for ev in follow(job.events, stop=stop, poll=0.1, alive=job.alive, terminal=EXPORT_END):
        on_event(ev)
        if isinstance(ev, EXPORT_END):
            end = ev
    if end is None:
        code = job.proc.poll()
        tail = job.stderr_tail()
        why = ("stopped following the export" if stop is not None and stop.is_set() else
               f"export failed: the export process exited with status {code}" + (f": {tail}" if tail else ""))
        end = ExportFailed(target=job.target, error=why)
        on_event(end)
    return end


if __name__ == "__main__":
    raise SystemExit(main())
