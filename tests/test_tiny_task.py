"""The synthetic review task: gold reward on hand-checked cases, and the shipped data has the intended properties."""

import math
import statistics
from pathlib import Path

import pytest

from rlhf.data import load_preferences, load_prompts, load_sft
from rlhf.tiny.task import gold_reward, item_of

DATA = Path(__file__).resolve().parents[1] / "data" / "tiny"


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_gold_reward_hand_computed():
    prompt = "Write a short review of the kettle."
    # two positive words, well formed, names the item
    assert gold_reward(prompt, "The kettle is great. It feels solid.") == pytest.approx(sigmoid(2))
    # one positive, one negative: neutral sentiment
    assert gold_reward(prompt, "The kettle is great. It feels flimsy.") == pytest.approx(0.5)
    # no final period halves it
    assert gold_reward(prompt, "The kettle is great and it feels solid") == pytest.approx(sigmoid(2) * 0.5)
    # wrong item: relevance 0.7
    assert gold_reward(prompt, "The lamp is great. It feels solid.") == pytest.approx(sigmoid(2) * 0.7)
    # too short (3 words) counts as badly formed
    assert gold_reward(prompt, "Kettle is great.") == pytest.approx(sigmoid(1) * 0.5)


def test_item_of_finds_the_item():
    assert item_of("What do you think of the headphones?") == "headphones"
    assert item_of("Hello there") is None


def test_sft_data_is_mediocre_under_gold_reward():
    records = load_sft(str(DATA / "sft_train.jsonl"))
    rewards = [gold_reward(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in records]
    assert 0.25 < statistics.mean(rewards) < 0.55  # room to improve for DPO/PPO


def test_preferences_follow_gold_reward_with_noise():
    pairs = load_preferences(str(DATA / "prefs_train.jsonl"))
    agree = [
        gold_reward(p["prompt"][0]["content"], p["chosen"][0]["content"])
        > gold_reward(p["prompt"][0]["content"], p["rejected"][0]["content"])
        for p in pairs
    ]
    assert 0.7 < sum(agree) / len(agree) < 0.98  # mostly right, not noise-free


def test_test_prompts_are_unseen_in_training():
    train = {r["prompt"][0]["content"] for r in load_prompts(str(DATA / "prompts_train.jsonl"))}
    test = {r["prompt"][0]["content"] for r in load_prompts(str(DATA / "prompts_test.jsonl"))}
    assert test and not (train & test)
