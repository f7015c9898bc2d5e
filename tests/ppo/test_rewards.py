"""PPO's rewards: reward functions with the reward model or instead of it, their weights, and the checks made before
any model loads (a function's answer, the reward-model gate)."""

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO
from rlhf.config import ConfigError
from rlhf.ppo import trainer

GOLD = "rlhf.tiny.task.gold_rewards"


def ppo(sft_run, output_dir, *flags):
    return trainer.main(["--config", "recipes/tiny/ppo.yaml", "--init_from", sft_run.output_dir,
                         "--output_dir", str(output_dir), "--save_merged", "false", *flags])


def metrics_lines(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_reward_function_alone_scores_the_rollouts_without_a_reward_model(sft_run, tmp_path):
    output_dir = tmp_path / "ppo_gold"
    manifest = ppo(sft_run, output_dir, "--reward_model", "null", "--reward_funcs", GOLD, "--steps", "2",
                   "--rollout_batch_size", "8", "--mini_batch_size", "4", "--ppo_epochs", "1", "--max_new_tokens", "24",
                   "--gold_eval_prompts", "")
    assert manifest.extra["reward_placement"] == "none (reward functions)" and manifest.extra["reward_model"] is None
    assert manifest.extra["rewards"] == ["gold_rewards"] and manifest.extra["reward_weights"] == [1.0]
    rows = metrics_lines(output_dir)
    assert len(rows) == 2
    for row in rows:
        assert "score/raw" not in row  # no reward model, no raw score
        assert all(math.isfinite(value) for key, value in row.items() if key != "value/explained_variance")
        # The function and the gold metric are the same reward on the same samples.
        assert row["score/gold_rewards"] == pytest.approx(row["score/gold"], abs=1e-6)
        assert row["score/combined"] == pytest.approx(row["score/gold_rewards"], abs=1e-6)


@pytest.mark.slow  # the tiny recipe's 40 steps, ~70 s; the default set runs the reward-model PPO to the same bar
def test_ppo_on_the_gold_reward_function_alone_beats_sft(sft_run, tmp_path):
    """No reward model at all: the tiny task's gold reward as a reward function (a verifiable reward) trains the
    policy, the tiny recipe's 40 steps, to over 1.5x the SFT policy's held-out gold reward.

    kl_coef 0: the recipe's 0.05 is set against the reward model's normalised scores (several units wide), to keep
    the policy from exploiting that model. Against the true reward there is nothing to exploit, and on its [0, 1]
    scale the same leash holds the policy at about 1.5x SFT (0.61-0.65 against SFT's 0.42, in 9 runs varying
    steps, learning rate and reward_weights). Without it: 0.77, 0.83, 0.74 over seeds 42, 1, 2 (30 steps: 0.77,
    0.75, 0.67, too close to the line)."""
    manifest = ppo(sft_run, tmp_path / "ppo_gold", "--reward_model", "null", "--reward_funcs", GOLD, "--kl_coef", "0")
    sft_gold = sft_run.metrics["gold"]["gold_reward"]["mean"]
    ppo_gold = manifest.metrics["gold"]["gold_reward"]["mean"]
    assert ppo_gold >= 1.5 * sft_gold, (sft_gold, ppo_gold)


def test_reward_model_and_function_are_weighed_and_both_logged(sft_run, reward_run, tmp_path):
    output_dir = tmp_path / "ppo_both"
    manifest = ppo(sft_run, output_dir, "--reward_model", reward_run.output_dir, "--reward_funcs", GOLD,
                   "--reward_weights", "1.0", "2.0", "--steps", "2", "--rollout_batch_size", "8",
                   "--mini_batch_size", "4", "--ppo_epochs", "1", "--max_new_tokens", "24", "--gold_eval_prompts", "")
    assert manifest.extra["rewards"] == ["reward_model", "gold_rewards"]
    assert manifest.extra["reward_weights"] == [1.0, 2.0]
    mean, std = reward_run.metrics["reward_mean"], reward_run.metrics["reward_std"]
    rows = metrics_lines(output_dir)
    assert len(rows) == 2
    for row in rows:
        # The sum is linear, so the batch means combine as the scores do: the reward model normalised, weight 1,
        # plus the gold reward, weight 2.
        expected = (row["score/raw"] - mean) / std + 2.0 * row["score/gold_rewards"]
        assert row["score/combined"] == pytest.approx(expected, abs=1e-4)
        assert all(math.isfinite(value) for key, value in row.items() if key != "value/explained_variance")


@pytest.fixture
def refuse_to_load_models(monkeypatch, tmp_path):
    """Each bad recipe must fail before a model loads (and before the output folder is made)."""
    import rlhf.ppo.layouts

    def build_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad recipe was refused")

    monkeypatch.setattr(rlhf.ppo.layouts, "build_models", build_models)
    (tmp_path / "bad_rewards.py").write_text(
        "def wrong_length(prompts, completions, **columns):\n    return [1.0]\n\n"
        "def a_string(prompts, completions, **columns):\n    return 'good'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad_rewards", raising=False)  # another test's module of that name
    yield
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--reward_funcs", "bad_rewards.wrong_length"], r"bad_rewards.wrong_length: returned 1 values for 2 completions"),
    (["--reward_funcs", "bad_rewards.a_string"], r"bad_rewards.a_string: returned str; expected a list of 2 numbers"),
    (["--reward_funcs", "no_such_module.reward"], r"no_such_module.reward'?: cannot import module 'no_such_module'"),
    ([], r"ppo: no reward: set reward_model .* and/or reward_funcs"),
    (["--reward_model_name_or_path", "some-org/a-hub-classifier"],
     r"reward_model_name_or_path: 'some-org/a-hub-classifier' is not a reward stage folder"),
    (["--reward_funcs", GOLD, "--reward_weights", "1.0", "2.0"], r"reward_weights has 2 weights for 1 rewards"),
    (["--reward_funcs", GOLD, "--value_init", "reward"], r"none \(reward_funcs only\); use value_init: policy"),
    (["--reward_funcs", GOLD, GOLD], r"the name 'gold_rewards' is taken"),
], ids=["wrong-length", "string", "bad-import", "no-reward", "hub-classifier", "weights", "value-init", "twice"])
def test_bad_rewards_are_refused_before_any_model_loads(sft_run, tmp_path, refuse_to_load_models, flags, message):
    with pytest.raises(ConfigError, match=message):
        ppo(sft_run, tmp_path / "out", "--reward_model", "null", *flags)


def test_reward_model_below_min_reward_accuracy_is_refused(sft_run, reward_run, tmp_path, refuse_to_load_models):
    # The gate reads the manifest only and refuses before anything loads, so the manifest alone makes the folder.
    manifest = json.loads((REPO / reward_run.output_dir / "manifest.json").read_text())
    manifest["metrics"]["eval_accuracy"] = 0.55
    weak = tmp_path / "weak_reward"
    weak.mkdir()
    (weak / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"held-out accuracy 0\.550, below min_reward_accuracy 0\.6"):
        ppo(sft_run, tmp_path / "out", "--reward_model", str(weak))
    del manifest["metrics"]["eval_accuracy"]  # a reward stage trained without eval_data: nothing to check against
    (weak / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"records no held-out accuracy .* set min_reward_accuracy: 0"):
        ppo(sft_run, tmp_path / "out", "--reward_model", str(weak))


def test_function_values_reach_ppo_as_trl_passes_them_and_nones_are_left_out_of_means():
    from rlhf.ppo.distributed import Distributed
    from rlhf.ppo.rollout import function_scores
    from rlhf.ppo.trainer import function_means

    calls = []

    def judge_first(prompts, completions, completion_ids, item):
        calls.append((prompts, completions, completion_ids, item))
        return [len(completion_ids[0]), None]

    prompts = [[{"role": "user", "content": "Review the lamp."}], [{"role": "user", "content": "Review the mug."}]]
    values = function_scores([judge_first], prompts, ["Nice.", "Bad."], [[5, 6, 2], [7, 2]], {"item": ["lamp", "mug"]})
    assert calls == [(prompts, [[{"role": "assistant", "content": "Nice."}], [{"role": "assistant", "content": "Bad."}]],
                      [[5, 6, 2], [7, 2]], ["lamp", "mug"])]
    assert values.shape == (2, 1) and values[0, 0] == 3 and math.isnan(values[1, 0])

    rollout = SimpleNamespace(function_names=["a", "never"], function_scores=torch.tensor([[1.0, math.nan],
                                                                                            [math.nan, math.nan],
                                                                                            [3.0, math.nan]]))
    distributed = Distributed(SimpleNamespace(num_processes=1, device="cpu"))
    # a: the mean of the two values it gave; never: judged nothing, so not logged (a NaN would stop the run)
    assert function_means(rollout, distributed) == {"score/a": 2.0}


def test_value_model_copied_from_a_reward_model_of_another_tokenizer_is_refused(sft_run, reward_run, tmp_path,
                                                                                 refuse_to_load_models):
    """layout separate with value_init reward makes the value model a copy of the reward model, and it reads the
    policy's token ids: a reward model whose tokenizer is not the policy's is refused before anything loads (before,
    the value model read other tokens than the policy sampled, or failed on their ids). The policy's own tokenizer
    passes the check and the run goes on to load the models."""
    import shutil

    from transformers import AutoTokenizer

    from rlhf.manifest import read_manifest

    other = tmp_path / "reward_other_tokenizer"  # the reward stage with one token more in its tokenizer
    shutil.copytree(REPO / reward_run.output_dir, other, ignore=shutil.ignore_patterns("*.safetensors"))
    manifest = read_manifest(other)
    folder = manifest.path(manifest.adapter_path or manifest.merged_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<reward-only>"])
    tokenizer.save_pretrained(folder)
    separate = ["--layout", "separate", "--value_init", "reward"]
    with pytest.raises(ConfigError, match=rf"reward model's tokenizer \({len(tokenizer)} tokens\) is not the policy's "
                                          r"\(\d+ tokens\).*Use value_init: policy"):
        ppo(sft_run, tmp_path / "out", "--reward_model", str(other), *separate)
    with pytest.raises(AssertionError, match="a model was loaded"):
        ppo(sft_run, tmp_path / "same_tokenizer", "--reward_model", reward_run.output_dir, *separate)
