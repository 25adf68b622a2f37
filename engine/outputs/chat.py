"""Chat with a run: its base + adapter (or the plain base, same history), token by token.

The engine half of the TUI's Chat screen, usable from any front end: ``ChatModel.load`` loads
the run's base and adapter once (``generate._load``: 4-bit on CUDA like in training, fp32 on
the CPU; the run's chat template); ``ChatModel.stream`` renders the history with that template
and yields the answer's text as it is generated (``TextIteratorStreamer``, the generation on
its own thread), until the end of the answer, ``max_new_tokens`` or a set ``stop`` event.
``tuned=False`` answers with the adapter disabled (PEFT ``disable_adapter``): the base model.

The transcript of a run is kept in ``RUN_DIR/chat.jsonl`` (one JSON object a line: role,
content, which model answered, from which adapter, when); ``clear`` appends a marker and the
history starts again after it.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from engine.outputs.generate import GenerateError
from engine.artifacts import RunArtifact

TRANSCRIPT = "chat.jsonl"
MAX_TRANSCRIPT_BYTES = 4 * 1024 * 1024       # read back at most this much of a transcript


class ChatError(GenerateError):
    """The chat cannot load or answer; the message is one line."""


@dataclass
class Sampling:
    """How an answer is drawn. ``temperature`` 0 = greedy (then ``top_p`` is unused)."""
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256

    def check(self) -> None:
        if not 0 <= self.temperature <= 5:
            raise ChatError(f"temperature {self.temperature}: must be between 0 (greedy) and 5")
        if not 0 < self.top_p <= 1:
            raise ChatError(f"top_p {self.top_p}: must be above 0 and at most 1")
        if not 1 <= self.max_new_tokens <= 8192:
            raise ChatError(f"max_new_tokens {self.max_new_tokens}: must be between 1 and 8192")


def sources(run_dir: str | Path) -> list[Path]:
    """What a run can chat with: its final adapter (if saved), then its checkpoints, newest
    first (each holds an adapter)."""
    run_dir = Path(run_dir)
    out = []
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        out.append(run_dir / "adapter")
    ckpts = [c for c in (run_dir / "checkpoints").glob("checkpoint-*")
             if (c / "adapter_config.json").is_file() and c.name.rsplit("-", 1)[-1].isdigit()]
    out += sorted(ckpts, key=lambda c: int(c.name.rsplit("-", 1)[-1]), reverse=True)
    return out


def owning_run(src: str | Path) -> Path:
    """The run directory of ``src`` (a run, its adapter or one of its checkpoints), where its
    transcript goes; an adapter outside any run keeps its transcript in its own folder."""
    src = Path(src).expanduser()
    if (src / "events.jsonl").exists() or (src / "config.toml").is_file():
        return src
    for cand in (src.parent, src.parent.parent):
        if (cand / "events.jsonl").exists() or (cand / "config.toml").is_file():
            return cand
    return src


class ChatModel:
    """One run's model, loaded once, answering one message at a time."""

    def __init__(self, src: str | Path) -> None:
        self.src = Path(src).expanduser()
        self.model = None
        self.tok = None
        self.info: dict = {}
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self, on_progress: Callable[[float, str], None] | None = None) -> dict:
        """Load base + adapter (seconds on the CPU demo, minutes for a large base); returns
        ``{"base", "adapter", "mode"}``. Raises ChatError with one line."""
        progress = on_progress or (lambda f, m: None)
        progress(0.05, f"finding the adapter of {self.src}")
        RunArtifact.open(self.src, ChatError)
        progress(0.15, "loading the base model and the adapter")
        from engine.outputs.generate import _load
        try:
            self.model, self.tok, self.info = _load(self.src, ChatError)
        except ChatError:
            raise
        except Exception as e:  # noqa: BLE001 - torch/transformers errors: one line
            raise ChatError(f"{self.src}: cannot load: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
        progress(1.0, f"ready: {self.info.get('mode', '')}")
        return self.info

    def render(self, history: list[dict], system: str = "") -> str:
        """The prompt for the next answer: ``system`` then ``history`` through the chat template."""
        msgs = ([{"role": "system", "content": system}] if system.strip() else []) + \
            [{"role": m["role"], "content": m["content"]} for m in history]
        try:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template that refuses a system turn, etc.
            raise ChatError(f"the chat template failed: {str(e).splitlines()[0][:200]}") from None

    def stream(self, history: list[dict], sampling: Sampling | None = None, *, system: str = "",
               tuned: bool = True, stop: threading.Event | None = None) -> Iterator[str]:
        """The answer to ``history`` (its last message is the user's), piece by piece.
        Stops early when ``stop`` is set (the text so far is what was said)."""
        if not self.loaded:
            raise ChatError("the model is not loaded yet")
        sampling = sampling or Sampling()
        sampling.check()
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop = stop or threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return stop.is_set()

        enc = self.tok(self.render(history, system), return_tensors="pt", add_special_tokens=False)
        device = next(self.model.parameters()).device
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600)
        kw = {"input_ids": enc.input_ids.to(device), "attention_mask": enc.attention_mask.to(device),
              "max_new_tokens": int(sampling.max_new_tokens), "streamer": streamer,
              "pad_token_id": self.tok.pad_token_id,
              "stopping_criteria": StoppingCriteriaList([_Stop()])}
        if sampling.temperature <= 0:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=float(sampling.temperature),
                      top_p=float(sampling.top_p), top_k=None)
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with self._lock, torch.no_grad():
                    if tuned or not hasattr(self.model, "disable_adapter"):
                        self.model.generate(**kw)
                    else:
                        with self.model.disable_adapter():
                            self.model.generate(**kw)
            except BaseException as e:  # noqa: BLE001 - reported to the reader below
                failure.append(e)
                streamer.end()

        worker = threading.Thread(target=generate, name="chat-generate", daemon=True)
        worker.start()
        for piece in streamer:
            if piece:
                yield piece
        worker.join()
        if failure:
            e = failure[0]
            raise ChatError(f"generation failed: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}")


# --------------------------------------------------------------------------- the transcript

def transcript_path(src: str | Path) -> Path:
    return owning_run(src) / TRANSCRIPT


def append_turn(src: str | Path, role: str, content: str, *, model: str = "", adapter: str = "",
                stopped: bool = False) -> None:
    """Add one message to the run's transcript (``model``: "tuned" or "base" for answers)."""
    rec = {"role": role, "content": content, "time": time.time()}
    if model:
        rec["model"] = model
    if adapter:
        rec["adapter"] = adapter
    if stopped:
        rec["stopped"] = True
    with open(transcript_path(src), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def clear(src: str | Path) -> None:
    """Start a new conversation: the transcript keeps the old one, behind a marker."""
    with open(transcript_path(src), "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"role": "clear", "time": time.time()}) + "\n")


def history(src: str | Path) -> list[dict]:
    """The current conversation of the run's transcript (after its last clear marker); a
    damaged line is skipped, and at most the file's last 4 MiB are read."""
    path = transcript_path(src)
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - MAX_TRANSCRIPT_BYTES))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    out: list[dict] = []
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("role") == "clear":
            out = []
        elif rec.get("role") in ("user", "assistant") and isinstance(rec.get("content"), str):
            out.append(rec)
    return out


def latest_run(runs_dir: str | Path) -> Path | None:
    """The newest run under ``runs_dir`` that has ended and has something to chat with (its
    adapter or a checkpoint): what the Chat screen opens when no run was picked."""
    from engine.core import rundir
    try:
        runs = rundir.list_runs(runs_dir)
    except OSError:
        return None
    for ri in runs:                       # newest first
        if ri.state != "live" and sources(ri.path):
            return Path(ri.path)
    return None
