"""PPO arithmetic against values worked out by hand (the comments show the working)."""

import math

import pytest
import torch

from rlhf.ppo.math import (
    AdaptiveKLController,
    FixedKLController,
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
