"""Policy evaluation: win-rates and intervals by hand, and a policy compared with itself."""

import math

import pytest

from conftest import TINY_BASE, TINY_DATA
from rlhf.config import ModelArgs
from rlhf.data import load_prompts
from rlhf.evaluate.policy import compare_policies, mean_with_interval, win_rate
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.tiny.task import gold_reward


def test_mean_with_interval_by_hand():
    result = mean_with_interval([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, sample variance 5/3, half width 1.96 * sqrt(5/3 / 4)
    half = 1.96 * math.sqrt((5 / 3) / 4)
    assert result["mean"] == 2.5
    assert result["ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    assert result["n"] == 4


def test_win_rate_counts_ties_as_half():
    result = win_rate([1.0, 2.0, 3.0, 5.0], [0.0, 2.0, 4.0, 1.0])
    assert result["mean"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_policy_against_itself_has_zero_kl_and_even_win_rate():
    model = load_causal_lm(TINY_BASE, ModelArgs()).eval()
    tokenizer = load_tokenizer(TINY_BASE)
    prompts = [record["prompt"] for record in load_prompts(str(TINY_DATA / "prompts_test.jsonl"))][:12]
    report = compare_policies({"same": model}, tokenizer, prompts, reference=model, gold=gold_reward,
                              batch_size=6, max_new_tokens=24, seed=3)
    summary = report["policies"]["same"]
    # Same seed, same model: identical samples, so every comparison is a tie and the KL estimate is exactly 0.
    assert summary["win_rate_vs_reference_gold"]["mean"] == 0.5
    assert summary["kl_to_reference"]["mean"] == 0.0
    assert summary["gold_reward"]["mean"] == report["reference"]["gold_reward"]["mean"]
    assert [e["policy"] for e in summary["examples"]] == [e["reference"] for e in summary["examples"]]
