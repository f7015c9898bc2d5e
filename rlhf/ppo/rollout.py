"""One PPO rollout: sample responses, score them, and turn scores into per-token rewards, advantages and returns.

Everything here runs without gradients. Per-token tensors are sliced so column t is response token t: the logits,
log-probs and values that belong to token t come from the position just before it.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from rlhf.generation import generate, position_ids_from_mask, token_logprobs
from rlhf.ppo import math as ppo_math
from rlhf.ppo.config import PPOArgs


@dataclass
class Rollout:
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    texts: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def inputs(self, rows=slice(None)):
        """(input_ids, attention_mask, position_ids) of prompt + response for the selected rows."""
        input_ids = torch.cat([self.prompt_ids[rows], self.response_ids[rows]], dim=1)
        attention_mask = torch.cat([self.prompt_mask[rows], self.response_mask[rows]], dim=1)
        return input_ids, attention_mask, position_ids_from_mask(attention_mask)


def response_columns(per_position: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """Per-position outputs over prompt + response -> the ones that predict each response token."""
    return per_position[:, prompt_width - 1 : -1]


def logits_to_keep(rollout: Rollout) -> int:
    """Positions that go through the LM head: the response width + 1, whose first R predict the response tokens.
    With a real vocabulary, logits over the prompt would dominate the memory of the update."""
    return rollout.response_ids.shape[1] + 1


def sampled_logprobs(response_logits: torch.Tensor, rollout: Rollout, rows, temperature: float):
    """(log-probs of the sampled response tokens, the temperature-scaled logits), from the logits that predict each
    response token: the first R of a forward's kept positions, or what sampling returned."""
    logits = response_logits.float() / temperature
    return token_logprobs(logits, rollout.response_ids[rows]) * rollout.response_mask[rows], logits


def policy_logprobs(models, rollout: Rollout, rows, temperature: float, grad: bool):
    """Log-probs of the sampled tokens under the current policy (and the logits, for the entropy)."""
    with torch.set_grad_enabled(grad):
        kept = models.policy_logits(*rollout.inputs(rows), keep=logits_to_keep(rollout))
        return sampled_logprobs(kept[:, :-1], rollout, rows, temperature)


def policy_logprobs_and_values(models, rollout: Rollout, rows, temperature: float, grad: bool):
    """(log-probs, logits, values): from one forward with a shared critic, else from the policy and the value model."""
    if not models.shared_critic:
        logprobs, logits = policy_logprobs(models, rollout, rows, temperature, grad)
        return logprobs, logits, value_predictions(models, rollout, rows, grad)
    with torch.set_grad_enabled(grad):
        kept, values = models.policy_logits_and_values(*rollout.inputs(rows), keep=logits_to_keep(rollout))
        logprobs, logits = sampled_logprobs(kept[:, :-1], rollout, rows, temperature)
        values = response_columns(values, rollout.prompt_ids.shape[1]).float()
        return logprobs, logits, values * rollout.response_mask[rows]


def value_predictions(models, rollout: Rollout, rows, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        values = response_columns(models.values(*rollout.inputs(rows)), rollout.prompt_ids.shape[1]).float()
        return values * rollout.response_mask[rows]


def render_for_reward(tokenizer, prompts: list[list[dict]], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response as the reward model saw conversations in training (its chat template), right-padded."""
    from rlhf.generation import pad_batch

    sequences = [
        list(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": text}], tokenize=True, return_dict=False))
        for prompt, text in zip(prompts, texts)
    ]
    return pad_batch(sequences, tokenizer.pad_token_id, side="right")


@torch.no_grad()
def collect(models, tokenizer, reward_tokenizer, prompts: list[list[dict]], prompt_ids: list[list[int]],
            args: PPOArgs, kl_coef: float, reward_stats: tuple[float, float] | None,
            gathered=lambda models: nullcontext(), synced_generation: bool = False) -> Rollout:
    """Sample and score one batch; rewards, advantages and returns are filled by `finish_advantages`. Sampling runs
    inside `gathered(models)` (the whole model on hand when it is sharded)."""
    device = next(models.parameters()).device
    start = time.perf_counter()
    from_generation = args.logprobs_from_generation
    with gathered(models):
        sample = generate(models, tokenizer, prompt_ids, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, return_logprobs=from_generation,
                          step_head=models.value_head if from_generation and models.shared_critic else None,
                          synced_gpus=synced_generation)
    generated = time.perf_counter()

    rollout = Rollout(
        prompt_ids=sample.prompt_ids, prompt_mask=sample.prompt_mask, response_ids=sample.response_ids,
        response_mask=sample.response_mask.to(torch.float32), ended=sample.ended, texts=sample.texts,
        logprobs=None, ref_logprobs=None, values=None, raw_scores=None, scores=None, rewards=None, kl=None,
    )
    rows = slice(None)
    if from_generation:
        rollout.logprobs = sample.logprobs  # already 0 after the first EOS
        rollout.values = (sample.head_outputs * rollout.response_mask if models.shared_critic
                          else value_predictions(models, rollout, rows, grad=False))
    else:
        rollout.logprobs, _, rollout.values = policy_logprobs_and_values(models, rollout, rows, args.temperature, grad=False)
    reference_logits = models.reference_logits(*rollout.inputs(), keep=logits_to_keep(rollout))
    rollout.ref_logprobs, _ = sampled_logprobs(reference_logits[:, :-1], rollout, rows, args.temperature)
    reward_ids, reward_mask = render_for_reward(reward_tokenizer, prompts, sample.texts)
    rollout.raw_scores = models.scores(reward_ids.to(device), reward_mask.to(device))
    mean, std = reward_stats if reward_stats else (None, None)
    rollout.scores = ppo_math.shape_scores(rollout.raw_scores, rollout.ended, args.missing_eos_penalty, mean, std,
                                           args.reward_clip)
    rollout.rewards, rollout.kl = ppo_math.per_token_rewards(
        rollout.scores, rollout.logprobs, rollout.ref_logprobs, rollout.response_mask, kl_coef, args.kl_estimator)
    rollout.timings = {"time/generation": generated - start, "time/scoring": time.perf_counter() - generated}
    return rollout


def finish_advantages(rollout: Rollout, args: PPOArgs, global_stats) -> None:
    """GAE and whitening. `global_stats(values, mask) -> (mean, var)` reduces over every process, so whitening
    uses the statistics of the whole global batch, exactly as one process holding it would."""
    mask = rollout.response_mask
    rewards = rollout.rewards
    if args.whiten_rewards:
        rewards = ppo_math.masked_whiten(rewards, mask, shift_mean=False, stats=global_stats(rewards, mask))
    advantages, rollout.returns = ppo_math.gae(rewards, rollout.values, mask, args.gamma, args.lam)
    if args.whiten_advantages:
        advantages = ppo_math.masked_whiten(advantages, mask, stats=global_stats(advantages, mask))
    rollout.advantages = advantages
