"""Nothing lost, clear errors: malformed input fails fast through the CLI, a killed stage resumes, a second run
on the same folder is refused, a diverging loss stops the stage."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, kill_when
from rlhf.cli import main
from rlhf.checkpoints import COMPLETE_MARKER, complete_checkpoints
from rlhf.stage import hold_output_lock

SFT = ["sft", "--config", "recipes/tiny/sft.yaml"]
PPO = ["ppo", "--config", "recipes/tiny/ppo.yaml", "--init_from", "nowhere/sft", "--reward_model", "nowhere/reward"]


def bad_files(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "nocol.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "same.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "a"}\n')
    (tmp_path / "types.yaml").write_text("model_name_or_path: data/tiny-base\nnum_train_epochs: many\n")
    (tmp_path / "unknown.yaml").write_text("model_name_or_path: data/tiny-base\nlearning_rat: 0.1\n")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "latin1.jsonl").write_bytes('{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"))
    (tmp_path / "cut.jsonl").write_text('{"prompt": "Write a short review of the lamp.", "chosen": "Gr')
    (tmp_path / "badfloat.yaml").write_text("model_name_or_path: data/tiny-base\nlearning_rate: fast\n")
    (tmp_path / "readonly").mkdir()
    (tmp_path / "readonly" / "adapter").symlink_to("/proc/self")  # a folder nobody can write into, root included


CASES = [
    (["sft", "--config", "{tmp}/absent.yaml"], "recipe {tmp}/absent.yaml: file not found"),
    (["sft", "--config", "{tmp}/unknown.yaml"], "unknown key 'learning_rat'. Did you mean 'learning_rate'"),
    (["sft", "--config", "{tmp}/types.yaml"], "key 'num_train_epochs' expects float, got str"),
    (SFT + ["--train_data", "{tmp}/missing.jsonl"], "{tmp}/missing.jsonl: file not found"),
    (SFT + ["--train_data", "{tmp}/broken.jsonl"], "broken.jsonl line 2"),
    (SFT + ["--train_data", "{tmp}/empty.jsonl"], "no records"),
    (SFT + ["--train_data", "{tmp}/nocol.jsonl"], "nocol.jsonl line 1"),
    (["reward", "--config", "recipes/tiny/reward.yaml", "--train_data", "{tmp}/same.jsonl", "--init_from", "x"],
     "same.jsonl line 1"),
    (SFT + ["--model_name_or_path", "{tmp}/noweights"], "no *.safetensors weights"),
    (SFT + ["--model_name_or_path", "{tmp}/nothing-here"], "folder not found"),
    (["dpo", "--config", "recipes/tiny/dpo.yaml", "--init_from", "{tmp}/unfinished"], "has no manifest.json"),
    (["dpo", "--config", "recipes/tiny/dpo.yaml", "--init_from", "{tmp}/gone"], "does not exist"),
    (["ppo", "--config", "recipes/tiny/ppo.yaml", "--rollout_batch_size", "10", "--mini_batch_size", "4"],
     "must be a multiple of mini_batch_size"),
    (["pipeline", "--config", "recipes/tiny/pipeline.yaml", "--stages", "sft", "kto"], "unknown stage(s) kto"),
    (["pipeline", "--config", "recipes/tiny/pipeline.yaml", "--policy_stages", "dpo", "sft"],
     "policy_stages: unknown sft; pick any of dpo, ppo, grpo, rloo"),
    (SFT + ["--train_data", "{tmp}/latin1.jsonl"], "latin1.jsonl line 1: not valid UTF-8"),
    (["reward", "--config", "recipes/tiny/reward.yaml", "--train_data", "{tmp}/cut.jsonl", "--init_from", "x"],
     "cut.jsonl line 1: not valid JSON: the line ends after column"),
    (["sft", "--config", "{tmp}/badfloat.yaml"], "key 'learning_rate' expects float, got str"),
    (SFT + ["--per_device_train_batch_size", "0"], "per_device_train_batch_size: expected an integer >= 1, got 0"),
    (SFT + ["--lora_r", "0"], "lora_r: expected an integer >= 1, got 0"),
    (SFT + ["--output_dir", "/proc/rlhf-out"], "output_dir /proc/rlhf-out: cannot create it"),
    (SFT + ["--output_dir", "{tmp}/readonly"], "{tmp}/readonly/adapter is not writable"),
    (PPO + ["--mini_batch_size", "0"], "mini_batch_size: expected an integer >= 1, got 0"),
    (PPO + ["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps: expected an integer >= 1, got 0"),
    (PPO + ["--rollout_batch_size", "-4"], "rollout_batch_size: expected an integer >= 1, got -4"),
    (PPO + ["--mini_batch_size", "4", "--gradient_accumulation_steps", "3"],
     "mini_batch_size (4) must be a multiple of gradient_accumulation_steps (3)"),
    (PPO + ["--temperature", "0"], "temperature: expected a number > 0, got 0.0"),
    (PPO + ["--eval_steps", "2"], "eval_steps 2 evaluates on eval_data, which is not set"),
    (PPO + ["--fp16", "true"], "fp16 is for GPUs"),
    (["tune", "--config", "x.yaml"], None),  # unknown command: usage, exit 2
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(case[0][:1] + case[0][-2:]) for case in CASES])
def test_malformed_input_fails_fast_with_a_clear_message(tmp_path, capsys, argv, message):
    bad_files(tmp_path)
    argv = ["--output_dir", str(tmp_path / "out")] + [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    argv = argv[2:3] + argv[:2] + argv[3:]  # the command first; a later --output_dir overrides this one
    code = main(argv)
    error = capsys.readouterr().err
    if message is None:
        assert code == 2 and "unknown command" in error
        return
    assert code == 1, error
    assert message.replace("{tmp}", str(tmp_path)) in error
    assert "Traceback" not in error
    assert not (tmp_path / "out").exists()  # failed before anything was written, not even a lock file


def test_wrong_parent_stage_is_refused(reward_run, capsys, tmp_path):
    code = main(["dpo", "--config", "recipes/tiny/dpo.yaml", "--init_from", reward_run.output_dir,
                 "--output_dir", str(tmp_path / "dpo")])
    assert code == 1
    assert "output of stage 'reward'" in capsys.readouterr().err


def test_second_run_on_the_same_folder_is_refused(tmp_path, capsys):
    lock = hold_output_lock(str(tmp_path / "sft"))  # noqa: F841  (another run holds the folder)
    assert main(SFT + ["--output_dir", str(tmp_path / "sft")]) == 1
    assert "in use by another run" in capsys.readouterr().err


def test_diverging_loss_stops_the_stage(tmp_path, capsys):
    code = main(SFT + ["--output_dir", str(tmp_path / "sft"), "--learning_rate", "1e12", "--max_steps", "20",
                       "--logging_steps", "1", "--save_steps", "1", "--warmup_steps", "0"])
    error = capsys.readouterr().err
    assert code == 1
    assert "the loss diverged" in error
    assert not (tmp_path / "sft" / "manifest.json").exists()  # never taken as done


def test_killed_stage_resumes_from_its_last_complete_checkpoint(tmp_path):
    output_dir = tmp_path / "sft"
    checkpoints = output_dir / "checkpoints"
    command = [sys.executable, "-m", "rlhf.cli", *SFT, "--output_dir", str(output_dir), "--max_steps", "60",
               "--save_steps", "10", "--gold_eval_prompts", "", "--eval_data", ""]
    kill_when(command, lambda: (checkpoints / "checkpoint-20" / COMPLETE_MARKER).is_file())
    assert not (output_dir / "manifest.json").exists()
    last_complete = complete_checkpoints(checkpoints)[-1]
    assert int(last_complete.name.split("-")[1]) >= 20

    # A kill in the middle of a save leaves a checkpoint folder with only some of its files: it must not be resumed.
    half_written = checkpoints / f"checkpoint-{int(last_complete.name.split('-')[1]) + 10}"
    half_written.mkdir(exist_ok=True)
    for leftover in half_written.iterdir():
        leftover.unlink() if leftover.is_file() else shutil.rmtree(leftover)
    shutil.copy(last_complete / "adapter_config.json", half_written / "adapter_config.json")

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"discarding {half_written}" in result.stderr
    assert f"resuming from {last_complete}" in result.stderr
    manifest = json.loads((output_dir / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 60
