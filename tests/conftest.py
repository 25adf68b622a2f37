"""Shared test set-up: one builtin:tiny cache for the whole session (subprocesses inherit it)."""
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("QLORA_TUI_CACHE", str(Path(tempfile.gettempdir()) / "qlora-tui-test-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_cfg(tmp_path):
    """A fast real-run config on builtin:tiny + builtin:sample writing under tmp_path."""
    from engine.core import config
    return config.load(REPO / "examples" / "demo.toml",
                  [f"output.dir={str(tmp_path / 'runs')!r}".replace("'", '"'), "train.max_steps=12",
                   "train.eval_steps=6", "train.save_steps=6"])
