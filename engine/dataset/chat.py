"""Chat templates and the label mask: the one code path shared by the trainer and the inspector.

For conversational rows, the trained tokens are exactly the assistant turns as the chat
template renders them, end-of-turn token included (so the model learns to stop), whatever
the template: each assistant turn's character span is found by rendering the conversation
up to that turn with and without it, and a token is trained when it starts inside a span.
Prompt/completion rows train on the completion (+ EOS); text rows on everything.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

from engine.dataset.data import DataError

IGNORE = -100

# ChatML with {% generation %} markers; used when a tokenizer has no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    text: str
    offsets: list[tuple[int, int]]

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def prepare_tokenizer(tok, chat_template: str = "") -> list[str]:
    """Set the chat template (override, own, or ChatML fallback) and a pad token. Returns warnings."""
    warnings = []
    if chat_template:
        tok.chat_template = _template_text(chat_template)
        _check_template(tok, chat_template)
    elif not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
        added = tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}) \
            if "<|im_end|>" not in tok.get_vocab() else 0
        warnings.append("the tokenizer has no chat template: using ChatML (<|im_start|>…<|im_end|>)"
                        + (f"; added {added} special tokens (their embeddings are untrained)" if added else ""))
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
            warnings.append(f"the tokenizer has no pad token: using the EOS token {tok.eos_token!r}")
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
            warnings.append("the tokenizer has no pad or EOS token: added <|pad|>")
    return warnings


def _template_text(chat_template: str) -> str:
    """model.chat_template: a Jinja template, or the path of a file holding one. Text with no
    ``{`` is no template (it would render the same constant for every row): it must be a file."""
    from engine.training.model import ModelError
    if "{" in chat_template:
        return chat_template
    p = Path(chat_template).expanduser()
    from engine.core import files
    try:
        return files.read_text(p)           # a regular file of sane size
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = "no such file" if isinstance(e, FileNotFoundError) else getattr(e, "strerror", None) or str(e)
        raise ModelError(f"model.chat_template = {chat_template!r}: {why}; give the path of a Jinja "
                         "template file, or the template itself") from None


def _check_template(tok, chat_template: str) -> None:
    """Render a two-turn conversation once: a template error is said now, in one line."""
    from engine.training.model import ModelError
    try:
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja2 syntax/undefined/raise_exception errors alike
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        msg = (getattr(e, "message", None) or str(e)).strip().splitlines()
        raise ModelError(f"model.chat_template: the template fails{where}: {type(e).__name__}: "
                         f"{msg[0][:200] if msg else ''}; fix the template (it is Jinja)") from None


def _render(tok, messages, add_generation_prompt=False, tools=None) -> str:
    if tools:
        return tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


class ToolTemplateError(DataError):
    """The model's chat template cannot render what a row holds (tool definitions, tool calls
    or tool results): training it would drop them without a word."""


_TOOL_SUPPORT: dict = {}      # chat template text -> "" (renders tools) or what it cannot render
_PROBE_ARG = "qlora_probe_argument"


def tool_support(tok) -> dict:
    """What the tokenizer's chat template renders, probed once per template: ``{"tools": bool,
    "tool_calls": bool, "tool_results": bool}`` (a probe name must appear in the rendered text)."""
    key = str(getattr(tok, "chat_template", None))
    if key in _TOOL_SUPPORT:
        return _TOOL_SUPPORT[key]
    fn = {"name": "qlora_probe_fn", "description": "probe",
          "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "qlora_probe_call",
                                                              "arguments": {"x": _PROBE_ARG}}}]}
    user = {"role": "user", "content": "hi"}
    out = {}
    for what, msgs, tools, needle in (
            ("tools", [user], [{"type": "function", "function": fn}], "qlora_probe_fn"),
            ("tool_calls", [user, call], None, "qlora_probe_call"),
            ("tool_results", [user, call, {"role": "tool", "name": "qlora_probe_call",
                                           "content": "qlora_probe_result"}], None, "qlora_probe_result")):
        try:
            out[what] = needle in _render(tok, msgs, tools=tools)
        except Exception:  # noqa: BLE001 - a template that raises on them cannot render them
            out[what] = False
    _TOOL_SUPPORT[key] = out
    return out


def _require_tools(tok, row: dict) -> None:
    need = []
    if row.get("tools"):
        need.append("tools")
    for m in row["messages"]:
        if m.get("tool_calls") and "tool_calls" not in need:
            need.append("tool_calls")
        if m["role"] == "tool" and "tool_results" not in need:
            need.append("tool_results")
    if not need:
        return
    can = tool_support(tok)
    missing = [w for w in need if not can[w]]
    if missing:
        what = {"tools": "tool definitions (tools=)", "tool_calls": "assistant tool calls",
                "tool_results": "tool results (role tool)"}
        raise ToolTemplateError("the model's chat template does not render " + ", ".join(what[w] for w in missing)
                                + ": the data has them; set model.chat_template to a template that "
                                "renders tools (the model's tool-calling template)")


def render_spans(tok, row: dict) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, trained character spans, add_special_tokens) for one normalised row."""
    if "messages" in row:
        msgs = row["messages"]
        tools = row.get("tools")
        if not tools and getattr(tok, "chat_template", None) == CHATML_TEMPLATE and _plain_turns(msgs):
            return _chatml_spans(msgs)
        _require_tools(tok, row)
        full = _render(tok, msgs, tools=tools)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or m.get("weight") == 0:      # weight 0: not trained
                continue
            prefix = _render(tok, msgs[:i], add_generation_prompt=True, tools=tools)
            upto = full if i + 1 == len(msgs) else _render(tok, msgs[: i + 1], tools=tools)
            if full.startswith(upto) and upto.startswith(prefix):
                spans.append((len(prefix), len(upto)))
            elif m["content"]:
                # template rewrites earlier turns (e.g. drops reasoning): locate the content itself
                start = full.find(m["content"], spans[-1][1] if spans else 0)
                if start >= 0:
                    spans.append((start, start + len(m["content"])))
        # a trailing newline after the end-of-turn token is formatting, not something to learn
        return full, [(a, b - (1 if b > a + 1 and full[b - 1] == "\n" else 0)) for a, b in spans], False
    eos = tok.eos_token or ""
    if "completion" in row:
        comp = row["completion"]
        if eos and not comp.endswith(eos):
            comp += eos
        text = row["prompt"] + comp
        return text, [(len(row["prompt"]), len(text))], True
    text = row["text"]
    if eos and not text.endswith(eos):
        text += eos
    return text, [(0, len(text))], True


MARK_LABELS = {"tool_call": "tool call", "tool_result": "tool result", "weight_0": "weight 0: not trained"}


def turn_marks(tok, row: dict, text: str) -> list[tuple[int, int, str]]:
    """Character spans of the turns a preview draws apart, ``(start, end, kind)`` with kind
    ``tool_call`` (an assistant's tool calls), ``tool_result`` (role tool) or ``weight_0`` (an
    assistant turn with weight 0). Each turn's span is found as ``render_spans`` finds an
    answer's: rendering the conversation up to it with and without it."""
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not msgs or row.get("images") is not None:
        return []
    want = [("tool_call" if m.get("tool_calls") else "weight_0" if m.get("weight") == 0 else None)
            if m["role"] == "assistant" else "tool_result" if m["role"] == "tool" else None for m in msgs]
    if not any(want):
        return []
    tools = row.get("tools")
    out = []
    for i, kind in enumerate(want):
        if kind is None:
            continue
        try:
            a = len(_render(tok, msgs[:i], tools=tools)) if i else 0
            upto = _render(tok, msgs[: i + 1], tools=tools)
        except Exception:  # noqa: BLE001 - a preview mark is never a reason to fail
            continue
        if text.startswith(upto) and a < len(upto):
            out.append((a, len(upto), kind))
    return out


def _plain_turns(msgs) -> bool:
    """Turns the ChatML fast path renders exactly as Jinja would: role and content strings only
    (an empty or assistant-first conversation takes the Jinja path, which refuses it)."""
    if not isinstance(msgs, list) or not msgs:
        return False
    for m in msgs:
        if type(m) is not dict or len(m) != 2 + ("weight" in m) or type(m.get("role")) is not str \
                or type(m.get("content")) is not str:
            return False
    return msgs[0]["role"] != "assistant"


def _chatml_spans(msgs) -> tuple[str, list[tuple[int, int]], bool]:
    """``render_spans`` for CHATML_TEMPLATE without Jinja: the same text and spans, ~100× faster.

    Each turn renders as ``<|im_start|>ROLE\nCONTENT<|im_end|>\n``; an assistant turn's span
    runs from its content to its ``<|im_end|>`` (the trailing newline is formatting).
    """
    parts = []
    spans = []
    pos = 0
    for m in msgs:
        head = "<|im_start|>" + m["role"] + "\n"
        body = m["content"] + "<|im_end|>"
        parts.append(head)
        parts.append(body)
        parts.append("\n")
        start = pos + len(head)
        pos = start + len(body) + 1
        if m["role"] == "assistant" and m.get("weight") != 0:
            spans.append((start, pos - 1))
    return "".join(parts), spans, False


def encode_batch(tok, rows: list[dict]) -> list[Encoded]:
    """Tokenise rows in one batched call and build their labels (IGNORE outside trained spans)."""
    out: list[Encoded | None] = [None] * len(rows)
    for i, r in enumerate(rows):      # pre-tokenised rows pass through as they are
        if "input_ids" in r:
            out[i] = Encoded(list(r["input_ids"]), list(r.get("labels") or r["input_ids"]), "", [])
    if all(o is not None for o in out):
        return out  # type: ignore[return-value]
    rendered = [render_spans(tok, r) if out[i] is None else ("", [], None) for i, r in enumerate(rows)]
    for special in (False, True):
        idx = [i for i, r in enumerate(rendered) if r[2] == special]
        if not idx:
            continue
        enc = tok([rendered[i][0] for i in idx], add_special_tokens=special,
                  return_offsets_mapping=True, return_attention_mask=False)
        for k, i in enumerate(idx):
            text, spans, _ = rendered[i]
            ids = enc["input_ids"][k]
            offs = enc["offset_mapping"][k]
            out[i] = Encoded(ids, labels_for(ids, offs, spans), text, [tuple(o) for o in offs])
    return out  # type: ignore[return-value]


_NUMPY_MIN = 32          # rows shorter than this: the plain loop is faster than numpy's set-up


def labels_for(ids, offsets, spans) -> list[int]:
    """A token is trained (keeps its id) when it has width and starts inside a span; IGNORE
    otherwise. Vectorised with numpy (same rule, same list of Python ints as the loop below)."""
    if not spans:
        return [IGNORE] * len(ids)
    starts = [a for a, _ in spans]
    n = len(ids)
    if n >= _NUMPY_MIN and len(offsets) == n and all(x <= y for x, y in zip(starts, starts[1:])):
        import numpy as np
        off = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
        s, e = off[:, 0], off[:, 1]
        j = np.searchsorted(np.asarray(starts, dtype=np.int64), s, side="right") - 1   # = bisect_right - 1
        ends = np.asarray([b for _, b in spans], dtype=np.int64)
        keep = (e != s) & (j >= 0) & (s < ends[np.maximum(j, 0)])
        return np.where(keep, np.asarray(ids, dtype=np.int64), IGNORE).tolist()
    labels = []
    for tid, (s, e) in zip(ids, offsets):
        if e == s:                       # special token added by the tokenizer (BOS): never trained
            labels.append(IGNORE)
            continue
        j = bisect_right(starts, s) - 1
        labels.append(tid if j >= 0 and s < spans[j][1] else IGNORE)
    return labels


def segments(enc: Encoded) -> list[tuple[str, bool]]:
    """The rendered text cut into (piece, trained) runs, for previews. Covers the whole text."""
    out: list[tuple[str, bool]] = []
    pos = 0
    for (s, e), lab in zip(enc.offsets, enc.labels):
        if e <= s:
            continue
        if s > pos:                        # text the tokenizer skipped (rare): untrained
            out.append((enc.text[pos:s], False))
        s = max(s, pos)
        if e > s:
            out.append((enc.text[s:e], lab != IGNORE))
        pos = max(pos, e)
    if pos < len(enc.text):
        out.append((enc.text[pos:], False))
    merged: list[tuple[str, bool]] = []
    for piece, t in out:
        if merged and merged[-1][1] == t:
            merged[-1] = (merged[-1][0] + piece, t)
        else:
            merged.append((piece, t))
    return merged
