"""Which trackers (report_to: tensorboard, wandb, ...) a stage reports to, checked before anything loads, and where
they write: <output_dir>/logs unless logging_dir says otherwise."""

from __future__ import annotations

import os
from pathlib import Path

from rlhf.config import ConfigError
from rlhf.processes import process_rank


def trackers(report_to) -> list[str]:
    """The trackers report_to names (a name, a list, "none" or "all"), each checked against transformers' list of
    integrations and what is installed, before anything loads."""
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [name for name in names if name != "none"]
    available = get_available_reporting_integrations()
    if names == ["all"]:
        return available
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"report_to: unknown tracker {name!r}; expected none, all or some of "
                              f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        if name not in available:
            raise ConfigError(f"report_to: {name} is not installed; pip install {name} (or drop it from report_to)")
    return names


def logs_folder(output_dir: str, logging_dir: str | None) -> Path:
    return Path(logging_dir) if logging_dir else Path(output_dir) / "logs"


def point_trackers(output_dir: str, logging_dir: str | None) -> Path:
    """Send every tracker's files to logging_dir (default <output_dir>/logs) rather than under checkpoints/:
    transformers' TensorBoard callback reads TENSORBOARD_LOGGING_DIR, wandb reads WANDB_DIR. Call once the output
    folder is locked (a refused run leaves nothing behind)."""
    folder = logs_folder(output_dir, logging_dir)
    if process_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder)
    os.environ["WANDB_DIR"] = str(folder)
    return folder
