"""The separate layout's value model when it is a copy of the reward model (value_init: reward), on random tiny
Llamas."""

import torch

from rlhf.config import ModelArgs
from rlhf.generation import position_ids_from_mask


def tiny_separate_models(policy_hidden: int, reward_hidden: int):
    """The separate layout on random one-block Llamas of one vocabulary, the value model copied from the reward model
    (value_init: reward) as build_models loads it: the reward model's body under a causal-LM head. Returns (models,
    the reward model)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf.ppo.layouts import SeparateModels

    def config(hidden: int, **extra):
        return LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, **extra)

    torch.manual_seed(0)
    reward = LlamaForSequenceClassification(config(reward_hidden, num_labels=1))
    value_body = LlamaForCausalLM(config(reward_hidden))
    value_body.model.load_state_dict(reward.model.state_dict())
    models = SeparateModels(LlamaForCausalLM(config(policy_hidden)), LlamaForCausalLM(config(policy_hidden)), reward,
                            ModelArgs(), "reward", value_body)
    return models.eval(), reward


def test_separate_value_model_copied_from_a_wider_reward_model_starts_as_its_scores():
    """layout separate, value_init reward, a reward model wider than the policy (96 against 64): the value head reads
    the value model's own hidden states, so before any update (LoRA B = 0) the value at the last token is the reward
    model's score. Before, the head was sized by the policy and building the models failed on the shapes."""
    models, reward = tiny_separate_models(policy_hidden=64, reward_hidden=96)
    ids = torch.randint(1, 128, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        values = models.values(ids, mask, position_ids_from_mask(mask))
        scores = reward(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert values.shape == (2, 6)
    assert torch.allclose(values[:, -1], scores, atol=1e-5)
