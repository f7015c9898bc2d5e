"""Data layouts through the stages that train on them: plain-text SFT, empty responses in reward and DPO pairs;
evaluation data checked as training data is."""

import json

import pytest

from conftest import TINY_BASE
from rlhf.config import ConfigError
from rlhf.data import DataError

COMMON = ["--model_name_or_path", TINY_BASE, "--max_steps", "2", "--per_device_train_batch_size", "4",
          "--max_length", "64", "--report_to", "none", "--bf16", "false", "--save_strategy", "no",
          "--logging_steps", "1", "--save_merged", "false"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def test_sft_trains_on_plain_text(tmp_path):
    from rlhf import sft

    data = write_jsonl(tmp_path / "text.jsonl",
                       [{"text": f"The kettle number {i} is great and the lamp is awful."} for i in range(8)])
    args = COMMON + ["--train_data", data, "--output_dir", str(tmp_path / "sft")]
    with pytest.raises(ConfigError, match=rf"^{data} line 1: plain 'text', which has no assistant turns for "
                                          r"assistant_only_loss; set assistant_only_loss: false"):
        sft.main(args + ["--assistant_only_loss", "true"])
    manifest = sft.main(args)
    assert manifest.metrics["steps"] == 2 and manifest.metrics["first_logged_loss"] > 0


def test_reward_and_dpo_train_on_pairs_with_empty_responses(tmp_path):
    from rlhf import dpo, reward

    data = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": f"Review item {i}.", "chosen": "" if i % 2 else "Great.", "rejected": "Bad." if i % 2 else ""}
        for i in range(8)])
    args = COMMON + ["--train_data", data]
    # The reward stage also scores the training pairs afterwards (stats_samples): every score must be a number.
    manifest = reward.main(args + ["--output_dir", str(tmp_path / "reward"), "--stats_samples", "8"])
    assert manifest.metrics["steps"] == 2 and manifest.metrics["reward_std"] > 0
    manifest = dpo.main(args + ["--output_dir", str(tmp_path / "dpo")])
    assert manifest.metrics["steps"] == 2 and manifest.metrics["last_logged_loss"] > 0


def test_held_out_prompts_come_from_the_test_split_unless_told(tmp_path):
    from rlhf.config import DataArgs
    from rlhf.stage import load_gold_prompts

    folder = tmp_path / "prompts"
    folder.mkdir()
    for split in ("train", "test", "validation"):
        write_jsonl(folder / f"{split}.jsonl", [{"prompt": f"{split} prompt {i}"} for i in range(3)])
    held_out = load_gold_prompts(DataArgs(gold_eval_prompts=str(folder), gold_eval_samples=2))
    assert held_out == [[{"role": "user", "content": f"test prompt {i}"}] for i in range(2)]
    chosen = load_gold_prompts(DataArgs(gold_eval_prompts=str(folder), gold_eval_split="validation"))
    assert [prompt[0]["content"] for prompt in chosen] == [f"validation prompt {i}" for i in range(3)]


LONG = " ".join(["word"] * 80)  # over max_length 64 on its own


@pytest.mark.parametrize("stage_name, records, message", [
    # Over-long evaluation pairs: TRL's RewardTrainer left them all out, and evaluate() then had no eval_loss.
    ("reward", [{"prompt": "Review it.", "chosen": LONG, "rejected": "Bad."}] * 2,
     r"^{eval}: all 2 records are longer than max_length 64; nothing left"),
    # A prompt that fills max_length alone: TRL's DPOTrainer dropped the pair without a word.
    ("dpo", [{"prompt": "Review it.", "chosen": "Good.", "rejected": "Bad."}, {"prompt": LONG, "chosen": "a",
                                                                                "rejected": "b"}],
     r"^{eval} line 2, field 'prompt': \d+ tokens on its own, not below max_length 64"),
    ("sft", [{"prompt": "<|im_start|>user\nhi<|im_end|>", "completion": "yo"}],
     r"^{eval} line 1, field 'prompt': the user message holds '<\|im_start\|>'"),
])
def test_eval_data_is_checked_like_training_data_before_the_model_loads(tmp_path, stage_name, records, message):
    import importlib

    stage = importlib.import_module(f"rlhf.{stage_name}")
    responses = {"completion": "Fine."} if stage_name == "sft" else {"chosen": "Good.", "rejected": "Bad."}
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"Review item {i}.", **responses} for i in range(8)])
    eval_data = write_jsonl(tmp_path / "eval.jsonl", records)
    output = tmp_path / "out"
    with pytest.raises(DataError, match=message.format(eval=eval_data)):
        stage.main(COMMON + ["--train_data", train, "--eval_data", eval_data, "--output_dir", str(output)])
    assert not output.exists()

