"""A TRL-trained stage's checkpoints: under <output_dir>/checkpoints, tied to one configuration, marked complete once
every process has saved, and the last complete one resumed; a folder a killed run left half-written is discarded."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from rlhf.processes import StageError, is_main_process

logger = logging.getLogger(__name__)


def prepare_checkpoints(training_args, output_dir: str, config: dict) -> str | None:
    """Point the trainer at <output_dir>/checkpoints; return the checkpoint to resume from, if a run with the same
    configuration was cut short. Checkpoints of a different configuration are refused, not silently resumed."""
    from rlhf.manifest import config_hash

    checkpoint_dir = Path(output_dir) / "checkpoints"
    training_args.output_dir = str(checkpoint_dir)
    check_checkpoint_config(checkpoint_dir, config_hash(config))
    discard_incomplete_checkpoints(checkpoint_dir)
    last = last_complete_checkpoint(checkpoint_dir)
    # TRL's habit: resume_from_checkpoint true (what a rerun does anyway) or a checkpoint folder.
    asked = training_args.resume_from_checkpoint
    if asked and str(asked).lower() not in ("true", "1", "yes"):
        if not (Path(asked) / "trainer_state.json").is_file():
            raise StageError(f"resume_from_checkpoint: {asked} is not a trainer checkpoint (no trainer_state.json); "
                             f"name a checkpoint-N folder, or leave it out to resume from {checkpoint_dir}")
        last = str(asked)
    elif asked and not last:
        raise StageError(f"resume_from_checkpoint: true, but {checkpoint_dir} holds no complete checkpoint to resume "
                         "from; leave it out to start from scratch")
    if last:
        logger.warning("resuming from %s", last)
    return last


# Trainer writes checkpoint-N file by file; a run killed mid-save leaves a folder that looks like a checkpoint but
# cannot be loaded. CheckpointCompleteMarker writes this file once every process has finished saving.
COMPLETE_MARKER = "checkpoint_complete"


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The finished checkpoint-N folders, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [path for path in checkpoint_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if path.name.split("-")[-1].isdigit() and (path / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda path: int(path.name.split("-")[-1]))


def last_complete_checkpoint(checkpoint_dir: Path) -> str | None:
    done = complete_checkpoints(Path(checkpoint_dir))
    return str(done[-1]) if done else None


def discard_incomplete_checkpoints(checkpoint_dir: Path) -> None:
    """Remove checkpoint folders a killed run left half-written, so neither resume nor rotation picks them up."""
    if not is_main_process() or not checkpoint_dir.is_dir():
        return
    done = set(complete_checkpoints(checkpoint_dir))
    for path in checkpoint_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        if path.is_dir() and path not in done:
            logger.warning("discarding %s: it was not completely written (the run was stopped while saving)", path)
            shutil.rmtree(path)


class CheckpointCompleteMarker(TrainerCallback):
    """Mark checkpoint-N finished once every process has written its part (sharded optimizers save per rank)."""

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        from rlhf.manifest import atomic_write

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            atomic_write(checkpoint / COMPLETE_MARKER, f"{state.global_step}\n")


def check_checkpoint_config(checkpoint_dir: Path, wanted_hash: str) -> None:
    """Record which configuration the checkpoints in this folder belong to, or refuse if it is another one."""
    from rlhf.manifest import atomic_write

    record = checkpoint_dir / "config_hash.txt"
    if record.is_file() and record.read_text().strip() != wanted_hash:
        raise StageError(
            f"{checkpoint_dir} holds checkpoints of a different configuration (hash {record.read_text().strip()}, "
            f"this run {wanted_hash}); delete that folder to start over, or use another output_dir"
        )
    if is_main_process():
        atomic_write(record, wanted_hash + "\n")
