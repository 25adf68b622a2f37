"""The text modality: chat turns checked and normalised (``check_turns``: roles, order, tool
calls, weights), rendering by the chat template and the label mask, the one code path shared
by the trainer and the inspector.

For conversational rows, the trained tokens are exactly the assistant turns as the chat
template renders them, end-of-turn token included (so the model learns to stop), whatever
the template: each assistant turn's character span is found by rendering the conversation
up to that turn with and without it, and a token is trained when it starts inside a span.
Prompt/completion rows train on the completion (+ EOS); text rows on everything.
"""
from __future__ import annotations

from bisect import bisect_right
import json
from dataclasses import dataclass

from engine.modalities.base import DataError, DataProblem, Modality, json_problem
from engine.models.builtin import CHATML_TEMPLATE

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    text: str
    offsets: list[tuple[int, int]]

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


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


def encode_dataset(tok, rows: list[dict], batch: int = 1000):
    """Rows encoded (``encode_batch``) into the ``datasets.Dataset`` of ``input_ids`` + ``labels``
    that TRL takes pre-tokenised: the trainer's, ``eval``'s and the tests' one encoding."""
    from datasets import Dataset
    ids, labels = [], []
    for i in range(0, len(rows), batch):
        for enc in encode_batch(tok, rows[i:i + batch]):
            ids.append(enc.input_ids)
            labels.append(enc.labels)
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


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


# ------------------------------------------------------------------------------ turns

_PLAIN_ROLES = ("user", "assistant", "system")


_BAD = object()


ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"function": "tool",          # OpenAI legacy: a function's result
                "developer": "system"}       # OpenAI's newer name for the system turn


def canonical_role(role):
    """``role`` with its alias resolved (``ROLE_ALIASES``); anything else as it is."""
    return ROLE_ALIASES.get(role, role) if isinstance(role, str) else role


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant", "tool": "tool", "function_call": "assistant",
                  "observation": "tool"}


def check_turns(turns, line: int, problems: list[DataProblem], system: object = None) -> list[dict] | None:
    """Turns → normalised turns ``{"role", "content"[, "tool_calls"][, "name"][, "tool_call_id"][, "weight": 0]}``.

    ``content`` is a string or a list of text parts (OpenAI ``{type: text, text}``, LLaMA-Factory
    ``{type: text, value}``), joined; an assistant turn may have ``tool_calls`` (OpenAI) or a
    legacy ``function_call`` instead of content; role ``function`` (legacy) is a tool result.
    ``weight`` / ``loss_weight`` 0 on a turn means it is not trained (kept only when 0).
    ``system``: a top-level system column, put first when the turns have no system turn.

    The steps, each recording its problems: the list itself, each turn (``_check_turn``), the
    system column (``_add_system``), the role order and something to train (``_check_order``)."""
    if not isinstance(turns, list):
        problems.append(DataProblem(line, "wrong_type", "messages must be a list of turns"))
        return None
    if not turns:
        problems.append(DataProblem(line, "empty_content", "messages is empty"))
        return None
    out = []
    ok = True
    for j, t in enumerate(turns):
        if not isinstance(t, dict):
            problems.append(DataProblem(line, "wrong_type", f"turn {j + 1} is not an object"))
            return None
        turn = _check_turn(t, j, line, problems)
        if turn is None:
            ok = False
        else:
            out.append(turn)
    if not ok:
        return None
    out = _add_system(out, system, line, problems)
    if out is None or not _check_order(out, line, problems):
        return None
    return out


def _check_turn(t: dict, j: int, line: int, problems: list[DataProblem]) -> dict | None:
    """One turn normalised, or None (its problem recorded)."""
    role, content = t.get("role"), t.get("content")
    if len(t) == 2 and type(content) is str and role in _PLAIN_ROLES and content and not content.isspace():
        return {"role": role, "content": content}          # the common turn: what the steps below give it
    role = _turn_role(t, j, line, problems)
    if role is None:
        return None
    got = _turn_calls(t, t.get("content"), j, role, line, problems)
    if got is None:
        return None
    calls, content = got
    content = _turn_content(t, content, calls, j, role, line, problems)
    if content is None:
        return None
    turn = {"role": role, "content": content}
    if calls:
        turn["tool_calls"] = calls
    if role == "tool":
        for key in ("name", "tool_call_id"):
            if isinstance(t.get(key), str) and t[key]:
                turn[key] = t[key]
    weight = _weight(t, j, role, line, problems)
    if weight is None:
        return None
    if weight == 0:
        turn["weight"] = 0
    return turn


def _turn_role(t: dict, j: int, line: int, problems: list[DataProblem]) -> str | None:
    """The turn's role (legacy ``function`` is ``tool``), or None when missing or unknown."""
    role = t.get("role")
    if role is None:
        problems.append(DataProblem(line, "missing_field", f"turn {j + 1} has no 'role'"))
        return None
    role = canonical_role(role)
    if role not in ROLES:
        problems.append(DataProblem(line, "unknown_role", f"turn {j + 1} has unknown role {str(role)!r}; "
                                    "allowed: " + ", ".join(ROLES)))
        return None
    return role


def _turn_calls(t: dict, content, j: int, role: str, line: int, problems: list[DataProblem]):
    """(tool calls or None, the content left) of a turn: OpenAI ``tool_calls``, legacy
    ``function_call`` or LLaMA-Factory v1 ``tool_call`` parts; None when they are unusable."""
    calls = None
    raw_calls = t.get("tool_calls") or t.get("function_call")
    if isinstance(content, list) and not raw_calls:      # LLaMA-Factory v1: tool_call parts
        part_calls = [p.get("value") for p in content if isinstance(p, dict) and p.get("type") == "tool_call"]
        if part_calls:
            raw_calls = [_json_value(v, f"turn {j + 1}'s tool_call part", line, problems) for v in part_calls]
            if any(c is _BAD for c in raw_calls):
                return None
            content = [p for p in content if not (isinstance(p, dict) and p.get("type") == "tool_call")]
    if raw_calls:
        if role != "assistant":
            problems.append(DataProblem(line, "wrong_type", f"turn {j + 1} ({role}) has tool calls; "
                                        "only assistant turns call tools"))
            return None
        calls = tool_calls(raw_calls, f"turn {j + 1}", line, problems)
        if calls is None:
            return None
    return calls, content


def _turn_content(t: dict, content, calls, j: int, role: str, line: int, problems: list[DataProblem]) -> str | None:
    """The turn's text (parts joined; "" for a tool call without content), or None."""
    if content is None and role == "assistant" and isinstance(t.get("refusal"), str):
        content = t["refusal"]              # OpenAI: a refusal is the assistant's answer, in its own field
    if content is None and "content" not in t and not calls:
        problems.append(DataProblem(line, "missing_field", f"turn {j + 1} ({role}) has no 'content'"))
        return None
    if content is None and calls:
        content = ""
    if role == "tool" and isinstance(content, dict):   # a tool's result as a JSON object: its JSON text
        content = json.dumps(content, ensure_ascii=False)
    if isinstance(content, list):
        content = join_parts(content, j, role, line, problems)
        if content is None:
            return None
    if not isinstance(content, str):
        problems.append(DataProblem(line, "non_string_content",
                                    f"turn {j + 1} ({role}) content is {type(content).__name__}, "
                                    "not a string or a list of text parts"))
        return None
    if not calls and (not content or content.isspace()):   # = not content.strip(), without copying it
        problems.append(DataProblem(line, "empty_content", f"turn {j + 1} ({role}) has empty content"))
        return None
    return content


def _add_system(out: list[dict], system, line: int, problems: list[DataProblem]) -> list[dict] | None:
    """The turns with a top-level system column put first (when they have no system turn)."""
    if isinstance(system, str) and system.strip():
        if out and out[0]["role"] == "system":
            if out[0]["content"] != system:
                problems.append(DataProblem(line, "role_order", "both a 'system' column and a different system "
                                            "turn; keep one of them"))
                return None
        else:
            out.insert(0, {"role": "system", "content": system})
    elif system is not None and not isinstance(system, str):
        problems.append(DataProblem(line, "wrong_type", "'system' must be a string"))
        return None
    return out


def _check_order(out: list[dict], line: int, problems: list[DataProblem]) -> bool:
    """Role order: optional system first, then user/assistant alternating (tool results after an
    assistant's tool calls, then the assistant again), with an assistant turn to train on."""
    prev, after_tool = None, False
    for j, t in enumerate(out):
        r = t["role"]
        if r == "system":
            if j:
                problems.append(DataProblem(line, "role_order", "a system turn after the first turn"))
                return False
            continue
        if r == "tool":
            after_tool = True
            continue
        if prev is None and r == "assistant":
            problems.append(DataProblem(line, "role_order", "assistant speaks first; expected a user turn first"))
            return False
        if prev == r and not (r == "assistant" and after_tool):
            problems.append(DataProblem(line, "role_order", f"two {r} turns in a row"))
            return False
        prev, after_tool = r, False
    answers = [t for t in out if t["role"] == "assistant"]
    if not answers:
        problems.append(DataProblem(line, "role_order", "no assistant turn: nothing to train on"))
        return False
    if all(t.get("weight") == 0 for t in answers):
        problems.append(DataProblem(line, "no_trained_tokens", "every assistant turn has weight 0: nothing to train on"))
        return False
    return True


def join_parts(parts: list, j: int, role: str, line: int, problems: list[DataProblem]) -> str | None:
    """Text content parts joined (OpenAI ``{type: text, text}``, LLaMA-Factory ``{type: text, value}``);
    LLaMA-Factory v1 ``reasoning`` parts become ``<think>…</think>`` before the text (the form
    reasoning chat templates read back from content)."""
    out = []
    for k, p in enumerate(parts):
        if isinstance(p, dict) and p.get("type") == "reasoning" and isinstance(p.get("value", p.get("text")), str):
            out.append(f"<think>\n{p.get('value', p.get('text'))}\n</think>\n\n")
            continue
        v = p.get("text", p.get("value")) if isinstance(p, dict) and p.get("type") == "text" else None
        if not isinstance(v, str):
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            problems.append(DataProblem(line, "wrong_type", f"turn {j + 1} ({role}) part {k + 1} is "
                                        f"{str(kind)[:40]!r}: expected {{\"type\": \"text\", \"text\": ...}} "
                                        "(images: {\"type\": \"image\", \"image\": path})"))
            return None
        out.append(v)
    return "".join(out)


def _weight(t: dict, j: int, role: str, line: int, problems: list[DataProblem]) -> int | None:
    """A turn's ``weight`` / ``loss_weight``: 1 (trained, the default) or 0 (not trained)."""
    w = t.get("weight", t.get("loss_weight"))
    if w is None:
        return 1
    if isinstance(w, (bool, int, float)) and w in (0, 1):
        return int(w)
    problems.append(DataProblem(line, "wrong_type", f"turn {j + 1} ({role}) weight {str(w)[:20]!r}: "
                                "a turn's weight is 0 (not trained) or 1 (trained)"))
    return None


def _json_value(v, what: str, line: int, problems: list[DataProblem]):
    """A field that may hold JSON text (LLaMA-Factory stores tools and calls as strings)."""
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v) if v.strip() else None
    except json.JSONDecodeError as e:
        problems.append(DataProblem(line, "wrong_type", f"{what} is text but not JSON ({json_problem(e)})"))
        return _BAD


def tool_calls(raw, what: str, line: int, problems: list[DataProblem]) -> list[dict] | None:
    """Tool calls → ``[{"type": "function", "function": {"name", "arguments": dict}}]`` (the form
    chat templates render). Accepts OpenAI ``tool_calls``, a legacy ``function_call`` and
    LLaMA-Factory's ``function_call`` text (one call or a list, as JSON)."""
    raw = _json_value(raw, f"{what}'s tool call", line, problems)
    if raw is _BAD:
        return None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        problems.append(DataProblem(line, "wrong_type", f"{what}: tool calls must be a list of "
                                    "{\"function\": {\"name\", \"arguments\"}}"))
        return None
    out = []
    for k, c in enumerate(raw):
        fn = c.get("function", c) if isinstance(c, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name.strip():
            problems.append(DataProblem(line, "missing_field", f"{what} tool call {k + 1} has no function 'name'"))
            return None
        args = fn.get("arguments", fn.get("parameters", {}))
        args = _json_value(args, f"{what} tool call {k + 1} arguments", line, problems)
        if args is _BAD:
            return None
        if args is None:
            args = {}
        if isinstance(args, str) and args.lstrip().startswith("{"):   # JSON encoded twice (seen in
            args = _json_value(args, f"{what} tool call {k + 1} arguments", line, problems)  # real files)
            if args is _BAD:
                return None
        if not isinstance(args, dict):
            problems.append(DataProblem(line, "wrong_type", f"{what} tool call {k + 1}: 'arguments' must be "
                                        "a JSON object"))
            return None
        call = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


def tool_definitions(rec: dict, line: int, problems: list[DataProblem]):
    """A row's tool definitions (``tools``; legacy ``functions``) → OpenAI form
    ``[{"type": "function", "function": {...}}]``; None when it has none, ``False`` on a problem."""
    if "tools" not in rec and "functions" not in rec:      # most rows: nothing to read
        return None
    key = "tools" if rec.get("tools") not in (None, "", []) else "functions"
    raw = _json_value(rec.get(key), f"'{key}'", line, problems)
    if raw is _BAD:
        return False
    if raw in (None, [], {}):
        return None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        problems.append(DataProblem(line, "wrong_type", f"'{key}' must be a list of function definitions"))
        return False
    out = []
    for k, t in enumerate(raw):
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str):
            out.append({"type": "function", "function": t["function"]})
        elif isinstance(t, dict) and isinstance(t.get("name"), str):
            out.append({"type": "function", "function": t})
        else:
            problems.append(DataProblem(line, "wrong_type", f"'{key}' item {k + 1} is no function definition "
                                        "(it needs a 'name')"))
            return False
    return out


# ------------------------------------------------------------------------------ the run's modality

MODALITY = Modality(
    name="text",
    summary="chat turns, prompt/completion or plain text: the tokenizer's encoding, packable",
)
