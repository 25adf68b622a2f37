"""What a run produced, found in one place: ``RunArtifact``.

A run's output is a LoRA adapter (``RUN_DIR/adapter``) or, for a method that trains the
weights themselves (GaLore), a full checkpoint (``RUN_DIR/model``). The artifact knows which
(the run's saved ``config.toml``, ``train.method``), where its files are (the adapter or the
full checkpoint, the checkpoints, the merged checkpoint and the exports), the base model it was
trained on with its revision and ``trust_remote_code``, where its tokenizer (and processor)
come from, and the run it continued (``model.adapter``). Merge, export, generate, eval, serve,
chat, the model card and the jobs all ask it instead of looking the files up themselves.

``RunArtifact.open(src)`` takes a run directory, an adapter directory or a full checkpoint; a
source with no usable output is refused with one line that says what to pass instead. Nothing
here loads torch or a model (a hub base is checked only by ``resolve_base``).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from engine.core import files as _files
from engine.core import rundir

MERGED = "merged"                     # RUN_DIR/export/merged: the merge export and `merge` reuse
EXPORTS = "export"                    # RUN_DIR/export: GGUF files, Modelfiles, the merged checkpoint
# the merge's own record (base, adapter, tolerance): local paths, kept next to the weights for
# `export` to recognise its merge; never uploaded (push leaves it out)
MERGE_INFO = "qlora_merge.json"


class AdapterError(ValueError):
    """A run/adapter directory or its base cannot be used; the message is one line."""


class ArtifactKind(StrEnum):
    """What a run's output is."""
    ADAPTER = "adapter"               # a PEFT LoRA adapter over the (4-bit) base
    FULL = "full"                     # the weights themselves (a full checkpoint)

    @property
    def words(self) -> str:
        return "a LoRA adapter" if self is ArtifactKind.ADAPTER else "a full checkpoint"


def artifact_kind(method: str) -> ArtifactKind:
    """The output of a ``train.method``: the method's own ``artifact`` (engine/methods/)."""
    from engine import methods
    try:
        return ArtifactKind(methods.get(str(method or methods.DEFAULT)).artifact)
    except methods.UnknownMethod:               # a run of a method this version no longer has
        return ArtifactKind.ADAPTER


def _checkpoint_number(p: Path) -> int:
    tail = p.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


@dataclass(frozen=True)
class RunArtifact:
    """One run's output. ``output_dir`` is the adapter (``kind`` adapter) or the full checkpoint."""
    src: Path                          # what was given
    kind: ArtifactKind
    output_dir: Path                   # the adapter dir or the full checkpoint dir
    run_dir: Path | None               # the run that produced it (holds config.toml), if known
    base: str = ""                     # as recorded (base_model_name_or_path / model.name), unresolved
    revision: str = ""
    trust_remote_code: bool = False
    method: str = "qlora"
    parent_run: str = ""               # model.adapter: the SFT run a preference run continued
    adapter_config: dict = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, src: str | Path, err: type[Exception] = AdapterError,
             kind: ArtifactKind | None = None) -> "RunArtifact":
        """The artifact of ``src`` (a run dir, an adapter dir or a full checkpoint dir). ``kind``:
        only that kind is accepted (``adapter`` where a LoRA adapter is needed). Raises ``err``
        with one line when there is no usable output."""
        p = Path(src).expanduser()
        if not p.exists():
            raise err(f"{p}: no such directory; pass a run directory or an adapter directory")
        if not p.is_dir():
            raise err(f"{p}: not a directory; pass a run directory or an adapter directory")
        if (p / rundir.CONFIG).is_file():        # a run: its train.method says what it produced
            method = str(_section(run_config(p), "train").get("method") or "qlora")
            found = artifact_kind(method)
        else:                                    # an adapter or a checkpoint folder: its files say
            method = ""
            found = ArtifactKind.FULL if full_checkpoint_dir(p) is not None else ArtifactKind.ADAPTER
        how = f"train.method = {method or 'galore'}"
        if kind == ArtifactKind.ADAPTER and found == ArtifactKind.FULL:
            raise err(f"{p}: a full checkpoint, not a LoRA adapter: {how} trains the weights themselves; "
                      f"load, copy or serve {full_checkpoint_dir(p) or _full_dir(p)} as it is")
        if found == ArtifactKind.FULL:
            full = full_checkpoint_dir(p)
            if full is None:
                raise err(f"{p}: no full checkpoint found: {how} saves one in {_full_dir(p)} (the run "
                          f"may still be running or have failed)")
            return cls._of(p, ArtifactKind.FULL, full, err)
        adapter = find_adapter_dir(p, err)
        if kind == ArtifactKind.FULL:
            raise err(f"{p}: a LoRA adapter ({adapter}), not a full checkpoint")
        return cls._of(p, ArtifactKind.ADAPTER, adapter, err)

    @classmethod
    def _of(cls, src: Path, kind: ArtifactKind, out: Path, err) -> "RunArtifact":
        run_dir = run_dir_of(src, out)
        cfg = run_config(run_dir)
        model, train = _section(cfg, "model"), _section(cfg, "train")
        method = str(train.get("method") or ("galore" if kind == ArtifactKind.FULL else "qlora"))
        acfg: dict = {}
        base = str(model.get("name") or "")
        if kind == ArtifactKind.ADAPTER:
            acfg = read_adapter_config(out, err)
            base = str(acfg.get("base_model_name_or_path") or "")
        else:
            base = str(_full_marker(out).get("base") or base)
        return cls(src=src, kind=kind, output_dir=out, run_dir=run_dir, base=base,
                   revision=str(model.get("revision") or acfg.get("revision") or ""),
                   trust_remote_code=bool(model.get("trust_remote_code", False)), method=method,
                   parent_run=str(model.get("adapter") or ""), adapter_config=acfg)

    # ------------------------------------------------------------------ where things are

    @property
    def adapter_dir(self) -> Path | None:
        return self.output_dir if self.kind == ArtifactKind.ADAPTER else None

    @property
    def full_dir(self) -> Path | None:
        return self.output_dir if self.kind == ArtifactKind.FULL else None

    @property
    def root(self) -> Path:
        """The run directory, or the folder that holds the output when there is no run."""
        return self.run_dir or self.output_dir.parent

    @property
    def exports_dir(self) -> Path:
        return self.root / EXPORTS

    @property
    def merged_dir(self) -> Path:
        return self.exports_dir / MERGED

    @property
    def checkpoints(self) -> list[Path]:
        """The run's saved checkpoints, oldest first."""
        d = self.root / rundir.CHECKPOINTS
        return sorted((c for c in d.glob("checkpoint-*") if c.is_dir()), key=_checkpoint_number)

    @property
    def model_settings(self) -> dict:
        """``[model]`` of the run's config.toml (chat_template, revision, ...), or {}."""
        return run_model_settings(self.run_dir)

    @property
    def name(self) -> str:
        return self.root.name

    def tokenizer_source(self, base: str | None = None) -> str:
        """The tokenizer (and processor) files the run saved with its output, else the base's."""
        return tokenizer_source(self.output_dir, base if base is not None else self.base)

    def resolve_base(self, override: str | None = None, err: type[Exception] = AdapterError) -> str:
        """A loadable base: ``override`` (--base) or the recorded one (see ``resolve_base``)."""
        where = ("--base" if override else
                 f"base_model_name_or_path in {self.output_dir / 'adapter_config.json'}")
        return resolve_base(override or self.base, revision=self.revision,
                            trust_remote_code=self.trust_remote_code, err=err, where=where)

    def require_adapter(self, err: type[Exception] = AdapterError, what: str = "this") -> Path:
        """The adapter dir, or one line saying a full checkpoint has none."""
        if self.adapter_dir is None:
            raise err(f"{what}: {self.output_dir} is a full checkpoint (train.method = {self.method}), "
                      f"there is no LoRA adapter")
        return self.adapter_dir

    def describe(self) -> dict:
        return {"kind": str(self.kind), "output": str(self.output_dir),
                "run_dir": str(self.run_dir) if self.run_dir else "", "base": self.base,
                "revision": self.revision, "method": self.method, "parent_run": self.parent_run}


# --------------------------------------------------------------------------- the lookups

def _section(cfg: dict, name: str) -> dict:
    v = cfg.get(name)
    return v if isinstance(v, dict) else {}


def full_checkpoint_dir(src) -> Path | None:
    """The full checkpoint of ``src`` (a GaLore run dir or its ``model`` dir), else None."""
    from engine.methods import galore
    return galore.full_checkpoint_dir(src)


def _full_dir(run_dir: Path) -> Path:
    """Where a run that trains the weights saves them (RUN_DIR/model)."""
    from engine.methods.base import FULL_DIR
    return run_dir / FULL_DIR


def _full_marker(full_dir: Path) -> dict:
    from engine.methods import galore
    return galore.read_marker(full_dir)


def find_adapter_dir(src: str | Path, err: type[Exception] = AdapterError) -> Path:
    """The adapter directory for ``src``: a run dir (its ``adapter/``) or an adapter dir."""
    p = Path(src).expanduser()
    if not p.exists():
        raise err(f"{p}: no such directory; pass a run directory or an adapter directory")
    if not p.is_dir():
        raise err(f"{p}: not a directory; pass a run directory or an adapter directory")
    if (p / rundir.ADAPTER / "adapter_config.json").is_file():
        return p / rundir.ADAPTER
    if (p / "adapter_config.json").is_file():
        return p
    hint = ""
    ckpts = sorted((p / rundir.CHECKPOINTS).glob("checkpoint-*"), key=_checkpoint_number)
    ckpts = [c for c in ckpts if (c / "adapter_config.json").is_file()]
    if ckpts:
        hint = f" (the run has no final adapter yet; use a checkpoint, e.g. {ckpts[-1]})"
    elif (p / rundir.EVENTS).exists():
        hint = " (the run has not saved an adapter: it may still be running or have failed)"
    raise err(f"{p}: no adapter found: expected {p / rundir.ADAPTER / 'adapter_config.json'} (run "
              f"directory) or {p / 'adapter_config.json'} (adapter directory){hint}")


def read_adapter_config(adapter_dir: Path, err: type[Exception] = AdapterError) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        data = _files.read_json(path)
    except (OSError, UnicodeDecodeError) as e:
        raise err(f"{path}: cannot read: {e}") from None
    except ValueError as e:
        raise err(f"{path}: not valid JSON ({e}); the adapter is damaged, re-save it") from None
    if not isinstance(data, dict):
        raise err(f"{path}: expected a JSON object")
    peft_type = str(data.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise err(f"{path}: peft_type is {peft_type}; only LoRA adapters are supported")
    return data


def run_dir_of(src: str | Path, adapter_dir: Path) -> Path | None:
    """The run directory owning ``adapter_dir`` (one that holds config.toml), if any."""
    for cand in (Path(src).expanduser(), adapter_dir.parent, adapter_dir.parent.parent.parent):
        if (cand / rundir.CONFIG).is_file():
            return cand
    return None


def run_config(run_dir: Path | None) -> dict:
    """The run's saved config.toml as a dict, or {} (none, unreadable)."""
    if run_dir is None:
        return {}
    try:
        data = tomllib.loads(_files.read_text(run_dir / rundir.CONFIG))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def run_model_settings(run_dir: Path | None) -> dict:
    """``[model]`` of the run's config.toml (revision, trust_remote_code), or {}."""
    model = run_config(run_dir).get("model")
    return model if isinstance(model, dict) else {}


def tokenizer_source(adapter_dir: Path, base: str) -> str:
    """The adapter's own tokenizer files when saved with it (the runner saves them), else the base's."""
    if (adapter_dir / "tokenizer_config.json").is_file() or (adapter_dir / "tokenizer.json").is_file():
        return str(adapter_dir)
    return base


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def resolve_base(name: str, *, revision: str = "", trust_remote_code: bool = False,
                 err: type[Exception] = AdapterError, where: str = "") -> str:
    """A loadable base: a local model directory or a hub id whose config can be fetched.

    ``where`` says where the name came from, for the error message.
    """
    src = f" ({where})" if where else ""
    if not name or not str(name).strip():
        raise err(f"no base model{src}: adapter_config.json has no base_model_name_or_path; pass --base")
    name = str(name).strip()
    if name.startswith("builtin:"):
        if name != "builtin:tiny":
            raise err(f"base model {name!r}{src} is unknown; the only builtin model is builtin:tiny")
        try:
            from engine.models.builtin import tiny_model_dir
        except ImportError as e:
            raise err(f"base model builtin:tiny{src} is not available in this install ({e}); "
                      f"pass --base DIR") from None
        return str(tiny_model_dir())
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise err(f"base model directory {p}{src} has no config.json; pass --base with a "
                      f"Hugging Face model directory")
        return str(p)
    if p.exists() or _looks_like_path(name):
        raise err(f"base model {name}{src} not found: no such directory; pass --base with the "
                  f"model the adapter was trained on")
    from engine.core import hub
    try:                     # cached here, or the hub answers: else one line, at once (no retries)
        hub.check_model_id(name, revision or None, what=f"base model{src}",
                           fix="pass --base with a local model directory")
    except ValueError as e:
        raise err(str(e)) from None
    try:
        from transformers import AutoConfig
        AutoConfig.from_pretrained(name, revision=revision or None, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - hub/network/auth errors all mean "not loadable"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise err(f"base model {name!r}{src} cannot be loaded: {reason[:200]}; check the hub id "
                  f"and network/HF_TOKEN, or pass --base with a local directory") from None
    return name
