"""Where the inspector's batches are counted (``token_count.Counter``): a worker thread of this
process, and for a large file a worker process too.

Counting an ASCII piece word by word (``token_count._Words``) is Python, so it holds the GIL: a
thread counting beside the main thread (which reads, normalises, renders and checks quality)
takes turns with it instead of running alongside. On the 100k-row benchmark the two halves were
~2.7 and ~4.1 CPU-s per 30k rows, run one after the other. A worker process counts on another
core instead, so the scan takes about as long as its larger half.

The process (``python -m engine.dataset.counting``: no fork of a process with threads, and the
caller's ``__main__`` is not imported again) is started only for a file of at least
``PROCESS_MIN_BYTES`` on a machine with a core to spare. Until it has started, and for any batch
it cannot count (it died, a row would not pickle), the thread counts, so no batch is lost or held
up. Its own output goes to /dev/null: it shares the terminal with the TUI. Batches and counts go
through its stdin and stdout, pickled: it is this process's own child, reading only what this
process wrote to it.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from queue import SimpleQueue

PROCESS_MIN_BYTES = 16 << 20    # files at least this large are counted in a worker process too
PROCESS_DEPTH = 2               # batches waiting in the process before the thread takes the next


def scaled_counts(counter, rows, rendered, scale) -> list:
    """``counter.counts`` of ``rows``, scaled up for the rows measured from a prefix
    (``inspect._measurable``)."""
    out = counter.counts(rows, rendered)
    if all(f == 1.0 for f in scale):
        return out
    return [(int(round(n * f)), int(round(tr * f)), kept) if f != 1.0 else (n, tr, kept)
            for (n, tr, kept), f in zip(out, scale)]


def side_counts(counter, sides) -> tuple[list, list]:
    """Preference rows, one side at a time (each ``(rows, rendered, scale)``): the counts of each
    row's longer side (what max_length must hold), and per row the tokens of its prompt (the
    untrained tokens of its first side: the prompt with its chat template) and of each answer
    (its trained tokens)."""
    per = [scaled_counts(counter, *s) for s in sides]
    longer = [max(cs, key=lambda c: c[0]) for cs in zip(*per)]
    return longer, [(cs[0][0] - cs[0][1], *(c[1] for c in cs)) for cs in zip(*per)]


_WAYS = {"rows": scaled_counts, "sides": side_counts}


def spare_core() -> bool:
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except (AttributeError, OSError):
        return (os.cpu_count() or 1) >= 2


# ---- the worker process

class WorkerGone(RuntimeError):
    """The counting process ended, or could not count a batch."""


def _send(out, msg) -> None:
    """One message: its length (8 bytes), then its pickle. Written in one call, so a thread that
    sends a large batch takes the GIL back once, not once per pipe-full."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(len(data).to_bytes(8, "little") + data)
    out.flush()


def _receive(inp):
    """The next message; EOFError at the end of the input (or a message cut short)."""
    head = inp.read(8)
    if len(head) < 8:
        raise EOFError
    n = int.from_bytes(head, "little")
    data = inp.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


def _serve(inp, out) -> int:
    """(the worker process) The tokenizer, then batches until its stdin closes."""
    import gc
    from engine.dataset.token_count import Counter
    gc.disable()        # as the inspector's scan: each batch is freed by reference counts alone
    tok_blob, max_len = _receive(inp)
    counter = Counter(pickle.loads(tok_blob), max_len)
    _send(out, ("ready", None, ""))
    while True:
        try:
            way, args = _receive(inp)
        except EOFError:
            return 0
        try:
            reply = ("ok", _WAYS[way](counter, *args), counter.mismatch)
        except Exception as e:      # the parent counts this batch itself
            reply = ("error", f"{type(e).__name__}: {e}", "")
        _send(out, reply)


class _Worker:
    """The parent's end of one counting process: ``submit`` returns a Future of the batch's
    ``(counts, mismatch)`` at once. A writer thread sends the batches (the caller never waits on
    a full pipe) and a reader thread resolves the futures in order (the process never waits on
    one either)."""

    def __init__(self, tok_blob: bytes, max_len: int) -> None:
        from engine.core.child import engine_env
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.dataset.counting"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=engine_env())
        self.ready: Future = Future()
        self.waiting: deque = deque([self.ready])     # futures not resolved yet, oldest first
        self.gone: WorkerGone | None = None            # set once, by the reader, as it ends
        self.lock = threading.Lock()                    # (gone and the last appends to waiting)
        self.outbox: SimpleQueue = SimpleQueue()
        self.outbox.put((tok_blob, max_len))
        self.threads = [threading.Thread(target=self._write, name="inspect-count-writer", daemon=True),
                        threading.Thread(target=self._read, name="inspect-count-reader", daemon=True)]
        for t in self.threads:
            t.start()

    def _write(self) -> None:
        try:
            while (msg := self.outbox.get()) is not None:
                _send(self.proc.stdin, msg)
        except Exception:           # gone (the reader says so), or a row that does not pickle
            self.proc.kill()
        finally:
            try:
                self.proc.stdin.close()     # the worker ends at the end of its input
            except OSError:
                pass

    def _read(self) -> None:
        try:
            while True:
                status, value, mismatch = _receive(self.proc.stdout)
                fut = self.waiting.popleft()
                if status == "error":
                    fut.set_exception(WorkerGone(value))
                else:
                    fut.set_result((value, mismatch))
        except Exception as e:      # EOF, a damaged reply: the worker is gone
            with self.lock:         # a batch submitted from now on fails at once (submit)
                self.gone = WorkerGone(f"the counting process ended ({type(e).__name__})")
            while self.waiting:
                fut = self.waiting.popleft()
                if not fut.done():
                    fut.set_exception(self.gone)

    def submit(self, way: str, args: tuple) -> Future:
        fut: Future = Future()
        with self.lock:
            if self.gone is not None:       # the reader has ended: nobody would resolve it
                fut.set_exception(self.gone)
                return fut
            self.waiting.append(fut)        # before sending: the reader resolves in this order
        self.outbox.put((way, args))
        return fut

    def close(self, kill: bool = False) -> None:
        self.outbox.put(None)
        if kill:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for t in self.threads:
            t.join(timeout=10)


class Counting:
    """Counts batches of rows off the main thread, in row order: ``submit`` returns a job,
    ``result(job)`` its counts (jobs are collected oldest first)."""

    wait_for_process = False     # (tests) hold the first batch until the process has started

    def __init__(self, counter, file_bytes: int = 0) -> None:
        self.counter = counter
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="inspect-tokenize")
        self.worker: _Worker | None = None
        self.process_mismatch = ""
        self.batches = {"thread": 0, "process": 0}
        if file_bytes >= PROCESS_MIN_BYTES and not counter.exact_only and spare_core():
            try:
                self.worker = _Worker(pickle.dumps(counter.tok), counter.max_len)
            except Exception:       # a tokenizer that does not pickle, no process to be had
                self.worker = None

    def _process_ready(self) -> bool:
        w = self.worker
        if w is None or self.counter.exact_only:     # (the thread's own checks failed)
            return False
        if self.wait_for_process:
            w.ready.exception()
        if not w.ready.done():
            return False
        if w.ready.exception() is not None:
            self._drop_process()
            return False
        return True

    @property
    def depth(self) -> int:
        """Batches the caller may leave in flight: one more while the process counts too."""
        return 1 if self.worker is None else PROCESS_DEPTH

    def submit(self, way: str, *args) -> tuple:
        """Count a batch: in the process while it keeps up (fewer than PROCESS_DEPTH batches
        waiting there), else in the thread, so neither core waits for the other for long."""
        if self._process_ready() and len(self.worker.waiting) < PROCESS_DEPTH:
            return ("process", self.worker.submit(way, args), way, args)
        return ("thread", self.thread.submit(_WAYS[way], self.counter, *args), way, args)

    def result(self, job):
        where, fut, way, args = job
        if where == "thread":
            self.batches["thread"] += 1
            return fut.result()
        try:
            got, mismatch = fut.result()
        except WorkerGone:          # counted here instead; the process is not used again
            self._drop_process()
            self.batches["thread"] += 1
            return _WAYS[way](self.counter, *args)
        self.batches["process"] += 1
        if mismatch:
            self.process_mismatch = mismatch
        return got

    @property
    def mismatch(self) -> str:
        """The warning of a counter that disagreed with the trainer's encoder ('' if none)."""
        return self.counter.mismatch or self.process_mismatch

    def _drop_process(self, kill: bool = True) -> None:
        if self.worker is not None:
            self.worker.close(kill=kill)
        self.worker = None

    def shutdown(self) -> None:
        self.thread.shutdown(wait=True, cancel_futures=True)
        self._drop_process(kill=False)


if __name__ == "__main__":
    _out = os.fdopen(os.dup(1), "wb")          # the replies; anything printed goes nowhere
    _null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(_null, 1)
    os.dup2(_null, 2)
    raise SystemExit(_serve(sys.stdin.buffer, _out))
