"""What every training stage does around its trainer: lock the output folder, resume from the last checkpoint, stop on
a non-finite loss, save the adapter (and merged model), check the policy against the gold reward, write the manifest.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sized
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from rlhf.checkpoints import CheckpointCompleteMarker, last_complete_checkpoint, prepare_checkpoints
from rlhf.config import ConfigError, DataArgs, ModelArgs, to_plain_dict
from rlhf.console import LogLastStep, count, say, say_header
from rlhf.hub import HubArgs
from rlhf.manifest import Manifest, ManifestError, write_manifest
from rlhf.processes import StageError, is_main_process
from rlhf.trackers import logs_folder, point_trackers, trackers  # noqa: F401 (stages import them from here)

logger = logging.getLogger(__name__)


@dataclass
class StageOutputArgs(HubArgs):
    """What every stage does with its output folder: a finished run already there, trackers, the console, the hub."""

    overwrite: bool = field(
        default=False, metadata={"help": "Replace a finished run in output_dir. Without it, a rerun with the same "
                                 "configuration says it is done and changes nothing, and one with another "
                                 "configuration is refused."})
    logging_dir: str | None = field(
        default=None, metadata={"help": "Where the trackers named by report_to (tensorboard, wandb) write; default "
                                "<output_dir>/logs."})
    verbose: bool = field(
        default=False, metadata={"help": "Show the libraries' own output (progress bars, load reports, deprecation "
                                 "warnings, the trainer's log dicts); by default a stage prints a header, one line per "
                                 "logging step, its evaluation and where it saved."})


# Keys that say how a run is carried out, not what it trains: left out of the configuration hash, so changing them
# neither refuses a finished run nor its checkpoints (PPO's fsdp and gather_for_generation: sharded and unsharded
# updates agree to float rounding, and checkpoints hold whole tensors either way; the gold curve samples under its own
# random state; the console, pinned memory and where the finished stage is pushed change nothing trained).
RUN_ONLY_KEYS = ("output_dir", "overwrite", "ddp_timeout", "logging_dir", "report_to", "fsdp",
                 "gather_for_generation", "gold_curve_points", "verbose", "disable_tqdm", "dataloader_pin_memory",
                 "push_to_hub", "hub_model_id", "hub_private_repo", "hub_strategy", "hub_token", "hub_always_push",
                 "hub_revision")

# Keys added after runs were made with this code, and their defaults: at the default they are left out of the
# configuration, so those runs' hashes still match.
KEYS_ADDED_LATER = {("model", "model_revision"): "main", ("data", "gold_eval_split"): "test",
                    ("data", "gold_eval_max_new_tokens"): 64}

LOCK_NAME = ".lock"


def hold_output_lock(output_dir: str):
    """Refuse a second run on the same output folder while this one lives. One lock per folder, held by rank 0 and
    its verdict shared with every rank, so either all processes of a launch go on or none does. The OS drops the
    lock if the process dies. Also checks the folder can be written before anything trains."""
    from rlhf.processes import ProcessWatch

    error, handle = None, None
    if is_main_process():
        error = check_writable(Path(output_dir))
        if error is None:
            lock_path = Path(output_dir) / LOCK_NAME
            handle = open(lock_path, "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                handle.write(str(os.getpid()))
                handle.flush()
            except BlockingIOError:
                handle.close()
                handle = None
                error = (f"{output_dir} is in use by another run (lock {lock_path}); wait for it or pick another "
                         "output_dir")
    error = _shared_verdict(error)
    if error:
        raise StageError(error)
    ProcessWatch.current().beat_into(output_dir)
    return handle  # keep a reference: the lock lives as long as this file object


def check_writable(output_dir: Path) -> str | None:
    """Why output_dir (or a folder in it a stage writes into) cannot be written, or None. Tried, not inferred from
    permission bits, which root and read-only mounts do not follow."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"output_dir {output_dir}: cannot create it ({error.strerror}); pick a folder you can write to"
    for folder in [output_dir] + [output_dir / name for name in ("adapter", "merged", "checkpoints")]:
        if not folder.exists():
            continue
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            return (f"output_dir: {folder} is not writable ({error.strerror}); fix its permissions or pick another "
                    "output_dir, before anything is trained")
    return None


def _shared_verdict(error: str | None) -> str | None:
    """Rank 0's verdict, on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    verdict = [error]
    dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _output_verdict(stage: str, output: Path, config: dict, overwrite: bool, extends) -> str:
    """What to do with a locked output folder: 'new', 'overwrite', 'extend', 'done', or why it is refused."""
    from rlhf.manifest import MANIFEST_NAME, config_hash, read_manifest

    if not (output / MANIFEST_NAME).is_file():
        return "new"
    if overwrite:
        return "overwrite"
    try:
        finished = read_manifest(output)
    except ManifestError as error:
        return f"{output}: {error}; pass --overwrite true to replace what is there"
    if finished.stage == stage and extends is not None and extends(finished):
        return "extend"
    if finished.stage == stage and finished.config_hash == config_hash(config):
        return "done"
    return (f"{output} holds a finished '{finished.stage}' run of another configuration (config "
            f"{finished.config_hash}, this run {config_hash(config)}); it is kept. Pass --overwrite true to replace "
            "it, or pick another output_dir")


def open_output(stage: str, output_dir: str, config: dict, overwrite: bool, extends=None, push_to=None):
    """Lock output_dir and look at what it holds. Returns (lock, finished manifest or None): a finished run of the
    same configuration is returned untouched (nothing to do; pushed to `push_to` when given, which is how a failed
    push is retried); one of another configuration is refused unless
    `overwrite`, which clears the folder first, or `extends(finished)` says this run continues it (PPO with more
    steps), which retires its manifest until this run writes the new one. Rank 0 looks and decides for every rank:
    a rank that looked after rank 0 had retired the manifest would take another path and miss a collective."""
    from rlhf.manifest import MANIFEST_NAME, read_manifest

    lock = hold_output_lock(output_dir)
    output = Path(output_dir)
    verdict = _shared_verdict(_output_verdict(stage, output, config, overwrite, extends) if is_main_process() else None)
    if verdict == "new":
        return lock, None
    if verdict in ("overwrite", "extend"):
        if is_main_process() and verdict == "overwrite":
            logger.warning("overwrite: removing the finished run in %s", output)
            for path in output.iterdir():
                if path.name not in (LOCK_NAME, ".heartbeat", ".pipeline_hash"):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif is_main_process():
            print(f"[rlhf] {stage}: continuing the finished run in {output_dir} "
                  f"(config {read_manifest(output).config_hash})", flush=True)
            (output / MANIFEST_NAME).unlink()
        _barrier()
        return lock, None
    if verdict == "done":
        finished = read_manifest(output)
        if is_main_process():
            print(f"[rlhf] {stage}: {output_dir} already holds this run (config {finished.config_hash}); nothing to "
                  "do. Pass --overwrite true to train it again.", flush=True)
            if push_to is not None:
                from rlhf.hub import push_stage

                push_stage(finished, push_to)
        return lock, finished
    raise StageError(verdict)


class NonFiniteLossGuard(TrainerCallback):
    """Stop on a NaN/inf loss instead of training on garbage; checkpoints saved so far stay on disk."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Trainer filters NaN/inf out of the logged loss by default; a non-finite gradient norm still shows it.
        logs = logs or {}
        # Under fp16 the gradient scaler overflows now and then by design; it skips that step, so an inf
        # gradient norm there is no divergence.
        keys = ("loss",) if args.fp16 else ("loss", "grad_norm")
        bad = [(key, logs[key]) for key in keys if isinstance(logs.get(key), float) and not math.isfinite(logs[key])]
        if bad:
            name, loss = bad[0]
            last = last_complete_checkpoint(Path(args.output_dir))
            kept = f"last good checkpoint: {last}" if last else "no checkpoint was saved yet"
            raise StageError(
                f"{'loss' if name == 'loss' else 'gradient norm'} became {loss} at step {state.global_step}; "
                f"the loss diverged; stopping ({kept}). "
                "Lower the learning rate or check the data."
            )


class GoldCurveCallback(TrainerCallback):
    """Held-out reward a few times during training (see rlhf.evaluate.curve), sampled by the main process.
    Skipped when the model is sharded (FSDP, DeepSpeed): one process cannot sample a model the others hold."""

    def __init__(self, data_args: DataArgs, output_dir: str, prompts: list[list[dict]] | None):
        self.data_args, self.output_dir, self.prompts, self.curve = data_args, output_dir, prompts, None

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        from rlhf.evaluate.curve import gold_curve

        if not state.is_world_process_zero or not self.data_args.gold_curve_points:
            return
        if model_is_sharded(args):
            logger.warning("gold_curve_points: skipped, the model is sharded over the processes")
            return
        self.curve = gold_curve(self.data_args, self.prompts, self.output_dir, state.max_steps, args.seed)
        if self.curve:
            self.curve.start(model, processing_class, state.global_step)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.curve and self.curve.due(state.global_step):
            self.curve.record(model, processing_class, state.global_step)


def model_is_sharded(args) -> bool:
    """FSDP or DeepSpeed, set in the training arguments or by the accelerate config the stage was launched with
    (which leaves args.fsdp and args.deepspeed empty and says so in the environment)."""
    from accelerate.utils import parse_flag_from_env

    return bool(args.fsdp or args.deepspeed or parse_flag_from_env("ACCELERATE_USE_FSDP")
                or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"))


def stage_callbacks(output_dir: str, data_args: DataArgs | None = None,
                    gold_prompts: list[list[dict]] | None = None) -> list[TrainerCallback]:
    """The callbacks every TRL-trained stage runs with; a policy stage passes its data arguments and held-out prompts
    for the held-out curve."""
    from rlhf.trackers import MetricsLog

    curve = [GoldCurveCallback(data_args, output_dir, gold_prompts)] if data_args is not None else []
    return [NonFiniteLossGuard(), CheckpointCompleteMarker(), LogLastStep(), MetricsLog(output_dir), *curve]


def train(trainer, stage: str, resume_from: str | None):
    """trainer.train with the stage's console lines (rlhf.console) in place of the trainer's progress bar."""
    from rlhf.console import attach

    attach(trainer, stage)
    return trainer.train(resume_from_checkpoint=resume_from)


def logged_losses(log_history: list[dict], key: str = "loss") -> list[float]:
    return [entry[key] for entry in log_history if key in entry]


def training_metrics(trainer, train_result) -> dict:
    """What every TRL-trained stage records: final loss, steps, records trained on (after the trainer's own
    filtering), and first/last logged loss (did it learn?)."""
    metrics = {"train_loss": train_result.training_loss, "steps": trainer.state.global_step,
               "world_size": trainer.accelerator.num_processes,
               "train_seconds": train_result.metrics.get("train_runtime"),
               "train_records": count(trainer.train_dataset)}
    if isinstance(trainer.eval_dataset, Sized):
        metrics["eval_records"] = len(trainer.eval_dataset)
    for key in ("loss", "reward"):  # reward: what the online stages (grpo, rloo) maximise, per logged step
        logged = logged_losses(trainer.state.log_history, key)
        if logged:
            metrics.update({f"first_logged_{key}": logged[0], f"last_logged_{key}": logged[-1]})
    return metrics


def load_gold_prompts(data_args: DataArgs) -> list[list[dict]] | None:
    """Held-out prompts for the end-of-stage gold-reward check and the held-out curve, when the recipe names them."""
    if not data_args.gold_eval_prompts:
        return None
    from rlhf.data import load_prompts

    records = load_prompts(data_args.gold_eval_prompts, data_args.gold_eval_split)
    return [record["prompt"] for record in records][: data_args.gold_eval_samples]


def require(value, name: str, stage: str) -> None:
    if value in (None, ""):
        raise ConfigError(f"{stage}: '{name}' is required (set it in the recipe or pass --{name})")


def start_stage(stage: str, stage_args, output_dir: str | None, hub_revision: str | None = None):
    """What every stage does first, before it reads any data: the console (library output silenced unless
    --verbose), and with push_to_hub the checks that the finished stage can be uploaded. Returns where to push it
    (rlhf.hub.HubTarget) or None."""
    from rlhf import console, hub

    console.start(stage_args.verbose, uses_datasets=stage != "ppo")
    require(output_dir, "output_dir", stage)
    return hub.push_target(stage_args, output_dir, hub_revision)


def start_trl_stage(stage: str, training_args, stage_args, **required):
    """What a TRL-trained stage checks before it reads any data (parse_args has checked the numeric ranges): what
    start_stage checks, required keys, and a launch whose processes can see each other (the TRL config already
    joined the process group, with its ddp_timeout). Returns where to push the finished stage, or None."""
    import torch

    from rlhf.processes import start_processes

    push_to = start_stage(stage, stage_args, training_args.output_dir, training_args.hub_revision)
    for name, value in required.items():
        require(value, name, stage)
    trackers(training_args.report_to)
    # TRL's own push would create the repo now and upload checkpoints while training; the stage pushes once, done.
    training_args.push_to_hub = False
    if not torch.accelerator.is_available():  # pinned memory only serves copies to an accelerator (and warns)
        training_args.dataloader_pin_memory = False
    start_processes(training_args.ddp_timeout)
    return push_to


def open_trl_output(stage: str, model_args: ModelArgs, data_args: DataArgs, training_args, stage_args,
                    parent: Manifest | None):
    """A TRL-trained stage's configuration and output folder: (config, lock, finished manifest or None, checkpoint
    to resume from). See open_output."""
    from rlhf.hub import push_target

    config = stage_config(model_args, data_args, training_args, stage_args, parent)
    output_dir = training_args.output_dir
    lock, finished = open_output(stage, output_dir, config, stage_args.overwrite,
                                 push_to=push_target(stage_args, output_dir, training_args.hub_revision))
    if not finished:
        # Seed before the model is built: the reward head, value head and LoRA weights are initialised before the
        # trainer seeds itself, so without this two runs of one recipe start from different weights.
        from transformers import set_seed

        set_seed(training_args.seed)
        point_trackers(output_dir, stage_args.logging_dir)
        mixed = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else None
        say_header(stage, model_args, output_dir, mixed)
    resume_from = None if finished else prepare_checkpoints(training_args, output_dir, config)
    return config, lock, finished, resume_from


def finish_stage(trainer, stage: str, output_dir: str, model_args: ModelArgs, **details) -> Manifest | None:
    """Save a TRL trainer's model, then write the stage (see write_stage; `push_to` from start_trl_stage). Returns
    the manifest on the main process, None elsewhere."""
    # save_model gathers sharded weights (DeepSpeed/FSDP) and writes safetensors + the tokenizer.
    trainer.save_model(str(Path(output_dir) / ("adapter" if model_args.use_lora else "merged")))
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return None
    return write_stage(stage, output_dir, model_args, tokenizer=trainer.processing_class, **details)


def stage_config(model_args: ModelArgs, data_args: DataArgs, training_args, stage_args=None,
                 parent: Manifest | None = None) -> dict:
    """The resolved configuration a stage records and hashes, computed before any trainer can touch the arguments.
    It includes the hashes of the stages it depends on (parent, reward model), so a changed upstream stage makes
    every stage after it stale; it leaves out where outputs go, which is not part of what was trained."""
    from rlhf.manifest import read_manifest

    config = {
        "model": to_plain_dict(model_args),
        "data": to_plain_dict(data_args),
        "training": to_plain_dict(training_args),
        **({"stage": to_plain_dict(stage_args)} if stage_args is not None else {}),
        "parent_config_hash": parent.config_hash if parent else None,
    }
    for section in ("training", "stage", "data"):
        for key in RUN_ONLY_KEYS:
            config.get(section, {}).pop(key, None)
    # Where to resume from says how the run is carried out, not what it trains; None keeps older runs' hashes.
    if "resume_from_checkpoint" in config["training"]:
        config["training"]["resume_from_checkpoint"] = None
    # TRL's GRPO/RLOO configs fill an unset generation_batch_size from the number of processes, so the pipeline (one
    # process) and the launched stage (N) would hash different values; the settings it is made of are hashed.
    config["training"].pop("generation_batch_size", None)
    for (section, key), default in KEYS_ADDED_LATER.items():
        if config[section].get(key) == default:
            config[section].pop(key)
    reward_model = getattr(training_args, "reward_source", None) or getattr(stage_args, "reward_source", None)
    from rlhf.manifest import MANIFEST_NAME

    if reward_model and (Path(reward_model) / MANIFEST_NAME).is_file():
        config["reward_config_hash"] = read_manifest(reward_model).config_hash
    return config


def write_stage(
    stage: str,
    output_dir: str,
    model_args: ModelArgs,
    data_args: DataArgs,
    config: dict,
    base_model: str,
    parent: Manifest | None,
    metrics: dict,
    tokenizer,
    extra: dict | None = None,
    save_merged: bool = True,
    gold_prompts: list[list[dict]] | None = None,
    after_save=None,
    push_to=None,
) -> Manifest:
    """Finish a stage whose adapter (or full model) is already saved: merged copy, checks, model cards, manifest
    (last); then, with `push_to` (rlhf.hub.HubTarget), the upload.

    Checks of the finished model (`after_save(manifest) -> metrics`, the gold-reward report) run on the model
    reloaded from disk: that proves the saved files are what was trained, whatever the sharding."""
    from rlhf.hub import write_cards
    from rlhf.manifest import config_hash, package_versions
    from rlhf.models import load_stage_output, save_merged_copy
    from rlhf.processes import peak_memory_mib

    metrics = {**metrics, "peak_memory_mib": peak_memory_mib()}  # training's peak, before the checks load more
    output = Path(output_dir)
    adapter_path = "adapter" if model_args.use_lora else None
    local_base = Path(base_model)
    manifest = Manifest(
        stage=stage,
        output_dir=str(output),
        base_model=str(local_base.resolve()) if local_base.exists() else base_model,
        adapter_path=adapter_path,
        merged_path=None if adapter_path else "merged",
        parent=str(Path(parent.output_dir).resolve()) if parent else None,
        parent_manifest={key: value for key, value in parent.__dict__.items() if key != "parent_manifest"} if parent else None,
        config=config,
        metrics=metrics,
        extra=extra or {},
    )
    if adapter_path and save_merged:
        manifest.merged_path = save_merged_copy(manifest, model_args)
    if gold_prompts and data_args.gold_reward:
        from rlhf.evaluate.devices import pick_device
        from rlhf.evaluate.policy import gold_report, load_gold_reward

        policy = load_stage_output(manifest, model_args).to(pick_device())
        seed = config["training"].get("seed", 0)
        report = gold_report(policy, tokenizer, gold_prompts, load_gold_reward(data_args.gold_reward), seed=seed,
                             max_new_tokens=data_args.gold_eval_max_new_tokens)
        manifest.metrics["gold"] = report
        say(stage, f"held-out gold reward {report['gold_reward']['mean']:.3f}, EOS rate {report['eos_rate']:.2f}")
    if after_save is not None:
        manifest.metrics.update(after_save(manifest))
    manifest.config_hash, manifest.versions = config_hash(config), package_versions()  # for the cards
    write_cards(manifest)
    path = write_manifest(manifest)
    saved = [folder + "/" for folder in (manifest.adapter_path, manifest.merged_path) if folder]
    say(stage, f"saved {output} ({', '.join(saved + [path.name])})")
    if push_to is not None:
        from rlhf.hub import push_stage

        push_stage(manifest, push_to)
    return manifest

