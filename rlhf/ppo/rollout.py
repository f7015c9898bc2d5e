"""One PPO rollout: sample responses, score them, and turn scores into per-token rewards, advantages and returns.

Everything here runs without gradients. Per-token tensors are sliced so column t is response token t: the logits,
log-probs and values that belong to token t come from the position just before it.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

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
    raw_scores: torch.Tensor | None  # the reward model's own score (None without a reward model)
    scores: torch.Tensor  # the combined score, clipped and penalised: what the last token is rewarded with
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    function_scores: torch.Tensor | None = None  # (batch, n_functions): each reward function's value, NaN for None
    function_names: list[str] = field(default_factory=list)
    combined_scores: torch.Tensor | None = None  # the weighted sum of the rewards, before clipping and the penalty
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


def function_scores(functions: list[Callable], prompts: list[list[dict]], texts: list[str],
                    completion_ids: list[list[int]], columns: dict[str, list]) -> torch.Tensor:
    """(batch, n_functions) values of reward functions called as TRL calls them: prompts and completions as message
    lists (PPO's prompts always are), the response token ids, the prompt records' other columns by name. None (the
    function does not judge that response) becomes NaN."""
    from rlhf.rewards import as_messages

    completions = [as_messages(text, "assistant") for text in texts]
    values = [function(prompts, completions, completion_ids=completion_ids, **columns) for function in functions]
    table = [[math.nan if value is None else value for value in column] for column in values]
    return torch.tensor(table, dtype=torch.float32).reshape(len(functions), len(texts)).T


@torch.no_grad()
def collect(models, tokenizer, reward_tokenizer, prompts: list[list[dict]], prompt_ids: list[list[int]],
            args: PPOArgs, kl_coef: float, reward_stats: tuple[float, float] | None,
            gathered=lambda models: nullcontext(), synced_generation: bool = False,
            reward_functions: list[Callable] = (), columns: dict[str, list] | None = None,
            reward_weights: list[float] | None = None) -> Rollout:
    """Sample and score one batch; rewards, advantages and returns are filled by `finish_advantages`. Sampling runs
    inside `gathered(models)` (the whole model on hand when it is sharded).

    The score is the weighted sum (reward_weights, default 1.0 each) of the reward model's score (when
    models.has_reward_model; normalised with reward_stats when given) and each reward function's values on these
    prompts (`columns`: the prompt records' other columns, one entry per prompt); then reward_clip and the
    missing-EOS penalty apply to it."""
    device = next(models.parameters()).device
    start = time.perf_counter()
    from_generation = args.logprobs_from_generation is not False  # None: not resolved (PPOArgs.resolve_precision)
    with gathered(models):
        sample = generate(models, tokenizer, prompt_ids, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, return_logprobs=from_generation,
                          step_head=models.value_head if from_generation and models.shared_critic else None,
                          synced_gpus=synced_generation, engine=args.generation_engine,
                          sampling_dtype=getattr(torch, args.sampling_dtype) if args.sampling_dtype else None)
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
    reward_columns = []
    if models.has_reward_model:
        reward_ids, reward_mask = render_for_reward(reward_tokenizer, prompts, sample.texts)
        rollout.raw_scores = models.scores(reward_ids.to(device), reward_mask.to(device))
        mean, std = reward_stats if reward_stats else (None, None)
        reward_columns.append(ppo_math.normalize_scores(rollout.raw_scores, mean, std)[:, None])
    if reward_functions:  # each process scores its own rows
        completion_ids = [ids[mask.bool()].tolist() for ids, mask in zip(sample.response_ids, rollout.response_mask)]
        rollout.function_names = [function.__name__ for function in reward_functions]
        rollout.function_scores = function_scores(list(reward_functions), prompts, sample.texts, completion_ids,
                                                  columns or {}).to(device)
        reward_columns.append(rollout.function_scores)
    reward_columns = torch.cat(reward_columns, dim=1)
    weights = torch.tensor(reward_weights) if reward_weights is not None else torch.ones(reward_columns.shape[1])
    rollout.combined_scores = ppo_math.combine_rewards(reward_columns, weights)
    # Normalised above, on the reward model's column only: shape_scores gets no statistics, so nothing is
    # normalised twice (nor a reward function's value normalised with the reward model's statistics).
    rollout.scores = ppo_math.shape_scores(rollout.combined_scores, rollout.ended, args.missing_eos_penalty,
                                           clip=args.reward_clip)
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
