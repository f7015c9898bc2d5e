"""Reward-model stage and eval-rm on the tiny task."""

import json
import os
import subprocess
import sys

import torch
from safetensors import safe_open

from conftest import REPO, TINY_DATA
from rlhf.config import ModelArgs
from rlhf.data import load_preferences
from rlhf.evaluate.scoring import score_pairs
from rlhf.manifest import read_manifest
from rlhf.models import load_stage_output, stage_tokenizer

TEST_PAIRS = str(TINY_DATA / "prefs_test.jsonl")


def test_reward_model_ranks_held_out_pairs(reward_run):
    metrics = reward_run.metrics
    assert metrics["eval_accuracy"] >= 0.85  # held-out pairs labelled by the gold ranking
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"]
    # Statistics PPO normalises with.
    assert metrics["reward_std"] > 0
    assert abs(metrics["reward_mean"]) < 10
    assert reward_run.extra["head"] == "reward"
    assert reward_run.parent_manifest["stage"] == "sft"


def test_lora_score_head_is_saved_and_reloads_to_identical_scores(lora_reward_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    adapter_dir = lora_reward_run.path("adapter")
    with safe_open(adapter_dir + "/adapter_model.safetensors", "pt") as adapter:
        assert any(".score." in key for key in adapter.keys())  # the head travels with the adapter
    pairs = load_preferences(TEST_PAIRS)[:16]
    model_args = ModelArgs()
    tokenizer = stage_tokenizer(lora_reward_run, model_args)
    ours = score_pairs(load_stage_output(lora_reward_run, model_args), tokenizer, pairs)
    # Plain transformers + peft: the SFT policy as a classifier, plus this adapter (LoRA + score head).
    sft_dir = lora_reward_run.parent
    base = AutoModelForSequenceClassification.from_pretrained(f"{sft_dir}/merged", num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    plain = PeftModel.from_pretrained(base, adapter_dir).eval()
    theirs = score_pairs(plain, tokenizer, pairs)
    torch.testing.assert_close(torch.tensor(ours["chosen"]), torch.tensor(theirs["chosen"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(ours["rejected"]), torch.tensor(theirs["rejected"]), atol=1e-4, rtol=1e-4)
    assert lora_reward_run.metrics["reward_std"] > 0


def test_full_reward_model_reloads_to_identical_scores(reward_run):
    from transformers import AutoModelForSequenceClassification

    pairs = load_preferences(TEST_PAIRS)[:16]
    tokenizer = stage_tokenizer(reward_run, ModelArgs())
    ours = score_pairs(load_stage_output(reward_run, ModelArgs()), tokenizer, pairs)
    plain = AutoModelForSequenceClassification.from_pretrained(reward_run.path(reward_run.merged_path)).eval()
    theirs = score_pairs(plain, tokenizer, pairs)
    assert ours == theirs


def test_eval_rm_report_matches_scores(reward_run, tmp_path):
    from rlhf.evaluate import rm

    out = tmp_path / "eval"
    results = rm.main(["--model", reward_run.output_dir, "--data", TEST_PAIRS, "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == report["n_pairs"] == len(load_preferences(TEST_PAIRS))
    assert report["accuracy"]["mean"] == sum(row["correct"] for row in rows) / len(rows)
    assert report["accuracy"]["mean"] >= 0.85
    assert results[reward_run.output_dir]["accuracy"] == report["accuracy"]
    for name in ("report.md", "reward_histogram.png", "calibration.png", "margin_histogram.png"):
        assert (out / name).stat().st_size > 0
    assert "Accuracy" in (out / "report.md").read_text() or "accuracy" in (out / "report.md").read_text()


def test_eval_rm_two_processes_equal_one(reward_run, tmp_path):
    base = [sys.executable, "-m", "accelerate.commands.launch"]
    args = ["-m", "rlhf.evaluate.rm", "--model", reward_run.output_dir, "--data", TEST_PAIRS, "--max_samples", "50",
            "--plots", "false"]
    outputs = {}
    for name, config in [("one", "cpu.yaml"), ("two", "cpu_2proc.yaml")]:
        command = base + ["--config_file", f"recipes/accelerate/{config}"] + args + ["--out", str(tmp_path / name)]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "ACCELERATE_USE_CPU": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = [json.loads(line) for line in (tmp_path / name / "scores.jsonl").read_text().splitlines()]
        assert json.loads((tmp_path / name / "report.json").read_text())["processes"] == {"one": 1, "two": 2}[name]
    assert [row["index"] for row in outputs["two"]] == list(range(50))
    for one, two in zip(outputs["one"], outputs["two"]):
        assert abs(one["chosen_score"] - two["chosen_score"]) < 1e-4
        assert abs(one["rejected_score"] - two["rejected_score"]) < 1e-4


def test_eval_rm_refuses_a_policy_folder(sft_run, capsys):
    from rlhf.cli import main

    assert main(["eval-rm", "--model", sft_run.output_dir, "--data", TEST_PAIRS]) == 1
    assert "not a reward model" in capsys.readouterr().err


def test_manifest_on_disk_matches_returned(reward_run):
    assert read_manifest(reward_run.output_dir).metrics == reward_run.metrics


def test_pairs_longer_than_max_length_are_counted_and_all_too_long_fails_before_training(sft_run, tmp_path, capsys):
    """TRL's RewardTrainer drops over-long pairs instead of truncating; the stage says so, and refuses when none fit."""
    import pytest

    from rlhf import reward
    from rlhf.data import DataError

    with pytest.raises(DataError, match=r"prefs_train.jsonl: all 48 records are longer than max_length 12"):
        reward.main(["--config", "recipes/tiny/reward.yaml", "--init_from", sft_run.output_dir, "--max_length", "12",
                     "--max_train_samples", "48", "--output_dir", str(tmp_path / "reward")])
    assert not list((tmp_path / "reward").glob("checkpoints/checkpoint-*"))  # nothing was trained
    assert not (tmp_path / "reward" / "manifest.json").exists()

    manifest = reward.main(["--config", "recipes/tiny/reward.yaml", "--init_from", sft_run.output_dir,
                            "--max_length", "40", "--max_train_samples", "48", "--max_steps", "1", "--stats_samples", "8",
                            "--eval_data", "", "--gold_eval_prompts", "", "--output_dir", str(tmp_path / "short")])
    message = [line for line in capsys.readouterr().out.splitlines() if "longer than max_length 40" in line]
    assert message and "of 48 pairs" in message[0], message
    dropped = int(message[0].split("reward: ")[1].split(" of ")[0])
    assert 0 < dropped < 48 and manifest.metrics["steps"] == 1


def test_one_recipe_trains_the_same_reward_model_twice(sft_run, tmp_path):
    """The score head and the LoRA weights are drawn before TRL's trainer seeds itself: the stage seeds first."""
    from safetensors.torch import load_file

    from rlhf import reward

    def adapter_weights(name):
        manifest = reward.main(["--config", "recipes/tiny/reward.yaml", "--init_from", sft_run.output_dir,
                                "--output_dir", str(tmp_path / name), "--use_lora", "true", "--max_steps", "2",
                                "--stats_samples", "0", "--eval_data", "", "--save_merged", "false"])
        return load_file(manifest.path("adapter") + "/adapter_model.safetensors")

    first, second = adapter_weights("first"), adapter_weights("second")
    assert first.keys() == second.keys() and any(".score." in key for key in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key
