"""Which trackers (report_to: tensorboard, wandb, ...) a stage reports to, checked before anything loads, and where
they write: <output_dir>/logs unless logging_dir says otherwise. Every stage also writes <output_dir>/metrics.jsonl
(the TRL stages through MetricsLog, PPO in its loop)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import TrainerCallback

from rlhf.config import ConfigError
from rlhf.processes import process_rank


def trackers(report_to) -> list[str]:
    """The trackers report_to names (a name, a list, "none" or "all"), each checked against transformers' list of
    integrations and what is installed, before anything loads."""
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [name for name in names if name != "none"]
    if not names:  # checking what is installed imports each tracker (wandb alone adds ~90 MiB to every process)
        return []
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


class MetricsLog(TrainerCallback):
    """<output_dir>/metrics.jsonl for the TRL stages, as PPO writes it: one row of numbers per logged step (training,
    evaluation and the closing summary), written by the main process. A resumed run first cuts the rows after the
    checkpoint it resumes from, so every step appears once."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / "metrics.jsonl"

    def on_train_begin(self, args, state, control, **kwargs):
        from rlhf.manifest import truncate_jsonl_log

        if state.is_world_process_zero:  # global_step is the checkpoint's on resume, 0 on a fresh run
            truncate_jsonl_log(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {key: value for key, value in (logs or {}).items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if state.is_world_process_zero and numbers:
            with open(self.path, "a") as log:
                log.write(json.dumps({"step": state.global_step, **numbers}) + "\n")
