"""The arithmetic of RLHF-PPO as pure functions on tensors (no models), each checked against hand-computed values.

Shapes: (batch, response_len) for per-token tensors; `mask` is 1 on real response tokens (up to and including the
first EOS) and 0 on padding. Every reduction is masked, so padding never moves a number.
"""

from __future__ import annotations

import torch


# ----------------------------------------------------------------------------------------------- masked statistics

def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        variance = variance * count / (count - 1).clamp(min=1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(values - mean) / std over the real tokens; padding stays 0. shift_mean=False keeps the mean (used for
    rewards, whose sign carries meaning). `stats` = (mean, unbiased variance) computed elsewhere, e.g. over the
    batches of all processes."""
    mean, variance = stats if stats is not None else (masked_mean(values, mask), masked_var(values, mask))
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each response (the EOS when there is one)."""
    return (mask.sum(dim=1) - 1).clamp(min=0).long()


# ----------------------------------------------------------------------------------------------- rewards

K3_LOG_RATIO_CLAMP = 10.0


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.
    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, always >= 0)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        # exp(-log_ratio) explodes for a token the policy made far less likely than the reference (-20 gives 4.9e8
        # and one such token swamps the batch); clamp the ratio as OpenRLHF does.
        log_ratio = log_ratio.clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def normalize_scores(scores: torch.Tensor, reward_mean: float | None = None,
                     reward_std: float | None = None) -> torch.Tensor:
    """Reward-model scores in standard deviations of its own training statistics (unchanged without them)."""
    scores = scores.float()
    if reward_mean is not None and reward_std is not None:
        scores = (scores - reward_mean) / max(reward_std, 1e-8)
    return scores


def combine_rewards(columns: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(batch, n_rewards) scores, NaN where a reward function returned None, -> (batch,) weighted sums. A NaN counts
    0 for that reward (TRL's nansum), so a function that does not judge a response neither rewards nor punishes it."""
    return torch.nansum(columns.float() * weights.to(columns.device, torch.float32), dim=1)


def shape_scores(scores: torch.Tensor, ended: torch.Tensor, missing_eos_penalty: float | None = None,
                 reward_mean: float | None = None, reward_std: float | None = None,
                 clip: float | None = None) -> torch.Tensor:
    """Sequence scores made ready for PPO, in this order: normalised with the reward model's own training statistics
    (when given; the rollout normalises the reward model's column before combining rewards and passes none here),
    clipped, then penalised when the response never produced EOS (truncated text is not a finished answer and must
    not be rewarded as one). The penalty comes last so that clipping cannot absorb it, and it is in the units of the
    scores at that point (reward-model standard deviations once normalised)."""
    scores = normalize_scores(scores, reward_mean, reward_std)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    if missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores - missing_eos_penalty)
    return scores


def per_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """rewards_t = -kl_coef * KL_t on every real token, plus the sequence score on the last real token (not on the
    first padding slot after it). Returns (rewards, per-token KL)."""
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards * mask, kl


# ----------------------------------------------------------------------------------------------- advantages

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response; the value after the last real token is 0 (episode end).
    Returns (advantages, returns = advantages + values), both 0 on padding."""
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros(rewards.shape[0], device=rewards.device, dtype=rewards.dtype)
    next_value = torch.zeros_like(next_advantage)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # On padding, carry nothing backwards: the next real token (to the left) sees the episode end.
        advantages[:, t] = advantage * mask[:, t]
        next_advantage = advantages[:, t]
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


# ----------------------------------------------------------------------------------------------- losses

def token_mean(values: torch.Tensor, mask: torch.Tensor, token_count: torch.Tensor | float | None = None):
    """Mean over real tokens; with token_count, the sum over these tokens divided by token_count, so the pieces of a
    batch split into micro-batches (and processes) add up to the mean over the whole batch."""
    if token_count is None:
        return masked_mean(values, mask)
    return (values * mask).sum() / token_count


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float = 0.2, token_count=None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-e, 1+e)), r = pi/pi_old (see token_mean for
    token_count)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = token_mean(torch.maximum(unclipped, clipped), mask, token_count)
    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
            "policy/approx_kl": masked_mean(0.5 * log_ratio ** 2, mask).item(),
            "policy/ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float = 0.2, token_count=None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 * mean over tokens of max((V - R)^2, (V_old + clip(V - V_old, ±e) - R)^2) (see
    token_mean for token_count)."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(unclipped_error, clipped_error), mask, token_count)
    with torch.no_grad():
        stats = {"value/clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask).item()}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical distribution given by logits."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 no better than a constant."""
    variance = masked_var(returns, mask)
    if variance.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask) / variance).item()


# ----------------------------------------------------------------------------------------------- KL coefficient

class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al. (2019): move the coefficient toward a target KL. The proportional error is clipped to ±0.2,
    and the step is scaled by the samples seen over the horizon."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def kl_controller(kl_coef: float, target: float | None, horizon: int):
    return AdaptiveKLController(kl_coef, target, horizon) if target else FixedKLController(kl_coef)

