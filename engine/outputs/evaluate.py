"""``qlora-tui eval RUN [--data FILE]``: did the fine-tune help? Base vs fine-tuned on held-out rows.

The model is loaded once (``generate._load``: a ``PeftModel``; its ``disable_adapter()`` is the
base). On every row, encoded exactly as training encodes it (``encode_dataset``: the chat template,
loss on the assistant tokens only), the mean loss per answer token and its perplexity, for both.
On rows that end in an answer (a last assistant turn: chat rows, prompt/completion, Alpaca,
ShareGPT), both models answer the prompt greedily and are scored by exact match and by whether
the answer contains the reference (case and whitespace folded).

Data: ``--data FILE`` (any format ``inspect`` reads), else the run's ``data.eval`` file, else the
same held-out split training made (``data.eval_fraction``, seeded by ``train.seed``).

Optional: ``lm_eval_tasks`` runs EleutherAI lm-evaluation-harness tasks on the same loaded model,
adapter off (base) and on, when the ``lm-eval`` package is installed (``qlora-tui[lm-eval]``). An
item that is a task YAML (or a folder of them) is a local task: its data is a file on this machine
(``dataset_path: json`` + ``dataset_kwargs.data_files``), no network. lm-eval's own tasks download
their data sets from the Hub: they need the network (or a warm ``HF_DATASETS_CACHE``); a task whose
data cannot be fetched fails with lm-eval's error on one line. Nothing here imports textual or rich.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.artifacts import AdapterError, ArtifactKind, RunArtifact


class EvalError(AdapterError):
    """Evaluation cannot run; the message is one line."""


@dataclass
class Side:
    loss: float
    perplexity: float
    exact: int = 0
    contains: int = 0


@dataclass
class EvalReport:
    data: str
    rows: int
    tokens: int                     # answer tokens the loss is averaged over
    answered: int                   # rows both models answered (exact match / contains)
    base: Side
    tuned: Side
    seconds: float = 0.0
    samples: list = field(default_factory=list)      # a few {prompt, reference, base, tuned}
    per_row: list = field(default_factory=list)      # [base, tuned] mean answer-token loss of each row
    lm_eval: dict = field(default_factory=dict)
    path: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> list[str]:
        rows = table_rows(self.to_dict())
        w = max(len(r[0]) for r in rows)
        out = [f"eval on {self.data}: {self.rows} rows, {self.tokens} answer tokens, "
               f"{self.answered} answered by both models ({self.seconds:.1f}s)",
               f"  {'':<{w}}  {'base':>16}  {'fine-tuned':>16}"]
        out += [f"  {name:<{w}}  {b:>16}  {t:>16}" for name, b, t in rows]
        if self.path:
            out.append(f"  saved: {self.path}")
        return out


def latest(run_dir: str | Path) -> dict | None:
    """The newest saved report of ``qlora-tui eval`` in RUN_DIR/eval (None: none, or unreadable)."""
    files = sorted(Path(run_dir).glob("eval/eval-*.json"))
    for f in reversed(files):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("base"), dict) and isinstance(data.get("tuned"), dict):
            return data
    return None


def table_rows(report: dict) -> list[tuple[str, str, str]]:
    """(metric, base, fine-tuned) of a report (``EvalReport.to_dict()`` or a saved one): the CLI's
    table and the TUI's run detail both show these rows. Raises KeyError/TypeError/ValueError on a
    malformed report."""
    b, t = report["base"], report["tuned"]
    n = int(report.get("answered") or 0)

    def pct(k: int) -> str:
        return f"{int(k)}/{n} ({int(k) / n:.0%})" if n else "-"
    rows = [("loss per token", f"{float(b['loss']):.4f}", f"{float(t['loss']):.4f}"),
            ("perplexity", f"{float(b['perplexity']):.3f}", f"{float(t['perplexity']):.3f}"),
            ("exact match", pct(b.get("exact", 0)), pct(t.get("exact", 0))),
            ("contains answer", pct(b.get("contains", 0)), pct(t.get("contains", 0)))]
    for task, scores in (report.get("lm_eval") or {}).items():
        for metric, (vb, vt) in scores.items():
            rows.append((f"lm-eval {task} {metric}"[:28], f"{float(vb):.4f}", f"{float(vt):.4f}"))
    return rows


def per_row_losses(report: dict) -> list[tuple[float, float]]:
    """The saved per-row (base, tuned) losses of a report; [] for an older report without them."""
    out = []
    for pair in report.get("per_row") or []:
        try:
            b, t = float(pair[0]), float(pair[1])
        except (TypeError, ValueError, IndexError, KeyError):
            return []
        if not (math.isfinite(b) and math.isfinite(t)):
            return []
        out.append((b, t))
    return out


# --------------------------------------------------------------------------- rows

def _run_config(run_dir: Path | None):
    if run_dir is None or not (run_dir / "config.toml").is_file():
        return None
    from engine.core import config
    try:
        return config.load(run_dir / "config.toml")
    except (config.ConfigError, OSError) as e:
        raise EvalError(f"{run_dir / 'config.toml'}: cannot read the run's config ({e})") from None


def held_out_rows(src, data: str | None) -> tuple[str, list[dict]]:
    """(where the rows come from, normalised rows): --data, else the run's eval file or split."""
    from engine.dataset import data as data_mod
    if data:
        p = Path(data).expanduser()
        if not p.is_file() and not p.is_dir():
            raise EvalError(f"--data {data}: no such file; pass a .jsonl/.json/.csv/.parquet of held-out rows")
        ds = data_mod.load(str(p))
        if not ds.rows:
            first = ds.problems[0] if ds.problems else None
            raise EvalError(f"{p}: none of {ds.raw_count} rows is usable"
                            + (f"; line {first.line}: {first.message}" if first else ""))
        return str(p), [r.data for r in ds.rows]
    cfg = _run_config(RunArtifact.open(src, EvalError).run_dir)
    if cfg is None:
        raise EvalError(f"{src}: not a run directory (no config.toml); pass --data FILE with held-out rows")
    from engine.dataset.rows import read_rows
    try:
        rows = read_rows(cfg)
    except data_mod.DataError as e:
        raise EvalError(f"the run's data: {e}") from None
    if not rows.eval:
        raise EvalError("the run has no held-out rows (data.eval empty and data.eval_fraction = 0); "
                        "pass --data FILE")
    where = cfg.data.eval or f"{cfg.data.train} (the held-out {cfg.data.eval_fraction:g} split, seed {cfg.train.seed})"
    return where, rows.eval


def prompt_and_answer(row: dict) -> tuple[list[dict], str] | None:
    """The chat up to the last answer, and that answer, for rows that end in one."""
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
        answer = msgs[-1].get("content")
        if isinstance(answer, str) and answer.strip() and len(msgs) > 1:
            return msgs[:-1], answer
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str) and row["completion"].strip():
        return [{"role": "user", "content": row["prompt"]}], row["completion"]
    return None


def _fold(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


# --------------------------------------------------------------------------- evaluation

def _losses(model, tok, rows: list[dict], max_length: int) -> tuple[float, float, int, list]:
    """(base loss, tuned loss, answer tokens, per-row [base, tuned]): mean per answer token."""
    import torch
    from engine.modalities.text import encode_dataset
    enc = encode_dataset(tok, rows)
    device = next(model.parameters()).device
    sums, count, per_row = [0.0, 0.0], 0, []
    for ids, labels in zip(enc["input_ids"], enc["labels"]):
        ids, labels = ids[:max_length], labels[:max_length]
        if sum(1 for x in labels[1:] if x != -100) == 0:
            continue
        x = torch.tensor([ids], device=device)
        y = torch.tensor([labels], device=device)
        n = int((y[:, 1:] != -100).sum())
        with torch.no_grad():
            with model.disable_adapter():
                lb = float(model(input_ids=x, labels=y).loss)
            lt = float(model(input_ids=x, labels=y).loss)
        sums[0] += lb * n
        sums[1] += lt * n
        per_row.append([round(lb, 6), round(lt, 6)])
        count += n
    if not count:
        raise EvalError("no answer tokens to score: the rows have no assistant turns (or they were all "
                        "truncated away)")
    return sums[0] / count, sums[1] / count, count, per_row


def _answers(model, tok, rows: list[dict], limit: int, max_new_tokens: int):
    import torch
    device = next(model.parameters()).device
    scored, exact, contains, samples = 0, [0, 0], [0, 0], []
    for row in rows:
        pa = prompt_and_answer(row)
        if pa is None:
            continue
        if scored >= limit:
            break
        msgs, ref = pa
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001
            raise EvalError(f"the chat template failed on a row: {str(e).splitlines()[0][:160]}") from None
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        budget = min(max_new_tokens, len(tok(ref, add_special_tokens=False).input_ids) + 16)
        kw = dict(max_new_tokens=budget, do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=tok.pad_token_id)
        outs = []
        with torch.no_grad():
            with model.disable_adapter():
                outs.append(model.generate(input_ids=ids, attention_mask=mask, **kw))
            outs.append(model.generate(input_ids=ids, attention_mask=mask, **kw))
        preds = [tok.decode(o[0, ids.shape[1]:], skip_special_tokens=True).strip() for o in outs]
        for i, pred in enumerate(preds):
            exact[i] += _fold(pred) == _fold(ref)
            contains[i] += _fold(ref) in _fold(pred)
        if len(samples) < 3:
            samples.append({"prompt": str(msgs[-1].get("content", ""))[:200], "reference": ref[:200],
                            "base": preds[0][:200], "tuned": preds[1][:200]})
        scored += 1
    return scored, exact, contains, samples


HUB_TASKS_NOTE = ("lm-eval's own tasks download their data sets from the Hugging Face Hub: they need the "
                  "network (or a warm HF_DATASETS_CACHE); a local task is a task YAML whose dataset_path "
                  "is json/csv/parquet with data_files on this machine")


def check_lm_eval() -> None:
    import importlib.util
    if importlib.util.find_spec("lm_eval") is None:
        raise EvalError("--lm-eval needs the lm-eval package: pip install 'qlora-tui[lm-eval]' (its hub tasks "
                        "also download their data sets: they need the network)")


_TASK_LINE = re.compile(r"^task:\s*['\"]?([^'\"#\s]+)", re.M)


def lm_eval_specs(specs: list[str]) -> tuple[list[str], list[str]]:
    """(task names, include folders) of ``--lm-eval`` items: a ``.yaml`` file or a folder of them is a
    local task (its ``task:`` names, its folder given to lm-eval's TaskManager); any other item is
    the name of a task lm-eval knows (its hub tasks need the network)."""
    names: list[str] = []
    include: list[str] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if spec.endswith((".yaml", ".yml")) or p.is_dir():
            files = sorted(p.glob("*.y*ml")) if p.is_dir() else [p]
            if not p.exists():
                raise EvalError(f"--lm-eval {spec}: no such task file; pass a task YAML, a folder of them, or "
                                f"a task name")
            found = []
            for f in files:
                try:
                    found += _TASK_LINE.findall(f.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError) as e:
                    raise EvalError(f"--lm-eval {f}: cannot read it ({e})") from None
            if not found:
                raise EvalError(f"--lm-eval {spec}: no 'task: NAME' line in it; a task YAML names its task")
            names += found
            folder = str((p if p.is_dir() else p.parent).resolve())
            if folder not in include:
                include.append(folder)
        else:
            names.append(spec)
    return names, include


def lm_eval_scores(model, tok, specs: list[str], limit: int | None) -> dict:
    """lm-evaluation-harness tasks on the base (adapter disabled) and the fine-tuned model, both the
    one loaded ``PeftModel``: {task: {metric: (base, tuned)}}."""
    check_lm_eval()
    names, include = lm_eval_specs(specs)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=include or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise EvalError(f"--lm-eval: lm-eval knows no task {', '.join(unknown)}; a local task: pass its .yaml "
                        f"file or folder")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    results = []
    for tuned in (False, True):
        try:
            if tuned:
                r = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager,
                                            log_samples=False, bootstrap_iters=0)
            else:
                with model.disable_adapter():
                    r = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager,
                                                log_samples=False, bootstrap_iters=0)
        except Exception as e:  # noqa: BLE001 - lm-eval's errors are many; each is one line here
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise EvalError(f"lm-eval {','.join(names)}: {first} ({HUB_TASKS_NOTE})") from None
        results.append((r or {}).get("results", {}))
    out: dict = {}
    for task, scores in results[0].items():
        for metric, value in scores.items():
            # a metric is "NAME,FILTER" ("acc,none"); "samples", "alias" and the stderrs are not scores
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "," in metric \
                    and "stderr" not in metric:
                tuned_v = results[1].get(task, {}).get(metric)
                if isinstance(tuned_v, (int, float)):
                    out.setdefault(task, {})[metric.split(",")[0]] = (float(value), float(tuned_v))
    return out


def evaluate(src, data: str | None = None, max_rows: int = 200, answer_rows: int = 32,
             max_new_tokens: int = 64, lm_eval_tasks: list[str] | None = None, lm_eval_limit: int | None = None,
             save: bool = True, on_progress=None) -> EvalReport:
    """Base vs fine-tuned on held-out rows; the report is saved under RUN_DIR/eval/ when ``save``."""
    t0 = time.time()
    progress = on_progress or (lambda f, m: None)
    if RunArtifact.open(src, EvalError).kind == ArtifactKind.FULL:
        raise EvalError(f"{src}: a GaLore run has a full checkpoint, not an adapter; eval compares base and "
                        f"adapter (use generate for base vs checkpoint)")
    if lm_eval_tasks:
        check_lm_eval()
        lm_eval_specs(lm_eval_tasks)                    # a missing task file: said before the model loads
    where, rows = held_out_rows(src, data)
    rows = rows[:max_rows]
    from engine.outputs.generate import _load
    progress(0.05, "loading base + adapter")
    model, tok, _ = _load(src, EvalError)
    art = RunArtifact.open(src, EvalError)
    cfg = _run_config(art.run_dir)
    max_length = cfg.data.max_length if cfg is not None else 4096
    progress(0.2, f"loss on {len(rows)} rows")
    lb, lt, tokens, per_row = _losses(model, tok, rows, max_length)
    progress(0.5, f"answers on up to {answer_rows} rows")
    answered, exact, contains, samples = _answers(model, tok, rows, answer_rows, max_new_tokens)
    report = EvalReport(data=where, rows=len(rows), tokens=tokens, answered=answered,
                        base=Side(lb, math.exp(min(lb, 700)), exact[0], contains[0]),
                        tuned=Side(lt, math.exp(min(lt, 700)), exact[1], contains[1]), samples=samples,
                        per_row=per_row)
    if lm_eval_tasks:
        progress(0.8, f"lm-eval: {', '.join(lm_eval_tasks)}")
        report.lm_eval = lm_eval_scores(model, tok, lm_eval_tasks, lm_eval_limit)
    report.seconds = time.time() - t0
    progress(1.0, "done")
    run_dir = art.run_dir
    if save and run_dir is not None:
        out = run_dir / "eval" / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        report.path = str(out)
        out.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return report
