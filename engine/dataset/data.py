"""Dataset files → normalised rows, with the format detected (and why) and problems by line.

Formats: ChatML ``messages``, ShareGPT ``conversations`` (from/value), Alpaca
(instruction/input/output), ``prompt``/``completion`` and plain ``text``; files: .jsonl,
.json, .csv, .tsv (each also .gz/.bz2/.xz), .parquet (read a batch at a time), or a directory
saved with ``datasets.save_to_disk``.
A malformed row never aborts reading: it becomes a ``DataProblem`` with its physical line
(1-based; for CSV the file line, for parquet/datasets the row number + 1).
"""
from __future__ import annotations

import csv
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from engine.modalities.base import DataError, DataProblem, json_problem
from engine.modalities.text import SHAREGPT_ROLES, check_turns, tool_definitions

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "tokens", "vision",
           "preference", "kto")      # the last two: engine.dataset.preference
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
# compressed text files, read through the standard library's codecs (data.jsonl.gz, ...)
COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}


@dataclass
class Row:
    line: int          # physical line (1-based) in the source file
    data: dict         # normalised: {"messages": [...]} | {"prompt","completion"} | {"text"}


@dataclass
class Dataset:
    path: str
    format: str
    reason: str
    rows: list[Row] = field(default_factory=list)
    problems: list[DataProblem] = field(default_factory=list)
    raw_count: int = 0
    formats_seen: dict = field(default_factory=dict)
    fields_seen: dict = field(default_factory=dict)      # top-level field name -> rows with it

    @property
    def conversational(self) -> bool:
        return self.format in ("messages", "sharegpt", "alpaca")


def resolve(path: str) -> Path:
    if path == "builtin:sample":
        from engine.models.builtin import sample_data_path
        return sample_data_path()
    if path == "builtin:vl-sample":
        from engine.models.builtin import vl_sample_path
        return vl_sample_path()
    return Path(path).expanduser()


DEEP = "invalid JSON: nested too deeply for the parser; flatten this row"


def parse_row(raw: bytes) -> tuple[object, str | None]:
    """One JSONL line as ``(record, None)`` or ``(None, problem)``: the line's own end is not
    part of it (an unterminated string is said as such, not as a control character), and nesting
    too deep for the parser is a problem of this line only."""
    try:
        return json.loads(raw.rstrip(b"\r\n")), None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, json_problem(e)
    except RecursionError:
        return None, DEEP


def iter_raw(path: str | Path, on_bytes: Callable[[int, int], None] | None = None
             ) -> Iterator[tuple[int, object, str | None]]:
    """Yield ``(line, record, error)`` for every record of a file; ``error`` is set for bad lines.
    A file that cannot be read as a whole (not UTF-8, unreadable, not parquet) raises DataError
    naming the file (and the line of the first bad byte)."""
    from engine.dataset import specs
    if specs.is_spec(str(path)):             # hf:org/name, dataset_info.json#NAME
        yield from specs.iter_spec(str(path), iter_raw)
        return
    p = resolve(str(path))
    if not p.exists():
        raise DataError(f"{p}: no such file or directory; check data.train / data.eval")
    try:
        yield from _iter_raw(p, on_bytes)
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(_not_utf8(p, e)) from None
    except OSError as e:
        raise DataError(f"{p}: cannot read it ({e.strerror or e}); check the path and its permissions") from None
    except Exception as e:  # noqa: BLE001 - pyarrow/datasets errors of a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DataError(f"{p}: not a readable {p.suffix.lstrip('.') or 'data'} file ({first}); "
                        "check that it is complete and of that type") from None


# A row (one JSONL line) larger than this is a problem of its line, never read into memory:
# it keeps the inspector's and the trainer's memory bounded whatever one line holds.
MAX_ROW_BYTES = 16 * 2**20
TOO_LARGE = "row too large"


def _capped_lines(fh, limit: int):
    """``(line, size)`` for each line of a binary file; ``line`` is None for a line longer than
    ``limit`` bytes, which is skipped in chunks without being held in memory."""
    while True:
        raw = fh.readline(limit + 1)
        if not raw:
            return
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw, len(raw)
            continue
        size = len(raw)
        del raw
        while True:
            chunk = fh.readline(1 << 20)
            size += len(chunk)
            if not chunk or chunk.endswith(b"\n"):
                break
        yield None, size


def _not_utf8(p: Path, e: UnicodeDecodeError) -> str:
    line = ""
    if isinstance(e.object, (bytes, bytearray)):
        n = bytes(e.object[:e.start]).count(b"\n") + 1
        line = f" at line {n}"
    return (f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02X}{line}); save the file as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)")


# a .json or .csv file is parsed whole (Python objects take several times the bytes): past this
# it is refused with the way out (JSONL is streamed row by row, whatever its size)
MAX_WHOLE_FILE_BYTES = 2 * 2**30


def _read_text(p: Path, codec: str | None = None) -> str:
    """A whole text file as UTF-8 (a BOM is accepted), decompressed by ``codec``; UnicodeDecodeError
    names the bytes. Past MAX_WHOLE_FILE_BYTES (of text, after decompression) it is refused."""
    with _open_data(p, codec) as (fh, raw):
        size = os.fstat(raw.fileno()).st_size
        data = fh.read(MAX_WHOLE_FILE_BYTES + 1) if size <= MAX_WHOLE_FILE_BYTES else b""
        if size > MAX_WHOLE_FILE_BYTES or len(data) > MAX_WHOLE_FILE_BYTES:
            size = max(size, len(data))
            raise DataError(f"{p}: {size / 2**30:.1f} GiB or more is too large to read as one {p.suffix} document (the "
                            f"limit is {MAX_WHOLE_FILE_BYTES // 2**30} GiB); save it as .jsonl, which is read row by row")
        return data.decode("utf-8-sig")


def suffix_of(p: Path) -> tuple[str, str | None]:
    """(the data suffix, the compression codec or None): data.jsonl.gz → (".jsonl", "gzip")."""
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        return (suffixes[-2] if len(suffixes) > 1 else ""), COMPRESSED[suffixes[-1]]
    return p.suffix.lower(), None


@contextmanager
def _open_data(p: Path, codec: str | None):
    """(binary stream of the file's data, the raw file under it): the codec's reader over the
    regular file (never a FIFO or a device); position and size are the raw file's."""
    from engine.core import files
    with files.open_regular(p) as raw:
        if codec is None:
            yield raw, raw
            return
        import importlib
        mod = importlib.import_module(codec)
        reader = {"gzip": "GzipFile", "bz2": "BZ2File", "lzma": "LZMAFile"}[codec]
        with getattr(mod, reader)(fileobj=raw) if codec == "gzip" else getattr(mod, reader)(raw) as fh:
            yield fh, raw


def _iter_raw(p: Path, on_bytes) -> Iterator[tuple[int, object, str | None]]:
    """The records of one file or datasets directory, read by its type's reader (``_READERS``)."""
    if p.is_dir():
        yield from _iter_datasets_dir(p)
        return
    suffix, codec = suffix_of(p)
    if codec and suffix not in TEXT_SUFFIXES:
        raise DataError(f"{p}: a compressed {suffix or 'file'} is not read here; compressed .jsonl, .json, "
                        ".csv or .tsv are (.gz, .bz2, .xz), or decompress it first")
    if p.suffix.lower() in (".zst", ".zstd", ".zip", ".7z", ".tar", ".tgz"):
        raise DataError(f"{p}: {p.suffix} archives are not read here; extract or decompress it first "
                        "(e.g. zstd -d, unzip), or recompress it as .gz")
    reader = _READERS.get(suffix)
    if reader is None:
        raise DataError(f"{p}: unsupported file type {suffix or '(none)'!r}; use one of "
                        + ", ".join(SUFFIXES) + " or a datasets directory")
    yield from reader(p, codec, on_bytes, suffix)


def _read_jsonl(p: Path, codec, on_bytes, suffix):
    """Row by row, each line capped at MAX_ROW_BYTES (never read whole); progress in raw bytes."""
    done = 0
    with _open_data(p, codec) as (fh, raw_fh):
        total = os.fstat(raw_fh.fileno()).st_size
        for i, (raw, size) in enumerate(_capped_lines(fh, MAX_ROW_BYTES), 1):
            done += size
            if on_bytes is not None and i % 2000 == 0:
                on_bytes(raw_fh.tell() if codec else done, total)
            if raw is None:
                yield i, None, (f"{TOO_LARGE}: {size / 2**20:.0f} MiB on one line (the limit is "
                                f"{MAX_ROW_BYTES // 2**20} MiB per row); split or shorten it")
                continue
            if not raw.strip():
                continue
            if i == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]                    # a BOM
            rec, err = parse_row(raw)
            yield i, rec, err
    if on_bytes is not None:
        on_bytes(total, total)


def _read_json(p: Path, codec, on_bytes, suffix):
    """One document: a list of rows, or an object holding one (data/train/rows/examples); JSONL
    saved as .json is read as JSONL. Items carry the physical line they start on."""
    text = _read_text(p, codec)
    try:
        data = json.loads(text)
    except RecursionError:
        yield 1, None, DEEP
        return
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n{" in text:   # JSONL saved as .json
            yield from iter_raw_lines_as_jsonl(text)
        else:
            yield getattr(e, "lineno", 1), None, json_problem(e)
        return
    if isinstance(data, dict):
        data = next((data[k] for k in ("data", "train", "rows", "examples") if isinstance(data.get(k), list)),
                    [data])
    if not isinstance(data, list):
        yield 1, None, "top-level JSON must be a list of rows"
        return
    lines = _json_array_item_lines(text, len(data))
    for i, rec in enumerate(data):
        yield lines[i], rec, None


def _read_csv(p: Path, codec, on_bytes, suffix):
    """A header row, then one record a row (tab-separated for .tsv); JSON cells parsed."""
    import io
    with io.StringIO(_read_text(p, codec), newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
        reader.fieldnames   # reads the header row
        prev = reader.line_num
        for rec in reader:
            yield prev + 1, _json_cells(rec), None
            prev = reader.line_num


def _read_parquet(p: Path, codec, on_bytes, suffix):
    """A batch at a time: memory bounded by the batch, not the file."""
    import pyarrow.parquet as pq
    from engine.core import files
    files.check_regular(p)
    pf = pq.ParquetFile(p)
    total, n = pf.metadata.num_rows or 1, 0
    size = p.stat().st_size
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH):
        for rec in batch.to_pylist():
            n += 1
            yield n, rec, None
        if on_bytes is not None:
            on_bytes(size * n // total, size)


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv,
            ".parquet": _read_parquet}
TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")     # the ones read through a compression codec too


def iter_raw_lines_as_jsonl(text: str):
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            rec, err = parse_row(line.encode("utf-8"))
            yield i, rec, err


PARQUET_BATCH = 1024
FIELDS_MAX = 1000         # distinct top-level field names counted (a file of ever new names stays bounded)
# CSV cells holding JSON (a conversation, pairs, tool definitions written as text): parsed when
# the cell is a JSON list or object. Text fields (prompt, chosen, ...) only when that JSON is a
# list of turns, so a prompt that merely starts with "[" stays text.
_JSON_CELLS = ("messages", "conversations", "tools", "functions", "images", "chosen_messages",
               "rejected_messages", "input", "preferred_output", "non_preferred_output", "history")
_TURN_CELLS = ("prompt", "completion", "chosen", "rejected")


def _json_cells(rec: dict) -> dict:
    for key in _JSON_CELLS + _TURN_CELLS:
        v = rec.get(key)
        if not isinstance(v, str) or not v.lstrip().startswith(("[", "{")):
            continue
        try:
            parsed = json.loads(v)
        except (json.JSONDecodeError, RecursionError):
            continue                 # left as text: the format's own checks say what is wrong
        if key in _TURN_CELLS and not (isinstance(parsed, list) and parsed and all(
                isinstance(t, dict) and ("role" in t or "from" in t) for t in parsed)):
            continue
        if isinstance(parsed, (list, dict)):
            rec[key] = parsed
    return rec


def _json_array_item_lines(text: str, n: int) -> list[int]:
    """Best-effort physical line of each top-level array item (its opening brace)."""
    lines, depth, line, in_str, esc = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
            if depth == 1:
                lines.append(line)
        elif ch in "[{":
            if depth == 1:
                lines.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
    lines += [lines[-1] if lines else 1] * (n - len(lines))
    return lines[:n] if len(lines) >= n else lines


def _iter_datasets_dir(p: Path):
    try:
        from datasets import load_from_disk
        ds = load_from_disk(str(p))
    except Exception as e:
        raise DataError(f"{p}: not a datasets directory (saved with save_to_disk): {e}") from None
    if hasattr(ds, "keys"):   # DatasetDict
        split = "train" if "train" in ds else next(iter(ds.keys()))
        ds = ds[split]
    for i, rec in enumerate(ds):
        yield i + 1, rec, None


_DETECTORS: list = []        # (vision.detect, preference.detect), imported on first use


def detect(rec: object) -> tuple[str | None, str]:
    """The format of one record and the evidence."""
    if not isinstance(rec, dict):
        return None, "not a JSON object"
    if not _DETECTORS:
        from engine.dataset import preference      # chosen/rejected or a KTO label: never SFT rows
        from engine.modalities import vision
        _DETECTORS[:] = [vision.detect, preference.detect]
    vis = _DETECTORS[0](rec)
    if vis:
        return vis
    pref = _DETECTORS[1](rec)
    if pref:
        return pref
    keys = set(rec)
    if "messages" in keys:
        return "messages", "field 'messages' (a list of role/content turns)"
    if "input_ids" in keys:
        return "tokens", "field 'input_ids' (pre-tokenised)"
    if "conversations" in keys:
        conv = rec["conversations"]
        if isinstance(conv, list) and conv and isinstance(conv[0], dict) and "from" in conv[0]:
            return "sharegpt", "field 'conversations' with from/value turns"
        return "messages", "field 'conversations' with role/content turns"
    if "instruction" in keys and "output" in keys:
        return "alpaca", "fields 'instruction' and 'output' (Alpaca)"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion", "fields 'prompt' and 'completion'"
    if "text" in keys:
        return "text", "field 'text' (plain language modelling)"
    return None, "fields " + ", ".join(sorted(map(str, keys))[:6]) + " match no known format"


def _conversation(rec: dict, turns, line: int, problems: list[DataProblem]) -> dict | None:
    """Turns + the row's ``system`` column and tool definitions → a normalised row."""
    tools = tool_definitions(rec, line, problems)
    if tools is False:
        return None
    msgs = check_turns(turns, line, problems, system=rec.get("system"))
    if not msgs:
        return None
    return {"messages": msgs, "tools": tools} if tools else {"messages": msgs}


def sharegpt_turns(conv, line: int, problems: list[DataProblem], roles: dict | None = None,
                   keys: tuple = ("from", "value")) -> list[dict] | None:
    """ShareGPT turns (``from``/``value``) → role/content turns: ``function_call`` turns are
    assistant tool calls, ``observation`` turns tool results."""
    if not isinstance(conv, list):
        problems.append(DataProblem(line, "missing_field", "missing list field 'conversations'"))
        return None
    fk, vk = keys
    table = roles or SHAREGPT_ROLES
    turns = []
    for j, t in enumerate(conv):
        if not isinstance(t, dict) or fk not in t:
            problems.append(DataProblem(line, "missing_field", f"turn {j + 1} has no '{fk}'"))
            return None
        who = str(t[fk])
        role = table.get(who, table.get(who.lower(), who))
        turn = {k: v for k, v in t.items() if k in ("weight", "loss_weight", "name")}
        if role == "function_call" or who.lower() == "function_call":
            turn.update(role="assistant", content="", tool_calls=t.get(vk))
        else:
            turn.update(role=role, content=t.get(vk))
        turns.append(turn)
    return turns


def _required_strings(rec: dict, names, line: int, problems: list[DataProblem]) -> bool:
    """Each field present and a string; else record the first problem and return False."""
    for name in names:
        v = rec.get(name)
        if v is None:
            problems.append(DataProblem(line, "missing_field", f"missing field '{name}'"))
            return False
        if not isinstance(v, str):
            problems.append(DataProblem(line, "wrong_type", f"'{name}' must be a string"))
            return False
    return True


MEDIA_FIELDS = ("videos", "audios")     # LLaMA-Factory columns of inputs no model here reads


def normalise(rec: object, fmt: str, line: int, problems: list[DataProblem]) -> dict | None:
    """One raw record → the row TRL takes, or None (with a problem recorded)."""
    if not isinstance(rec, dict):
        problems.append(DataProblem(line, "not_object", "row is not a JSON object"))
        return None
    for media in MEDIA_FIELDS:        # never trained as text with the media silently dropped
        if rec.get(media):
            problems.append(DataProblem(line, "unsupported_media", f"the row has '{media}' (LLaMA-Factory's "
                                        f"{media[:-1]} column): only text and images are trained here; remove "
                                        f"the '{media}' field and its <{media[:-1]}> placeholders, or the row"))
            return None
    if fmt == "vision":
        from engine.modalities import vision
        return vision.normalise(rec, line, problems)
    if fmt in ("preference", "kto"):
        from engine.dataset import preference
        return preference.normalise(rec, fmt, line, problems)
    if fmt == "messages":
        turns = rec.get("messages", rec.get("conversations"))
        if turns is None:
            problems.append(DataProblem(line, "missing_field", "missing field 'messages'"))
            return None
        return _conversation(rec, turns, line, problems)
    if fmt == "sharegpt":
        turns = sharegpt_turns(rec.get("conversations"), line, problems)
        return _conversation(rec, turns, line, problems) if turns is not None else None
    if fmt == "alpaca":
        ins, inp, out = rec.get("instruction"), rec.get("input", ""), rec.get("output")
        if not _required_strings(rec, ("instruction", "output"), line, problems):
            return None
        if inp is None:
            inp = ""
        if not isinstance(inp, str):
            problems.append(DataProblem(line, "wrong_type", "'input' must be a string"))
            return None
        if not ins.strip() or not out.strip():
            problems.append(DataProblem(line, "empty_content", "empty instruction or output"))
            return None
        user = ins if not inp.strip() else f"{ins}\n\n{inp}"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
        if isinstance(rec.get("system"), str) and rec["system"].strip():
            msgs.insert(0, {"role": "system", "content": rec["system"]})
        return {"messages": msgs}
    if fmt == "prompt_completion":
        p, c = rec.get("prompt"), rec.get("completion")
        if isinstance(p, list) or isinstance(c, list):
            return _conversational_pc(rec, p, c, line, problems)
        if not _required_strings(rec, ("prompt", "completion"), line, problems):
            return None
        if not c.strip():
            problems.append(DataProblem(line, "empty_content", "empty completion: nothing to train on"))
            return None
        return {"prompt": p, "completion": c}
    if fmt == "tokens":
        ids, labels = rec.get("input_ids"), rec.get("labels")
        if not isinstance(ids, list) or not ids or not all(isinstance(x, int) for x in ids):
            problems.append(DataProblem(line, "wrong_type", "'input_ids' must be a non-empty list of token ids"))
            return None
        if labels is not None and (not isinstance(labels, list) or len(labels) != len(ids)):
            problems.append(DataProblem(line, "wrong_type", "'labels' must be a list as long as 'input_ids'"))
            return None
        return {"input_ids": ids, "labels": labels if labels is not None else list(ids)}
    if fmt == "text":
        t = rec.get("text")
        if t is None:
            problems.append(DataProblem(line, "missing_field", "missing field 'text'"))
            return None
        if not isinstance(t, str):
            problems.append(DataProblem(line, "wrong_type", "'text' must be a string"))
            return None
        if not t.strip():
            problems.append(DataProblem(line, "empty_content", "empty text"))
            return None
        return {"text": t}
    raise ValueError(fmt)


def _conversational_pc(rec: dict, p, c, line: int, problems: list[DataProblem]) -> dict | None:
    """TRL's conversational prompt-completion (both message lists): one conversation whose
    completion turns alone are trained (assistant turns of the prompt get weight 0)."""
    if not (isinstance(p, list) and isinstance(c, list)):
        problems.append(DataProblem(line, "wrong_type", "'prompt' and 'completion' must both be strings or "
                                    "both lists of messages (TRL conversational)"))
        return None
    if not c:
        problems.append(DataProblem(line, "empty_content", "empty completion: nothing to train on"))
        return None
    prompt = [dict(t, weight=0) if isinstance(t, dict) and t.get("role") == "assistant" else t for t in p]
    return _conversation(rec, prompt + c, line, problems)


def load(path: str, fmt: str = "auto", on_bytes=None) -> Dataset:
    """Read, detect and normalise a whole file. Bad rows become problems; never raises for them."""
    raw = list(iter_raw(path, on_bytes=on_bytes))
    return build(str(path), raw, fmt)


def build(path: str, raw: list, fmt: str = "auto") -> Dataset:
    seen: dict[str, int] = {}
    first_line: dict[str, int] = {}
    fields: dict[str, int] = {}
    for line, rec, err in raw:
        if err is None:
            count_format(rec, line, seen, first_line)
            for k in rec if isinstance(rec, dict) else ():
                if k in fields or len(fields) < FIELDS_MAX:
                    fields[k] = fields.get(k, 0) + 1
    fmt, reason, problems = choose_format(path, fmt, seen, first_line, len(raw))
    ds = Dataset(path=str(path), format=fmt, reason=reason, raw_count=len(raw), formats_seen=seen,
                 fields_seen=fields)
    for line, rec, err in raw:
        row = normalise_record(line, rec, err, fmt, problems)
        if row is not None:
            ds.rows.append(row)
    problems.sort(key=lambda p: p.line)
    ds.problems = problems
    if fmt == "vision":          # every image resolved against the data file and checked
        from engine.modalities import vision
        vision.attach_images(ds, resolve(ds.path).resolve().parent)
    return ds


def count_format(rec: object, line: int, seen: dict, first_line: dict) -> str | None:
    """Tally one record's format into ``seen`` (count) and ``first_line`` (where first met)."""
    f, _ = detect(rec)
    if f:
        seen[f] = seen.get(f, 0) + 1
        first_line.setdefault(f, line)
    elif None not in first_line and isinstance(rec, dict):
        first_line[None] = (line, rec)        # the first unknown row: named if no row is known
    return f


_ANSWERS = ("completion", "chosen", "rejected", "response", "output", "answer", "messages", "conversations")


def unknown_format(path, line: int, rec: dict) -> str:
    """One line for a file none of whose rows has a known format: the kind of row it is when it is
    one we know of but do not train, else its fields and how to map them."""
    where = f"{resolve(path)}: line {line}"
    keys = set(rec)
    if "completions" in keys and "labels" in keys:
        return (f"{where} is TRL stepwise supervision (prompt/completions/labels, for a process reward "
                "model): not trained here; for SFT give each row a 'prompt' and a 'completion'")
    if "prompt" in keys and not keys & set(_ANSWERS):
        return (f"{where} is prompt-only (TRL: a 'prompt' with no answer, for online methods such as "
                "GRPO): nothing to train on here; add the answer as 'completion' (SFT) or "
                "'chosen'/'rejected' (train.method = dpo)")
    fields = ", ".join(sorted(str(k)[:40] for k in keys)[:8]) or "none"
    return (f"{where}: no row matches a known format (messages, conversations, instruction/output, "
            f"prompt/completion, chosen/rejected, text); its fields are {fields}: rename them, or map "
            "them in a LLaMA-Factory dataset_info.json (data.train = \"dataset_info.json#NAME\")")


def choose_format(path: str, fmt: str, seen: dict, first_line: dict, n_raw: int
                  ) -> tuple[str, str, list[DataProblem]]:
    """(format, reason, [mixed_format problem]) from the tallies of ``count_format``."""
    problems: list[DataProblem] = []
    if fmt == "auto":
        if not seen:
            where = resolve(path)
            if not n_raw:
                raise DataError(f"{where}: the file has no rows; add training examples")
            if None in first_line:
                raise DataError(unknown_format(path, *first_line[None]))
            raise DataError(f"{where}: no row is a JSON object with a known format (messages, "
                            "conversations, instruction/output, prompt/completion, text); fix the file")
        fmt = max(seen, key=seen.get)
        reason = f"{seen[fmt]} of {n_raw} rows have " + detect_reason(fmt)
    else:
        reason = f"set by data.format = {fmt!r}"
        other = {k: v for k, v in seen.items() if k != fmt and not (fmt == "messages" and k == "sharegpt")}
        if other:                    # rows of another format are skipped: never silently
            k = max(other, key=other.get)
            problems.append(DataProblem(first_line[k], "mixed_format",
                                        f"data.format = {fmt!r}, but {other[k]} of {n_raw} rows look like {k} "
                                        f"({detect_reason(k)}); they are skipped: set data.format = "
                                        f"\"auto\" or \"{k}\""))
            return fmt, reason, problems
    if len(seen) > 1:
        others = ", ".join(f"{k} ({v} rows, first at line {first_line[k]})" for k, v in seen.items() if k != fmt)
        problems.append(DataProblem(first_line[min(seen, key=seen.get)], "mixed_format",
                                    f"mixed formats: using {fmt}; also found {others}"))
    return fmt, reason, problems


_UNKNOWN = object()


def normalise_record(line: int, rec: object, err: str | None, fmt: str,
                     problems: list[DataProblem], detected=_UNKNOWN) -> Row | None:
    """One ``iter_raw`` record → a Row, or None (a problem recorded, or another format's row).
    ``detected``: the record's format when the caller has already detected it (``detect``)."""
    if err is not None:
        kind = "row_too_large" if err.startswith(TOO_LARGE) else "invalid_json" if "JSON" in err else "bad_row"
        problems.append(DataProblem(line, kind, err))
        return None
    f = detect(rec)[0] if detected is _UNKNOWN else detected
    if f is not None and f != fmt and not (fmt == "messages" and f == "sharegpt") \
            and not (fmt == "vision" and f in ("messages", "sharegpt")):      # text-only turns
        return None   # reported once as mixed_format
    norm = normalise(rec, fmt, line, problems)
    return Row(line, norm) if norm is not None else None


def detect_reason(fmt: str) -> str:
    if fmt in ("preference", "kto"):
        from engine.dataset import preference
        return preference.reason(fmt)
    return {"messages": "a 'messages' list of role/content turns (ChatML)",
            "sharegpt": "'conversations' with from/value turns (ShareGPT)",
            "alpaca": "'instruction' and 'output' fields (Alpaca)",
            "prompt_completion": "'prompt' and 'completion' fields",
            "text": "a 'text' field (plain language modelling)",
            "tokens": "'input_ids' (pre-tokenised; labels optional)",
            "vision": "images with their turns (ChatML image parts or LLaMA-Factory 'images')"}[fmt]


