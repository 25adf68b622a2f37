"""Model cards (README.md with Hugging Face metadata) and ``qlora-tui push``.

``merge`` and ``export`` call ``write_card`` next to their outputs; ``push`` uploads the
adapter, the merged checkpoint or the GGUF files through ``huggingface_hub`` with the token
from its usual places (``HF_TOKEN``, ``hf auth login``'s cache): we never read it into a file.
"""
from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

WHAT = ("adapter", "merged", "gguf")


class PushError(ValueError):
    """The upload cannot run or failed; the message is one line."""


# --------------------------------------------------------------------------- the card

def _run_config(run_dir: Path | None) -> tuple[dict, str]:
    if run_dir is None:
        return {}, ""
    try:
        text = (run_dir / "config.toml").read_text(encoding="utf-8")
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


def _front_matter(base: str, datasets: list[str], kind: str) -> list[str]:
    lines = ["---"]
    if _hub_id(base):
        lines.append(f"base_model: {base}")
    else:
        lines.append(f"# base model {json.dumps(base)} is not a hub id; set base_model: to the one it came from")
    lines.append("library_name: " + {"adapter": "peft", "merged": "transformers"}.get(kind, "gguf"))
    lines.append("license:   # set the license (the base model's terms apply to the weights)")
    hub_data = [d for d in datasets if _hub_id(d)]
    if hub_data:
        lines.append("datasets:")
        lines += [f"  - {d}" for d in hub_data]
    tags = ["qlora", "lora", "qlora-tui"] + (["peft"] if kind == "adapter" else []) + \
           (["gguf", "llama.cpp", "ollama"] if kind == "gguf" else [])
    lines.append("tags:")
    lines += [f"  - {t}" for t in tags]
    lines.append("pipeline_tag: text-generation")
    lines.append("---")
    return lines


def card_text(run_dir: Path | None, adapter_dir: Path, kind: str, files: list[str], export=None,
              command: str = "") -> str:
    cfg, cfg_text = _run_config(run_dir)
    model = cfg.get("model", {}) if isinstance(cfg.get("model"), dict) else {}
    data = cfg.get("data", {}) if isinstance(cfg.get("data"), dict) else {}
    acfg = {}
    try:
        acfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        pass
    base = str(model.get("name") or acfg.get("base_model_name_or_path") or "unknown")
    datasets = [str(d) for d in (data.get("train"), data.get("eval")) if d]
    steps, evals = _losses(run_dir)
    name = (run_dir or adapter_dir).name
    what = {"adapter": "a LoRA adapter", "merged": "the merged 16-bit model",
            "gguf": "GGUF files for llama.cpp and Ollama"}[kind]
    lines = _front_matter(base, datasets, kind) + [
        "", f"# {name}", "",
        f"{what[0].upper() + what[1:]}: a QLoRA fine-tune (4-bit NF4 base, LoRA r={acfg.get('r', '?')}, "
        f"alpha={acfg.get('lora_alpha', '?')}) of `{base}` on {', '.join(f'`{d}`' for d in datasets) or 'local data'}, "
        f"made with qlora-tui.", "",
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


def write_card(out_dir: Path, run_dir: Path | None, adapter_dir: Path, kind: str, export=None,
               command: str = "") -> Path:
    out_dir = Path(out_dir)
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name != "README.md") \
        if out_dir.is_dir() else []
    if kind == "gguf":
        files = [f for f in files if f.endswith((".gguf", ".Modelfile"))]
    path = out_dir / "README.md"
    path.write_text(card_text(run_dir, adapter_dir, kind, files, export, command), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- push

def push_plan(run_dir: str | Path, what: str = "adapter") -> tuple[Path, list[str], list[str]]:
    """(folder, allow_patterns, files that would be uploaded) for ``push``; writes the card
    into the folder when it has none."""
    from engine.outputs.merge import find_adapter_dir, run_dir_of
    if what not in WHAT:
        raise PushError(f"--what {what!r}: use one of {', '.join(WHAT)}")
    adapter_dir = find_adapter_dir(run_dir, PushError)
    owner = run_dir_of(run_dir, adapter_dir)
    root = owner or adapter_dir.parent
    if what == "adapter":
        folder, patterns = adapter_dir, ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "README.md"]
    elif what == "merged":
        folder, patterns = root / "export" / "merged", ["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                        "*.model", "README.md"]
        if not (folder / "config.json").is_file():
            raise PushError(f"{folder}: no merged checkpoint; run `qlora-tui export {root} --gguf f16` "
                            f"(it keeps the merge there) or `qlora-tui merge {root} --out {folder}`")
    else:
        folder, patterns = root / "export", ["*.gguf", "*.Modelfile", "README.md"]
        if not list(folder.glob("*.gguf")):
            raise PushError(f"{folder}: no .gguf file; run `qlora-tui export {root} --gguf f16` first")
    card = folder / "README.md"
    try:
        ours = "qlora-tui" in card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        ours = False
    if not ours:     # none yet, or PEFT's generic template from save_pretrained
        write_card(folder, owner, adapter_dir, what)
    import fnmatch
    files = sorted(str(p.relative_to(folder)) for p in folder.iterdir()
                   if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns))
    return folder, patterns, files


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:240]


def push(run_dir: str | Path, repo_id: str, what: str = "adapter", private: bool = False,
         dry_run: bool = False) -> dict:
    """Upload through huggingface_hub. The token comes from huggingface_hub's own lookup."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id or ""):
        raise PushError(f"repo id {repo_id!r} is not of the form USER/NAME (or ORG/NAME)")
    folder, patterns, files = push_plan(run_dir, what)
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
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, allow_patterns=patterns,
                                 commit_message=f"qlora-tui push ({what})")
    except Exception as e:  # noqa: BLE001 - network, auth, hub errors: one line each
        raise PushError(f"upload to {repo_id} failed: {_one_line(e)} (check the network, HF_TOKEN and "
                        f"that you may write to {repo_id.split('/')[0]})") from None
    plan["url"] = str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")
    return plan
