"""A small interpreter of Go's text/template, the subset Ollama's TEMPLATE lines use, for tests:
text and ``{{ }}`` actions with the ``{{-`` / ``-}}`` trim markers; ``if`` / ``else if`` / ``else``
/ ``end``; ``range PIPE`` and ``range $i, $m := PIPE``; ``$x := PIPE`` and ``$x = PIPE`` (block
scoped, as Go's); fields (``.Role``, ``$.Messages``, ``$m.Content``); string and integer literals;
parenthesised commands; the builtins ``eq ne and or not len slice index``. Truth is Go's: an empty
string, 0, false, nil and an empty list are false. Anything else raises ``GoTemplateError``: a test
using a construct this does not know fails instead of passing on a guess.

Ollama executes a model's TEMPLATE with text/template on ``{"System": ..., "Messages": [{"Role",
"Content"}, ...], ...}``; ``render`` takes that dict.
"""
from __future__ import annotations

import re


class GoTemplateError(ValueError):
    pass


_ACTION = re.compile(r"\{\{(- )?(.*?)( -)?\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|:=|=|,|[^\s(),=]+)')


def _lex(src: str) -> list:
    """[("text", s) | ("action", tokens)] with the trim markers applied to the text around them."""
    out: list = []
    pos = 0
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        out.append(["text", text])
        body = m.group(2).strip()
        if body.startswith("/*"):
            out.append(["text", ""])
        else:
            out.append(["action", _tokens(body)])
        pos = m.end()
        if m.group(3):
            rest = src[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    out.append(["text", src[pos:]])
    return out


def _tokens(body: str) -> list[str]:
    toks, pos = [], 0
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if not m or not m.group(1):
            if body[pos:].strip():
                raise GoTemplateError(f"cannot read {body!r}")
            break
        toks.append(m.group(1))
        pos = m.end()
    return toks


def _parse(items: list, i: int = 0, stop=("end",)) -> tuple[list, int, list | None]:
    """Nodes until an action whose first word is in ``stop``; returns (nodes, index, that action)."""
    nodes: list = []
    while i < len(items):
        kind, val = items[i]
        i += 1
        if kind == "text":
            if val:
                nodes.append(("text", val))
            continue
        word = val[0] if val else ""
        if word in stop:
            return nodes, i, val
        if word == "if":
            node, i = _parse_if(items, i, val[1:])
            nodes.append(node)
        elif word == "range":
            rest = val[1:]
            names: list[str] = []
            if ":=" in rest:
                k = rest.index(":=")
                names = [t for t in rest[:k] if t != ","]
                rest = rest[k + 1:]
            body, i, end = _parse(items, i, ("end", "else"))
            if end and end[0] == "else":
                raise GoTemplateError("range ... else is not supported here")
            nodes.append(("range", names, rest, body))
        elif word in ("end", "else"):
            raise GoTemplateError(f"unexpected {{{{ {word} }}}}")
        elif len(val) >= 2 and val[0].startswith("$") and val[1] in (":=", "="):
            nodes.append(("set", val[0], val[1], val[2:]))
        else:
            nodes.append(("out", val))
    if stop != ("end",) or nodes is None:
        pass
    return nodes, i, None


def _parse_if(items: list, i: int, cond: list) -> tuple[tuple, int]:
    body, i, end = _parse(items, i, ("end", "else"))
    if end is None:
        raise GoTemplateError("if without end")
    if end[0] == "end":
        return ("if", cond, body, []), i
    if len(end) > 1 and end[1] == "if":            # else if: a nested if that shares the end
        node, i = _parse_if(items, i, end[2:])
        return ("if", cond, body, [node]), i
    other, i, end2 = _parse(items, i, ("end",))
    if end2 is None:
        raise GoTemplateError("else without end")
    return ("if", cond, body, other), i


def _truth(v) -> bool:
    return not (v is None or v is False or v == 0 and not isinstance(v, str) or v == "" or v == [] or v == {})


class _Scope:
    def __init__(self, root, parent=None):
        self.vars: dict = {} if parent else {"$": root}
        self.parent = parent

    def get(self, name: str):
        s = self
        while s is not None:
            if name in s.vars:
                return s.vars[name]
            s = s.parent
        raise GoTemplateError(f"undefined variable {name}")

    def assign(self, name: str, value) -> None:
        s = self
        while s is not None:
            if name in s.vars:
                s.vars[name] = value
                return
            s = s.parent
        raise GoTemplateError(f"assignment to undeclared {name}")


def _field(obj, names: list[str]):
    for n in names:
        if not n:
            continue
        if isinstance(obj, dict) and n in obj:
            obj = obj[n]
        else:
            raise GoTemplateError(f"no field {n} in {type(obj).__name__}")
    return obj


def _operand(tok: str, dot, scope: _Scope):
    if tok.startswith('"'):
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if tok in ("true", "false"):
        return tok == "true"
    if tok == ".":
        return dot
    if tok.startswith("."):
        return _field(dot, tok[1:].split("."))
    if tok.startswith("$"):
        head, _, rest = tok.partition(".")
        return _field(scope.get(head), rest.split(".") if rest else [])
    raise GoTemplateError(f"unknown word {tok!r}")


def _builtin(name: str, args: list):
    if name == "eq":
        return any(args[0] == a for a in args[1:])
    if name == "ne":
        return args[0] != args[1]
    if name == "and":
        for a in args:
            if not _truth(a):
                return a
        return args[-1]
    if name == "or":
        for a in args:
            if _truth(a):
                return a
        return args[-1]
    if name == "not":
        return not _truth(args[0])
    if name == "len":
        return len(args[0])
    if name == "slice":
        if len(args) > 3:
            raise GoTemplateError("slice with a capacity is not supported here")
        return args[0][args[1] if len(args) > 1 else 0:args[2] if len(args) > 2 else len(args[0])]
    if name == "index":
        v = args[0]
        for k in args[1:]:
            v = v[k]
        return v
    raise GoTemplateError(f"unknown function {name}")


def _eval(toks: list[str], dot, scope: _Scope):
    """A command: an operand, or a function and its arguments (parenthesised commands nest)."""
    args, i = [], 0
    while i < len(toks):
        t = toks[i]
        if t == "(":
            depth, j = 1, i + 1
            while depth:
                if j >= len(toks):
                    raise GoTemplateError("unbalanced (")
                depth += {"(": 1, ")": -1}.get(toks[j], 0)
                j += 1
            args.append(("v", _eval(toks[i + 1:j - 1], dot, scope)))
            i = j
            continue
        if t == "|":
            raise GoTemplateError("pipelines with | are not supported here")
        args.append(("w", t))
        i += 1
    if not args:
        raise GoTemplateError("empty command")
    kind, first = args[0]
    if kind == "w" and re.fullmatch(r"[a-z]+", first) and first not in ("true", "false"):
        vals = [v if k == "v" else _operand(v, dot, scope) for k, v in args[1:]]
        return _builtin(first, vals)
    if len(args) != 1:
        raise GoTemplateError(f"cannot call {first!r}")
    return first if kind == "v" else _operand(first, dot, scope)


def _run(nodes: list, dot, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            v = _eval(node[1], dot, scope)
            out.append("" if v is None else str(v) if not isinstance(v, bool) else str(v).lower())
        elif kind == "set":
            _, name, op, expr = node
            v = _eval(expr, dot, scope)
            if op == ":=":
                scope.vars[name] = v
            else:
                scope.assign(name, v)
        elif kind == "if":
            _, cond, body, other = node
            inner = _Scope(None, scope)
            _run(body if _truth(_eval(cond, dot, scope)) else other, dot, inner, out)
        elif kind == "range":
            _, names, expr, body = node
            seq = _eval(expr, dot, scope)
            for idx, item in enumerate(seq or []):
                inner = _Scope(None, scope)
                if len(names) == 1:
                    inner.vars[names[0]] = item
                elif len(names) == 2:
                    inner.vars[names[0]], inner.vars[names[1]] = idx, item
                _run(body, item, inner, out)


def render(template: str, data: dict) -> str:
    nodes, i, end = _parse(_lex(template))
    if end is not None:
        raise GoTemplateError(f"unexpected {{{{ {' '.join(end)} }}}}")
    out: list[str] = []
    _run(nodes, data, _Scope(data), out)
    return "".join(out)


def ollama_values(messages: list[dict]) -> dict:
    """What Ollama hands a TEMPLATE for a chat (its template.Execute, the ``.Messages`` path):
    consecutive messages of one role merged with "\\n\\n", and ``.System`` the system messages'
    contents joined the same way."""
    merged: list[dict] = []
    system = []
    for m in messages:
        if m["role"] == "system":
            system.append(m["content"])
        if merged and merged[-1]["Role"] == m["role"]:
            merged[-1]["Content"] += "\n\n" + m["content"]
        else:
            merged.append({"Role": m["role"], "Content": m["content"]})
    return {"System": "\n\n".join(system), "Messages": merged, "Response": "", "Prompt": ""}
