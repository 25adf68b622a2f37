"""``qlora-tui export``: a run as a GGUF file for llama.cpp and Ollama, verified.

The model path reuses ``merge`` (16-bit/fp32 merge, itself verified against base + adapter),
writes the merged checkpoint as GGUF (``engine.outputs.gguf_write``), then reads the GGUF back with
transformers (``gguf_file=``): the tokenizer must encode the check prompts to the same ids and
the logits must match the merged checkpoint within the type's bound. An Ollama ``Modelfile``
and a model card (README.md) are written next to the file, the commands to use it printed, and
the result appended to the run's ``events.jsonl`` (an ``export`` event).

``--adapter-gguf`` writes the LoRA adapter alone as a llama.cpp adapter GGUF (``--lora``,
Ollama ``ADAPTER``); no merge is needed.
"""
from __future__ import annotations

import json
import re
import shlex
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from engine.artifacts import AdapterError, ArtifactKind, RunArtifact
from engine.core import files as _files
from engine.core.events import Event, ExportProgress, ExportStage
from engine.outputs import gguf_write
from engine.outputs.merge import CHECK_PROMPTS, compare_logits, merge, model_logits, prompt_texts

# progress: (stage, fraction of the whole export, message)
Progress = Callable[[ExportStage, float, str], None]


class ExportError(AdapterError):
    """The export cannot run or its result failed verification; the message is one line."""


@dataclass
class ExportReport:
    path: str
    kind: str                        # model | adapter
    gguf_type: str
    arch: str
    size_bytes: int
    tensors: int
    seconds: float
    merged_dir: str = ""
    max_abs_diff: float | None = None
    tolerance: float | None = None
    top1_agreement: float | None = None
    tokenizer_roundtrip: bool | None = None
    prompts: int = 0
    modelfile: str = ""
    card: str = ""
    commands: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"GGUF {self.kind} ({self.gguf_type}, {self.arch}): {self.path}",
               f"  size:     {self.size_bytes / 1e6:.1f} MB, {self.tensors} tensors, {self.seconds:.1f}s"]
        if self.max_abs_diff is not None:
            out.append(f"  verified: read back with transformers (gguf_file=): tokenizer ids identical on "
                       f"{self.prompts} prompts; max |logit diff| vs the merged checkpoint "
                       f"{self.max_abs_diff:.3g} <= {self.tolerance:.3g}; top-1 agreement "
                       f"{self.top1_agreement:.1%}")
        if self.merged_dir:
            out.append(f"  merged:   {self.merged_dir}")
        if self.modelfile:
            out.append(f"  Modelfile: {self.modelfile}")
        if self.card:
            out.append(f"  card:     {self.card}")
        out.append("  use it:")
        out += [f"    {c}" for c in self.commands]
        out += [f"  warning:  {w}" for w in self.warnings]
        return out


# --------------------------------------------------------------------------- helpers

def _read_json(path: Path, err=ExportError) -> dict:
    try:
        return _files.read_json(path)
    except (OSError, ValueError) as e:
        raise err(f"{path}: cannot read ({e})") from None


def run_rows(run_dir: Path | None, n: int = 200) -> list[dict]:
    """Up to ``n`` rows of the run's train data (for check prompts and the system prompt)."""
    if run_dir is None:
        return []
    from engine.outputs.generate import run_data_path, read_prompt_rows
    try:
        data = tomllib.loads(_files.read_text(run_dir / "config.toml")).get("data", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []
    path = run_data_path(str(data.get("train") or ""), run_dir) if isinstance(data, dict) else None
    if path is None or not path.is_file() or path.suffix not in (".jsonl", ".json"):
        return []
    return [r for r in read_prompt_rows(path, False, n)[:n] if isinstance(r, dict)]


def system_prompt(rows: list[dict]) -> str:
    """The system message most rows of the data share, if more than half of those with one agree."""
    counts: dict[str, int] = {}
    for row in rows:
        msgs = row.get("messages") or row.get("conversations") or []
        first = msgs[0] if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) else {}
        if first.get("role", first.get("from")) == "system":
            text = str(first.get("content", first.get("value", ""))).strip()
            if text:
                counts[text] = counts.get(text, 0) + 1
    if not counts:
        return ""
    text, n = max(counts.items(), key=lambda kv: kv[1])
    return text if n * 2 > sum(counts.values()) else ""


def default_name(run_dir: Path | None, adapter_dir: Path) -> str:
    import re
    base = (run_dir or adapter_dir).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-").lower() or "model"


def _export_dir(out: str | Path | None, run_dir: Path | None, adapter_dir: Path, name: str,
                gguf_type: str, adapter: bool) -> Path:
    suffix = f"-lora-{gguf_type}.gguf" if adapter else f"-{gguf_type}.gguf"
    if out:
        p = Path(out).expanduser()
        return p if p.suffix == ".gguf" else p / f"{name}{suffix}"
    root = (run_dir or adapter_dir.parent) / "export"
    return root / f"{name}{suffix}"


def _merged_dir(path: Path, adapter_dir: Path, src, base, progress: Progress) -> Path:
    """A merged checkpoint of this adapter next to the GGUF: reused when already there."""
    merged = path.parent / "merged"
    info = merged / "qlora_merge.json"
    if info.is_file():
        try:
            same = _files.read_json(info).get("adapter") == str(adapter_dir.resolve())
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            progress(ExportStage.MERGE, 0.35, f"reusing the merged checkpoint {merged}")
            return merged
        raise ExportError(f"{merged} holds a merge of another adapter; pass --out with a new directory")
    merge(src, merged, dtype="auto", base=base,
          on_progress=lambda f, m: progress(ExportStage.MERGE, 0.35 * f, m))
    return merged


# --------------------------------------------------------------------------- verification

def verify(merged: Path, path: Path, tok, texts: list[str], gguf_type: str) -> dict:
    """Read the GGUF back with transformers: same token ids as the original tokenizer on every
    check text, and logits within the type's bound of the merged checkpoint's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()     # our own progress lines only
    try:
        g_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path}: transformers cannot read its tokenizer back: "
                          f"{str(e).splitlines()[0][:200]}") from None
    for text in texts:
        want = tok(text, add_special_tokens=True).input_ids
        got = g_tok(text, add_special_tokens=True).input_ids
        if want != got:
            raise ExportError(f"{path}: the GGUF tokenizer does not round-trip: {text[:40]!r} encodes to "
                              f"{got[:8]}... instead of {want[:8]}...; this tokenizer cannot be exported")
    encoded = [torch.tensor([tok(t, add_special_tokens=True).input_ids[:128]]) for t in texts]
    encoded = [e for e in encoded if e.shape[1] > 0]
    ref_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    ref = model_logits(ref_model, encoded)
    del ref_model
    try:
        g_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                       dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path}: transformers cannot load it back: {str(e).splitlines()[0][:200]}") from None
    got = model_logits(g_model, encoded)
    del g_model
    diff, tol, agree, total = compare_logits(ref, got, *gguf_write.TYPES[gguf_type].tolerance)
    result = {"max_abs_diff": diff, "tolerance": tol, "top1_agreement": agree / total if total else 1.0,
              "prompts": len(encoded), "tokenizer_roundtrip": True}
    if not diff <= tol:
        raise ExportError(f"verification failed: {path.name} logits differ from the merged checkpoint by "
                          f"{diff:.4g} (> bound {tol:.4g} for {gguf_type}); the file was removed")
    return result


# --------------------------------------------------------------------------- Ollama / llama.cpp

_OLLAMA_TEMPLATES = {
    "chatml": ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n'),
    "llama3": ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
               '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n'),
    # Gemma has no system role: like its Jinja template, a system message opens the first user turn
    "gemma": ('{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}'
              '{{- else }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
              '{{ if and $system (eq .Role "user") }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
              '{{ .Content }}<end_of_turn>\n{{ end }}{{- end }}<start_of_turn>model\n'),
    "phi3": ('{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n'),
    # Llama 2: the system prompt in <<SYS>> inside the first user turn; every later user turn opens with
    # its own <s> (the first one's is llama.cpp's BOS), an answer is " ANSWER </s>"
    "llama2": ('{{- $first := true }}{{- range .Messages }}{{ if eq .Role "user" }}{{ if not $first }}<s>{{ end }}'
               '[INST] {{ if and $first $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ .Content }} '
               '[/INST]{{ $first = false }}{{ else if eq .Role "assistant" }} {{ .Content }} </s>{{ end }}{{ end }}'),
    # Mistral's three shapes. Like their Jinja templates, v0.3 and Nemo put the system prompt in the
    # last user turn ("[INST]SYSTEM\n\nUSER[/INST]"); the last message is the one whose tail
    # `slice $.Messages $i` has length 1 (Ollama's own Mistral templates test it the same way).
    # Nemo (tekken): [INST]text[/INST]answer</s>
    "mistral": ('{{- range $i, $_ := .Messages }}{{ if eq .Role "user" }}[INST]'
                '{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}'
                '{{ .Content }}[/INST]{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}'),
    # v0.3: [INST] text[/INST] answer</s>
    "mistral_v3": ('{{- range $i, $_ := .Messages }}{{ if eq .Role "user" }}[INST] '
                   '{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}'
                   '{{ .Content }}[/INST]{{ else if eq .Role "assistant" }} {{ .Content }}</s>{{ end }}{{ end }}'),
    # v0.1 / v0.2: [INST] text [/INST]answer</s> (their Jinja refuses a system message; here it opens
    # the last user turn as in v0.3)
    "mistral_v1": ('{{- range $i, $_ := .Messages }}{{ if eq .Role "user" }}[INST] '
                   '{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}'
                   '{{ .Content }} [/INST]{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}'),
}


def template_family(jinja: str) -> str | None:
    if "<|im_start|>" in jinja and "<|im_end|>" in jinja:
        return "chatml"
    if "<|start_header_id|>" in jinja and "<|eot_id|>" in jinja:
        return "llama3"
    if "<start_of_turn>" in jinja and "<end_of_turn>" in jinja:
        return "gemma"
    if "<|assistant|>" in jinja and "<|end|>" in jinja:
        return "phi3"
    if "[INST]" in jinja and "[/INST]" in jinja and "<<SYS>>" in jinja:
        return "llama2"
    if "[INST]" in jinja and "[/INST]" in jinja:
        if re.search(r"""['"] \[/INST\]""", jinja):          # "' [/INST]'": a space before the close
            return "mistral_v1"
        return "mistral_v3" if "[INST] " in jinja else "mistral"
    return None


# a default system prompt written into a ChatML template (Qwen2.5's "You are Qwen, created by ..."),
# used when the chat has none
_CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}<>\\]+)<\|im_end\|>")


def ollama_template(jinja: str) -> str | None:
    """The Go template (Ollama's TEMPLATE) that renders as the Jinja chat template ``jinja`` does,
    or None for a template of no family translated here."""
    family = template_family(jinja or "")
    if family is None:
        return None
    go = _OLLAMA_TEMPLATES[family]
    default = _CHATML_DEFAULT_SYSTEM.search(jinja) if family == "chatml" else None
    if default:
        go = f"{{{{- if not .System }}}}<|im_start|>system\n{default.group(1)}<|im_end|>\n{{{{ end }}}}" + go
    return go


def template_warning(vocab: gguf_write.Vocab) -> str:
    """The one line said when the model's chat template has no Ollama translation here ("" if it
    has one, or the model has no chat template)."""
    if not vocab.chat_template or ollama_template(vocab.chat_template):
        return ""
    return ("the Modelfile has no TEMPLATE: the chat template is none of the families translated to "
            "Ollama's Go syntax (ChatML/Qwen, Llama 2, Llama 3, Gemma, Phi-3, Mistral v0.1/v0.3/Nemo); Ollama falls "
            "back to the Jinja template stored in the GGUF (tokenizer.chat_template) when it recognises it")


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile_text(from_: str, vocab: gguf_write.Vocab, system: str, adapter: str | None = None,
                   note: str = "") -> str:
    """An Ollama Modelfile. Comments stand on lines of their own: Ollama's parser takes the rest
    of a ``FROM`` line (a ``# ...`` included) as the path."""
    lines = ["# Ollama Modelfile written by qlora-tui export"] + ([f"# {note}"] if note else []) + [f"FROM {from_}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    template = ollama_template(vocab.chat_template)
    if template:
        lines.append(f"TEMPLATE {_quote(template)}")
    elif vocab.chat_template:
        lines.append("# " + template_warning(vocab))
    for stop in vocab.stop_tokens:
        lines.append("PARAMETER stop " + json.dumps(stop))
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    return "\n".join(lines) + "\n"


def use_commands(path: Path, name: str, modelfile: Path, adapter_base: str | None = None) -> list[str]:
    q = shlex.quote
    if adapter_base is not None:
        return [f"llama-cli -m BASE.gguf --lora {q(str(path))} -cnv   # BASE.gguf: {adapter_base} as GGUF",
                f"ollama create {q(name)} -f {q(str(modelfile))}   # edit FROM in the Modelfile first"]
    return [f"llama-cli -m {q(str(path))} -cnv",
            f"llama-server -m {q(str(path))} --port 8080",
            f"ollama create {q(name)} -f {q(str(modelfile))} && ollama run {q(name)}",
            f"scp HOST:{q(str(path.resolve()))} .   # one file holds weights, tokenizer and chat template"]


# --------------------------------------------------------------------------- export

@dataclass
class _Source:
    """The run's artifact (a LoRA adapter) and the name its files get."""
    src: str
    art: RunArtifact
    name: str

    @property
    def adapter_dir(self) -> Path:
        return self.art.output_dir

    @property
    def acfg(self) -> dict:
        return self.art.adapter_config

    @property
    def run_dir(self) -> Path | None:
        return self.art.run_dir


def _source(src, name: str | None, adapter: bool) -> _Source:
    """The source's artifact: a LoRA adapter, or for a model export also a full checkpoint (a
    GaLore run: written as it is, no merge)."""
    art = src if isinstance(src, RunArtifact) else RunArtifact.open(src, ExportError)
    if adapter or art.kind != ArtifactKind.FULL:
        art.require_adapter(ExportError, "--adapter-gguf" if adapter else "export")
    return _Source(str(art.src), art, name or default_name(art.run_dir, art.output_dir))


def progress_events(emit: Callable[[Event], None] | None, target: str) -> Progress:
    """The export's progress as ``ExportProgress`` events of ``target`` (nothing when ``emit`` is None)."""
    def progress(stage: ExportStage, fraction: float, message: str) -> None:
        if emit is not None:
            emit(ExportProgress(target=target, stage=stage, done=round(float(fraction), 4), total=1.0,
                                message=str(message)))
    return progress


def _prepare_target(path: Path, force: bool) -> None:
    """The .gguf and its Modelfile, checked before any work: never a symlink or a folder,
    an existing file only with ``force``."""
    for p in (path, path.with_suffix(".Modelfile")):
        if p.exists() and not p.is_symlink() and p.is_file() and not force:
            raise ExportError(f"{p} already exists; pass --force to overwrite it or --out elsewhere")
        try:
            _files.check_output(p, what="export", allow_empty_dir=False, overwrite_file=True)
        except OSError as e:
            raise ExportError(str(e)) from None
    path.parent.mkdir(parents=True, exist_ok=True)


def _begin(src, gguf_type: str, out, name, force: bool, emit, target: str, adapter: bool):
    """What both exports start with: the checked type, the source, the target file (refused when
    it exists without ``force``). Returns (start time, progress callback, type, source, path)."""
    t0 = time.time()
    progress = progress_events(emit, target)
    gguf_type = _checked(gguf_type)
    s = _source(src, name, adapter)
    path = _export_dir(out, s.run_dir, s.adapter_dir, s.name, gguf_type, adapter=adapter)
    _prepare_target(path, force)
    return t0, progress, gguf_type, s, path


def export_model(src, gguf_type: str = "f16", out=None, base: str | None = None, name: str | None = None,
                 force: bool = False, emit: Callable[[Event], None] | None = None,
                 target: str = "gguf") -> ExportReport:
    """Merge (or reuse the merge), write the GGUF, verify it, write the Modelfile and card.
    ``src``: a run dir, an adapter dir or its ``RunArtifact``; ``emit`` gets ``ExportProgress``."""
    t0, progress, gguf_type, s, path = _begin(src, gguf_type, out, name, force, emit, target, adapter=False)
    progress(ExportStage.CHECK, 0.0, f"exporting {s.adapter_dir} as GGUF {gguf_type}")
    if s.art.full_dir is not None:       # the weights themselves: nothing to merge
        merged = s.art.full_dir
        progress(ExportStage.MERGE, 0.35, f"a full checkpoint (train.method = {s.art.method}): written as it is")
    else:
        _preflight(s, base)
        merged = _merged_dir(path, s.adapter_dir, s.src, base, progress)
    cfg = _read_json(merged / "config.json")
    arch, permute = _guard(gguf_write.architecture_of, cfg, str(merged / "config.json"))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(merged))
    vocab = _guard(gguf_write.read_vocab, tok, int(gguf_write.text_config(cfg)["vocab_size"]), str(merged))
    tensors = _guard(gguf_write.plan_model, merged, cfg, arch, permute, gguf_type)
    total = sum(gguf_write.tensor_nbytes(t.shape, t.qtype) for t in tensors)
    prog = gguf_write.Progress(lambda f, m: progress(ExportStage.WRITE, f, m), total, 0.4, 0.4,
                               int(gguf_write.text_config(cfg)["num_hidden_layers"]))

    def kv(w):
        w.add_name(s.name)
        gguf_write.add_file_type(w, gguf_type)
        gguf_write.add_hparams(w, cfg, arch, str(merged))
        gguf_write.add_vocab(w, vocab)

    size = _guard(gguf_write.write_gguf, path, arch, kv, tensors, prog)
    progress(ExportStage.VERIFY, 0.8, "reading the GGUF back with transformers")
    rows = run_rows(s.run_dir)
    texts = prompt_texts(tok, rows[:3]) + list(CHECK_PROMPTS[:2])
    try:
        check = verify(merged, path, tok, texts, gguf_type)
    except ExportError:
        path.unlink(missing_ok=True)
        raise
    modelfile = path.with_suffix(".Modelfile")         # one per file: exports of several types coexist
    _files.write_atomic(modelfile, modelfile_text(f"./{path.name}", vocab, system_prompt(rows)))
    report = ExportReport(path=str(path), kind="model", gguf_type=gguf_type, arch=arch, size_bytes=size,
                          tensors=len(tensors), seconds=0.0, merged_dir=str(merged), modelfile=str(modelfile),
                          commands=use_commands(path, s.name, modelfile), **check)
    report.warnings += [w for w in [template_warning(vocab)] if w]
    _finish(report, s, t0, progress)
    return report


def export_adapter(src, gguf_type: str = "f16", out=None, base: str | None = None, name: str | None = None,
                   force: bool = False, emit: Callable[[Event], None] | None = None,
                   target: str = "gguf-adapter") -> ExportReport:
    """The LoRA adapter alone as a llama.cpp adapter GGUF (general.type = adapter)."""
    _guard(gguf_write.check_adapter_type, gguf_type)
    t0, progress, gguf_type, s, path = _begin(src, gguf_type, out, name, force, emit, target, adapter=True)
    progress(ExportStage.CHECK, 0.0, f"exporting the adapter {s.adapter_dir} as GGUF {gguf_type}")
    base_name = _base_name(s, base)
    cfg = _base_config(base_name)
    arch, permute = _guard(gguf_write.architecture_of, cfg, f"base model {base_name}")
    where = str(s.adapter_dir / "adapter_config.json")
    alpha = _guard(gguf_write.lora_scale_alpha, s.acfg, where)
    tensors = _guard(gguf_write.plan_adapter, s.adapter_dir, s.acfg, cfg, arch, permute, gguf_type)
    total = sum(gguf_write.tensor_nbytes(t.shape, t.qtype) for t in tensors)
    prog = gguf_write.Progress(lambda f, m: progress(ExportStage.WRITE, f, m), total, 0.1, 0.8,
                               int(gguf_write.text_config(cfg)["num_hidden_layers"]))

    def kv(w):
        w.add_type("adapter")
        w.add_name(s.name)
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", alpha)
        gguf_write.add_file_type(w, gguf_type)

    size = _guard(gguf_write.write_gguf, path, arch, kv, tensors, prog)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(s.art.tokenizer_source(base_name))
    vocab = _guard(gguf_write.read_vocab, tok, int(gguf_write.text_config(cfg)["vocab_size"]), str(s.adapter_dir))
    modelfile = path.with_suffix(".Modelfile")
    _files.write_atomic(modelfile, modelfile_text("BASE.gguf", vocab, system_prompt(run_rows(s.run_dir)),
                                                  adapter=f"./{path.name}",
                                                  note="BASE.gguf: the base model as GGUF; edit the FROM line"))
    report = ExportReport(path=str(path), kind="adapter", gguf_type=gguf_type, arch=arch, size_bytes=size,
                          tensors=len(tensors), seconds=0.0, modelfile=str(modelfile),
                          commands=use_commands(path, s.name, modelfile, adapter_base=base_name),
                          warnings=[w for w in [template_warning(vocab)] if w])
    _finish(report, s, t0, progress)
    return report


def _base_name(s: _Source, base: str | None) -> str:
    return s.art.resolve_base(base, ExportError)


def _preflight(s: _Source, base: str | None) -> None:
    """Refuse an unsupported architecture or tokenizer before the (long) merge."""
    base_name = _base_name(s, base)
    cfg = _base_config(base_name)
    _guard(gguf_write.architecture_of, cfg, f"base model {base_name}")
    from transformers import AutoTokenizer
    source = s.art.tokenizer_source(base_name)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"tokenizer of {source}: cannot load: {str(e).splitlines()[0][:200]}") from None
    _guard(gguf_write.read_vocab, tok, int(gguf_write.text_config(cfg)["vocab_size"]), source)


def _checked(gguf_type: str) -> str:
    return _guard(gguf_write.check_type, gguf_type)


def _guard(fn, *args):
    """Call a gguf_write step; its GGUFError becomes an ExportError (one line)."""
    try:
        return fn(*args)
    except gguf_write.GGUFError as e:
        raise ExportError(str(e)) from None


def _base_config(base_name: str) -> dict:
    p = Path(base_name)
    if (p / "config.json").is_file():
        return _read_json(p / "config.json")
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(base_name).to_dict()
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"base model {base_name}: cannot read its config ({str(e).splitlines()[0][:200]})") from None


def _finish(report: ExportReport, s: _Source, t0: float, progress: Progress) -> None:
    progress(ExportStage.FILES, 0.95, "writing the model card and the run's record")
    report.seconds = time.time() - t0
    try:
        from engine.outputs import modelcard
        flag = "--adapter-gguf " if report.kind == "adapter" else ""
        command = f"qlora-tui export {shlex.quote(s.src)} {flag}--gguf {report.gguf_type}"
        report.card = str(modelcard.write_card(Path(report.path).parent, s.run_dir, s.adapter_dir,
                                               kind="gguf", export=report, command=command))
    except (ImportError, OSError):       # a README.md that is not ours is left as it is
        pass
    if s.run_dir is not None:
        from engine.core import events
        import dataclasses
        names = {f.name for f in dataclasses.fields(events.Exported)} - {"time"}
        writer = events.JsonlWriter(s.run_dir / "events.jsonl")
        writer(events.Exported(**{k: v for k, v in report.to_dict().items() if k in names}))
        writer.close()
    progress(ExportStage.DONE, 1.0, "done")
