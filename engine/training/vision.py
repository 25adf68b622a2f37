"""The trainer's side of image+text rows: a lazily encoded dataset (pixels read when the loader
asks), the rows left out when their images would not fit, the collator on tensors, and the
longest row the fit planner plans for. The rows, their encoding and the processor are
``engine.modalities.vision``'s."""
from __future__ import annotations

import json

from engine.modalities.text import IGNORE
from engine.modalities.vision import FORMAT, SEQ_KEYS, encode_row, processor_for, row_tokens


def rows_dataset(proc, rows: list[dict], max_length: int | None):
    """A ``datasets.Dataset`` (what TRL takes) whose rows are encoded, images read and processed,
    only when the loader asks (``set_transform``): pixels of a whole dataset never sit in memory."""
    from datasets import Dataset
    ds = Dataset.from_dict({"row": [json.dumps(r) for r in rows]})

    def encode(batch):
        items = [encode_row(proc, json.loads(r), max_length) for r in batch["row"]]
        return {k: [it[k] for it in items] for k in items[0]}
    ds.set_transform(encode)
    return ds


def collate(pad_id: int):
    """Pads ids/labels/mask (right), concatenates image tensors along their first dim."""
    import torch

    def fn(items: list[dict]) -> dict:
        n = max(len(x["input_ids"]) for x in items)
        out = {"input_ids": torch.full((len(items), n), pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(items), n), dtype=torch.long),
               "labels": torch.full((len(items), n), IGNORE, dtype=torch.long)}
        for key in SEQ_KEYS[2:]:        # per-token type ids (M-RoPE needs them): padded with 0
            if key in items[0]:
                out[key] = torch.zeros((len(items), n), dtype=torch.long)
        for b, x in enumerate(items):
            k = len(x["input_ids"])
            out["input_ids"][b, :k] = x["input_ids"]
            out["attention_mask"][b, :k] = 1
            out["labels"][b, :k] = x["labels"]
            for key in SEQ_KEYS[2:]:
                if key in x:
                    out[key][b, :k] = x[key]
        for key in items[0]:
            if key not in out:
                vals = [x[key] for x in items if key in x]
                out[key] = torch.cat(vals, dim=0)
        return out
    return fn


def training_set(proc, rows: list[dict], max_length: int) -> tuple[object, list[int], list[str]]:
    """(dataset, token lengths, warnings): rows whose images would not fit in max_length are left
    out (truncation there would cut an image's tokens), each named in a warning."""
    keep, lengths, warnings = [], [], []
    for i, r in enumerate(rows):
        n = row_tokens(proc, r)
        if n["image_end"] > max_length:
            warnings.append(f"row {i + 1}: its images end at token {n['image_end']}, past data.max_length = "
                            f"{max_length} (row skipped; raise data.max_length or use smaller images)")
            continue
        keep.append(r)
        lengths.append(min(n["total"], max_length))
    return rows_dataset(proc, keep, max_length), lengths, warnings


def training_sets(cfg, proc, rows) -> tuple[object, object, list[str]]:
    """(train, eval or None, warnings) of an image run (``engine.modalities.vision.MODALITY``
    names it): ``training_set`` of rows.train and rows.eval, the first five skipped rows named."""
    train, _lengths, warnings = training_set(proc, rows.train, cfg.data.max_length)
    ev = training_set(proc, rows.eval, cfg.data.max_length)[0] if rows.eval else None
    return train, ev, warnings[:5]


def collator(cfg, rt, tok, args):
    """Our encoded rows as they are (labels built here, TRL's preparation skipped), images batched."""
    args.remove_unused_columns = False
    args.dataset_kwargs = {"skip_prepare_dataset": True}
    return collate(tok.pad_token_id)


def longest_row(cfg, fmt: str, rows: list[dict]) -> int | None:
    """The longest image row of ``rows`` (data format ``fmt``) in tokens (visual tokens included,
    at most data.max_length), for the fit planner: image rows are never packed and a batch is
    padded to its longest row, so that row, not data.max_length, sets the peak. None for text
    data or when the processor cannot be loaded (the trainer then says why)."""
    if fmt != FORMAT or not rows:
        return None
    try:
        proc = processor_for(cfg)
        longest = max(row_tokens(proc, r)["total"] for r in rows)
    except Exception:  # noqa: BLE001 - planning advice only; build() reports a bad model
        return None
    return min(int(longest), int(cfg.data.max_length))


