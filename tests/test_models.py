"""Model loading: pad != eos, safetensors only (models and adapters), clear errors for folders that are not models."""

from pathlib import Path

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

    # Merged in bf16 for sampling under bf16 autocast: the same numbers autocast would make of the fp32 merge, and
    # the fp32 originals come back.
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16), lora_merged(model, "default") as merged:
            autocast_fp32_merge = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16), lora_merged(model, "default", torch.bfloat16) as merged:
            lora_layers = [module for module in model.modules() if hasattr(module, "lora_A")]
            assert merged and all(module.get_base_layer().weight.dtype == torch.bfloat16 for module in lora_layers)
            bf16_merge = model(input_ids=ids).logits
    assert torch.equal(bf16_merge, autocast_fp32_merge)
    assert all(parameter is base[name][0] and parameter.dtype == torch.float32
               for name, parameter in model.named_parameters())

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


@pytest.mark.parametrize("config_pad", ["none", "eos"])
def test_reloaded_reward_stage_scores_a_padded_batch_as_each_sequence_alone(tmp_path, config_pad):
    import json

    from transformers import AutoModelForSequenceClassification

    from rlhf.manifest import Manifest, read_manifest, write_manifest
    from rlhf.models import REWARD, load_pretrained, load_stage_output

    # A reward stage as finish_stage leaves one (merged model + its tokenizer), with the config.json pad that many
    # bases ship: missing, or the EOS. The tokenizer saved with the stage pads with its own, distinct pad.
    merged = tmp_path / "merged"
    tokenizer = load_tokenizer(TINY_BASE)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(TINY_BASE, num_labels=1).save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    config = json.loads((merged / "config.json").read_text())
    config["pad_token_id"] = None if config_pad == "none" else tokenizer.eos_token_id
    (merged / "config.json").write_text(json.dumps(config))
    write_manifest(Manifest(stage="reward", output_dir=str(tmp_path), base_model=TINY_BASE, merged_path="merged",
                            extra={"head": REWARD}))

    conversations = [[{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": content}]
                     for content in ("A ripe yellow banana from the market.", "Fig.", "An apple")]
    texts = [tokenizer.apply_chat_template(conversation, tokenize=False) for conversation in conversations]
    for model in (load_stage_output(read_manifest(tmp_path), ModelArgs()), load_pretrained(str(merged), ModelArgs(), REWARD)):
        model.eval()
        with torch.no_grad():
            alone = torch.cat([model(**tokenizer(text, return_tensors="pt")).logits[:, 0] for text in texts])
            batch = tokenizer(texts, padding=True, return_tensors="pt")
            assert (batch["attention_mask"] == 0).any(), "the batch must hold padding"
            batched = model(**batch).logits[:, 0]
            # Alone, the score is the one at the last token (the EOS).
            hidden = model.model(**tokenizer(texts[1], return_tensors="pt")).last_hidden_state
            at_eos = model.score(hidden[:, -1]).squeeze()
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone[1], at_eos, atol=1e-5, rtol=1e-5)
        assert alone.std() > 0  # the random head tells tokens apart, so a score read elsewhere would show
        assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id


def test_stage_rebuilt_from_its_adapter_is_trainable_like_its_merged_copy(tmp_path):
    from peft import get_peft_model

    from rlhf.manifest import Manifest, read_manifest, write_manifest
    from rlhf.models import load_stage_output

    # An SFT stage saved without a merged copy: loading it merges the adapter into the base. Full fine-tuning from
    # it (DPO or reward with use_lora: false) needs every weight trainable, as from_pretrained leaves a merged copy.
    model_args = ModelArgs()
    get_peft_model(load_causal_lm(TINY_BASE, model_args), lora_config(model_args)).save_pretrained(tmp_path / "adapter")
    write_manifest(Manifest(stage="sft", output_dir=str(tmp_path), base_model=TINY_BASE, adapter_path="adapter"))
    model = load_stage_output(read_manifest(tmp_path), model_args)
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged: a plain model
    assert all(parameter.requires_grad for parameter in model.parameters())
    # The same SFT adapter under a reward head (a reward stage started from it): the body merged as above.
    from rlhf.models import REWARD

    reward_model = load_stage_output(read_manifest(tmp_path), model_args, head=REWARD, pad_token_id=0)
    assert type(reward_model).__name__ == "LlamaForSequenceClassification"
    body, reward_body = model.model.state_dict(), reward_model.model.state_dict()
    assert body.keys() == reward_body.keys() and all(torch.equal(body[key], reward_body[key]) for key in body)


def test_saved_adapter_loads_from_any_working_directory(sft_run, tmp_path, monkeypatch):
    """peft records the base as the model's _name_or_path; it must not be relative to where the stage ran."""
    import json

    from peft import AutoPeftModelForCausalLM

    adapter = Path(sft_run.path(sft_run.adapter_path))
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute() and (Path(base) / "config.json").is_file()
    monkeypatch.chdir(tmp_path)
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert model.peft_config["default"].base_model_name_or_path == base


# --------------------------------------------------------------------------- model_revision

SHA_MAIN, SHA_V2 = "a" * 40, "b" * 40


def fake_hub_cache(root: Path) -> Path:
    """A hub cache as huggingface_hub lays it out, holding tiny-org/tiny-llm at two commits: main is the tiny base,
    the tag v2 a randomly initialised model of the same shape (an untrained model's loss is far higher)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    repo = root / "models--tiny-org--tiny-llm"
    shutil.copytree(TINY_BASE, repo / "snapshots" / SHA_MAIN)
    shutil.copytree(TINY_BASE, repo / "snapshots" / SHA_V2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_BASE)).save_pretrained(repo / "snapshots" / SHA_V2)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA_MAIN)
    (repo / "refs" / "v2").write_text(SHA_V2)
    return root


def use_hub_cache(monkeypatch, cache: Path) -> None:
    """That cache, offline: huggingface_hub read HF_HUB_OFFLINE when first imported, maybe before conftest set it,
    and would otherwise try the network (and wait for it) before falling back to the cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_pinned_revision_resolves_offline_from_the_hub_cache(tmp_path, monkeypatch):
    from rlhf.models import pinned_snapshot

    use_hub_cache(monkeypatch, fake_hub_cache(tmp_path))
    assert Path(pinned_snapshot("tiny-org/tiny-llm", "v2")).name == SHA_V2  # a tag, through refs/
    assert Path(pinned_snapshot("tiny-org/tiny-llm", SHA_MAIN)).name == SHA_MAIN  # a commit
    with pytest.raises(ConfigError, match=r"revision 'v3' is not in the hub cache and the hub cannot be reached"):
        pinned_snapshot("tiny-org/tiny-llm", "v3")


def test_stage_trains_the_pinned_revision_and_records_its_commit(tmp_path, monkeypatch):
    from rlhf import sft
    from rlhf.hub import base_hub_name

    use_hub_cache(monkeypatch, fake_hub_cache(tmp_path / "hub"))
    quick = ["--config", "recipes/tiny/sft.yaml", "--model_name_or_path", "tiny-org/tiny-llm", "--max_steps", "2",
             "--logging_steps", "1", "--save_strategy", "no", "--eval_data", "", "--gold_eval_prompts", "",
             "--save_merged", "false"]
    main = sft.main(quick + ["--output_dir", str(tmp_path / "main")])
    pinned = sft.main(quick + ["--output_dir", str(tmp_path / "v2"), "--model_revision", "v2"])
    assert main.base_model == "tiny-org/tiny-llm"  # main: loaded by name, as before
    assert Path(pinned.base_model).name == SHA_V2 and pinned.config["model"]["model_revision"] == "v2"
    assert base_hub_name(pinned.base_model) == "tiny-org/tiny-llm"  # what the model card's front matter names
    # It trained the v2 weights: an untrained model's loss (about ln 642 = 6.5) against the tiny base's.
    assert pinned.metrics["train_loss"] > 5 > 3 > main.metrics["train_loss"]


def test_revision_applies_only_to_a_hub_model(tmp_path):
    from rlhf.models import resolve_start

    with pytest.raises(ConfigError, match="a stage started from init_from loads the base its parent stage recorded"):
        resolve_start(ModelArgs(init_from=str(tmp_path), model_revision="v2"), ("sft",))
    with pytest.raises(ConfigError, match="is a local folder, which has no revisions"):
        resolve_start(ModelArgs(model_name_or_path=TINY_BASE, model_revision="v2"), ("sft",))
