"""No secret given on the command line or in a recipe may reach a file the stages write."""

import io
import os

import pytest
import torch

from rlhf.config import parse_args
from rlhf.sft import ARG_TYPES

SECRET = "hf_SECRETdoNotWriteMe0123456789"


@pytest.fixture
def clean_token_env(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)  # monkeypatch restores the caller's value afterwards


def pickled(instance) -> bytes:
    buffer = io.BytesIO()
    torch.save(instance, buffer)  # what the HF Trainer writes as training_args.bin
    return buffer.getvalue()


def test_hub_token_moves_to_the_environment_and_out_of_training_args(tmp_path, clean_token_env):
    from trl import SFTConfig

    # The check below can see a token: a config that still holds one pickles it in plain text.
    assert SECRET.encode() in pickled(SFTConfig(output_dir=str(tmp_path), bf16=False, hub_token=SECRET))

    _, _, training_args, _ = parse_args(ARG_TYPES, ["--output_dir", str(tmp_path), "--bf16", "false",
                                                    "--report_to", "none", "--hub_token", SECRET])
    assert training_args.hub_token is None
    assert os.environ["HF_TOKEN"] == SECRET  # huggingface_hub reads it from here for uploads
    assert SECRET.encode() not in pickled(training_args)


def test_hub_token_from_a_recipe_is_moved_too(tmp_path, clean_token_env):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'out'}\nbf16: false\nhub_token: {SECRET}\n")
    _, _, training_args, _ = parse_args(ARG_TYPES, ["--config", str(recipe), "--report_to", "none"])
    assert training_args.hub_token is None
    assert os.environ["HF_TOKEN"] == SECRET
    assert SECRET.encode() not in pickled(training_args)


def test_no_hub_token_leaves_the_environment_alone(tmp_path, clean_token_env):
    parse_args(ARG_TYPES, ["--output_dir", str(tmp_path), "--bf16", "false", "--report_to", "none"])
    assert "HF_TOKEN" not in os.environ
