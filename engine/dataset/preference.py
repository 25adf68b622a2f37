"""Preference data: detected, normalised to TRL's preference types, never trained as SFT.

Two kinds of rows (``data.format`` ``preference`` and ``kto``):

- **pairs** (DPO, ORPO, SimPO): TRL's explicit prompt ``{"prompt", "chosen", "rejected"}`` or its
  implicit prompt ``{"chosen", "rejected"}`` (the shared start of both is the prompt), each
  conversational (lists of role/content turns) or plain strings; LLaMA-Factory's sharegpt pairs
  ``{"conversations": [from/value turns], "chosen": {from, value}, "rejected": {from, value}}``
  (and the same with ``messages`` of role/content turns).
- **unpaired** (KTO): ``{"prompt", "completion", "label": bool}`` (TRL) or a conversation whose last
  assistant turn is judged by ``label`` (LLaMA-Factory's ``kto_tag``): ``{"messages": [...],
  "label": false}``.

Every row becomes TRL's explicit form: ``{"prompt", "chosen", "rejected"}`` or ``{"prompt",
"completion", "label"}``, where the prompt is a list of turns and the answers lists of one
assistant turn (conversational), or all strings (plain text, used as is). TRL tokenises them
with the model's chat template, so what is trained is what TRL's own preference recipes train.

A run whose ``train.method`` is not a preference method refuses such a file (``check_method``)
with one line; a preference method refuses SFT data the same way. Pairs can train KTO (each pair
gives one desirable and one undesirable row, TRL's ``unpair_preference_dataset``); unpaired rows
cannot train DPO/ORPO/SimPO.
"""
from __future__ import annotations

from engine import methods
from engine.methods.base import PAIRS, PREFERENCE, UNPAIRED   # data.format of pairs / of labelled rows
from engine.modalities.text import ROLE_ALIASES, SHAREGPT_ROLES, canonical_role

FORMATS = (PAIRS, UNPAIRED)
REFUSAL = "this is preference data (chosen/rejected): set train.method = dpo, orpo or kto"
KTO_TAGS = ("label", "kto_tag")
V1_PAIR = ("chosen_messages", "rejected_messages")   # LLaMA-Factory v1: two whole conversations
_ROLES = {**SHAREGPT_ROLES, **ROLE_ALIASES}        # from/role names → roles
PROMPT_FIELDS = ("prompt", "question", "instruction", "input")   # a pair's explicit prompt, first found
OPENAI_PAIR = ("preferred_output", "non_preferred_output")   # OpenAI preference fine-tuning, beside "input"
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def kto_label(value) -> bool | None:
    """A KTO label as people write it: a boolean, 1/0, or the text true/false (yes/no, 1/0);
    None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        return True if v in _TRUE else False if v in _FALSE else None
    return None


def is_method(cfg) -> bool:
    """True when ``train.method`` is a preference method (dpo, orpo, kto, simpo, ...)."""
    return methods.of(cfg).family == PREFERENCE


def detect(rec: dict) -> tuple[str, str] | None:
    """(format, evidence) for a preference row, else None (the SFT formats' detection goes on)."""
    keys = set(rec)
    if OPENAI_PAIR[0] in keys and OPENAI_PAIR[1] in keys:
        return PAIRS, "fields 'input', 'preferred_output' and 'non_preferred_output' (OpenAI preference pairs)"
    if V1_PAIR[0] in keys and V1_PAIR[1] in keys and "chosen" not in keys:
        return PAIRS, "fields 'chosen_messages' and 'rejected_messages' (LLaMA-Factory v1 preference pairs)"
    if "chosen" in keys and "rejected" in keys:
        if "conversations" in keys or "messages" in keys:
            return PAIRS, "fields 'chosen'/'rejected' beside a conversation (LLaMA-Factory preference pairs)"
        p = next((k for k in PROMPT_FIELDS if k in keys), None)
        if p is not None:
            return PAIRS, f"fields '{p}', 'chosen' and 'rejected' (preference pairs, explicit prompt)"
        return PAIRS, "fields 'chosen' and 'rejected' (preference pairs, implicit prompt)"
    tag = next((k for k in KTO_TAGS if k in keys), None)
    if tag is not None and kto_label(rec[tag]) is not None and (
            ("prompt" in keys and "completion" in keys) or "messages" in keys or "conversations" in keys):
        return UNPAIRED, f"a true/false '{tag}' beside the answer (unpaired preference, KTO)"
    return None


def reason(fmt: str) -> str:
    return {PAIRS: "'chosen' and 'rejected' answers (preference pairs)",
            UNPAIRED: "a true/false 'label' on each answer (unpaired preference, KTO)"}[fmt]


# ------------------------------------------------------------------ normalise
def normalise(rec: dict, fmt: str, line: int, problems: list) -> dict | None:
    """One raw preference row → TRL's explicit form, or None with a problem recorded."""
    from engine.modalities.base import DataProblem
    try:
        return _pairs(rec) if fmt == PAIRS else _unpaired(rec)
    except _Bad as e:
        problems.append(DataProblem(line, e.kind, str(e)))
        return None


class _Bad(ValueError):
    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


def _turns(value, what: str, sharegpt_ok: bool = True) -> list[dict]:
    """A list of turns (role/content or from/value) checked: known roles, string content."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _Bad("wrong_type", f"'{what}' must be a non-empty list of turns or a string")
    out = []
    for j, t in enumerate(value):
        if not isinstance(t, dict):
            raise _Bad("wrong_type", f"'{what}' turn {j + 1} is not an object")
        if "role" in t:
            role, content = t.get("role"), t.get("content")
            role = canonical_role(role)
        elif "from" in t and sharegpt_ok:
            role, content = _ROLES.get(str(t.get("from")).lower(), t.get("from")), t.get("value")
        else:
            raise _Bad("missing_field", f"'{what}' turn {j + 1} has no 'role'")
        if role not in ("system", "user", "assistant", "tool"):
            raise _Bad("unknown_role", f"'{what}' turn {j + 1} has unknown role {str(role)!r}; "
                       "allowed: system, user, assistant, tool")
        if isinstance(content, list):          # content parts (OpenAI / LLaMA-Factory v1): joined
            from engine.modalities.text import join_parts
            found: list = []
            content = join_parts(content, j, role, 0, found)
            if content is None:
                raise _Bad(found[0].kind, f"'{what}' {found[0].message}")
        if not isinstance(content, str):
            raise _Bad("non_string_content", f"'{what}' turn {j + 1} ({role}) content is "
                       f"{type(content).__name__}, not a string")
        if not content.strip():
            raise _Bad("empty_content", f"'{what}' turn {j + 1} ({role}) has empty content")
        out.append({"role": role, "content": content})
    return out


def _answer(value, what: str) -> list[dict] | str:
    """One side of a pair (or a KTO completion): a string, or assistant turn(s)."""
    if isinstance(value, str):
        if not value.strip():
            raise _Bad("empty_content", f"'{what}' is empty: nothing to prefer")
        return value
    turns = _turns(value, what)
    if turns[-1]["role"] != "assistant":
        raise _Bad("role_order", f"'{what}' must end with an assistant turn")
    return turns


def _prompt(value, what: str = "prompt") -> list[dict] | str:
    if isinstance(value, str):
        if not value.strip():
            raise _Bad("empty_content", f"'{what}' is empty")
        return value
    turns = _turns(value, what)
    if turns[-1]["role"] == "assistant":
        raise _Bad("role_order", f"'{what}' ends with an assistant turn; the answer goes in chosen/rejected")
    return turns


def _as_turns(answer) -> list[dict]:
    return [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer


def _split_implicit(chosen, rejected):
    """TRL's implicit prompt: the longest shared start of both sides (turns, or text up to the
    first differing character, a separating space left with the answer)."""
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise _Bad("missing_field", "no 'prompt' and chosen/rejected share no opening turn; add a "
                       "'prompt' field or start both with the user turn")
        return chosen[:n], chosen[n:], rejected[n:]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n and chosen[n - 1] == " ":
        n -= 1
    if n == 0:
        raise _Bad("missing_field", "no 'prompt' and chosen/rejected share no opening text; add a 'prompt' field")
    return chosen[:n], chosen[n:], rejected[n:]


def _openai_pair(rec: dict) -> dict:
    """OpenAI's preference fine-tuning row ``{"input": {"messages", "tools"}, "preferred_output":
    [assistant turn], "non_preferred_output": [...]}`` → TRL's explicit conversational pair."""
    inp = rec.get("input")
    if not isinstance(inp, dict) or not isinstance(inp.get("messages"), list):
        raise _Bad("missing_field", "'input' must be an object with a 'messages' list (OpenAI preference pairs)")
    if inp.get("tools") or inp.get("functions"):
        raise _Bad("unsupported_tools", "tool definitions in a preference row ('input.tools') are not "
                   "trained here; remove them, or train the tool calls with SFT rows (messages + tools)")
    return {"prompt": inp["messages"], "chosen": rec.get(OPENAI_PAIR[0]), "rejected": rec.get(OPENAI_PAIR[1]),
            **({"system": rec["system"]} if "system" in rec else {})}


def _whole_conversation(value) -> bool:
    """A side that is a whole conversation (it has a non-assistant turn), not just the answer."""
    return isinstance(value, list) and any(
        isinstance(t, dict) and _ROLES.get(str(t.get("role", t.get("from"))).lower()) not in ("assistant", None)
        for t in value)


def _pairs(rec: dict) -> dict:
    if OPENAI_PAIR[0] in rec:
        rec = _openai_pair(rec)
    if V1_PAIR[0] in rec and "chosen" not in rec:     # LLaMA-Factory v1: TRL's implicit prompt
        rec = {k: v for k, v in rec.items() if k not in V1_PAIR} | {
            "chosen": rec.get(V1_PAIR[0]), "rejected": rec.get(V1_PAIR[1])}
    conv = rec.get("conversations", rec.get("messages"))
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if _whole_conversation(chosen) and _whole_conversation(rejected):
        # both sides hold the whole conversation (UltraFeedback-binarized style, beside a copy of
        # it in 'prompt' / 'messages'): the shared start is the prompt, as TRL's
        # maybe_extract_prompt does when the prompt column does not match the sides' form
        conv = None
        rec = {k: v for k, v in rec.items() if k not in PROMPT_FIELDS}
    if conv is not None:                                     # LLaMA-Factory: history + one answer each
        prompt = _prompt(conv, "conversations" if "conversations" in rec else "messages")
        if isinstance(prompt, str):
            raise _Bad("wrong_type", "'conversations' must be a list of turns")
        chosen, rejected = _as_turns(_answer(chosen, "chosen")), _as_turns(_answer(rejected, "rejected"))
    elif any(k in rec for k in PROMPT_FIELDS):
        if "prompt" in rec:
            prompt = _prompt(rec.get("prompt"))
        else:       # a chat question: Axolotl's chatml.intel (question), Alpaca-style (instruction + input)
            key = next(k for k in PROMPT_FIELDS if k in rec)
            text = _prompt(rec.get(key), key)
            if not isinstance(text, str):
                raise _Bad("wrong_type", f"'{key}' must be a string")
            extra = rec.get("input") if key == "instruction" else None
            if isinstance(extra, str) and extra.strip():
                text = f"{text}\n\n{extra}"
            prompt = [{"role": "user", "content": text}]
        chosen, rejected = _answer(chosen, "chosen"), _answer(rejected, "rejected")
        if not (isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str)):
            # one side a conversation: all of it is (a plain prompt is the user's turn, a plain answer
            # the assistant's)
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            chosen, rejected = _as_turns(chosen), _as_turns(rejected)
    else:
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise _Bad("wrong_type", "chosen and rejected must both be strings or both lists of turns")
        chosen = chosen if isinstance(chosen, str) else _turns(chosen, "chosen")
        rejected = rejected if isinstance(rejected, str) else _turns(rejected, "rejected")
        prompt, chosen, rejected = _split_implicit(chosen, rejected)
        if isinstance(prompt, list):
            prompt = _prompt(prompt)
        chosen, rejected = _answer(chosen, "chosen"), _answer(rejected, "rejected")
    if chosen == rejected:
        raise _Bad("identical_pair", "chosen and rejected are identical: the pair teaches nothing")
    return {"prompt": _with_system(rec, prompt), "chosen": chosen, "rejected": rejected}


def _with_system(rec: dict, prompt):
    """A top-level ``system`` column becomes the conversation's first turn (when it has none)."""
    system = rec.get("system")
    if isinstance(prompt, list) and isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
        return [{"role": "system", "content": system}] + prompt
    return prompt


def _unpaired(rec: dict) -> dict:
    tag = next(k for k in KTO_TAGS if k in rec)
    label = kto_label(rec[tag])
    if label is None:
        raise _Bad("wrong_type", f"'{tag}' must be true or false (or 1/0)")
    if "prompt" in rec and "completion" in rec:
        prompt, completion = _prompt(rec["prompt"]), _answer(rec["completion"], "completion")
        if isinstance(prompt, str) and not isinstance(completion, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(completion, str) and not isinstance(prompt, str):
            completion = [{"role": "assistant", "content": completion}]
    else:
        what = "messages" if "messages" in rec else "conversations"
        turns = _turns(rec.get(what), what)
        if turns[-1]["role"] != "assistant" or len(turns) < 2:
            raise _Bad("role_order", f"'{what}' must end with the assistant answer that '{tag}' judges")
        prompt, completion = _prompt(turns[:-1], what), turns[-1:]
    return {"prompt": _with_system(rec, prompt), "completion": completion, "label": label}


# ------------------------------------------------------------------ which method takes which data
def check_method(cfg, fmt: str, where, key: str = "data.train") -> None:
    """Raise DataError (one line naming the file) when the data and ``train.method`` do not go
    together: preference data under an SFT method, SFT data under a preference method, unpaired
    (KTO) rows under a pair method."""
    from engine.modalities.base import DataError
    m = methods.of(cfg)
    method, pref = m.name, m.family == PREFERENCE
    if fmt in FORMATS and not pref:
        raise DataError(f"{where}: {REFUSAL}")
    if pref and fmt not in FORMATS:
        raise DataError(f"{where}: train.method = {method!r} needs preference data ({key}): rows with "
                        f"prompt/chosen/rejected{' or prompt/completion/label' if UNPAIRED in m.rows else ''}; "
                        f"this file is {fmt} (SFT) data: train it with train.method = \"qlora\"")
    if pref and fmt == UNPAIRED and UNPAIRED not in m.rows:
        takes = " or ".join(f'"{n}"' for n in methods.family(PREFERENCE) if UNPAIRED in methods.get(n).rows)
        raise DataError(f"{where}: train.method = {method!r} needs chosen/rejected pairs; these rows are "
                        f"unpaired (a 'label' per answer): set train.method = {takes}")


def for_trainer(cfg, rows: list[dict]) -> list[dict]:
    """The rows as the method's TRL trainer takes them: KTO unpairs pairs (one desirable and one
    undesirable row per pair); everything else as normalised."""
    if methods.of(cfg).rows[0] != UNPAIRED or not rows or "label" in rows[0]:
        return rows
    out = []
    for r in rows:
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return out


def sides(row: dict) -> dict[str, str]:
    """Plain text of each side of a normalised row (for previews and length statistics)."""
    def text(v):
        return v if isinstance(v, str) else "\n".join(f"{t['role']}: {t['content']}" for t in v)
    return {k: text(row[k]) for k in ("prompt", "chosen", "rejected", "completion") if k in row}


def side_view(row: dict, side: str | None = None) -> dict:
    """One side of a normalised preference row in the SFT shape the inspector measures and
    previews (the prompt untrained, the answer trained: TRL's completion mask). ``side``:
    "chosen", "rejected" (pairs) or None = the longer answer of a pair (what max_length must
    hold), the completion of a KTO row."""
    if "completion" in row:
        answer = row["completion"]
    else:
        if side is None:
            side = "chosen" if len(sides(row)["chosen"]) >= len(sides(row)["rejected"]) else "rejected"
        answer = row[side]
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": answer}
    return {"messages": list(prompt) + list(answer)}
