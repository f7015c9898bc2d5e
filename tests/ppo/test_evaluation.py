"""PPO's held-out evaluation (eval_data, eval_steps): logged at the right steps, finite, and training unchanged."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import metrics_rows, short_ppo_run, REPO, TINY_DATA
from rlhf.ppo.evaluation import HeldOutPrompts

EVAL_KEYS = ("eval/score", "eval/score_raw", "eval/kl", "eval/length", "eval/eos_rate")


def test_evaluation_every_eval_steps_leaves_training_unchanged(sft_run, reward_run, tmp_path):
    short_ppo_run(sft_run, reward_run, tmp_path / "plain", "--steps", "4")
    short_ppo_run(sft_run, reward_run, tmp_path / "eval", "--steps", "4",
                  "--eval_data", str(TINY_DATA / "prompts_test.jsonl"), "--max_eval_samples", "12", "--eval_steps", "2")
    plain, evaluated = metrics_rows(tmp_path / "plain"), metrics_rows(tmp_path / "eval")
    assert [sorted(key for key in row if key.startswith("eval/")) for row in evaluated] == [
        [], sorted(EVAL_KEYS), [], sorted(EVAL_KEYS)]
    for row in evaluated[1::2]:
        assert all(math.isfinite(row[key]) for key in EVAL_KEYS), row
        assert 0 < row["eval/length"] <= 24 and 0 <= row["eval/eos_rate"] <= 1 and row["time/eval"] > 0
    assert evaluated[1]["eval/kl"] != evaluated[3]["eval/kl"]  # the policy moved between the two
    # Same seed: the same training with or without the evaluations (their sampling has its own random state).
    for with_eval, without in zip(evaluated, plain):
        for key, value in without.items():
            if not key.startswith(("time/", "memory/")):
                assert with_eval[key] == value, key


def test_eval_steps_without_eval_data_is_refused(sft_run, reward_run, tmp_path):
    from rlhf.config import ConfigError

    with pytest.raises(ConfigError, match="eval_steps 2 evaluates on eval_data, which is not set"):
        short_ppo_run(sft_run, reward_run, tmp_path / "bad", "--steps", "2", "--eval_steps", "2")


def test_every_process_gets_as_many_prompts_and_each_prompt_counts_once():
    held_out = HeldOutPrompts([[{"role": "user", "content": str(i)}] for i in range(5)], [[i] for i in range(5)], {},
                              eval_steps=3, total_steps=7)
    shares = [held_out.share(rank, 2) for rank in range(2)]
    assert [rows for rows, _ in shares] == [[0, 1, 2], [3, 4, 0]]
    assert torch.cat([weights for _, weights in shares]).tolist() == [1, 1, 1, 1, 1, 0]
    assert [step for step in range(1, 8) if held_out.due(step)] == [3, 6, 7]


def test_two_processes_evaluate_reward_functions_on_their_shares(sft_run, tmp_path):
    """Two processes, 5 held-out prompts (one share padded), reward functions only: eval/score is the gold reward
    (in [0, 1]); learning rate 0, so the policy stays the reference and eval/kl is ~0."""
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join((TINY_DATA / "prompts_test.jsonl").read_text().splitlines(keepends=True)[:5]))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml",
               "--main_process_port", "29627", "-m", "rlhf.ppo", "--config", "recipes/tiny/ppo.yaml",
               "--init_from", sft_run.output_dir, "--reward_model", "null",
               "--reward_funcs", "rlhf.tiny.task.gold_rewards", "--output_dir", str(tmp_path / "ppo"),
               "--rollout_batch_size", "4", "--mini_batch_size", "4", "--ppo_epochs", "1", "--max_new_tokens", "24",
               "--gold_eval_prompts", "", "--save_merged", "false", "--steps", "2", "--learning_rate", "0",
               "--eval_data", str(prompts), "--eval_steps", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_rows(tmp_path / "ppo")
    for row in rows:
        assert "eval/score_raw" not in row and 0 <= row["eval/score"] <= 1
        assert abs(row["eval/kl"]) < 1e-4 and 0 < row["eval/length"] <= 24
        assert row["eval/length"] * 5 == pytest.approx(round(row["eval/length"] * 5))  # a mean over 5 prompts
    assert rows[0]["eval/score"] == rows[1]["eval/score"]  # the same policy, the same evaluation draw
