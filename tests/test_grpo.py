"""GRPO and RLOO stages: they beat SFT on the tiny task's gold reward, rewarded by the reward model or by the gold
function; rewards are checked before any model loads; the reward-model gate; two processes; resume after a kill."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY_BASE, held_out_curve, kill_when
from rlhf import grpo, rloo
from rlhf.cli import main as cli
from rlhf.config import ConfigError
from rlhf.data import DataError
from rlhf.manifest import read_jsonl_log
from rlhf.checkpoints import COMPLETE_MARKER, complete_checkpoints

GOLD_FUNCTION = "rlhf.tiny.task.gold_rewards"


def sft_gold(sft_run) -> float:
    return sft_run.metrics["gold"]["gold_reward"]["mean"]


def test_grpo_on_the_reward_model_beats_sft(grpo_run, sft_run):
    gold = grpo_run.metrics["gold"]["gold_reward"]["mean"]
    assert gold >= 1.25 * sft_gold(sft_run), (sft_gold(sft_run), gold)
    assert grpo_run.metrics["last_logged_reward"] > grpo_run.metrics["first_logged_reward"] + 0.3
    assert grpo_run.extra["rewards"] == ["reward_model"] and grpo_run.extra["reference"].startswith("parent policy")
    held_out_curve(grpo_run, sft_gold(sft_run))


def test_rloo_on_the_reward_model_beats_sft(sft_run, reward_run, tmp_path):
    manifest = rloo.main(["--config", "recipes/tiny/rloo.yaml", "--init_from", sft_run.output_dir,
                          "--reward_model", reward_run.output_dir, "--output_dir", str(tmp_path / "rloo")])
    gold = manifest.metrics["gold"]["gold_reward"]["mean"]
    assert gold >= 1.25 * sft_gold(sft_run), (sft_gold(sft_run), gold)
    assert manifest.stage == "rloo"


def test_grpo_on_the_gold_function_alone_beats_sft_by_half(sft_run, tmp_path):
    """A verifiable reward: no reward model at all, the task's gold reward as a reward function."""
    manifest = grpo.main(["--config", "recipes/tiny/grpo.yaml", "--init_from", sft_run.output_dir,
                          "--reward_model", "null", "--reward_funcs", GOLD_FUNCTION, "--output_dir", str(tmp_path / "g")])
    gold = manifest.metrics["gold"]["gold_reward"]["mean"]
    assert gold >= 1.5 * sft_gold(sft_run), (sft_gold(sft_run), gold)
    assert manifest.extra["rewards"] == ["gold_rewards"] and manifest.extra["reward_model"] is None


BAD_REWARDS = '''
def one_value(prompts, completions, **columns):
    return [1.0]

def words(prompts, completions, **columns):
    return ["good" for _ in completions]

def needs_answer(prompts, completions, answer, **columns):
    return [float(a in c[0]["content"]) for a, c in zip(answer, completions)]
'''


@pytest.mark.parametrize("spec, message", [
    ("no_such_package.reward", "cannot import module 'no_such_package'"),
    ("bad_rewards.missing", "module bad_rewards has no 'missing'"),
    ("bad_rewards.one_value", "returned 1 values for 2 completions"),
    ("bad_rewards.words", r"value 0 is 'good' \(str\); expected a number"),
    ("bad_rewards.needs_answer", "failed on a probe call .* missing 1 required positional argument: 'answer'.* with columns \\['item'\\]"),
    ("length", "neither a TRL reward"),
])
def test_bad_reward_functions_fail_before_any_model_loads(sft_run, tmp_path, monkeypatch, capsys, spec, message):
    (tmp_path / "bad_rewards.py").write_text(BAD_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad_rewards", raising=False)  # another test's module of that name
    output_dir = tmp_path / "out"
    code = cli(["grpo", "--config", "recipes/tiny/grpo.yaml", "--init_from", sft_run.output_dir, "--reward_model",
                "null", "--reward_funcs", spec, "--output_dir", str(output_dir)])
    error = capsys.readouterr().err
    assert code == 1
    assert re.search(message, error), error
    assert not output_dir.exists()  # refused before the output folder (and any model) was touched


def test_weak_reward_model_is_refused_with_what_was_measured(sft_run, reward_run, tmp_path, capsys):
    weak = tmp_path / "weak_reward"
    shutil.copytree(reward_run.output_dir, weak)
    manifest = json.loads((weak / "manifest.json").read_text())
    manifest["metrics"]["eval_accuracy"] = 0.55
    (weak / "manifest.json").write_text(json.dumps(manifest))
    argv = ["grpo", "--config", "recipes/tiny/grpo.yaml", "--init_from", sft_run.output_dir, "--reward_model", str(weak),
            "--output_dir", str(tmp_path / "out")]
    assert cli(argv) == 1
    error = capsys.readouterr().err
    assert "held-out accuracy 0.550, below min_reward_accuracy 0.6" in error
    argv[argv.index(str(weak))] = reward_run.output_dir
    assert cli(argv + ["--reward_weights", "1.0", "2.0"]) == 1  # 2 weights, 1 reward
    assert "reward_weights has 2 weights for 1 rewards" in capsys.readouterr().err


def test_grpo_under_two_processes(sft_run, reward_run, tmp_path):
    output_dir = tmp_path / "grpo2"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml",
               "-m", "rlhf.grpo", "--config", "recipes/tiny/grpo.yaml", "--init_from", sft_run.output_dir,
               "--reward_model", reward_run.output_dir, "--reward_funcs", GOLD_FUNCTION, "--reward_weights", "1.0",
               "0.5", "--per_device_train_batch_size", "16", "--max_steps", "3", "--logging_steps", "1",
               "--gold_eval_prompts", "", "--output_dir", str(output_dir)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((output_dir / "manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2 and manifest["metrics"]["steps"] == 3
    assert manifest["extra"]["rewards"] == ["reward_model", "gold_rewards"]
    assert manifest["extra"]["reward_weights"] == [1.0, 0.5]


def test_killed_grpo_resumes_from_its_last_complete_checkpoint(sft_run, reward_run, tmp_path):
    output_dir = tmp_path / "grpo"
    checkpoints = output_dir / "checkpoints"
    command = [sys.executable, "-m", "rlhf.cli", "grpo", "--config", "recipes/tiny/grpo.yaml", "--init_from",
               sft_run.output_dir, "--reward_model", reward_run.output_dir, "--output_dir", str(output_dir),
               "--max_steps", "12", "--save_steps", "4", "--gold_eval_prompts", ""]
    kill_when(command, lambda: (checkpoints / "checkpoint-4" / COMPLETE_MARKER).is_file())
    assert not (output_dir / "manifest.json").exists()
    last_complete = complete_checkpoints(checkpoints)[-1]

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {last_complete}" in result.stderr
    manifest = json.loads((output_dir / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 12
    # metrics.jsonl was cut back to the checkpoint, so each training step is logged once, as in an unbroken run.
    logged_steps = [row["step"] for row in read_jsonl_log(output_dir / "metrics.jsonl") if "loss" in row]
    assert logged_steps == sorted(set(logged_steps)) and logged_steps[-1] == 12 and len(logged_steps) >= 3


# One short GRPO step from the base model on the gold reward function: enough to see what reaches the trainer.
QUICK = ["--model_name_or_path", TINY_BASE, "--train_data", "data/tiny/prompts_train.jsonl", "--max_train_samples", "8",
         "--reward_funcs", GOLD_FUNCTION, "--num_generations", "4", "--per_device_train_batch_size", "4",
         "--per_device_eval_batch_size", "4", "--max_completion_length", "8", "--max_steps", "1", "--report_to", "none",
         "--bf16", "false", "--save_strategy", "no", "--logging_steps", "1", "--save_merged", "false",
         "--activation_checkpointing", "false"]


@pytest.mark.parametrize("stage", [grpo, rloo])
def test_eval_data_is_scored_after_training(stage, tmp_path):
    manifest = stage.main(QUICK + ["--eval_data", "data/tiny/prompts_test.jsonl", "--max_eval_samples", "2",
                                   "--output_dir", str(tmp_path / "out")])
    metrics = manifest.metrics
    assert metrics["eval_records"] == 2 and metrics["steps"] == 1
    assert 0 <= metrics["eval_reward"] <= 1 and "eval_rewards/gold_rewards/mean" in metrics, metrics


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def test_bad_eval_data_and_prompt_columns_stop_grpo_before_any_model_loads(tmp_path):
    output = tmp_path / "out"
    quick = QUICK + ["--output_dir", str(output)]
    with pytest.raises(DataError, match=r"^/does/not/exist: file not found"):
        grpo.main(quick + ["--eval_data", "/does/not/exist"])
    with pytest.raises(ConfigError, match=r"grpo: eval_data is scored in groups of 4 completions per prompt .* "
                                          r"\(6\) must be a multiple of 4"):
        grpo.main(quick + ["--eval_data", "data/tiny/prompts_test.jsonl", "--per_device_eval_batch_size", "6"])
    # Arrow refused such a column only once the trainer built its dataset, after the model had loaded.
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "2+2?", "answer": 4},
                                                   {"prompt": "Name?", "answer": "Bob"}])
    with pytest.raises(DataError, match=rf"^{mixed} line 2, field 'answer': a string, but {mixed} line 1 has a number"):
        grpo.main(quick + ["--train_data", mixed])
    templated = write_jsonl(tmp_path / "templated.jsonl", [{"prompt": "<|im_start|>user\nhi<|im_end|>"}])
    with pytest.raises(DataError, match=rf"^{templated} line 1, field 'prompt': the user message holds "
                                        r"'<\|im_start\|>'"):
        grpo.main(quick + ["--eval_data", templated])
    assert not output.exists()


def test_full_fine_tuning_from_a_parent_without_its_merged_copy_is_refused(tmp_path):
    """TRL would take the base model (config._name_or_path of a parent rebuilt as base + adapter) as the KL reference."""
    from peft import get_peft_model

    from rlhf.config import ModelArgs
    from rlhf.manifest import Manifest, write_manifest
    from rlhf.models import load_causal_lm, lora_config

    parent = tmp_path / "sft"
    model_args = ModelArgs()
    get_peft_model(load_causal_lm(TINY_BASE, model_args), lora_config(model_args)).save_pretrained(parent / "adapter")
    write_manifest(Manifest(stage="sft", output_dir=str(parent), base_model=TINY_BASE, adapter_path="adapter"))
    shutil.copytree(TINY_BASE, parent / "adapter", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors",
                                                                                                     "config.json"))
    quick = [arg for arg in QUICK] + ["--init_from", str(parent), "--output_dir", str(tmp_path / "out")]
    del quick[:2]  # the base comes from the parent
    with pytest.raises(ConfigError, match=r"grpo: use_lora false with beta 0.1 needs the parent stage's merged copy"):
        grpo.main(quick + ["--use_lora", "false", "--beta", "0.1"])
    assert not (tmp_path / "out").exists()
