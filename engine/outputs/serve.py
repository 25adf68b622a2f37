"""The vLLM command that serves one or more trained adapters over their shared base.

Nothing is started here: ``serve_command`` reads each adapter's ``adapter_config.json`` and
prints a ready ``vllm serve`` line (``--enable-lora --max-loras N --max-lora-rank R
--lora-modules name=path ...``) plus an example request. vLLM's OpenAI-compatible server picks
the adapter from the request's ``"model"`` field, so each adapter gets a name.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from engine.artifacts import ArtifactKind, RunArtifact

# ranks vLLM accepts for --max-lora-rank
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class ServeError(ValueError):
    """The adapters cannot be served together; the message is one line."""


def vllm_rank(r: int) -> int:
    """The smallest vLLM-supported --max-lora-rank that holds rank ``r``."""
    for rank in VLLM_RANKS:
        if r <= rank:
            return rank
    raise ServeError(f"LoRA rank {r} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]}); "
                     f"merge the adapter instead (qlora-tui merge)")


def adapter_rank(acfg: dict) -> int:
    """The largest rank in an adapter: ``r`` and any per-module ``rank_pattern`` override."""
    ranks = [int(acfg.get("r") or 8)]
    pattern = acfg.get("rank_pattern") or {}
    if isinstance(pattern, dict):
        ranks += [int(v) for v in pattern.values() if isinstance(v, (int, float))]
    return max(ranks)


def sanitize_name(text: str) -> str:
    """A LoRA name vLLM and shells accept: letters, digits, '.', '_', '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return name or "adapter"


def default_name(src: str | Path, adapter_dir: Path) -> str:
    """The run directory's name (``runs/2026...-tiny/adapter`` → ``2026...-tiny``); a checkpoint
    gets its run's name plus the checkpoint (``...-tiny-checkpoint-500``)."""
    p = Path(src).expanduser().resolve()
    a = adapter_dir.resolve()
    if a.name == "adapter" and a != p:
        return sanitize_name(p.name)
    if a.name == "adapter":
        return sanitize_name(a.parent.name)
    if a.name.startswith("checkpoint-") and a.parent.name == "checkpoints":
        return sanitize_name(f"{a.parent.parent.name}-{a.name}")
    return sanitize_name(a.name)


def _same_base(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def plan(adapters: list[str], names: list[str] | None = None) -> dict:
    """Resolve the adapters: base, ranks, names and absolute paths; refuse mixed bases."""
    if not adapters:
        raise ServeError("no adapters given; pass one or more run directories or adapter directories")
    if names and len(names) != len(adapters):
        raise ServeError(f"{len(names)} --name value(s) for {len(adapters)} adapter(s); give one "
                         f"name per adapter, in the same order, or none")
    entries = []
    for i, src in enumerate(adapters):
        art = RunArtifact.open(src, ServeError, kind=ArtifactKind.ADAPTER)
        adapter_dir, acfg = art.output_dir, art.adapter_config
        base = art.base.strip()
        if not base:
            raise ServeError(f"{adapter_dir / 'adapter_config.json'}: no base_model_name_or_path; "
                             f"set it to the model the adapter was trained on")
        if names:
            name = names[i]
            if sanitize_name(name) != name:
                raise ServeError(f"--name {name!r}: use only letters, digits, '.', '_' and '-' "
                                 f"(e.g. {sanitize_name(name)!r})")
        else:
            name = default_name(src, adapter_dir)
        entries.append({"src": str(src), "name": name, "path": str(adapter_dir.resolve()),
                        "base": base, "r": adapter_rank(acfg),
                        "use_dora": bool(acfg.get("use_dora")),
                        "modules_to_save": acfg.get("modules_to_save") or []})
    first = entries[0]
    for e in entries[1:]:
        if not _same_base(e["base"], first["base"]):
            raise ServeError(f"adapters have different bases: {first['src']} was trained on "
                             f"{first['base']} but {e['src']} on {e['base']}; one vLLM server "
                             f"serves adapters of one base, start one server per base")
    seen: dict[str, int] = {}
    for e in entries:
        if e["name"] in seen:
            if names:
                raise ServeError(f"--name {e['name']!r} is given twice; adapter names must be unique")
            seen[e["name"]] += 1
            e["name"] = f"{e['name']}-{seen[e['name']]}"
        seen.setdefault(e["name"], 1)
    max_r = max(e["r"] for e in entries)
    return {"base": first["base"], "adapters": entries, "max_r": max_r,
            "max_lora_rank": vllm_rank(max_r), "max_loras": len(entries)}


def serve_command(adapters: list[str], names: list[str] | None = None, port: int = 8000) -> str:
    """The ``vllm serve`` command for ``adapters`` (run or adapter dirs) and an example request.

    Raises ``ServeError`` for adapters of different bases, a missing adapter, a bad name.
    """
    if not (1 <= int(port) <= 65535):
        raise ServeError(f"--port {port}: must be 1 to 65535")
    from engine.methods import galore
    full = [a for a in adapters if galore.full_checkpoint_dir(a) is not None]
    if full and len(adapters) == 1:
        return galore.serve_command(galore.full_checkpoint_dir(full[0]), port)
    if full:
        raise ServeError(f"{full[0]} is a full checkpoint (train.method = galore), not an adapter: "
                         f"serve it on its own (qlora-tui serve-cmd {full[0]})")
    p = plan(adapters, names)
    q = shlex.quote
    modules = " ".join(q(f"{e['name']}={e['path']}") for e in p["adapters"])
    lines = [
        "# serve the base with the adapters; each request picks one by name",
        f"vllm serve {q(p['base'])} \\",
        "  --enable-lora \\",
        f"  --max-loras {p['max_loras']} --max-lora-rank {p['max_lora_rank']} \\",
        f"  --lora-modules {modules} \\",
        f"  --port {int(port)}",
    ]
    if p["max_lora_rank"] != p["max_r"]:
        lines.append(f"# largest adapter rank is {p['max_r']}; rounded up to {p['max_lora_rank']}, "
                     f"the next rank vLLM supports")
    for e in p["adapters"]:
        if e["use_dora"]:
            lines.append(f"# warning: {e['name']} is a DoRA adapter; if vLLM refuses it, merge it "
                         f"(qlora-tui merge {e['src']} --out DIR) and serve the merged model")
        if e["modules_to_save"]:
            lines.append(f"# warning: {e['name']} also saves full modules "
                         f"({', '.join(map(str, e['modules_to_save']))}); vLLM may ignore or refuse "
                         f"them: merge it if the outputs differ")
    name = p["adapters"][0]["name"]
    body = json.dumps({"model": name,
                       "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 64})
    lines += [
        "",
        f"# example request: \"model\" selects the adapter ({', '.join(e['name'] for e in p['adapters'])}); "
        f"the base's own name ({p['base']}) answers without any adapter",
        f"curl http://localhost:{int(port)}/v1/chat/completions \\",
        "  -H 'Content-Type: application/json' \\",
        f"  -d {q(body)}",
        "",
        f"# OpenAI Python client: client.chat.completions.create(model={name!r}, messages=[...])",
        f"# note: the server picks the adapter by \"model\" as above; extra_body="
        f"{{\"lora_request\": {{\"name\": {json.dumps(name)}}}}}, which some examples pass, is vLLM's "
        f"offline API (LLM.generate(..., lora_request=LoRARequest({name!r}, 1, path)))",
    ]
    return "\n".join(lines)
