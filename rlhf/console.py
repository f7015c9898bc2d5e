"""What a stage prints: a short header, one line per logging step, the evaluation in one line, where it saved.

Library noise (weight-loading and dataset-map progress bars, transformers' load reports, deprecation warnings, the
trainer's progress bar and log dicts) is silenced unless the stage runs with `--verbose true`. Our own warnings
(logger.warning in rlhf.*) and errors always show.

    [rlhf] sft: data/tiny-base -> /tmp/x (LoRA r16, cpu, float32, 1 process)
    [rlhf] sft: training 5 steps on 2000 records (eval 200)
    [rlhf] sft: step 5/5 loss 1.16 token_acc 0.6043 grad_norm 0.3516 lr 8.00e-04
    [rlhf] sft: trained 5 steps in 1.1 s
    [rlhf] sft: eval on 200 records at step 5: loss 1.194 token_acc 0.5988
"""

from __future__ import annotations

import sys
import warnings

from transformers import TrainerCallback

# Libraries whose FutureWarnings/DeprecationWarnings are addressed to their callers' developers, not to a user.
LIBRARIES = r"(transformers|trl|peft|accelerate|datasets|torch|huggingface_hub|safetensors|tokenizers)(\.|$)"

# What a step line shows, in this order (TRL's and PPO's log keys -> short label); the rest goes to the trackers,
# the trainer's log history and PPO's metrics.jsonl.
STEP_KEYS = {
    "loss": "loss", "loss/policy": "pg_loss", "loss/value": "vf_loss",
    "reward": "reward", "score/combined": "score", "score/gold": "gold",
    "kl": "kl", "kl/sequence": "kl",
    "accuracy": "acc", "margin": "margin", "rewards/accuracies": "acc", "rewards/margins": "margin",
    "mean_token_accuracy": "token_acc", "completions/mean_length": "length", "response/length": "length",
    "grad_norm": "grad_norm", "learning_rate": "lr", "lr": "lr",
}
EVAL_PREFIX = "eval_"

_verbose = False  # process-wide, as the library settings it goes with


def say(stage: str, text: str) -> None:
    print(f"[rlhf] {stage}: {text}", flush=True)


def start(verbose: bool, uses_datasets: bool = True) -> None:
    """Silence library output for this process (or, verbose, give the libraries back their defaults). Called first
    thing by every stage, before any data or model loads."""
    global _verbose
    import huggingface_hub.utils
    import transformers.utils.logging as transformers_logging

    # PPO reads its files without datasets: importing it only to quiet it would cost every PPO process ~60 MiB
    # (pandas, pyarrow). The TRL stages import it with trl anyway.
    datasets = sys.modules.get("datasets")
    if datasets is None and uses_datasets:
        import datasets
    _verbose = verbose
    if verbose:
        transformers_logging.set_verbosity_warning()
        transformers_logging.enable_progress_bar()
        if datasets is not None:
            datasets.utils.logging.set_verbosity_warning()
            datasets.enable_progress_bars()
        huggingface_hub.utils.enable_progress_bars()
        library_warnings("default")
        return
    transformers_logging.set_verbosity_error()  # load reports ("newly initialized: score.weight"), advice
    transformers_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    if datasets is not None:
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()  # TRL's "Tokenizing train dataset" and every map/filter
    huggingface_hub.utils.disable_progress_bars()  # downloads and uploads
    library_warnings("ignore")


def library_warnings(action: str) -> None:
    """Ignore (or show again) the libraries' FutureWarnings and DeprecationWarnings. The newest filter wins."""
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings(action, category=category, module=LIBRARIES)


# Already while the recipe is parsed, before `start` knows about --verbose: the TRL configs' own defaults raise some
# (`gradient_checkpointing` is deprecated). A verbose run shows those raised after it starts.
library_warnings("ignore")


def is_verbose() -> bool:
    return _verbose


def say_header(stage: str, model_args, output_dir: str, mixed_precision: str | None = None) -> None:
    """A stage's first line: what it starts from, where it writes, how (adapter, device, precision, processes)."""
    from accelerate import PartialState

    state = PartialState()
    if not state.is_main_process:
        return
    start = model_args.init_from or model_args.model_name_or_path
    details = [f"LoRA r{model_args.lora_r}" if model_args.use_lora else "full fine-tuning", state.device.type,
               model_args.dtype + (f" + {mixed_precision} autocast" if mixed_precision else ""),
               f"{state.num_processes} process{'es' if state.num_processes > 1 else ''}"]
    say(stage, f"{start} -> {output_dir} ({', '.join(details)})")


def number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}"


def step_values(values: dict) -> str:
    """`loss 1.234 ... lr 1.00e-04`: the STEP_KEYS found in values, each label once."""
    shown, labels = [], set()
    for key, label in STEP_KEYS.items():
        if key in values and label not in labels and isinstance(values[key], (int, float)):
            labels.add(label)
            shown.append(f"{label} {values[key]:.2e}" if label == "lr" else f"{label} {number(values[key])}")
    return " ".join(shown)


def step_line(step: int, total: int, values: dict) -> str:
    return f"step {step}/{total} {step_values(values)}"


def eval_line(metrics: dict) -> str:
    """`loss 0.99 acc 0.93 margin 2.0`: the evaluation's STEP_KEYS, the rest in the manifest and trackers."""
    return step_values({key[len(EVAL_PREFIX):]: value for key, value in metrics.items() if key.startswith(EVAL_PREFIX)})


def count(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # an iterable dataset has no length
        return None


class LogLastStep(TrainerCallback):
    """Log the final step whatever logging_steps is: a run shorter than logging_steps would log no loss at all, and
    the last logged loss (the manifest's last_logged_loss) would not be the last one."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.logging_strategy != "no":
            control.should_log = True


class ConsoleCallback(TrainerCallback):
    """A TRL trainer's console output: the training line, one line per logging step, the evaluation, the time."""

    def __init__(self, stage: str, train_records: int | None, eval_records: int | None):
        self.stage, self.train_records, self.eval_records = stage, train_records, eval_records

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        records = f" on {self.train_records} records" if self.train_records is not None else ""
        evaluation = f" (eval {self.eval_records})" if self.eval_records else ""
        resumed = f", from step {state.global_step}" if state.global_step else ""
        say(self.stage, f"training {state.max_steps} steps{records}{evaluation}{resumed}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if not state.is_world_process_zero or any(key.startswith(EVAL_PREFIX) for key in logs):
            return  # evaluations: on_evaluate
        if "train_runtime" in logs:  # the trainer's summary at the end of train()
            say(self.stage, f"trained {state.global_step} steps in {logs['train_runtime']:.1f} s")
        else:
            say(self.stage, step_line(state.global_step, state.max_steps, logs))

    def on_evaluate(self, args, state, control, metrics=None, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        records = count(getattr(eval_dataloader, "dataset", None)) or self.eval_records
        on = f" on {records} records" if records else ""
        say(self.stage, f"eval{on} at step {state.global_step}: {eval_line(metrics or {})}")


def attach(trainer, stage: str) -> None:
    """Give a built trainer our console lines; unless verbose, instead of its progress bar and log dicts."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if not _verbose:
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
    eval_dataset = trainer.eval_dataset
    if isinstance(eval_dataset, dict):  # several named eval sets
        eval_records = sum(count(part) or 0 for part in eval_dataset.values())
    else:
        eval_records = count(eval_dataset) if eval_dataset is not None else None
    trainer.add_callback(ConsoleCallback(stage, count(trainer.train_dataset), eval_records))
