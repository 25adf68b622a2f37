"""Shared test set-up: one builtin:tiny cache for the whole session (subprocesses inherit it)."""
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("QLORA_TUI_CACHE", str(Path(tempfile.gettempdir()) / "qlora-tui-test-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One compute thread per process (this one and every run it starts). The tests' models are tiny: a
# second thread gains nothing, but while another process holds a core (a TUI test drawing, a
# detached run, two ranks, runs started together) a 2-thread OpenMP team waits on its descheduled
# thread: measured on 2 cores, 2.4-2.8 s per step against 0.14-0.26 s single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_cfg(tmp_path):
    """A fast real-run config on builtin:tiny + builtin:sample writing under tmp_path."""
    from reliability_helpers import tiny_config
    return tiny_config(tmp_path)
