"""What a stage prints: a header, one line per logging step (the last step always), the evaluation, where it saved;
library noise only with --verbose. Run through the CLI in a subprocess, as a user sees it."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from rlhf.console import eval_line, step_line

NOISE = ["Loading weights", "FutureWarning", "pin_memory", "Tokenizing train dataset", "it/s]", "{'loss'"]


def run_sft(output_dir, *extra: str) -> list[str]:
    """A 3-step tiny SFT logging every 2 steps (so the last step logs only because it is the last), with its
    evaluation, the held-out gold check and a merged copy; stdout and stderr together, by line."""
    command = [sys.executable, "-m", "rlhf.cli", "sft", "--config", "recipes/tiny/sft.yaml", "--max_steps", "3",
               "--logging_steps", "2", "--max_eval_samples", "32", "--gold_eval_samples", "4",
               "--output_dir", str(output_dir), *extra]
    # Without the session's WANDB_MODE=offline, which transformers announces on import (a user's own setting).
    env = {key: value for key, value in os.environ.items() if key != "WANDB_MODE"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout
    return result.stdout.replace("\r", "\n").splitlines()


def test_a_stage_prints_a_header_its_steps_its_evaluation_and_where_it_saved(tmp_path):
    output = tmp_path / "sft"
    lines = run_sft(output)
    assert lines == [line for line in lines if line.startswith("[rlhf] sft: ")], "\n".join(lines)
    assert lines[0] == f"[rlhf] sft: data/tiny-base -> {output} (LoRA r16, cpu, float32, 1 process)"
    assert lines[1] == "[rlhf] sft: training 3 steps on 2000 records (eval 32)"
    steps = [line for line in lines if line.startswith("[rlhf] sft: step ")]
    assert [line.split()[3] for line in steps] == ["2/3", "3/3"] and all(" loss " in line for line in steps)
    assert any(line.startswith("[rlhf] sft: eval on 32 records at step 3: loss ") for line in lines)
    assert lines[-1] == f"[rlhf] sft: saved {output} (adapter/, merged/, manifest.json)"
    assert len(lines) == 8  # header 2, steps 2, trained, eval, gold, saved
    assert not [line for line in lines if any(noise in line for noise in NOISE)]
    # The last step was logged, so the manifest's last logged loss is the last step's.
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["metrics"]["last_logged_loss"] == pytest.approx(float(steps[-1].split(" loss ")[1].split()[0]),
                                                                    rel=1e-3)


def test_verbose_brings_the_library_output_back(tmp_path):
    text = "\n".join(run_sft(tmp_path / "sft", "--verbose", "true"))
    assert "Loading weights" in text and "Tokenizing train dataset" in text and "it/s]" in text
    assert "[rlhf] sft: saved" in text


def test_step_and_eval_lines_are_short():
    logs = {"loss": 1.5, "grad_norm": 0.25, "learning_rate": 1e-4, "epoch": 0.5, "num_tokens": 3086.0,
            "mean_token_accuracy": 0.625, "entropy": 1.0}
    assert step_line(10, 60, logs) == "step 10/60 loss 1.5 token_acc 0.625 grad_norm 0.25 lr 1.00e-04"
    ppo = {"step": 3, "loss/policy": -0.5, "score/combined": 0.75, "kl/sequence": 0.125, "lr": 1e-3,
           "time/step": 2.0}
    assert step_line(3, 40, ppo) == "step 3/40 pg_loss -0.5 score 0.75 kl 0.125 lr 1.00e-03"
    assert eval_line({"eval_loss": 0.5, "eval_accuracy": 0.875, "eval_runtime": 1.25, "epoch": 1.0}) == \
        "loss 0.5 acc 0.875"
