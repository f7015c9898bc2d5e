"""Recipe + command-line parsing: precedence, unknown keys, wrong types, and every shipped recipe parses."""

import importlib
import re
from pathlib import Path

import pytest
import torch

from rlhf.config import ConfigError, DataArgs, ModelArgs, parse_args
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
