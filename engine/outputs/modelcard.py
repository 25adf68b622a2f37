"""Model cards (README.md with Hugging Face metadata) and ``qlora-tui push``.

``merge`` and ``export`` call ``write_card`` next to their outputs; ``push`` uploads the
adapter, the merged checkpoint or the GGUF files through ``huggingface_hub`` with the token
from its usual places (``HF_TOKEN``, ``hf auth login``'s cache): we never read it into a file.
"""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

from engine.core import files as _files

WHAT = ("adapter", "merged", "gguf")


class PushError(ValueError):
    """The upload cannot run or failed; the message is one line."""


# --------------------------------------------------------------------------- the card

def _run_config(run_dir: Path | None) -> tuple[dict, str]:
    if run_dir is None:
        return {}, ""
    try:
        text = _files.read_text(run_dir / "config.toml")
        return tomllib.loads(text), text
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}, ""


def _hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name or "")) and not Path(name).expanduser().exists()


def _losses(run_dir: Path | None) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    if run_dir is None or not (run_dir / "events.jsonl").is_file():
        return [], []
    from engine.core import events
    from engine.core.summary import fold
    s = fold(events.read_events(run_dir / "events.jsonl"))     # each step once, past a resume too
    return sorted(dict(s.losses).items()), sorted(dict(s.evals).items())


def loss_table(steps: list, evals: list, rows: int = 12) -> list[str]:
    """A markdown table of the loss curve: at most ``rows`` evenly spaced steps plus the last."""
    if not steps:
        return ["(no logged steps)"]
    pick = sorted({steps[round(i * (len(steps) - 1) / max(rows - 1, 1))][0] for i in range(min(rows, len(steps)))})
    loss, ev = dict(steps), dict(evals)
    out = ["| step | train loss | eval loss |", "|---:|---:|---:|"]
    for s in sorted(set(pick) | set(ev)):
        tl = f"{loss[s]:.4f}" if s in loss else ""
        el = f"{ev[s]:.4f}" if s in ev else ""
        out.append(f"| {s} | {tl} | {el} |")
    return out


# the key of the card's metadata that marks a card as ours (its value: {"card": kind}); a card is
# recognised by its parsed metadata, never by the words in it (a local base path may hold any)
OURS_KEY = "qlora_tui"


def card_data(base: str, datasets: list[str], kind: str):
    """The card's metadata, built by ``huggingface_hub.ModelCardData`` (valid YAML whatever the
    base or data paths hold; local paths are not hub ids and are left out)."""
    from huggingface_hub import ModelCardData
    tags = ["qlora", "lora", "qlora-tui"] + (["peft"] if kind == "adapter" else []) + \
           (["gguf", "llama.cpp", "ollama"] if kind == "gguf" else [])
    hub_data = [d for d in datasets if _hub_id(d)]
    return ModelCardData(base_model=base if _hub_id(base) else None,
                         library_name={"adapter": "peft", "merged": "transformers"}.get(kind, "gguf"),
                         datasets=hub_data or None, tags=tags, pipeline_tag="text-generation",
                         **{OURS_KEY: {"card": kind}})


def _front_matter(base: str, datasets: list[str], kind: str) -> list[str]:
    return ["---", card_data(base, datasets, kind).to_yaml().rstrip(), "---"]


def is_our_card(path: Path) -> bool:
    """Whether ``path`` is a model card this program wrote (its metadata carries ``OURS_KEY``);
    PEFT's placeholder, a user's card, an unreadable file: False."""
    from huggingface_hub import ModelCard
    try:
        card = ModelCard(_files.read_text(path, limit=_files.JSON_LIMIT), ignore_metadata_errors=True)
        mark = card.data.to_dict().get(OURS_KEY)
    except Exception:  # noqa: BLE001 - any damage: not ours
        return False
    return isinstance(mark, dict) and "card" in mark


def card_text(run_dir: Path | None, adapter_dir: Path, kind: str, files: list[str], export=None,
              command: str = "") -> str:
    cfg, cfg_text = _run_config(run_dir)
    model = cfg.get("model", {}) if isinstance(cfg.get("model"), dict) else {}
    data = cfg.get("data", {}) if isinstance(cfg.get("data"), dict) else {}
    acfg = {}
    try:
        acfg = _files.read_json(adapter_dir / "adapter_config.json")
    except (OSError, ValueError):
        pass
    base = str(model.get("name") or acfg.get("base_model_name_or_path") or "unknown")
    datasets = [str(d) for d in (data.get("train"), data.get("eval")) if d]
    steps, evals = _losses(run_dir)
    name = (run_dir or adapter_dir).name
    what = {"adapter": "a LoRA adapter", "merged": "the merged 16-bit model",
            "gguf": "GGUF files for llama.cpp and Ollama"}[kind]
    lines = _front_matter(base, datasets, kind) + [
        "", f"# {name}", "",
        *([] if _hub_id(base) else [f"The base model `{base}` is not a hub id: add `base_model:` to the "
                                    "metadata above with the one it came from.", ""]),
        "Set `license:` in the metadata above: the base model's terms apply to the weights.", "",
        f"{what[0].upper() + what[1:]}: {_how_trained(cfg, acfg)} of `{base}` on "
        f"{', '.join(f'`{d}`' for d in datasets) or 'local data'}, made with qlora-tui.", "",
        "## Results", "",
        f"- final train loss: {steps[-1][1]:.4f} (step {steps[-1][0]})" if steps else "- final train loss: n/a",
        f"- final eval loss: {evals[-1][1]:.4f} (step {evals[-1][0]})" if evals else "- final eval loss: n/a",
    ]
    if export is not None and export.max_abs_diff is not None:
        lines.append(f"- GGUF {export.gguf_type} verified against the merged checkpoint: max |logit diff| "
                     f"{export.max_abs_diff:.3g} (bound {export.tolerance:.3g}), top-1 agreement "
                     f"{export.top1_agreement:.1%}")
    lines += ["", "## Loss curve", ""] + loss_table(steps, evals)
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in files]
    if export is not None:
        lines += ["", "## Use it", "", "```bash"] + list(export.commands) + ["```"]
    lines += ["", "## How it was made", "", "```bash",
              f"qlora-tui train {run_dir / 'config.toml' if run_dir else 'CONFIG'} --headless"]
    if command:
        lines.append(command)
    lines += ["```"]
    if cfg_text:
        lines += ["", "## Training config", "", "```toml", cfg_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _how_trained(cfg: dict, acfg: dict) -> str:
    """The fine-tune in a few words: the LoRA adapter's shape, or full weights (a method that
    trains them, GaLore)."""
    from engine.artifacts import ArtifactKind, artifact_kind
    train = cfg.get("train", {}) if isinstance(cfg.get("train"), dict) else {}
    method = str(train.get("method") or "qlora")
    if artifact_kind(method) == ArtifactKind.FULL and not acfg:
        return f"a full-weight fine-tune ({method})"
    return (f"a QLoRA fine-tune (4-bit NF4 base, LoRA r={acfg.get('r', '?')}, "
            f"alpha={acfg.get('lora_alpha', '?')})")


def write_card(out_dir: Path, run_dir: Path | None, adapter_dir: Path, kind: str, export=None,
               command: str = "") -> Path:
    out_dir = Path(out_dir)
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name != "README.md") \
        if out_dir.is_dir() else []
    if kind == "gguf":
        files = [f for f in files if f.endswith((".gguf", ".Modelfile"))]
    path = out_dir / "README.md"
    if path.is_symlink() or (path.exists() and not is_our_card(path)):
        raise OSError(f"{path} is not a card qlora-tui wrote; it is left as it is")
    _files.write_atomic(path, card_text(run_dir, adapter_dir, kind, files, export, command))
    return path


# --------------------------------------------------------------------------- push

def push_plan(run_dir: str | Path, what: str = "adapter") -> tuple[Path, dict[str, object], list[str]]:
    """(folder, {name in the repository: local path or the card's bytes}, the names) for ``push``.
    Nothing is written into the folder: the card (README.md) is the folder's own when qlora-tui
    wrote it, else ours built now (PEFT's placeholder is never uploaded); the merge's local record
    (``qlora_merge.json``: absolute local paths) is left out."""
    from engine.artifacts import ArtifactKind, RunArtifact
    if what not in WHAT:
        raise PushError(f"--what {what!r}: use one of {', '.join(WHAT)}")
    art = RunArtifact.open(run_dir, PushError, kind=ArtifactKind.ADAPTER)
    adapter_dir, owner, root = art.output_dir, art.run_dir, art.root
    if what == "adapter":
        folder, patterns = adapter_dir, ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "README.md"]
    elif what == "merged":
        folder, patterns = art.merged_dir, ["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                        "*.model", "README.md"]
        if not (folder / "config.json").is_file():
            raise PushError(f"{folder}: no merged checkpoint; run `qlora-tui export {root} --gguf f16` "
                            f"(it keeps the merge there) or `qlora-tui merge {root} --out {folder}`")
    else:
        folder, patterns = art.exports_dir, ["*.gguf", "*.Modelfile", "README.md"]
        if not list(folder.glob("*.gguf")):
            raise PushError(f"{folder}: no .gguf file; run `qlora-tui export {root} --gguf f16` first")
    import fnmatch
    from engine.artifacts import MERGE_INFO
    upload: dict[str, object] = {
        p.name: p for p in sorted(folder.iterdir())
        if p.is_file() and not p.is_symlink() and p.name not in (MERGE_INFO, "README.md")
        and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)}
    card = folder / "README.md"
    if card.is_file() and not card.is_symlink() and is_our_card(card):
        upload["README.md"] = card
    else:            # none, or PEFT's generic template from save_pretrained: ours, built in memory
        text = card_text(owner, adapter_dir, what, sorted(upload))
        upload["README.md"] = text.encode("utf-8")
    return folder, upload, sorted(upload)


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:240]


def push(run_dir: str | Path, repo_id: str, what: str = "adapter", private: bool = False,
         dry_run: bool = False) -> dict:
    """Upload through huggingface_hub. The token comes from huggingface_hub's own lookup."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id or ""):
        raise PushError(f"repo id {repo_id!r} is not of the form USER/NAME (or ORG/NAME)")
    folder, upload, files = push_plan(run_dir, what)
    plan = {"repo_id": repo_id, "folder": str(folder), "files": files, "private": private, "url": ""}
    if dry_run:
        return plan
    from huggingface_hub import HfApi, get_token
    if not get_token():
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (the token stays in "
                        "huggingface_hub's own cache; qlora-tui never writes it)")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        from huggingface_hub import CommitOperationAdd
        ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=src if isinstance(src, bytes) else str(src))
               for name, src in upload.items()]
        info = api.create_commit(repo_id=repo_id, operations=ops, repo_type="model",
                                 commit_message=f"qlora-tui push ({what})")
    except Exception as e:  # noqa: BLE001 - network, auth, hub errors: one line each
        raise PushError(f"upload to {repo_id} failed: {_one_line(e)} (check the network, HF_TOKEN and "
                        f"that you may write to {repo_id.split('/')[0]})") from None
    plan["url"] = str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")
    return plan
