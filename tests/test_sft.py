"""SFT stage: assistant-only masking, learning on the tiny task, outputs that load with plain transformers/peft."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_BASE, TINY_DATA, tensorboard_scalars
from rlhf.config import ModelArgs
from rlhf.data import load_prompts
from rlhf.evaluate.policy import gold_report
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.tiny.task import gold_reward


def test_only_assistant_tokens_are_in_the_loss(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from rlhf.data import to_dataset

    tokenizer = load_tokenizer(TINY_BASE)
    records = [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Write a short review of the kettle."},
        {"role": "assistant", "content": "The kettle is great."},
        {"role": "user", "content": "And the lamp?"},
        {"role": "assistant", "content": "The lamp is awful."},
    ]}]
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, bf16=False, report_to="none", max_length=256)
    trainer = SFTTrainer(model=load_causal_lm(TINY_BASE, ModelArgs()), args=args,
                         train_dataset=to_dataset(records), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels = batch["labels"][0]
    trained = labels[labels != -100].tolist()
    # Exactly both assistant turns, each with the end-of-turn token that teaches the model to stop.
    assert tokenizer.decode(trained) == "The kettle is great.<|im_end|>The lamp is awful.<|im_end|>"
    untrained = batch["input_ids"][0][labels == -100]
    assert "Write a short review" in tokenizer.decode(untrained)


@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_prompt_completion_records_train_on_the_completion_only(tmp_path, assistant_only_loss):
    """TRL's habit for prompt + completion data: the loss is on the completion, even without assistant_only_loss,
    and an assistant turn inside the prompt (an earlier answer) is context, not a target."""
    from trl import SFTConfig, SFTTrainer

    from rlhf.data import normalise_sft_record, to_dataset

    tokenizer = load_tokenizer(TINY_BASE)
    record = normalise_sft_record({"system": "Be brief.", "prompt": [
        {"role": "user", "content": "Write a short review of the kettle."},
        {"role": "assistant", "content": "An old answer."},
        {"role": "user", "content": "And the lamp?"},
    ], "completion": "The lamp is awful."}, "sft.jsonl line 1")
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=assistant_only_loss, bf16=False,
                     report_to="none", max_length=256)
    trainer = SFTTrainer(model=load_causal_lm(TINY_BASE, ModelArgs()), args=args,
                         train_dataset=to_dataset([record]), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels = batch["labels"][0]
    assert tokenizer.decode(labels[labels != -100].tolist()) == "The lamp is awful.<|im_end|>"
    untrained = tokenizer.decode(batch["input_ids"][0][labels == -100])
    assert "Be brief." in untrained and "An old answer." in untrained


def test_sft_learns_the_task(sft_run):
    metrics = sft_run.metrics
    assert metrics["last_logged_loss"] < 0.92 * metrics["first_logged_loss"]
    assert metrics["eval_loss"] < metrics["first_logged_loss"]

    # The untrained base, scored on the same prompts with the same sampling seed.
    prompts = [record["prompt"] for record in load_prompts(str(TINY_DATA / "prompts_test.jsonl"))][:64]
    base = gold_report(load_causal_lm(TINY_BASE, ModelArgs()), load_tokenizer(TINY_BASE), prompts, gold_reward, seed=42)
    sft = metrics["gold"]
    assert sft["gold_reward"]["mean"] > base["gold_reward"]["mean"] + 0.05
    assert sft["eos_rate"] >= 0.9  # the base already ends chat turns (it saw transcripts); SFT must keep doing so


def test_outputs_load_with_plain_transformers_and_peft(sft_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = sft_run.path(sft_run.adapter_path)
    merged_dir = sft_run.path(sft_run.merged_path)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_BASE), adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer("The kettle is great.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
        base_logits = AutoModelForCausalLM.from_pretrained(TINY_BASE)(ids).logits
    assert not torch.allclose(base_logits, merged(ids).logits, atol=1e-3)  # the adapter changed something
    assert sft_run.base_model == str(REPO / "data" / "tiny-base")
    assert sft_run.config["training"]["assistant_only_loss"] is True


def test_accelerate_launch_runs_the_stage(tmp_path):
    output_dir = tmp_path / "sft"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu.yaml",
        "-m", "rlhf.sft", "--config", "recipes/tiny/sft.yaml", "--output_dir", str(output_dir),
        "--max_steps", "4", "--save_steps", "2", "--gold_eval_samples", "4", "--max_train_samples", "64",
        "--report_to", "tensorboard", "--logging_steps", "1",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output_dir / "manifest.json").is_file()
    assert (output_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (output_dir / "checkpoints" / "checkpoint-4").is_dir()
    # TensorBoard logs in <output_dir>/logs, not under checkpoints/ where transformers would put them.
    assert [step for step, _ in tensorboard_scalars(output_dir / "logs")["train/loss"]] == [1, 2, 3, 4]
    assert not list((output_dir / "checkpoints").rglob("events.out.tfevents.*"))


def test_cli_reports_bad_recipe_without_traceback(tmp_path, capsys):
    from rlhf.cli import main

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_name_or_path: data/tiny-base\nlerning_rate: 0.1\n")
    assert main(["sft", "--config", str(recipe)]) == 1
    assert "unknown key 'lerning_rate'" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["--train_data", "data/tiny/nope.jsonl"], "file not found"),
    (["--model_name_or_path", "data/tiny"], "no config.json"),
    (["--init_from", "runs/does-not-exist"], "set exactly one of"),
])
def test_bad_inputs_fail_before_training(tmp_path, capsys, overrides, message):
    from rlhf.cli import main

    code = main(["sft", "--config", "recipes/tiny/sft.yaml", "--output_dir", str(tmp_path / "out"), *overrides])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoints").exists()
