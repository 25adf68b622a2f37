"""Actions on a finished run in a child process that speaks typed events.

``python -m engine.outputs.jobs JOB PARAMS_JSON`` runs one action (export, merge, compare,
eval, push) and writes ``JobProgress`` events while it works, then one ``JobDone`` with the action's
report (what the CLI's ``--json`` prints) or the one line that says why not: one JSON event a
line on its stdout (everything the libraries print goes to stderr). ``run_child`` starts it and
hands each event to a callback, so a front end (the TUI) never loads torch or a model, and
never parses a child's text.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from engine.core.events import Event, JobDone, JobProgress, dumps, loads

JOBS = ("export", "merge", "compare", "eval", "push")


def run(job: str, params: dict, emit: Callable[[Event], None]) -> dict | None:
    """Run ``job`` in this process, emitting its progress; the report, or None after a
    ``JobDone`` with the error (an expected failure: one line; never a traceback)."""
    from engine.outputs.merge import AdapterError
    from engine.outputs.modelcard import PushError

    def progress(fraction: float, message: str) -> None:
        emit(JobProgress(job=job, fraction=float(fraction), message=str(message)))

    src = str(params.get("src", ""))
    try:
        if job == "export":
            from engine.outputs.export import export_adapter, export_model
            fn = export_adapter if params.get("adapter") else export_model
            report = fn(src, str(params.get("gguf", "f16")), force=bool(params.get("force", True)),
                        on_progress=progress).to_dict()
        elif job == "merge":
            from engine.outputs.merge import merge
            from engine.methods import galore
            full = galore.full_checkpoint_dir(src)
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

    def emit(ev: Event) -> None:
        out.write(dumps(ev) + "\n")
        out.flush()

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
    try:
        report = run(argv[0], params if isinstance(params, dict) else {}, emit)
    except Exception as e:  # noqa: BLE001 - an unexpected failure: still one line to the front end
        emit(JobDone(job=argv[0], error=f"{argv[0]} failed: {type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:300] if str(e) else ''}"))
        return 1
    return 0 if report is not None else 1


def child_env() -> dict:
    """The child's environment: it imports the same ``engine`` as its parent."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_child(job: str, params: dict, on_event: Callable[[Event], None],
              cancel: threading.Event | None = None) -> JobDone:
    """Run ``job`` in a child process; ``on_event`` gets each of its events (on this thread).
    Returns its ``JobDone``; one is made up, with the reason, when the child ended without
    one (killed, crashed) or ``cancel`` was set (the child is then terminated)."""
    proc = subprocess.Popen([sys.executable, "-m", "engine.outputs.jobs", job, json.dumps(params)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", errors="replace", env=child_env())
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


if __name__ == "__main__":
    raise SystemExit(main())
