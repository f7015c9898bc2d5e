"""Recipe + command-line parsing: precedence, unknown keys, wrong types, TRL's key names, precision without a GPU,
and every shipped recipe parses."""

import importlib
import json
import re
from pathlib import Path

import pytest
import torch

from rlhf.config import ConfigError, DataArgs, ModelArgs, check_precision, check_training_ranges, parse_args
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
    # transformers' own words for it vary by release (5.17: "warmup_steps must be an integer or a float").
    with pytest.raises(ConfigError, match=r"^rlhf sft: .*warmup_steps.* \(from SFTConfig's checks of the settings\)$"
                       ) as caught:
        parse_args(sft_types(), flags, prog="rlhf sft")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # one message, not a chained traceback


# --------------------------------------------------------------------------- TRL's names


def ppo_types():
    from rlhf.ppo.trainer import ARG_TYPES

    return ARG_TYPES


def test_trl_names_in_a_recipe_fill_our_keys(tmp_path):
    recipe = write(tmp_path, "dataset_name: org/data\ndataset_train_split: tr\ndataset_test_split: te\n"
                             "use_peft: false\ntorch_dtype: bfloat16\nlora_target_modules: all-linear\n"
                             "model_revision: main\n")
    model_args, data_args = parse_args((ModelArgs, DataArgs), ["--config", recipe])
    assert (data_args.train_data, data_args.train_split, data_args.eval_split) == ("org/data", "tr", "te")
    assert model_args.use_lora is False and model_args.dtype == "bfloat16"
    assert model_args.lora_target_modules == ["all-linear"]  # TRL recipes write one module as a plain string


def test_trl_names_on_the_command_line_fill_our_keys():
    model_args, data_args = parse_args((ModelArgs, DataArgs), [
        "--dataset_name", "org/data", "--dataset_train_split=tr", "--no_use_peft", "--torch_dtype", "float16",
        "--lora_target_modules", "q_proj", "v_proj", "--model_revision", "main"])
    assert (data_args.train_data, data_args.train_split) == ("org/data", "tr")
    assert model_args.use_lora is False and model_args.dtype == "float16"
    assert model_args.lora_target_modules == ["q_proj", "v_proj"]


def test_activation_checkpointing_runs_where_transformers_still_calls_it_gradient_checkpointing(tmp_path):
    """transformers 5.17 (the GPU machines' release) has only gradient_checkpointing; the recipes use the newer name."""
    from dataclasses import dataclass

    @dataclass
    class OlderTrainingArguments:
        gradient_checkpointing: bool = True

    (older,) = parse_args((OlderTrainingArguments,), ["--config", write(tmp_path, "activation_checkpointing: false\n")])
    assert older.gradient_checkpointing is False
    (older,) = parse_args((OlderTrainingArguments,), ["--activation_checkpointing", "false"])
    assert older.gradient_checkpointing is False


def test_ppo_takes_trl_training_names():
    *_, args = parse_args(ppo_types(), ["--max_steps", "3", "--num_ppo_epochs", "2", "--lr_scheduler_type", "cosine",
                                        "--response_length", "20", "--reward_model_path", "runs/r"])
    assert (args.steps, args.ppo_epochs, args.lr_scheduler, args.max_new_tokens) == (3, 2, "cosine", 20)
    assert args.reward_model == "runs/r"
    # SFTConfig has a max_steps of its own: there it stays TRL's key.
    _, _, training_args, _ = parse_args(sft_types(), ["--output_dir", "out", *CPU_SAFE, "--max_steps", "3"])
    assert training_args.max_steps == 3


def test_eval_commands_take_trl_data_names():
    from rlhf.evaluate.policy import ARG_TYPES as POLICY
    from rlhf.evaluate.rm import ARG_TYPES as RM

    (rm_args,) = parse_args(RM, ["--dataset_name", "pairs.jsonl", "--dataset_test_split", "val", "--torch_dtype",
                                 "bfloat16"])
    assert (rm_args.data, rm_args.split, rm_args.dtype) == ("pairs.jsonl", "val", "bfloat16")
    (policy_args,) = parse_args(POLICY, ["--dataset_name", "prompts.jsonl", "--max_completion_length", "12"])
    assert (policy_args.prompts, policy_args.max_new_tokens) == ("prompts.jsonl", 12)


@pytest.mark.parametrize(("recipe", "flags", "pattern"), [
    ("use_peft: false\nuse_lora: true\n", [],
     r"^recipe .*: 'use_peft' and 'use_lora' are the same setting \(use_lora\) with different values "
     r"\(False and True\): give one of them$"),
    ("", ["--dataset_name", "a.jsonl", "--train_data", "b.jsonl"],
     r"^--dataset_name and --train_data are the same setting \(train_data\) with different values "
     r"\('a.jsonl' and 'b.jsonl'\): give one of them$"),
    ("", ["--max_steps", "3", "--steps", "4"], r"^--max_steps and --steps are the same setting \(steps\)"),
])
def test_a_trl_name_and_ours_with_different_values_are_refused(tmp_path, recipe, flags, pattern):
    config = ["--config", write(tmp_path, recipe)] if recipe else []
    with pytest.raises(ConfigError, match=pattern):
        parse_args(ppo_types(), config + flags)


def test_a_trl_name_and_ours_agreeing_are_one_setting(tmp_path):
    recipe = write(tmp_path, "use_peft: false\nuse_lora: false\n")
    model_args, _ = parse_args((ModelArgs, DataArgs), ["--config", recipe, "--torch_dtype", "float16",
                                                       "--dtype=float16"])
    assert model_args.use_lora is False and model_args.dtype == "float16"
    # The command line still overrides the recipe, whichever name each uses.
    model_args, _ = parse_args((ModelArgs, DataArgs), ["--config", recipe, "--use_lora", "true"])
    assert model_args.use_lora is True


@pytest.mark.parametrize(("flags", "message"), [
    (["--learning_rat", "1e-3"], "unknown option --learning_rat; did you mean --learning_rate? (--help lists the "
                                 "options)"),
    (["--dataset_nam", "a"], "unknown option --dataset_nam; did you mean --dataset_name?"),
    (["--lora_r", "abc"], "argument --lora_r/--lora-r: invalid int value: 'abc'"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
])
def test_a_bad_flag_is_one_line(flags, message):
    with pytest.raises(ConfigError) as caught:
        parse_args(sft_types(), ["--output_dir", "out", *CPU_SAFE, *flags])
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_flag_is_never_read_as_an_abbreviation():
    # argparse would otherwise take --lora_dr for --lora_dropout.
    with pytest.raises(ConfigError, match=r"^unknown option --lora_dr; did you mean --lora_r\?"):
        parse_args((ModelArgs,), ["--lora_dr", "0.1"])


def test_unknown_recipe_key_suggests_trl_names_too(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'use_pefts'\. Did you mean 'use_peft'\? Run with --help"):
        parse_args((ModelArgs,), ["--config", write(tmp_path, "use_pefts: true\n")])


def test_ppo_says_what_replaces_a_trl_batch_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'per_device_train_batch_size'\. PPO sizes batches in "
                                          r"rollouts: set rollout_batch_size .*\. Run with --help"):
        parse_args(ppo_types(), ["--config", write(tmp_path, "per_device_train_batch_size: 8\n")])
    with pytest.raises(ConfigError, match=r"^unknown option --num_train_epochs; PPO runs a number of iterations"):
        parse_args(ppo_types(), ["--num_train_epochs", "2"])


def test_help_names_trl_aliases(capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(ppo_types(), ["--help"], prog="rlhf ppo")
    assert caught.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(also: --dataset_name, as TRL names it)" in text
    assert "(also: --max_steps, as TRL names it)" in text
    assert "(also: --response_length, --max_completion_length, as TRL names it)" in text


def test_dataset_name_evaluates_on_its_test_split_like_trl(tmp_path):
    def data_args(*flags):
        return parse_args(sft_types(), ["--output_dir", str(tmp_path), *CPU_SAFE, *flags])[1]

    folder = tmp_path / "data"
    folder.mkdir()
    assert data_args("--dataset_name", str(folder), "--eval_strategy", "steps").eval_data == str(folder)
    assert data_args("--dataset_name", str(folder)).eval_data is None  # eval_strategy no: no evaluation
    assert data_args("--train_data", str(folder), "--eval_strategy", "steps").eval_data is None  # our names: as set
    one_file = tmp_path / "one.jsonl"
    one_file.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"^eval_strategy is 'steps' but dataset_name .*one\.jsonl is one file, "
                                          r"with no 'test' split to evaluate on: set eval_data"):
        data_args("--dataset_name", str(one_file), "--eval_strategy", "steps")


# --------------------------------------------------------------------------- precision without a GPU


no_gpu = pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                            reason="checks the refusal on a machine without a GPU")


@no_gpu
def test_check_precision_refuses_half_precision_without_a_gpu():
    with pytest.raises(ConfigError, match=r"^ppo sets bf16: true but this machine has no GPU that runs bf16: set "
                                          r"bf16: false \(--bf16 false\) or run on a GPU$"):
        check_precision(True, False, "ppo")
    with pytest.raises(ConfigError, match=r"^ppo sets fp16: true but this machine has no GPU"):
        check_precision(False, True, "ppo")
    check_precision(False, False, "ppo")


def test_check_precision_refuses_bf16_and_fp16_together():
    with pytest.raises(ConfigError, match=r"^ppo sets both bf16 and fp16: set at most one$"):
        check_precision(True, True, "ppo")


@no_gpu
def test_bf16_recipe_is_refused_before_the_training_arguments(tmp_path):
    with pytest.raises(ConfigError, match=r"^the config sets bf16: true but this machine has no GPU"):
        parse_args(sft_types(), ["--output_dir", str(tmp_path), "--bf16", "true"])
    # use_cpu runs bf16 on the CPU, as transformers allows.
    _, _, training_args, _ = parse_args(sft_types(), ["--output_dir", str(tmp_path), "--bf16", "true", "--use_cpu"])
    assert training_args.bf16


def run_rlhf(*argv):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "rlhf.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_cli_typo_is_one_line_with_a_suggestion():
    result = run_rlhf("sft", "--config", "recipes/tiny/sft.yaml", "--learning_rat", "1e-3")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "rlhf sft: error: unknown option --learning_rat; did you mean --learning_rate? (--help lists the options)"]


@no_gpu
def test_cli_flags_only_run_on_cpu_is_one_line(tmp_path):
    # No bf16 given: TRL's configs turn it on, which this machine cannot run.
    result = run_rlhf("sft", "--model_name_or_path", "data/tiny-base", "--dataset_name", "data/tiny/sft_train.jsonl",
                      "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "rlhf sft: error: TRL's default (bf16 unset) sets bf16: true but this machine has no GPU that runs bf16: set "
        "bf16: false (--bf16 false) or run on a GPU"]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- an alignment-handbook recipe


HANDBOOK_SFT = """\
# Model arguments
model_name_or_path: data/tiny-base
model_revision: main
torch_dtype: float32
use_peft: true
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules: all-linear

# Data training arguments
dataset_name: {data}
dataset_train_split: train
dataset_test_split: test

# SFT trainer config
bf16: false
eval_strategy: steps
eval_steps: 2
per_device_eval_batch_size: 64
learning_rate: 1.0e-03
lr_scheduler_type: cosine
max_steps: 2
max_length: 256
per_device_train_batch_size: 8
logging_steps: 1
output_dir: {output_dir}
report_to:
- none
seed: 42
"""


def test_alignment_handbook_style_recipe_runs(tmp_path):
    from rlhf.cli import main

    # A dataset folder as the hub lays one out: train.jsonl and test.jsonl.
    folder = tmp_path / "data"
    folder.mkdir()
    for split, source in (("train", "sft_train.jsonl"), ("test", "sft_test.jsonl")):
        lines = (REPO / "data" / "tiny" / source).read_text().splitlines()[:32]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    output_dir = tmp_path / "sft"
    recipe = write(tmp_path, HANDBOOK_SFT.format(data=folder, output_dir=output_dir))
    assert main(["sft", "--config", recipe]) == 0
    manifest = json.loads((output_dir / "manifest.json").read_text())
    data, model = manifest["config"]["data"], manifest["config"]["model"]
    assert (data["train_data"], data["train_split"]) == (str(folder), "train")
    assert (data["eval_data"], data["eval_split"]) == (str(folder), "test")  # TRL's eval: the test split
    assert (model["use_lora"], model["lora_r"], model["lora_alpha"]) == (True, 8, 16)
    assert manifest["config"]["training"]["max_steps"] == 2
    assert "eval_loss" in manifest["metrics"]
    adapter = json.loads((output_dir / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)


def test_config_given_with_equals_is_read(tmp_path):
    model_args, _ = parse_args((ModelArgs, DataArgs), [f"--config={write(tmp_path, 'lora_r: 4')}"])
    assert model_args.lora_r == 4


def test_trl_token_settings_reach_the_hash_while_the_hub_token_stays_hidden():
    from trl import DPOConfig, RewardConfig

    from rlhf.config import to_plain_dict

    def plain(config_type, **values):
        return to_plain_dict(config_type(output_dir="out", report_to="none", bf16=False, **values))

    default = plain(RewardConfig)
    assert default["eos_token"] == "<EOS_TOKEN>"  # unset: as before, so older runs' hashes still match
    assert plain(RewardConfig, eos_token="<|end|>")["eos_token"] == "<|end|>"
    assert plain(DPOConfig, pad_token="<|pad|>")["pad_token"] == "<|pad|>"
    assert plain(RewardConfig, hub_token="hf_secret")["hub_token"] == "<HUB_TOKEN>"


@pytest.mark.parametrize("key, value", [("dtype", "auto"), ("torch_dtype", "auto"), ("on_bad_record", "raise"),
                                        ("length_policy", "cut")])
def test_a_recipe_value_outside_a_keys_choices_is_refused_as_a_flag_would_be(tmp_path, key, value):
    from rlhf.sft import ARG_TYPES

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"{key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"recipe {recipe}: key '{key}' expects one of .*, got '{value}'"):
        parse_args(ARG_TYPES, ["--config", str(recipe), "--output_dir", str(tmp_path / "out")])


def test_model_init_kwargs_are_refused_with_the_recipe_keys_that_do_their_job(tmp_path):
    from rlhf.dpo import ARG_TYPES

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("bf16: false\nmodel_init_kwargs:\n  torch_dtype: bfloat16\n  attn_implementation: sdpa\n")
    with pytest.raises(ConfigError, match=r"model_init_kwargs: the stages load the models themselves.*"
                                          r"torch_dtype -> dtype, attn_implementation -> attn_implementation"):
        parse_args(ARG_TYPES, ["--config", str(recipe), "--output_dir", str(tmp_path / "out")])
