"""Exit statuses of every `qlora-tui` command, in one place (documented in docs/RELIABILITY.md).

| status | name | meaning |
|---|---|---|
| 0 | ``OK`` | done: the run completed, the command did what it was asked |
| 1 | ``FAILED`` | the run failed (``run_failed``: oom, nan, disk, data, error), or the command could not finish (``inspect --strict`` found problems, ``stop`` found no live run, a merge failed) |
| 2 | ``REFUSED`` | bad input, refused before anything started: a config, data, model or argument problem, a run that another process writes, a documented resume refusal; one line on stderr, nothing created |
| 3 | ``STOPPED`` | the run was stopped before its end (SIGTERM, SIGHUP, Ctrl+C, a ``stop`` request): checkpoint and adapter saved, resumable |
| 130 | ``KILLED`` | Ctrl+C twice (or Ctrl+C in a command that has nothing to save): stopped at once |
"""
OK = 0
FAILED = 1
REFUSED = 2
STOPPED = 3
KILLED = 130


def for_run(result) -> int:
    """The exit status of a run from its terminal event (None: it never ended: FAILED)."""
    from engine.core.events import RunFinished
    if not isinstance(result, RunFinished):
        return FAILED
    return STOPPED if result.stopped else OK
