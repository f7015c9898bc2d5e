"""The pipeline command: hand-off by manifest, skip when up to date, --force, rerun after a config change."""

import json

import pytest

from rlhf.config import ConfigError
from rlhf.manifest import read_manifest
from rlhf.pipeline import main

QUICK_SFT = ["--max_steps", "3", "--save_steps", "2", "--max_train_samples", "48", "--gold_eval_prompts", "",
             "--eval_data", ""]


def write_recipe(tmp_path, **changes):
    recipe = {
        "name": "test", "output_dir": str(tmp_path / "runs"), "stages": ["sft"],
        "sft_recipe": "recipes/tiny/sft.yaml", "sft_args": QUICK_SFT,
        "accelerate_config": "recipes/accelerate/cpu.yaml",
    }
    recipe.update(changes)
    path = tmp_path / "pipeline.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_skip_force_and_config_change(tmp_path):
    recipe = write_recipe(tmp_path)
    report = main(["--config", recipe])
    assert report.is_file()
    first = read_manifest(tmp_path / "runs" / "sft")
    assert first.metrics["steps"] == 3

    main(["--config", recipe])  # unchanged: skipped
    assert read_manifest(tmp_path / "runs" / "sft").created == first.created
    assert json.loads((tmp_path / "runs" / "pipeline.json").read_text())["sft"]["skipped"] is True

    main(["--config", recipe, "--force"])  # forced: rerun
    forced = read_manifest(tmp_path / "runs" / "sft")
    assert forced.config_hash == first.config_hash
    assert forced.created != first.created

    changed = write_recipe(tmp_path, sft_args=QUICK_SFT + ["--learning_rate", "1e-3"])
    main(["--config", changed])  # changed config: a new run with a new hash
    assert read_manifest(tmp_path / "runs" / "sft").config_hash != first.config_hash


def test_a_resumed_stage_counts_the_time_before_it_stopped(tmp_path, monkeypatch):
    import time

    import rlhf.pipeline as pipeline

    real_run_stage, spent = pipeline.run_stage, []

    def stopped_once(*args):
        started = time.perf_counter()
        try:
            if not spent:  # the first attempt dies after a while, as a killed or crashed stage does
                time.sleep(0.5)
                raise ConfigError("stage 'sft' failed: stopped")
            real_run_stage(*args)
        finally:
            spent.append(time.perf_counter() - started)

    monkeypatch.setattr(pipeline, "run_stage", stopped_once)
    recipe = write_recipe(tmp_path)
    timings_path = tmp_path / "runs" / "pipeline.json"
    with pytest.raises(ConfigError, match="stopped"):
        main(["--config", recipe])
    assert json.loads(timings_path.read_text())["sft"]["seconds_so_far"] == pytest.approx(spent[0], abs=0.05)
    main(["--config", recipe])  # resumes: the same config, the stage folder kept
    assert json.loads(timings_path.read_text())["sft"]["seconds"] == pytest.approx(sum(spent), abs=0.1)

    timings_path.write_text('{"sft": {"seconds": 1')  # cut short: only the timings are lost, never the run
    main(["--config", recipe])
    assert json.loads(timings_path.read_text())["sft"]["skipped"] is True


def test_a_stage_is_stale_when_a_stage_it_starts_from_finished_after_it(tmp_path):
    from rlhf.manifest import Manifest, write_manifest
    from rlhf.pipeline import retrained_upstream

    def finish(stage, created):
        write_manifest(Manifest(stage=stage, output_dir=str(tmp_path / stage), base_model="base",
                                adapter_path="adapter", config={}, metrics={}, created=created))

    finish("sft", "2026-11-27T09:00:00+0000")
    finish("reward", "2026-11-27T09:05:00+0000")
    finish("ppo", "2026-11-27T09:10:00+0000")
    stages = ["sft", "reward", "ppo"]
    assert retrained_upstream("ppo", tmp_path, stages) is None
    finish("reward", "2026-11-27T10:00:00+0000")  # --force --only reward: same config, a new reward model
    assert retrained_upstream("ppo", tmp_path, stages) == "reward"
    assert retrained_upstream("ppo", tmp_path, ["sft", "ppo"]) is None  # not this pipeline's reward stage
    assert retrained_upstream("dpo", tmp_path, stages + ["dpo"]) is None  # never finished: nothing to compare


def test_a_hub_token_goes_to_the_stage_in_its_environment_not_its_command_line():
    from rlhf.pipeline import without_hub_token

    assert without_hub_token(["--lr", "1", "--hub_token", "hf_secret", "--x", "2"]) == (
        ["--lr", "1", "--x", "2"], "hf_secret")
    assert without_hub_token(["--hub_token=hf_secret"]) == ([], "hf_secret")
    assert without_hub_token(["--push_to_hub", "true"]) == (["--push_to_hub", "true"], None)


@pytest.mark.parametrize("changes, message", [
    ({"stages": ["sft", "rlhf"]}, "unknown stage"),
    ({"sft_recipe": "recipes/tiny/missing.yaml"}, "file not found"),
    ({"accelerate_config": "nope.yaml"}, "accelerate config nope.yaml"),
])
def test_bad_pipeline_recipes_fail_fast(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        main(["--config", write_recipe(tmp_path, **changes)])


def test_failing_stage_error_is_said_once_and_last(tmp_path, capfd):
    from rlhf.cli import main as cli

    recipe = write_recipe(tmp_path, sft_args=QUICK_SFT + ["--train_data", str(tmp_path / "missing.jsonl")])
    assert cli(["pipeline", "--config", recipe]) == 1
    error = capfd.readouterr().err
    lines = [line for line in error.splitlines() if line.strip()]
    assert "stage 'sft' failed" in lines[-1] and "missing.jsonl: file not found" in lines[-1]
    assert error.count("missing.jsonl: file not found") == 1
    assert "Traceback" not in error


def quick_stage_args():
    """Every stage cut to a few steps: this checks the hand-offs and the launch, not what is learned."""
    quick = ["--max_steps", "2", "--save_steps", "1", "--gold_eval_prompts", "", "--eval_data", ""]
    return {
        "sft_args": quick + ["--max_train_samples", "32"],
        "reward_args": quick + ["--max_train_samples", "32"],
        "dpo_args": quick + ["--max_train_samples", "32"],
        # The 2-step reward model has no held-out accuracy (no eval_data): the gate is turned off.
        "grpo_args": quick + ["--per_device_train_batch_size", "8", "--num_generations", "4",
                              "--max_completion_length", "12", "--min_reward_accuracy", "0"],
        "ppo_args": ["--steps", "2", "--save_steps", "1", "--rollout_batch_size", "4", "--mini_batch_size", "2",
                     "--ppo_epochs", "1", "--max_new_tokens", "12", "--gold_eval_prompts", "",
                     "--min_reward_accuracy", "0"],
    }


def test_whole_pipeline_under_two_processes(tmp_path):
    """The tiny pipeline, every stage launched with the 2-process CPU (gloo DDP) accelerate config."""
    recipe = write_recipe(
        tmp_path, stages=["sft", "reward"], policy_stages=["dpo", "ppo", "grpo"], reward_recipe="recipes/tiny/reward.yaml",
        dpo_recipe="recipes/tiny/dpo.yaml", ppo_recipe="recipes/tiny/ppo.yaml", grpo_recipe="recipes/tiny/grpo.yaml",
        accelerate_config="recipes/accelerate/cpu_2proc.yaml", eval_prompts="data/tiny/prompts_test.jsonl",
        eval_preferences="data/tiny/prefs_test.jsonl", eval_samples=8, **quick_stage_args())
    report = main(["--config", recipe])

    runs = tmp_path / "runs"
    for stage in ("sft", "reward", "dpo"):
        manifest = read_manifest(runs / stage)
        assert manifest.metrics["world_size"] == 2, stage
        assert manifest.metrics["steps"] == 2, stage
    ppo = read_manifest(runs / "ppo")
    assert ppo.extra["world_size"] == 2
    grpo = read_manifest(runs / "grpo")
    assert grpo.metrics["world_size"] == 2 and grpo.parent.endswith("sft") and grpo.extra["rewards"] == ["reward_model"]
    assert ppo.parent.endswith("sft") and read_manifest(runs / "dpo").parent.endswith("sft")
    text = report.read_text()
    assert "| dpo |" in text and "| ppo |" in text and "| grpo |" in text and "## Reward model" in text
    assert (runs / "policies.png").is_file() and (runs / "ppo_training.png").is_file()

    main(["--config", recipe])  # everything up to date: nothing reruns
    timings = json.loads((runs / "pipeline.json").read_text())
    assert all(timings[stage]["skipped"] for stage in ("sft", "reward", "dpo", "ppo", "grpo"))


@pytest.mark.slow
def test_readme_pipeline_improves_gold_reward(tmp_path):
    """The README's main command, in full (about 7 minutes on 2 cores): DPO and PPO both beat SFT on gold reward."""
    report = main(["--config", "recipes/tiny/pipeline.yaml", "--output_dir", str(tmp_path / "tiny")])
    policies = json.loads((tmp_path / "tiny" / "eval_policy" / "report.json").read_text())
    sft_gold = policies["reference"]["gold_reward"]["mean"]
    for name, summary in policies["policies"].items():
        assert summary["gold_reward"]["mean"] > sft_gold + 0.05, (name, summary["gold_reward"], sft_gold)
    assert "| ppo |" in report.read_text()
