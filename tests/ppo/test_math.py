"""PPO arithmetic against values worked out by hand (the comments show the working)."""

import math

import pytest
import torch

from rlhf.ppo.math import (
    AdaptiveKLController,
    FixedKLController,
    combine_rewards,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    shape_scores,
    value_loss,
)

T = torch.tensor


def close(actual, expected):
    torch.testing.assert_close(actual.float(), T(expected).float(), atol=1e-5, rtol=1e-5)


def test_rewards_put_score_on_last_real_token_and_kl_everywhere():
    logprobs = T([[-1.0, -2.0, -3.0], [-1.0, -1.0, -5.0]])
    ref_logprobs = T([[-1.5, -2.0, -2.0], [-1.0, -2.0, -9.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])  # second response: 2 real tokens, then padding
    rewards, kl = per_token_rewards(T([1.0, 2.0]), logprobs, ref_logprobs, mask, kl_coef=0.1)
    # k1 = logp - ref = [[0.5, 0, -1], [0, 1, (pad)]]; rewards = -0.1*kl, + score at the last real token
    close(kl, [[0.5, 0.0, -1.0], [0.0, 1.0, 0.0]])
    close(rewards, [[-0.05, 0.0, 0.1 + 1.0], [0.0, -0.1 + 2.0, 0.0]])


def test_k3_estimator_is_nonnegative_and_matches_formula():
    # log ratio 0.5: exp(-0.5) - 1 + 0.5
    close(kl_estimate(T([-1.0]), T([-1.5]), "k3"), [math.exp(-0.5) - 1 + 0.5])
    close(kl_estimate(T([-1.5]), T([-1.0]), "k3"), [math.exp(0.5) - 1 - 0.5])
    with pytest.raises(ValueError, match="k1' or 'k3"):
        kl_estimate(T([0.0]), T([0.0]), "k2")


def test_scores_normalised_clipped_and_penalised_without_eos():
    scores = shape_scores(T([2.0, -1.0, 0.5]), ended=T([True, False, True]), missing_eos_penalty=1.0,
                          reward_mean=0.5, reward_std=0.5, clip=2.0)
    # (s - 0.5) / 0.5 = [3, -3, 0] -> clip ±2 = [2, -2, 0] -> no EOS on the second: -2 - 1
    close(scores, [2.0, -3.0, 0.0])


def test_rewards_combine_as_a_weighted_sum_where_none_counts_zero():
    nan = float("nan")
    # Columns: reward model (normalised), function a, function b (NaN: b returned None for that response).
    columns = T([[1.0, 0.5, 1.0],
                 [-2.0, nan, 0.0],
                 [0.5, 1.0, nan],
                 [nan, nan, nan]])
    combined = combine_rewards(columns, T([1.0, 2.0, -0.5]))
    # row 0: 1 + 2*0.5 - 0.5*1 = 1.5; row 1: -2 + 0 - 0 = -2; row 2: 0.5 + 2*1 + 0 = 2.5; row 3: nothing judged = 0
    close(combined, [1.5, -2.0, 2.5, 0.0])
    # One reward of weight 1 is that reward, unchanged (the reward model alone scores as before).
    close(combine_rewards(T([[0.25], [-3.0]]), T([1.0])), [0.25, -3.0])


def test_missing_eos_penalty_comes_after_normalising_and_clipping_as_its_help_says():
    import dataclasses

    from rlhf.ppo.config import PPOArgs

    help_text = next(f for f in dataclasses.fields(PPOArgs) if f.name == "missing_eos_penalty").metadata["help"]
    assert "after normalize_reward and after reward_clip" in help_text
    assert "reward-model standard deviations when normalize_reward is on" in help_text
    assert "-(reward_clip + this)" in help_text

    raw, ended = T([12.0, -8.0, 3.0, 3.0]), T([False, False, True, False])
    scores = shape_scores(raw, ended, missing_eos_penalty=1.5, reward_mean=2.0, reward_std=2.0, clip=4.0)
    # (s - 2) / 2 = [5, -5, 0.5, 0.5] -> clip ±4 = [4, -4, 0.5, 0.5] -> -1.5 where no EOS (1.5 standard deviations).
    # Penalising before the clip would give [2.5, -4, ...]: the clip would swallow the second response's penalty.
    close(scores, [2.5, -5.5, 0.5, -1.0])
    # normalize_reward off: the same penalty in raw reward-model units, still after the clip.
    close(shape_scores(raw, ended, missing_eos_penalty=1.5, clip=4.0), [2.5, -5.5, 3.0, 1.5])
    close(shape_scores(raw, ended, missing_eos_penalty=None, clip=4.0), [4.0, -4.0, 3.0, 3.0])


def test_gae_by_hand():
    advantages, returns = gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1, 1, 1]]), gamma=1.0, lam=0.5)
    # t2: delta = 1 + 0 - 0.7 = 0.3 ; t1: 0 + 0.7 - 0.6 = 0.1, A = 0.1 + 0.5*0.3 = 0.25
    # t0: 0 + 0.6 - 0.5 = 0.1, A = 0.1 + 0.5*0.25 = 0.225 ; returns = A + V
    close(advantages, [[0.225, 0.25, 0.3]])
    close(returns, [[0.725, 0.85, 1.0]])


def test_gae_ignores_padding_and_discounts():
    # Padding holds junk reward 99 and value 42 that must not leak into the real tokens.
    advantages, returns = gae(T([[0.0, 1.0, 99.0]]), T([[0.5, 0.7, 42.0]]), T([[1, 1, 0]]), gamma=0.9, lam=0.5)
    # t1: delta = 1 + 0.9*0 - 0.7 = 0.3 ; t0: delta = 0 + 0.9*0.7 - 0.5 = 0.13, A = 0.13 + 0.9*0.5*0.3 = 0.265
    close(advantages, [[0.265, 0.3, 0.0]])
    close(returns, [[0.765, 1.0, 0.0]])


def test_whitening_uses_real_tokens_only():
    whitened = masked_whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]]))
    # mean 2, unbiased variance 1
    close(whitened, [[-1.0, 0.0, 1.0, 0.0]])
    kept_mean = masked_whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]]), shift_mean=False)
    close(kept_mean, [[1.0, 2.0, 3.0, 0.0]])


def test_policy_loss_clips_by_hand():
    logprobs, old = T([[-1.0, -1.0]]), T([[-1.0, -1.5]])  # ratios 1 and e^0.5 = 1.6487
    mask = T([[1, 1]])
    loss, stats = policy_loss(logprobs, old, T([[1.0, 1.0]]), mask, clip_range=0.2)
    # positive advantage: max(-1*1, -1*1) = -1 ; max(-1.6487, -1.2) = -1.2 -> mean -1.1, second token clipped
    assert loss.item() == pytest.approx(-1.1)
    assert stats["policy/clipfrac"] == pytest.approx(0.5)
    assert stats["policy/approx_kl"] == pytest.approx(0.5 * 0.25 / 2)
    loss, stats = policy_loss(logprobs, old, T([[-1.0, -1.0]]), mask, clip_range=0.2)
    # negative advantage: max(1.6487, 1.2) = 1.6487 (pessimistic bound, no clipping) -> mean (1 + 1.6487) / 2
    assert loss.item() == pytest.approx((1 + math.exp(0.5)) / 2, rel=1e-5)
    assert stats["policy/clipfrac"] == 0.0


def test_policy_loss_ignores_padding():
    loss, _ = policy_loss(T([[-1.0, 50.0]]), T([[-1.0, -50.0]]), T([[2.0, 7.0]]), T([[1, 0]]))
    assert loss.item() == pytest.approx(-2.0)


def test_value_loss_clips_by_hand():
    loss, stats = value_loss(T([[1.0, 0.0]]), T([[0.5, 0.5]]), T([[2.0, 0.0]]), T([[1, 1]]), clip_range_value=0.2)
    # clipped V = [0.7, 0.3]; errors unclipped [1, 0], clipped [1.69, 0.09] -> 0.5 * mean(1.69, 0.09)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert stats["value/clipfrac"] == 1.0


def test_adaptive_kl_controller_by_hand():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 12 is 100% over target: error clipped to +0.2 -> 0.1 * (1 + 0.2 * 256 / 10000)
    assert controller.update(12.0, 256) == pytest.approx(0.1 * 1.00512)
    before = controller.value
    # KL 3 is 50% under: error clipped to -0.2
    assert controller.update(3.0, 256) == pytest.approx(before * (1 - 0.00512))
    assert FixedKLController(0.05).update(100.0, 256) == 0.05


def test_entropy_explained_variance_and_masked_mean():
    assert entropy_from_logits(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))
    returns, mask = T([[1.0, 2.0, 3.0]]), T([[1, 1, 1]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    assert masked_mean(T([[1.0, 3.0, 100.0]]), T([[1, 1, 0]])).item() == 2.0


def test_k3_is_clamped_for_tokens_the_policy_made_far_less_likely():
    policy, reference = torch.tensor([[-21.0, -1.0]]), torch.tensor([[-1.0, -21.0]])
    k3 = kl_estimate(policy, reference, "k3")
    # log-ratio -20 would give e^20 - 21 = 4.85e8; clamped at -10: e^10 - 11. +20 clamps to +10: e^-10 + 9.
    assert k3[0, 0].item() == pytest.approx(math.exp(10) - 11, rel=1e-6)
    assert k3[0, 1].item() == pytest.approx(math.exp(-10) + 9, rel=1e-6)


def test_losses_with_a_global_token_count_add_up_over_micro_batches():
    """Two micro-batches of 1 and 3 real tokens: their losses, each divided by the 4 tokens of the whole batch, add
    up to the token-mean of the whole batch (the mean of the two micro-batch means would not)."""
    logprobs = torch.tensor([[-1.0, 0.0, 0.0], [-0.5, -0.2, -0.9]])
    old = torch.tensor([[-1.2, 0.0, 0.0], [-0.4, -0.3, -0.7]])
    advantages = torch.tensor([[1.0, 0.0, 0.0], [-0.5, 2.0, 0.3]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    whole, _ = policy_loss(logprobs, old, advantages, mask)
    parts = [policy_loss(logprobs[rows], old[rows], advantages[rows], mask[rows], token_count=4.0)[0]
             for rows in (slice(0, 1), slice(1, 2))]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), abs=1e-7)
    means = [policy_loss(logprobs[rows], old[rows], advantages[rows], mask[rows])[0] for rows in (slice(0, 1), slice(1, 2))]
    assert abs((means[0] + means[1]).item() / 2 - whole.item()) > 1e-2
    values, returns = torch.tensor([[0.5, 0.0, 0.0], [0.1, 0.2, 0.3]]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    whole_value, _ = value_loss(values, values, returns, mask)
    value_parts = [value_loss(values[rows], values[rows], returns[rows], mask[rows], token_count=4.0)[0]
                   for rows in (slice(0, 1), slice(1, 2))]
    assert (value_parts[0] + value_parts[1]).item() == pytest.approx(whole_value.item(), abs=1e-7)


def test_global_whitening_statistics_keep_their_digits_at_a_large_mean():
    from types import SimpleNamespace

    from rlhf.ppo.distributed import Distributed

    generator = torch.Generator().manual_seed(0)
    values = 1000.0 + torch.randn(64, 48, generator=generator)
    mask = torch.ones_like(values)
    mean, variance = Distributed(SimpleNamespace(num_processes=1, device="cpu")).masked_stats(values, mask)
    exact = values.double()
    assert mean.item() == pytest.approx(exact.mean().item(), rel=1e-7)
    assert variance.item() == pytest.approx(exact.var().item(), rel=1e-4)
