"""Model loading: pad != eos, safetensors only, clear errors for folders that are not models."""

import pytest
import torch

from conftest import TINY_BASE
from rlhf.config import ConfigError, ModelArgs
from rlhf.models import check_model_path, load_causal_lm, load_tokenizer


def test_pad_equal_to_eos_gets_a_distinct_pad(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    tokenizer.pad_token = tokenizer.eos_token  # what SmolLM2 and many others ship
    tokenizer.save_pretrained(tmp_path)
    fixed = load_tokenizer(str(tmp_path))
    assert fixed.pad_token_id != fixed.eos_token_id
    # A right-padded batch keeps the real EOS inside the attention mask.
    batch = fixed(["The kettle is great.<|im_end|>", "Hi<|im_end|>"], padding=True, return_tensors="pt")
    eos_positions = batch["input_ids"] == fixed.eos_token_id
    assert eos_positions.sum() == 2
    assert bool(batch["attention_mask"][eos_positions].all())


def test_tiny_base_loads_as_safetensors_llama():
    model = load_causal_lm(TINY_BASE, ModelArgs())
    assert model.config.model_type == "llama"
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 5_000_000
    assert model.dtype == torch.float32


def test_folder_without_weights_or_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        check_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="pickle weights pytorch_model.bin"):
        check_model_path(str(tmp_path))
    with pytest.raises(ConfigError, match="folder not found"):
        check_model_path(str(tmp_path / "missing"))


def test_tokenizer_without_eos_is_refused(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no eos_token"):
        load_tokenizer(str(tmp_path))
