"""Export targets: what a run's artifact can be turned into, one file each.

``TARGETS`` names each target's module and attribute (harlequin's ``_FILE_FORMATS`` shape): the
registry is importable without importing any target, and a target's module imports nothing
heavy until it runs. Adding a target is one file here that defines a ``Target`` and one line
in ``TARGETS``; the CLI (``qlora-tui export --target``, its options as flags) and the TUI's
export screen list targets and their options from here.

A target's ``run(artifact, options, emit, **common)`` turns a ``RunArtifact`` into files,
emitting ``ExportProgress`` events, and returns its report (a dict with at least ``path``,
``size_bytes``, ``commands`` and ``lines``). ``run_target`` wraps it with ``ExportStarted`` and
``ExportFinished`` / ``ExportFailed`` (one line), so every face sees one typed stream.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.core.registry import Registry

TARGETS: dict[str, str] = {
    "gguf": "engine.outputs.targets.gguf_model:TARGET",
    "gguf-adapter": "engine.outputs.targets.gguf_adapter:TARGET",
    "merged": "engine.outputs.targets.merged:TARGET",
    "ollama": "engine.outputs.targets.ollama:TARGET",
    "peft": "engine.outputs.targets.peft_folder:TARGET",
}
DEFAULT = "gguf"
# what every target takes besides its own options (the CLI's --out/--base/--name/--force)
COMMON = ("out", "base", "name", "force")


@dataclass(frozen=True)
class Option:
    """One choice a target asks for: its flag/parameter ``name``, the ``choices`` as (value,
    label) pairs and the default. ``strict``: a value outside ``choices`` is refused here (else
    the target checks it itself, with its own hint)."""
    name: str
    label: str
    choices: tuple[tuple[str, str], ...]
    default: str
    help: str = ""
    strict: bool = True


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    help: str
    run: Callable[..., dict]
    options: tuple[Option, ...] = ()
    # the artifact kinds it takes ("adapter", "full"); others are refused in one line
    accepts: tuple[str, ...] = ("adapter",)
    extra: dict = field(default_factory=dict)

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def defaults(self) -> dict[str, str]:
        return {o.name: o.default for o in self.options}


_TARGETS = Registry(TARGETS, "export target {name!r} is unknown; use one of {valid}", ValueError)
names = _TARGETS.names          # every target's name, in registry order (imports none of them)
get = _TARGETS.get              # the Target called a name; ValueError (one line) for an unknown one


def all_targets() -> list[Target]:
    return [get(n) for n in TARGETS]


def check_options(target: Target, options: dict | None, err: type[Exception]) -> dict[str, str]:
    """The target's options: defaults filled in, unknown names and values refused (one line)."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(given) - {o.name for o in target.options})
    if unknown:
        raise err(f"export target {target.name}: no option {unknown[0]!r}; it takes "
                  f"{', '.join(o.name for o in target.options) or 'no options'}")
    out = target.defaults() | {k: str(v) for k, v in given.items()}
    for o in target.options:
        values = [v for v, _ in o.choices]
        if o.strict and out[o.name] not in values:
            raise err(f"--{o.name} {out[o.name]!r} is not one of {', '.join(values)} "
                      f"(export target {target.name})")
    return out


def run_target(name: str, src, options: dict | None = None, emit: Callable[[Any], None] | None = None,
               /, **common) -> dict | None:
    """Run export target ``name`` on ``src`` (a run dir, an adapter dir or a full checkpoint):
    ``ExportStarted``, its ``ExportProgress`` events, then ``ExportFinished`` with the report
    (returned) or ``ExportFailed`` with one line (None returned). Nothing is raised for an
    expected failure. ``common``: out, base, name (the model's), force."""
    from engine.artifacts import AdapterError, RunArtifact
    from engine.core.events import ExportFailed, ExportFinished, ExportStarted
    from engine.outputs.export import ExportError
    from engine.outputs.gguf_write import GGUFError
    emit = emit or (lambda ev: None)
    try:
        target = get(name)
        opts = check_options(target, options, ExportError)
        art = RunArtifact.open(src, ExportError)
        if str(art.kind) not in target.accepts:
            from engine.artifacts import ArtifactKind
            takes = " or ".join(ArtifactKind(k).words for k in target.accepts)
            raise ExportError(f"{art.output_dir}: {art.kind.words} (train.method = {art.method}); the "
                              f"{target.name} export takes {takes}")
        emit(ExportStarted(target=target.name, src=str(src), artifact=str(art.kind), options=opts,
                           pid=os.getpid()))
        report = target.run(art, opts, emit, **{k: v for k, v in common.items() if k in COMMON})
    except (AdapterError, GGUFError, ValueError, OSError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        emit(ExportFailed(target=str(name), error=f"export failed: {text[:400]}"))
        return None
    emit(ExportFinished(target=target.name, report=report))
    return report
