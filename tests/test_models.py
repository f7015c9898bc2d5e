"""Model loading: pad != eos, safetensors only (models and adapters), clear errors for folders that are not models."""

import pytest
import torch

from conftest import TINY_BASE
from rlhf.config import ConfigError, ModelArgs
from rlhf.models import (
    check_adapter_folder, check_model_path, load_causal_lm, load_tokenizer, lora_config, lora_merged,
)


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


def test_lora_merged_runs_plain_weights_and_restores_the_base_exactly():
    from peft import get_peft_model

    model_args = ModelArgs()
    model = get_peft_model(load_causal_lm(TINY_BASE, model_args), lora_config(model_args)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    base = {name: (parameter, parameter.detach().clone()) for name, parameter in model.named_parameters()}
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with lora_merged(model, "default") as merged:
            assert merged
            lora_layers = [module for module in model.modules() if hasattr(module, "lora_A")]
            assert all(module.disable_adapters for module in lora_layers)  # no LoRA branch runs
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(inside, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, expected)
    for name, parameter in model.named_parameters():
        original, copy = base[name]
        assert parameter is original and torch.equal(parameter, copy), name

    with lora_merged(model.to(torch.bfloat16), "default") as merged:
        assert not merged  # bf16 would round the update away: generation keeps the LoRA branch


def test_adapter_folder_must_hold_safetensors(tmp_path):
    adapter = tmp_path / "adapter"
    with pytest.raises(ConfigError, match="adapter .*adapter: folder not found"):
        check_adapter_folder(str(adapter))
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "training_args.bin").write_bytes(b"pickle")  # saved by the Trainer beside every adapter: not weights
    with pytest.raises(ConfigError, match="no adapter weights found .expected adapter_model.safetensors"):
        check_adapter_folder(str(adapter))
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError) as error:
        check_adapter_folder(str(adapter))
    message = str(error.value)
    assert f"adapter {adapter}: holds pickle weights (adapter_model.bin)" in message
    assert "PeftModel.from_pretrained(base_model, folder).save_pretrained(folder, safe_serialization=True)" in message
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    check_adapter_folder(str(adapter))  # safetensors present: accepted (peft then loads that file, not the .bin)


def test_stage_with_pickled_adapter_is_refused_before_anything_loads(tmp_path, monkeypatch):
    import peft

    from rlhf import models
    from rlhf.manifest import Manifest, read_manifest, write_manifest

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(b"pickle")
    write_manifest(Manifest(stage="sft", output_dir=str(tmp_path), base_model=TINY_BASE, adapter_path="adapter"))
    calls = []
    monkeypatch.setattr(models, "load_pretrained", lambda *args, **kwargs: calls.append("base model") or object())
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *args, **kwargs: calls.append("peft"))
    with pytest.raises(ConfigError, match="holds pickle weights .adapter_model.bin.*Convert it once"):
        models.load_stage_output(read_manifest(tmp_path), ModelArgs())
    assert calls == []
