"""Library noise a user cannot act on stays off the terminal unless ``--verbose`` is given.

Silenced: FutureWarnings (transformers' renames, pynvml's shim), bitsandbytes' CPU-kernel
warning, transformers/datasets/hub progress bars and their info logging. Our own progress
lines are untouched. The choice is exported as QLORA_TUI_VERBOSE so a detached or
distributed child process makes the same one.
"""
from __future__ import annotations

import logging
import os
import warnings

ENV = "QLORA_TUI_VERBOSE"

# set before the libraries are imported (they read them at import)
_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
_LOGGERS = ("bitsandbytes", "transformers", "datasets", "accelerate", "peft", "trl",
            "huggingface_hub", "torch.distributed.elastic")


def verbose() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def apply(want_verbose: bool = False) -> None:
    """Silence the libraries (or, verbose, leave everything as the libraries print it)."""
    if want_verbose:
        os.environ[ENV] = "1"
    if verbose():
        return
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*pynvml package is deprecated.*")
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
