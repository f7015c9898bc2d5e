"""PPO rollout: what sampling hands back (log-probs, shared-critic values) equals a second forward of the policy."""

import pytest
import torch

from conftest import TINY_DATA
from rlhf.config import ModelArgs
from rlhf.data import load_prompts
from rlhf.generation import encode_prompts
from rlhf.models import stage_tokenizer
from rlhf.ppo.config import PPOArgs
from rlhf.ppo.layouts import POLICY, build_models
from rlhf.ppo.rollout import collect, policy_logprobs_and_values


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_rollout_from_generation_matches_a_forward_of_the_policy(sft_run, lora_reward_run, critic):
    models = build_models("shared", sft_run, lora_reward_run, ModelArgs(), value_init="reward", critic=critic).eval()
    with torch.no_grad():  # a policy that is not the base, so generation really runs merged LoRA weights
        for name, parameter in models.model.named_parameters():
            if f"lora_B.{POLICY}" in name:
                parameter.normal_(std=0.05)
        torch.nn.init.normal_(models.value_head.weight, std=0.1)
    tokenizer = stage_tokenizer(sft_run, ModelArgs())
    prompts = [record["prompt"] for record in load_prompts(str(TINY_DATA / "prompts_test.jsonl"))[:6]]
    args = PPOArgs(max_new_tokens=16, temperature=0.7)
    torch.manual_seed(0)
    rollout = collect(models, tokenizer, stage_tokenizer(lora_reward_run, ModelArgs()), prompts,
                      encode_prompts(tokenizer, prompts), args, kl_coef=0.05, reward_stats=None)
    assert rollout.response_mask.sum() > 12 and rollout.values.abs().sum() > 0

    logprobs, _, values = policy_logprobs_and_values(models, rollout, slice(None), args.temperature, grad=False)
    torch.testing.assert_close(rollout.logprobs, logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rollout.values, values, atol=1e-4, rtol=1e-4)
    # Generation put the shared base back: both trainable adapters train again on their next use.
    models.policy_logits(*rollout.inputs(slice(0, 1)))
    models.values(*rollout.inputs(slice(0, 1)))
    assert all(parameter.requires_grad for parameter in models.policy_parameters() + models.value_parameters())


def test_recomputed_logprobs_agree_with_the_generation_ones(sft_run, lora_reward_run):
    models = build_models("shared", sft_run, lora_reward_run, ModelArgs(), value_init="reward").eval()
    tokenizer = stage_tokenizer(sft_run, ModelArgs())
    prompts = [record["prompt"] for record in load_prompts(str(TINY_DATA / "prompts_test.jsonl"))[:4]]
    rollouts = {}
    for from_generation in (True, False):
        torch.manual_seed(1)  # same seed: the same samples
        rollouts[from_generation] = collect(models, tokenizer, tokenizer, prompts, encode_prompts(tokenizer, prompts),
                                            PPOArgs(max_new_tokens=12, logprobs_from_generation=from_generation),
                                            kl_coef=0.05, reward_stats=None)
    assert torch.equal(rollouts[True].response_ids, rollouts[False].response_ids)
    torch.testing.assert_close(rollouts[True].logprobs, rollouts[False].logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rollouts[True].values, rollouts[False].values, atol=1e-5, rtol=1e-5)


def test_shared_reward_adapter_scores_the_last_real_token_on_either_padding_side(sft_run, lora_reward_run):
    from rlhf.generation import pad_batch
    from rlhf.ppo.rollout import render_for_reward

    models = build_models("shared", sft_run, lora_reward_run, ModelArgs(), value_init="reward").eval()
    assert models.reward_model is None  # the reward adapter + head on the shared base: the path under test
    tokenizer = stage_tokenizer(lora_reward_run, ModelArgs())
    prompts = [record["prompt"] for record in load_prompts(str(TINY_DATA / "prompts_test.jsonl"))[:3]]
    right_ids, right_mask = render_for_reward(tokenizer, prompts, ["A long and careful answer, with detail.", "Ok.", "No"])
    lengths = right_mask.sum(1)
    assert len(set(lengths.tolist())) == 3  # different lengths: the shorter rows carry padding
    sequences = [row[:length].tolist() for row, length in zip(right_ids, lengths)]
    left_ids, left_mask = pad_batch(sequences, tokenizer.pad_token_id, side="left")

    alone = torch.cat([models.scores(torch.tensor([sequence]), torch.ones(1, len(sequence), dtype=torch.long))
                       for sequence in sequences])
    assert alone.std() > 0
    torch.testing.assert_close(models.scores(right_ids, right_mask), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(models.scores(left_ids, left_mask), alone, atol=1e-5, rtol=1e-5)
