"""DPO stage: improves the gold reward over SFT, reference = adapter disabled on one model, loss variants."""

import gc
import shutil

import pytest
import torch

from conftest import TINY_DATA, held_out_curve
from rlhf.config import ModelArgs, parse_args
from rlhf.data import load_preferences, to_dataset
from rlhf.generation import pad_batch, response_logprobs
from rlhf.models import load_stage_output, load_start_model, lora_config, start_tokenizer


def test_dpo_improves_gold_reward_over_sft(dpo_run, sft_run):
    sft_gold = sft_run.metrics["gold"]["gold_reward"]["mean"]
    dpo_gold = dpo_run.metrics["gold"]["gold_reward"]["mean"]
    assert dpo_gold >= 1.25 * sft_gold, (sft_gold, dpo_gold)
    assert dpo_run.metrics["eval_rewards/accuracies"] > 0.6
    assert dpo_run.extra["reference"].startswith("parent policy")
    assert [row["step"] for row in held_out_curve(dpo_run, sft_gold)] == [0, 25, 50, 75, 100, 125]


def _logprobs(model, tokenizer, pairs):
    prompts = [list(tokenizer.apply_chat_template(p["prompt"], add_generation_prompt=True, return_dict=False)) for p in pairs]
    responses = [tokenizer(p["chosen"][0]["content"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for p in pairs]
    prompt_ids, prompt_mask = pad_batch(prompts, tokenizer.pad_token_id, "left")
    response_ids, response_mask = pad_batch(responses, tokenizer.pad_token_id, "right")
    with torch.no_grad():
        return response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask)


def count_models():
    """Distinct copies of model weights alive (a causal LM and its inner body share one embedding matrix)."""
    from transformers import PreTrainedModel

    gc.collect()
    return len({obj.get_input_embeddings().weight.data_ptr() for obj in gc.get_objects()
                if isinstance(obj, PreTrainedModel)})


def test_reference_is_the_sft_policy_with_the_adapter_disabled(sft_run, tmp_path):
    from trl import DPOConfig, DPOTrainer

    pairs = load_preferences(str(TINY_DATA / "prefs_train.jsonl"))[:32]
    model_args = ModelArgs(init_from=sft_run.output_dir)
    models_before = count_models()
    tokenizer, base_path, parent = start_tokenizer(model_args, ("sft",))
    model = load_start_model(model_args, tokenizer, base_path, parent)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=5e-3,
                     bf16=False, report_to="none", logging_steps=1, save_strategy="no")
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=to_dataset(pairs),
                         processing_class=tokenizer, peft_config=lora_config(model_args))
    trainer.train()
    assert trainer.ref_model is None
    assert count_models() - models_before == 1  # the policy; no reference copy

    policy = trainer.model.eval()
    sft_policy = load_stage_output(sft_run, ModelArgs()).eval()
    sft_logprobs = _logprobs(sft_policy, tokenizer, pairs[:8])
    with policy.disable_adapter():
        reference_logprobs = _logprobs(policy, tokenizer, pairs[:8])
    torch.testing.assert_close(reference_logprobs, sft_logprobs, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_logprobs(policy, tokenizer, pairs[:8]), sft_logprobs, atol=1e-3)  # DPO moved the policy


def test_full_fine_tuning_takes_the_sft_policy_as_reference_not_the_base(sft_run, tmp_path, monkeypatch):
    import trl

    from conftest import TINY_BASE
    from rlhf import dpo
    from rlhf.models import load_causal_lm

    trainers = []

    class RecordingDPOTrainer(trl.DPOTrainer):  # the stage's own trainer, kept so its reference can be inspected
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(trl, "DPOTrainer", RecordingDPOTrainer)
    # An SFT stage saved without its merged copy (save_merged: false): the policy is then built as base + adapter,
    # and its config still names the base model's folder.
    parent = tmp_path / "sft"
    shutil.copytree(sft_run.output_dir, parent, ignore=shutil.ignore_patterns("merged", "checkpoints", ".lock"))
    manifest = dpo.main(["--config", "recipes/tiny/dpo.yaml", "--init_from", str(parent),
                         "--output_dir", str(tmp_path / "dpo"), "--use_lora", "false", "--max_steps", "2",
                         "--max_train_samples", "16", "--per_device_train_batch_size", "8", "--eval_data", "",
                         "--gold_eval_prompts", "", "--save_merged", "false"])
    assert manifest.extra["reference"].startswith("separate frozen copy of the parent policy")
    (trainer,) = trainers
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert reference is not None

    pairs = load_preferences(str(TINY_DATA / "prefs_train.jsonl"))[:8]
    tokenizer = trainer.processing_class
    reference_logprobs = _logprobs(reference.eval(), tokenizer, pairs)
    sft_logprobs = _logprobs(load_stage_output(sft_run, ModelArgs()).eval(), tokenizer, pairs)
    base_logprobs = _logprobs(load_causal_lm(TINY_BASE, ModelArgs()).eval(), tokenizer, pairs)
    torch.testing.assert_close(reference_logprobs, sft_logprobs, atol=1e-5, rtol=1e-5)  # after training: untouched
    assert not torch.allclose(reference_logprobs, base_logprobs, atol=1e-2)
    assert not torch.allclose(_logprobs(trainer.model.eval(), tokenizer, pairs), sft_logprobs, atol=1e-3)  # trained
    assert not any(parameter.requires_grad for parameter in reference.parameters())


def test_loss_variants_and_weights_parse():
    from rlhf import dpo

    _, _, config, _ = parse_args(dpo.ARG_TYPES, ["--output_dir", "x", "--loss_type", "sigmoid", "sft",
                                                 "--loss_weights", "0.8", "0.2", "--beta", "0.3",
                                                 "--label_smoothing", "0.1", "--bf16", "false"])
    assert config.loss_type == ["sigmoid", "sft"]
    assert config.loss_weights == [0.8, 0.2]
    assert (config.beta, config.label_smoothing) == (0.3, 0.1)


@pytest.mark.parametrize("extra", [
    ["--loss_type", "ipo", "--loss_weights", "1.0"],
    ["--loss_type", "sigmoid", "apo_zero", "--loss_weights", "0.5", "0.5"],
    ["--precompute_ref_log_probs", "true"],
])
def test_short_runs_with_other_losses_and_precomputed_reference(sft_run, tmp_path, extra):
    from rlhf import dpo

    manifest = dpo.main(["--config", "recipes/tiny/dpo.yaml", "--init_from", sft_run.output_dir,
                         "--output_dir", str(tmp_path / "dpo"), "--max_steps", "3", "--max_train_samples", "48",
                         "--eval_data", "", "--gold_eval_prompts", "", "--save_merged", "false", *extra])
    assert manifest.metrics["steps"] == 3
    recipe_losses = ["sigmoid", "sft"]
    expected = extra[1:extra.index("--loss_weights")] if "--loss_type" in extra else recipe_losses
    assert manifest.extra["loss_type"] == expected
    assert torch.isfinite(torch.tensor(manifest.metrics["train_loss"]))
    assert manifest.config["training"]["precompute_ref_log_probs"] == ("--precompute_ref_log_probs" in extra)
