"""Rewards for the online stages (ppo, grpo, rloo): a reward-model stage, Python reward functions, or both.

A reward function has TRL's signature: `f(prompts, completions, **columns) -> list[float | None]`, one value per
completion (None: this function does not judge that one). Prompts and completions are message lists for chat data
(a completion is `[{"role": "assistant", "content": text}]`), strings for plain text; every other column of the
prompt data reaches the function by name. Functions are named by import path, as `trl grpo --reward_funcs` takes
them (`package.module.function` or `package.module:function`), or by TRL's built-in names (`accuracy_reward`, ...).

Everything here is checked before a model loads: import paths, and one probe call of each function on the first
prompts, whose answer must be a list of numbers of the right length.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys
from dataclasses import dataclass, field
from numbers import Real
from typing import Callable

from rlhf.config import ConfigError
from rlhf.manifest import Manifest

# TRL's built-in reward functions, by the names `trl grpo --reward_funcs` accepts.
TRL_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward", "get_soft_overlong_punishment")


@dataclass
class RewardArgs:
    """Where an online stage's reward comes from."""

    reward_model: str | None = field(
        default=None, metadata={"help": "Reward stage folder (e.g. runs/tiny/reward): its model scores each completion "
                                "at the last real token."})
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "TRL's name for the reward model: a reward stage folder, or (grpo/rloo) any "
                                "sequence-classification model by path or hub name, loaded by TRL."})
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Reward functions by import path (package.module.function or package.module:function) or "
                  "TRL built-in name (accuracy_reward, think_format_reward, ...): f(prompts, completions, **columns) "
                  "-> list[float | None]. Used with the reward model or instead of it; reward_weights weighs the "
                  "reward model first, then the functions in order."})
    normalize_reward: bool = field(
        default=True, metadata={"help": "Normalise reward-model scores with the mean/std its manifest recorded, so "
                                "they are on a scale comparable to functions in [0, 1] and to reward_weights."})
    min_reward_accuracy: float = field(
        default=0.6, metadata={"help": "Refuse to start when the reward model's held-out accuracy (in its manifest) "
                               "is below this; 0 turns the check off."})

    def __post_init__(self):
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if not 0 <= self.min_reward_accuracy <= 1:
            raise ConfigError(f"min_reward_accuracy: expected a number in [0, 1] (0 = off), got "
                              f"{self.min_reward_accuracy!r}")
        if self.reward_model and self.reward_model_name_or_path and self.reward_model != self.reward_model_name_or_path:
            raise ConfigError("set reward_model or reward_model_name_or_path (TRL's name for it), not both")

    @property
    def reward_source(self) -> str | None:
        return self.reward_model or self.reward_model_name_or_path


def is_stage_folder(path: str | None) -> bool:
    from rlhf.manifest import MANIFEST_NAME

    return bool(path) and os.path.isfile(os.path.join(path, MANIFEST_NAME))


def reward_manifest(args: RewardArgs) -> Manifest | None:
    """The reward stage's manifest, when the reward model is one of our stages."""
    from rlhf.manifest import resolve_parent

    source = args.reward_source
    if args.reward_model or is_stage_folder(source):
        return resolve_parent(source, ("reward",))  # a missing or unfinished folder gets its own clear error
    return None  # a plain sequence classifier named by reward_model_name_or_path, loaded by TRL


def check_reward_sources(stage: str, args: RewardArgs, manifest: Manifest | None) -> None:
    """At least one reward, and a reward model good enough to train against (the gate)."""
    if not args.reward_source and not args.reward_funcs:
        raise ConfigError(f"{stage}: no reward: set reward_model (a reward stage folder) and/or reward_funcs "
                          "(import paths of reward functions)")
    if manifest is None or not args.min_reward_accuracy:
        return
    accuracy = manifest.metrics.get("eval_accuracy")
    if accuracy is None:
        raise ConfigError(f"{stage}: {manifest.output_dir} records no held-out accuracy (its stage had no eval_data), "
                          f"so min_reward_accuracy {args.min_reward_accuracy} cannot be checked; retrain it with "
                          "eval_data or set min_reward_accuracy: 0")
    if accuracy < args.min_reward_accuracy:
        raise ConfigError(f"{stage}: the reward model {manifest.output_dir} has held-out accuracy {accuracy:.3f}, below "
                          f"min_reward_accuracy {args.min_reward_accuracy}: training against it would optimise noise. "
                          "Improve it (more data or steps) or lower min_reward_accuracy (0 = no check)")


def reward_statistics(stage: str, manifest: Manifest, normalize: bool) -> tuple[float, float] | None:
    """(mean, std) the reward model's scores are normalised with, or None."""
    if not normalize:
        return None
    if "reward_mean" not in manifest.metrics:
        raise ConfigError(f"{stage}: {manifest.output_dir}: manifest has no reward_mean/reward_std; retrain it or set "
                          "normalize_reward: false")
    return manifest.metrics["reward_mean"], manifest.metrics["reward_std"]


# ----------------------------------------------------------------------------------------------- functions

def load_reward_function(spec: str) -> Callable:
    """One reward function from a TRL built-in name or an import path; a clear error for anything else."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"reward_funcs: {spec!r}: expected an import path such as mypackage.rewards.exact_match")
    if spec in TRL_REWARDS:
        import trl.rewards

        function = getattr(trl.rewards, spec)
        # TRL's CLI builds the overlong punishment with these values; do the same so the name means the same here.
        return function(max_completion_len=1280, soft_punish_cache=256) if spec == "get_soft_overlong_punishment" else function
    module_name, separator, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not separator or not module_name or not name:
        raise ConfigError(f"reward_funcs: {spec!r} is neither a TRL reward ({', '.join(TRL_REWARDS)}) nor an import "
                          "path like package.module.function")
    if os.getcwd() not in sys.path:  # as `trl grpo` does: modules next to the recipe import without installing
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"reward_funcs: {spec!r}: cannot import module {module_name!r} ({error})") from None
    function = getattr(module, name, None)
    if function is None:
        raise ConfigError(f"reward_funcs: {spec!r}: module {module_name} has no {name!r}")
    if not callable(function):
        raise ConfigError(f"reward_funcs: {spec!r} is a {type(function).__name__}, not a function")
    return function


def checked(function: Callable, spec: str) -> Callable:
    """`function`, raising a clear error when it answers with the wrong number of values or a value that is not a
    number or None. Keeps the function's name (TRL logs rewards/<name>/mean)."""

    @functools.wraps(function)
    def call(prompts, completions, **columns):
        values = function(prompts=prompts, completions=completions, **columns)
        return check_values(values, len(completions), spec)

    return call


def check_values(values, expected: int, spec: str) -> list[float | None]:
    if not isinstance(values, (list, tuple)) and not hasattr(values, "tolist"):
        raise ConfigError(f"reward function {spec}: returned {type(values).__name__}; expected a list of "
                          f"{expected} numbers (one per completion)")
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    if len(values) != expected:
        raise ConfigError(f"reward function {spec}: returned {len(values)} values for {expected} completions; "
                          "expected one per completion")
    for index, value in enumerate(values):
        if value is not None and (isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value)):
            raise ConfigError(f"reward function {spec}: value {index} is {value!r} ({type(value).__name__}); expected "
                              "a number, or None to leave that completion unjudged")
    return [None if value is None else float(value) for value in values]


def load_reward_functions(specs: list[str], probe_records: list[dict]) -> list[Callable]:
    """Import every function and call each once on the first prompts with an empty answer (an empty reply is a
    valid completion), so a wrong signature, length or value type stops the stage before any model loads."""
    functions = []
    for spec in specs:
        function = checked(load_reward_function(spec), spec)
        prompts = [record["prompt"] for record in probe_records]
        completions = [[{"role": "assistant", "content": ""}] if isinstance(prompt, list) else "" for prompt in prompts]
        columns = record_columns(probe_records)
        try:
            function(prompts, completions, completion_ids=[[] for _ in prompts], **columns)
        except ConfigError:
            raise
        except Exception as error:  # noqa: BLE001 (any failure of user code is reported, not traced)
            raise ConfigError(f"reward function {spec}: failed on a probe call with the first {len(prompts)} prompts "
                              f"and empty answers: {type(error).__name__}: {error}. It is called as f(prompts=..., "
                              f"completions=..., completion_ids=..., **columns) with columns "
                              f"{sorted(columns) or 'none'}") from None
        functions.append(function)
    return functions


def record_columns(records: list[dict]) -> dict[str, list]:
    """Every column of the prompt records but the prompt, as lists (None where a record lacks it): what a reward
    function receives by name, as TRL passes a dataset's extra columns."""
    names = dict.fromkeys(key for record in records for key in record if key != "prompt")
    return {name: [record.get(name) for record in records] for name in names}


def completion_text(completion) -> str:
    """The text of a completion as a reward function receives it (a message list or a string)."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion if isinstance(message, dict))


# ----------------------------------------------------------------------------------------------- reward model

class RewardModelFunction:
    """A reward stage's model as a reward function: each prompt + completion rendered with the reward model's chat
    template exactly as in its training, scored at the last real token, normalised with its manifest's statistics
    when asked. Runs on `device`, one batch at a time."""

    __name__ = "reward_model"

    def __init__(self, manifest: Manifest, model_args, statistics: tuple[float, float] | None, device,
                 batch_size: int = 32):
        from rlhf.models import REWARD, load_stage_output, stage_tokenizer

        self.tokenizer = stage_tokenizer(manifest, model_args)
        self.model = load_stage_output(manifest, model_args, REWARD).to(device).requires_grad_(False).eval()
        self.statistics = statistics
        self.batch_size = batch_size

    def __call__(self, prompts, completions, **columns) -> list[float]:
        from rlhf.evaluate.scoring import score_conversations

        conversations = [as_messages(prompt, "user") + as_messages(completion, "assistant")
                         for prompt, completion in zip(prompts, completions)]
        scores, _ = score_conversations(self.model, self.tokenizer, conversations, self.batch_size, show_progress=False)
        if self.statistics:
            mean, std = self.statistics
            scores = [(score - mean) / max(std, 1e-8) for score in scores]
        return scores


def as_messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]
