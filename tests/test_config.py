"""Recipe + command-line parsing: precedence, unknown keys, wrong types, and every shipped recipe parses."""

import importlib
import re
from pathlib import Path

import pytest
import torch

from rlhf.config import ConfigError, DataArgs, ModelArgs, check_training_ranges, parse_args
from rlhf.manifest import config_hash

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_command_line_overrides_recipe(tmp_path):
    recipe = write(tmp_path, "model_name_or_path: base\nlora_r: 4\ntrain_data: a.jsonl\n")
    model_args, data_args = parse_args((ModelArgs, DataArgs), ["--config", recipe, "--lora_r", "8"])
    assert model_args.model_name_or_path == "base"
    assert model_args.lora_r == 8
    assert data_args.train_data == "a.jsonl"
    assert model_args.lora_alpha == 32  # dataclass default where neither says


def test_unknown_key_suggests_the_close_one(tmp_path):
    recipe = write(tmp_path, "lora_rank: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'lora_rank'.*Did you mean 'lora_r'"):
        parse_args((ModelArgs, DataArgs), ["--config", recipe])


def test_wrong_type_names_key_and_expected_type(tmp_path):
    recipe = write(tmp_path, "lora_r: [4, 8]\n")
    with pytest.raises(ConfigError, match=r"key 'lora_r' expects int, got list"):
        parse_args((ModelArgs,), ["--config", recipe])


def test_missing_recipe_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        parse_args((ModelArgs,), ["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_args((ModelArgs,), ["--config", write(tmp_path, "- a\n- b\n")])


def test_env_block_sets_variables(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_TEST_VAR", raising=False)
    parse_args((ModelArgs,), ["--config", write(tmp_path, "env:\n  RLHF_TEST_VAR: yes-please\n")])
    import os

    assert os.environ["RLHF_TEST_VAR"] == "yes-please"


def stage_recipes():
    return sorted(path for path in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in path.parts)


@pytest.mark.parametrize("recipe", stage_recipes(), ids=lambda path: str(path.relative_to(REPO)))
def test_every_stage_recipe_parses(recipe):
    # Every recipe opens with the command that runs it; that names the stage module whose dataclasses it fills.
    head = recipe.read_text().splitlines()[1]
    command = re.search(r"rlhf (\S+) --config", head)
    assert command, f"{recipe}: second line should show the command that runs it"
    from rlhf.cli import COMMANDS

    module = importlib.import_module(COMMANDS[command.group(1)][0])
    overrides = []
    if "bf16: true" in recipe.read_text() and not torch.cuda.is_available():
        overrides = ["--bf16", "false"]  # GPU recipes: TrainingArguments refuses bf16 on a machine without one
    instances = parse_args(module.ARG_TYPES, ["--config", str(recipe), *overrides])
    assert len(instances) == len(module.ARG_TYPES)


@pytest.mark.parametrize("config", sorted((REPO / "recipes" / "accelerate").glob("*.yaml")), ids=lambda path: path.name)
def test_every_accelerate_config_loads(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_processes >= 1
    assert loaded.distributed_type is not None


def test_config_hash_ignores_key_order_but_not_values():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


# --------------------------------------------------------------------------- YAML numbers


def sft_types():
    from rlhf.sft import ARG_TYPES

    return ARG_TYPES


CPU_SAFE = ["--bf16", "false", "--report_to", "none"]  # TRL defaults to bf16, which a CPU-only machine refuses


def test_yaml_exponent_without_dot_is_read_as_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 and 1.0e3 as strings; a float field takes them as the number they spell.
    recipe = write(tmp_path, f"output_dir: {tmp_path / 'out'}\nlearning_rate: 1e-3\nlora_dropout: 5E-2\n"
                             "max_grad_norm: 1.0e1\n")
    model_args, _, training_args, _ = parse_args(sft_types(), ["--config", recipe, *CPU_SAFE])
    assert training_args.learning_rate == 0.001
    assert model_args.lora_dropout == 0.05
    assert training_args.max_grad_norm == 10.0


def test_yaml_exponent_for_an_integer_field_is_refused_with_the_fix(tmp_path):
    recipe = write(tmp_path, "lora_r: 1e1\n")
    with pytest.raises(ConfigError, match=r"recipe .*recipe\.yaml: key 'lora_r' expects int, got str '1e1'; "
                                          r"write it as a plain integer, e\.g\. 10"):
        parse_args((ModelArgs,), ["--config", recipe])


def test_yaml_word_for_a_float_field_is_still_refused(tmp_path):
    recipe = write(tmp_path, "lora_dropout: lots\n")
    with pytest.raises(ConfigError, match=r"key 'lora_dropout' expects float, got str 'lots'"):
        parse_args((ModelArgs,), ["--config", recipe])


# --------------------------------------------------------------------------- numeric ranges


@pytest.mark.parametrize(
    ("flags", "pattern"),
    [
        (["--lora_r", "0"], r"^lora_r: expected an integer >= 1, got 0$"),
        (["--lora_alpha", "-8"], r"^lora_alpha: expected a number > 0, got -8$"),
        (["--lora_dropout", "1.0"], r"^lora_dropout: expected a number in \[0, 1\), got 1\.0$"),
        (["--lora_dropout", "-0.1"], r"^lora_dropout: expected a number in \[0, 1\), got -0\.1$"),
        (["--max_train_samples", "0"], r"^max_train_samples: expected an integer >= 1 \(or leave it unset\), got 0$"),
        (["--max_eval_samples", "-3"], r"^max_eval_samples: expected an integer >= 1 \(or leave it unset\), got -3$"),
        (["--gold_eval_samples", "0"], r"^gold_eval_samples: expected an integer >= 1, got 0$"),
    ],
)
def test_shared_args_ranges(flags, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_args((ModelArgs, DataArgs), flags)


def test_shared_args_ranges_apply_to_recipes_and_direct_construction(tmp_path):
    with pytest.raises(ConfigError, match=r"^lora_r: expected an integer >= 1, got 0$"):
        parse_args((ModelArgs,), ["--config", write(tmp_path, "lora_r: 0\n")])
    with pytest.raises(ConfigError, match=r"^gold_eval_samples: expected an integer >= 1, got 0$"):
        DataArgs(gold_eval_samples=0)
    assert ModelArgs(lora_r=1, lora_alpha=1, lora_dropout=0.0).lora_r == 1
    assert DataArgs(max_train_samples=1, max_eval_samples=None).max_train_samples == 1


def sft_config(tmp_path, **values):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(tmp_path / "out"), bf16=False, report_to="none", **values)


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ({"per_device_train_batch_size": 0}, r"^per_device_train_batch_size: expected an integer >= 1, got 0$"),
        ({"per_device_eval_batch_size": -1}, r"^per_device_eval_batch_size: expected an integer >= 1, got -1$"),
        ({"gradient_accumulation_steps": 0}, r"^gradient_accumulation_steps: expected an integer >= 1, got 0$"),
        ({"learning_rate": -1e-4}, r"^learning_rate: expected a number >= 0, got -0\.0001$"),
        ({"num_train_epochs": 0}, r"^num_train_epochs: expected a number > 0 \(or set max_steps > 0\), got 0"),
        ({"max_length": 0}, r"^max_length: expected an integer >= 1 \(or leave it unset\), got 0$"),
    ],
)
def test_check_training_ranges_names_the_key(tmp_path, values, pattern):
    # transformers/TRL accept every one of these and fail much later (or never): the check is ours.
    training_args = sft_config(tmp_path, **values)
    with pytest.raises(ConfigError, match=pattern):
        check_training_ranges(training_args)


def test_check_training_ranges_accepts_good_values(tmp_path):
    check_training_ranges(sft_config(tmp_path))
    check_training_ranges(sft_config(tmp_path, num_train_epochs=0, max_steps=5, max_length=None, learning_rate=0.0))


def test_parse_args_checks_training_ranges(tmp_path):
    with pytest.raises(ConfigError, match=r"^per_device_train_batch_size: expected an integer >= 1, got 0$"):
        parse_args(sft_types(), ["--output_dir", str(tmp_path), *CPU_SAFE, "--per_device_train_batch_size", "0"])


def test_parse_args_turns_a_trl_value_error_into_a_config_error(tmp_path):
    flags = ["--output_dir", str(tmp_path), *CPU_SAFE, "--warmup_steps", "-1"]
    with pytest.raises(ConfigError, match=r"^rlhf sft: Got warmup_steps = -1(\.0)?, Expected value warmup_steps >= 0 "
                                          r"\(from SFTConfig's checks of the settings\)$") as caught:
        parse_args(sft_types(), flags, prog="rlhf sft")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # one message, not a chained traceback
