"""Run arguments shared by every stage, and the parser that fills dataclasses from a YAML recipe plus the command line.

Precedence: dataclass defaults < YAML recipe (--config) < command-line flags. Recipe keys and flags are checked
before anything runs: an unknown one fails in one line with a did-you-mean, a value of the wrong type fails naming the
key and the expected type. TRL's names for our keys (rlhf.trl_names) are accepted in recipes and on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A recipe or command line that cannot run; the message says what to fix."""


def _check_range(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def _at_least_one(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    _check_range(name, value, isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 "an integer >= 1" + (" (or leave it unset)" if optional else ""))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class ModelArgs:
    """Which model a stage starts from and how its LoRA adapter is shaped."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base model: a local folder or a hub name. Leave empty when init_from names a parent stage."},
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "Output folder of the parent stage (e.g. runs/tiny/sft); its manifest gives base and adapter."},
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "Hub revision (branch, tag or commit) of model_name_or_path. Any other than main is fetched "
                          "(offline: read from the hub cache) as a snapshot folder at that commit, which the manifest "
                          "records, so every later stage loads the same weights whatever the branch does next."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with the model. Off unless you trust it."}
    )
    dtype: str = field(
        default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16.", "choices": ["float32", "bfloat16", "float16"]}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."})
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (else full fine-tuning)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "Modules to adapt; 'all-linear' adapts every linear layer."}
    )
    lora_modules_to_save: list[str] = field(
        default_factory=list, metadata={"help": "Modules trained in full and saved with the adapter (e.g. norm)."}
    )
    lora_trainable_tokens: list[str] = field(
        default_factory=list, metadata={"help": "Tokens whose embeddings train with the adapter (e.g. <|im_end|>, "
                                                "when the chat template's special tokens were never trained)."}
    )

    def __post_init__(self):
        _at_least_one("lora_r", self.lora_r)
        _check_range("lora_alpha", self.lora_alpha, _number(self.lora_alpha) and self.lora_alpha > 0, "a number > 0")
        _check_range("lora_dropout", self.lora_dropout, _number(self.lora_dropout) and 0 <= self.lora_dropout < 1,
                     "a number in [0, 1)")


@dataclass
class DataArgs:
    """Where training and evaluation data come from (local JSONL/JSON/parquet file or hub dataset name)."""

    train_data: str | None = field(default=None, metadata={"help": "Training data: file, folder or hub dataset name."})
    train_split: str = field(default="train", metadata={"help": "Split to read when train_data is a hub dataset."})
    eval_data: str | None = field(default=None, metadata={"help": "Evaluation data (same forms as train_data)."})
    eval_split: str = field(default="test", metadata={"help": "Split to read when eval_data is a hub dataset."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation records."})
    length_policy: str = field(
        default="truncate",
        metadata={"help": "Records longer than max_length: error, drop or truncate.", "choices": ["error", "drop", "truncate"]},
    )
    gold_reward: str | None = field(
        default=None,
        metadata={"help": "module:function scoring (prompt, response) when the task has a programmatic gold reward, "
                  "e.g. rlhf.tiny.task:gold_reward. Used for reports only, never for training."},
    )
    gold_eval_prompts: str | None = field(
        default=None, metadata={"help": "Held-out prompts (a file, folder or hub dataset): sampled after training "
                                "to report the gold reward (with gold_reward), and during training for "
                                "gold_curve_points."}
    )
    gold_eval_split: str = field(default="test", metadata={
        "help": "Split to read when gold_eval_prompts is a hub dataset or a folder of splits."})
    gold_eval_samples: int = field(default=64, metadata={"help": "How many of gold_eval_prompts are sampled."})
    gold_eval_max_new_tokens: int = field(default=64, metadata={
        "help": "Longest response sampled from gold_eval_prompts (the gold check and the held-out curve)."})
    gold_curve_points: int = field(
        default=0, metadata={"help": "Policy stages: also sample gold_eval_prompts at the start and this many times "
                             "during training, evenly spaced, into <output_dir>/gold_curve.jsonl (the samples, and "
                             "their gold reward when gold_reward is set). The pipeline scores them with its reward "
                             "model and plots reward against training seconds. Its sampling has its own random state: "
                             "training is unchanged. 0 (or no gold_eval_prompts) = off."})
    dataset_config: str | None = field(
        default=None, metadata={"help": "Hub dataset configuration (its 'subset', e.g. 'helpful-base'), passed to "
                                "datasets.load_dataset(name, dataset_config); also picks a config of a local hub "
                                "snapshot folder."})
    on_bad_record: str = field(
        default="error",
        metadata={"help": "Malformed records: error (stop at the first, naming it) or skip (leave them out; the count "
                  "and the first reasons are printed).", "choices": ["error", "skip"]},
    )
    margin_from_scores: bool = field(
        default=False, metadata={"help": "Preference data with score_chosen/score_rejected (UltraFeedback): use "
                                 "score_chosen - score_rejected as the pair's margin (TRL's reward-model margin)."})

    def __post_init__(self):
        _at_least_one("max_train_samples", self.max_train_samples, optional=True)
        _at_least_one("max_eval_samples", self.max_eval_samples, optional=True)
        _at_least_one("gold_eval_samples", self.gold_eval_samples)
        _at_least_one("gold_eval_max_new_tokens", self.gold_eval_max_new_tokens)
        _check_range("gold_curve_points", self.gold_curve_points, isinstance(self.gold_curve_points, int)
                     and self.gold_curve_points >= 0, "an integer >= 0 (0 = off)")


def check_training_ranges(training_args) -> None:
    """Check the TRL/transformers TrainingArguments fields that are easy to get wrong (transformers accepts a batch
    size of 0 and fails much later); raises ConfigError naming the key. Fields a config lacks are skipped."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if hasattr(training_args, name):
            _at_least_one(name, getattr(training_args, name))
    learning_rate = getattr(training_args, "learning_rate", None)
    if learning_rate is not None:
        _check_range("learning_rate", learning_rate, _number(learning_rate) and learning_rate >= 0, "a number >= 0")
    epochs, max_steps = getattr(training_args, "num_train_epochs", None), getattr(training_args, "max_steps", None)
    if epochs is not None and not (_number(max_steps) and max_steps > 0):
        _check_range("num_train_epochs", epochs, _number(epochs) and epochs > 0, "a number > 0 (or set max_steps > 0)")
    for name in ("max_length", "max_prompt_length", "max_completion_length"):
        if hasattr(training_args, name):
            _at_least_one(name, getattr(training_args, name), optional=True)


def check_precision(bf16: bool, fp16: bool, where: str) -> None:
    """Refuse half precision this machine cannot run, before anything loads: transformers and accelerate refuse it
    later with a traceback. `where` names what asked for it (e.g. "ppo", "TRL's default")."""
    from transformers.utils import import_utils

    if bf16 and fp16:
        raise ConfigError(f"{where} sets both bf16 and fp16: set at most one")
    if bf16 and not (import_utils.is_torch_bf16_gpu_available() or import_utils.is_torch_xla_available()):
        raise ConfigError(f"{where} sets bf16: true but this machine has no GPU that runs bf16: set bf16: false "
                          "(--bf16 false) or run on a GPU")
    # accelerate runs fp16 mixed precision on these devices only
    fp16_devices = ("cuda", "xpu", "npu", "mlu", "musa", "hpu", "mps")
    if fp16 and not any(getattr(import_utils, f"is_torch_{device}_available", lambda: False)() for device in fp16_devices):
        raise ConfigError(f"{where} sets fp16: true but this machine has no GPU: set fp16: false (--fp16 false) or run "
                          "on a GPU")


def _check_training_precision(namespace: dict) -> None:
    """check_precision for TrainingArguments values, before TrainingArguments itself refuses them (use_cpu runs bf16
    on the CPU; TRL's configs turn bf16 on when neither bf16 nor fp16 is set)."""
    fp16 = bool(namespace.get("fp16") or namespace.get("fp16_full_eval"))
    bf16 = namespace.get("bf16")
    where = "TRL's default (bf16 unset)" if bf16 is None and not fp16 else "the config"
    bf16 = (not fp16 if bf16 is None else bf16) or bool(namespace.get("bf16_full_eval"))
    check_precision(bf16 and not namespace.get("use_cpu"), fp16, where)


def _field_types(dataclass_types) -> dict[str, tuple[type, object]]:
    fields: dict[str, tuple[type, object]] = {}
    for dataclass_type in dataclass_types:
        hints = typing.get_type_hints(dataclass_type)
        for dataclass_field in dataclasses.fields(dataclass_type):
            if dataclass_field.init:
                fields[dataclass_field.name] = (hints.get(dataclass_field.name, object), dataclass_type)
    return fields


def _matches_type(value, annotation) -> bool:
    """Loose check of a YAML value against a dataclass annotation (enough to catch `lr: [1]` or `epochs: many`)."""
    origin = typing.get_origin(annotation)
    if annotation is typing.Any or annotation is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches_type(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, (dict, str))  # TRL accepts JSON strings for dict fields
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, (str, int, float))
    if isinstance(annotation, type) and issubclass(annotation, str):  # str-valued enums (e.g. IntervalStrategy)
        return isinstance(value, str)
    return True


def _describe(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


# PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent: `1e-3` and `1.0e3` are read as strings.
_NUMBER_STRING = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _accepts(annotation, wanted: type) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts(arg, wanted) for arg in typing.get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, wanted) and not (
        wanted is int and annotation is bool)


def _takes_list(annotation) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_list(arg) for arg in typing.get_args(annotation))
    return annotation is list or typing.get_origin(annotation) is list


def _recipe_value(value, annotation):
    """A recipe value as the field should hold it: a number written as a string (`learning_rate: 1e-3`) becomes a
    float where the field takes a float and no string; one string where the field takes a list and no string
    (`lora_target_modules: all-linear`, as TRL recipes write it) becomes a list of it. Everything else is as is."""
    if (isinstance(value, str) and _NUMBER_STRING.fullmatch(value.strip()) and _accepts(annotation, float)
            and not _accepts(annotation, str)):
        return float(value)
    if isinstance(value, str) and _takes_list(annotation) and not _accepts(annotation, str):
        return [value]
    return value


def _type_hint(value, annotation) -> str:
    """Extra advice for a number string given to an integer field (`max_steps: 1e3`)."""
    if (isinstance(value, str) and _NUMBER_STRING.fullmatch(value.strip()) and _accepts(annotation, int)
            and not _accepts(annotation, float)):
        number = float(value)
        example = f"{int(number)}" if number.is_integer() else "a whole number"
        return f"; write it as a plain integer, e.g. {example}"
    return ""


def load_recipe(path: str, dataclass_types) -> dict:
    """Read a YAML recipe and check every key and value type against the stage's dataclasses; TRL's names come back
    as ours."""
    return _read_recipe(path, dataclass_types)[0]


def _read_recipe(path: str, dataclass_types) -> tuple[dict, set[str]]:
    """The recipe with our key names, and the TRL names it used."""
    import yaml

    recipe_path = Path(path)
    if not recipe_path.is_file():
        raise ConfigError(f"recipe {path}: file not found")
    try:
        recipe = yaml.safe_load(recipe_path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe {path}: not valid YAML: {error}") from None
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of key: value, got {type(recipe).__name__}")
    env = recipe.pop("env", {})
    if not isinstance(env, dict):
        raise ConfigError(f"recipe {path}: 'env' must be a mapping of VARIABLE: value")
    from rlhf.trl_names import aliases_for, canonical, did_you_mean

    known = _field_types(dataclass_types)
    aliases = aliases_for(known)
    for key, value in list(recipe.items()):
        if aliases.get(key, key) not in known:
            hint = did_you_mean(key, [*known, *aliases], show=repr)
            hint = f" {hint[:1].upper()}{hint[1:]}{'' if hint.endswith('?') else '.'}" if hint else ""
            raise ConfigError(f"recipe {path}: unknown key '{key}'.{hint} Run with --help to list the keys.")
        annotation, owner = known[aliases.get(key, key)]
        value = recipe[key] = _recipe_value(value, annotation)
        if not _matches_type(value, annotation):
            raise ConfigError(f"recipe {path}: key '{key}' expects {_describe(annotation)}, got "
                              f"{type(value).__name__} {value!r}{_type_hint(value, annotation)}")
        # argparse checks choices on the command line only; a recipe's values become its defaults, unchecked.
        choices = next(item.metadata.get("choices") for item in dataclasses.fields(owner)
                       if item.name == aliases.get(key, key))
        if choices and value not in choices:
            raise ConfigError(f"recipe {path}: key '{key}' expects one of {', '.join(map(str, choices))}, got "
                              f"{value!r}")
    pairs, used = canonical(recipe.items(), aliases, f"recipe {path}: ", show=repr)
    return {**dict(pairs), **({"env": env} if env else {})}, used


def _raise_config_error(message: str):
    """argparse's own errors (a bad choice, a value that is not a number) as one line instead of its usage text."""
    raise ConfigError(message)


def parse_args(dataclass_types, argv: list[str] | None = None, prog: str | None = None, description: str | None = None):
    """Fill `dataclass_types` from `--config recipe.yaml` and command-line overrides; returns one instance each."""
    from trl import TrlParser

    from rlhf.trl_names import aliases_for, canonical_flags

    args = list(sys.argv[1:] if argv is None else argv)
    args = [part for arg in args for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    # A field declared by several dataclasses (trust_remote_code is in ModelArgs and every TRL config) becomes one
    # flag whose value fills them all. No abbreviations: a typo'd flag must fail, not set the flag it prefixes.
    parser = TrlParser(dataclass_types, prog=prog, description=description, conflict_handler="resolve",
                       allow_abbrev=False)
    parser.error = _raise_config_error
    parser.add_argument("--config", default=None, help="YAML recipe; command-line flags override its values.")
    aliases = aliases_for(_field_types(dataclass_types))
    for action in parser._actions:
        if action.help and "%" in action.help and "%(" not in action.help:  # plain prose: '%' is not a format
            action.help = action.help.replace("%", "%%")
        also = [f"--{alias}" for alias, target in aliases.items() if action.option_strings[:1] == [f"--{target}"]]
        if also:
            action.help = f"{action.help or ''} (also: {', '.join(also)}, as TRL names it)".strip()
    trl_names = set()
    if "--config" in args:
        index = args.index("--config")
        if index + 1 >= len(args):
            raise ConfigError("--config needs a recipe path")
        recipe_path = args[index + 1]
        del args[index : index + 2]
        recipe, trl_names = _read_recipe(recipe_path, dataclass_types)
        for name, value in recipe.pop("env", {}).items():
            os.environ[name] = str(value)
        parser.set_defaults_with_config(**recipe)
    args, flag_trl_names = canonical_flags(args, parser, aliases)
    namespace = vars(parser.parse_args(args))
    optional = {name for name, (annotation, _) in _field_types(dataclass_types).items() if _accepts(annotation, type(None))}
    for name in optional & set(namespace):  # `--reward_model null` on the command line unsets it, as in a recipe
        if namespace[name] in ("null", "None"):
            namespace[name] = None
    if any(_is_training_arguments_type(dataclass_type) for dataclass_type in dataclass_types):
        _check_training_precision(namespace)
    instances = []
    for dataclass_type in dataclass_types:
        names = {item.name for item in dataclasses.fields(dataclass_type) if item.init}
        values = {name: value for name, value in namespace.items() if name in names}
        instances.append(_build(dataclass_type, values, prog))
    for instance in instances:
        if _is_training_arguments(instance):
            check_training_ranges(instance)
            _refuse_model_init_kwargs(instance)
        _move_hub_token(instance)
    if "dataset_name" in trl_names | flag_trl_names:
        _evaluate_like_trl(instances)
    return tuple(instances)


def _evaluate_like_trl(instances) -> None:
    """TRL's scripts evaluate on dataset_name's dataset_test_split whenever eval_strategy is not "no"; a recipe that
    names its data the TRL way and no eval_data gets the same (our stages evaluate on eval_data, read with
    eval_split)."""
    data_args = next((item for item in instances if isinstance(item, DataArgs)), None)
    training_args = next((item for item in instances if _is_training_arguments(item)), None)
    if data_args is None or training_args is None or data_args.eval_data or training_args.eval_strategy == "no":
        return
    if os.path.isfile(data_args.train_data or ""):
        raise ConfigError(f"eval_strategy is {training_args.eval_strategy.value!r} but dataset_name "
                          f"{data_args.train_data} is one file, with no {data_args.eval_split!r} split to evaluate "
                          "on: set eval_data (or eval_strategy: no)")
    data_args.eval_data = data_args.train_data


def _build(dataclass_type, values: dict, prog: str | None):
    try:
        return dataclass_type(**values)
    except ConfigError:
        raise
    except ValueError as error:  # TrainingArguments/TRL configs check combinations in __post_init__
        where = f"{prog}: " if prog else ""
        raise ConfigError(f"{where}{error} (from {dataclass_type.__name__}'s checks of the settings)") from None


def _is_training_arguments(instance) -> bool:
    from transformers import TrainingArguments

    return isinstance(instance, TrainingArguments)


def _is_training_arguments_type(dataclass_type) -> bool:
    from transformers import TrainingArguments

    return isinstance(dataclass_type, type) and issubclass(dataclass_type, TrainingArguments)


# TRL's model_init_kwargs keys and the recipe keys that do their job here.
MODEL_INIT_KEYS = {"dtype": "dtype", "torch_dtype": "dtype", "attn_implementation": "attn_implementation",
                   "trust_remote_code": "trust_remote_code", "revision": "model_revision"}


def _refuse_model_init_kwargs(training_args) -> None:
    """The stages load every model themselves (rlhf.models) and hand TRL a built one, which makes TRL ignore
    model_init_kwargs: refused rather than silently dropped, naming the keys that do the same here."""
    for name in ("model_init_kwargs", "ref_model_init_kwargs"):
        value = getattr(training_args, name, None)
        if not value:
            continue
        keys = json.loads(value) if isinstance(value, str) else value
        instead = ", ".join(f"{key} -> {MODEL_INIT_KEYS[key]}" for key in keys if key in MODEL_INIT_KEYS)
        raise ConfigError(f"{name}: the stages load the models themselves, so TRL would ignore it; set the model "
                          f"keys of the recipe instead ({instead or ', '.join(sorted(set(MODEL_INIT_KEYS.values())))})")


SECRET_KEYS = ("hub_token", "push_to_hub_token")


def _move_hub_token(instance) -> None:
    """Keep the hub token out of the arguments: the HF Trainer pickles its TrainingArguments into training_args.bin in
    every checkpoint and adapter folder. huggingface_hub reads HF_TOKEN from the environment for uploads instead."""
    token = getattr(instance, "hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token
        instance.hub_token = None


def to_plain_dict(instance) -> dict:
    """A JSON-safe dict of a config dataclass, for manifests and hashing."""
    if hasattr(instance, "to_dict"):  # transformers TrainingArguments hides secrets (hub tokens) in to_dict
        values = instance.to_dict()
        # ... by hiding every "*_token" value, TRL's eos_token and pad_token too: those are settings, not secrets,
        # and must reach the hash and the manifest (unset they stay hidden, so older runs' hashes still match).
        values.update({key: getattr(instance, key) for key in values if key.endswith("_token")
                       and key not in SECRET_KEYS and getattr(instance, key, None) is not None})
    else:
        values = dataclasses.asdict(instance)
    return {key: _json_safe(value) for key, value in values.items()}


def _json_safe(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(item) for item in value]
    if hasattr(value, "value"):  # enums
        return _json_safe(value.value)
    return str(value)
