"""External trackers (``output.report_to``): where their logs go, and the set-up they need.

The HF Trainer's own integrations do the logging: every name the installed transformers knows
(``transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK``: tensorboard, wandb,
mlflow, trackio, comet_ml, clearml, ...), one or several comma-separated. A name it does not know,
or one whose package is missing (transformers' own availability check), is one clear line before
the model loads. Here: tensorboard, wandb and MLflow (a local file store, ``RUN_DIR/mlruns``) log
inside the run directory unless the user's environment points them elsewhere; the others use
their own defaults. Our tokens/s joins the logged metrics (``engine.training.sft.EventCallback``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# what to install for a tracker: our extras where we have one, else its PyPI name
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow-skinny", "comet_ml": "comet_ml",
            "azure_ml": "azureml-core", "flyte": "flytekit"}


def names(report_to: str) -> list[str]:
    """The trackers of ``output.report_to`` ("none" and "" = none; comma-separated)."""
    return [n.strip() for n in str(report_to or "").split(",") if n.strip() and n.strip() != "none"]


def known() -> list[str]:
    """Every ``report_to`` name the installed transformers has a callback for."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    return list(INTEGRATION_TO_CALLBACK)


def _available() -> list[str]:
    """The trackers whose packages are installed (transformers' own check)."""
    from transformers.integrations.integration_utils import get_available_reporting_integrations
    return get_available_reporting_integrations()


class TrackerError(ValueError):
    """The tracker cannot be used; the message is one line."""


def log_location(report_to: str, run_dir: str | Path) -> str:
    """Where the tracker's files go ('' for none); the Train screen and run_started say it."""
    run_dir = Path(run_dir)
    if "," in report_to:
        return "; ".join(f"{n}: {log_location(n, run_dir)}" for n in names(report_to))
    if report_to == "mlflow":
        uri = _users("MLFLOW_TRACKING_URI") or f"file://{run_dir / 'mlruns'}"
        return f"{uri} (mlflow, experiment {_users('MLFLOW_EXPERIMENT_NAME') or 'qlora-tui'})"
    if report_to == "tensorboard":
        return str(Path(_users("TENSORBOARD_LOGGING_DIR") or run_dir / "tensorboard"))
    if report_to == "wandb":
        mode = os.environ.get("WANDB_MODE", "online")
        where = Path(_users("WANDB_DIR") or run_dir) / "wandb"
        project = _users("WANDB_PROJECT") or "qlora-tui"
        return f"{where} (wandb {mode}, project {project})"
    if report_to in names(report_to):
        return f"{report_to}'s own default location"
    return ""


def check_available(report_to: str) -> None:
    """Each name known to transformers and its package installed, else one line."""
    wanted = names(report_to)
    if not wanted:
        return
    every = known()
    for n in wanted:
        if n not in every:
            raise TrackerError(f"output.report_to = \"{report_to}\": {n!r} is not a tracker transformers "
                               f"knows; use none or one or more (comma-separated) of {', '.join(every)}")
    have = _available()
    for n in wanted:
        if n not in have and n != "flyte":
            pkg = PACKAGES.get(n, n)
            how = f"pip install 'qlora-tui[{EXTRAS[n]}]'" if n in EXTRAS else f"pip install {pkg}"
            raise TrackerError(f"output.report_to = \"{report_to}\": {n} needs the {pkg} package: {how} "
                               f"(or set output.report_to = \"none\")")


def setup(report_to: str, run_dir: str | Path) -> str:
    """Point the tracker at the run directory (unless the user's environment already does);
    returns the log location."""
    check_available(report_to)
    run_dir = Path(run_dir)
    if "," in report_to:
        for n in names(report_to):
            setup(n, run_dir)
        return log_location(report_to, run_dir)
    if report_to == "mlflow":
        if not _users("MLFLOW_TRACKING_URI"):
            _set_default("MLFLOW_TRACKING_URI", f"file://{run_dir / 'mlruns'}")
            _set_default("MLFLOW_ALLOW_FILE_STORE", "true")      # MLflow 3 keeps file stores behind this flag
        _set_default("MLFLOW_EXPERIMENT_NAME", "qlora-tui")
    elif report_to == "tensorboard":
        _set_default("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    elif report_to == "wandb":
        _set_default("WANDB_DIR", str(run_dir))
        _set_default("WANDB_PROJECT", "qlora-tui")
        _set_default("WANDB_NAME", run_dir.name)
    return log_location(report_to, run_dir)


_OURS: dict[str, str] = {}     # variables we set (a later run in the same process replaces them)


def _users(key: str) -> str:
    """The environment's value of ``key`` when the user set it (not an earlier run of ours)."""
    value = os.environ.get(key, "")
    return "" if value and _OURS.get(key) == value else value


def _set_default(key: str, value: str) -> None:
    """Set ``key`` unless the user's environment set it (then their choice wins)."""
    if key in os.environ and _OURS.get(key) != os.environ[key]:
        return
    os.environ[key] = _OURS[key] = value


def finish(report_to: str) -> None:
    """Close the tracker's run so its files are complete before the run's thread ends (the HF
    callback leaves a wandb run open until the process exits)."""
    wandb = sys.modules.get("wandb") if "wandb" in names(report_to) else None
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish()
        except Exception:  # noqa: BLE001 - the run itself is over; a tracker hiccup must not fail it
            pass
    mlflow = sys.modules.get("mlflow") if "mlflow" in names(report_to) else None
    if mlflow is not None:           # a run stopped before on_train_end leaves its MLflow run open
        try:
            if mlflow.active_run() is not None:
                mlflow.end_run()
        except Exception:  # noqa: BLE001
            pass
