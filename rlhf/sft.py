"""Supervised fine-tuning with a LoRA adapter (TRL SFTTrainer), loss on the assistant's tokens only.

    rlhf sft --config recipes/tiny/sft.yaml
    accelerate launch --config_file recipes/accelerate/cpu.yaml -m rlhf.sft --config recipes/tiny/sft.yaml

Reads conversations (`messages`), prompt/completion records or plain `text` (language modelling, with
assistant_only_loss: false), writes <output_dir>/adapter (+ merged/) and
manifest.json for the reward-model, DPO and PPO stages to start from.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from trl import SFTConfig

from rlhf.config import ConfigError, DataArgs, ModelArgs, parse_args
from rlhf.processes import run_main
from rlhf.stage import (
    StageOutputArgs,
    finish_stage,
    load_gold_prompts,
    open_trl_output,
    stage_callbacks,
    start_trl_stage,
    train,
    training_metrics,
)

STAGE = "sft"
PARENT_STAGES = ("sft",)


@dataclass
class SFTStageArgs(StageOutputArgs):
    save_merged: bool = field(default=True, metadata={"help": "Also write <output_dir>/merged (base + adapter merged)."})


ARG_TYPES = (ModelArgs, DataArgs, SFTConfig, SFTStageArgs)


def main(argv: list[str] | None = None):
    # Config
    model_args, data_args, training_args, stage_args = parse_args(ARG_TYPES, argv, prog="rlhf sft", description=__doc__)
    push_to = start_trl_stage(STAGE, training_args, stage_args, train_data=data_args.train_data)
    output_dir = training_args.output_dir

    # Data: everything is validated before the model is even loaded.
    from rlhf import data
    from rlhf.models import start_tokenizer

    train_records, eval_records = data.load_train(data_args, "sft"), data.load_eval(data_args, "sft")
    plain_text = next((records[0] for records in (train_records, eval_records or [])
                       if records and "text" in records[0]), None)
    if plain_text and training_args.assistant_only_loss:  # TRL would refuse only after the model has loaded
        raise ConfigError(f"{plain_text.where}: plain 'text', which has no assistant turns for assistant_only_loss; "
                          "set assistant_only_loss: false (the loss is then on every token)")
    gold_prompts = load_gold_prompts(data_args)
    tokenizer, base_model, parent = start_tokenizer(model_args, PARENT_STAGES)
    # Training and evaluation records alike: lengths by length_policy, and no text already in chat-template form
    # (TRL would wrap it in the template again).
    max_length, policy = training_args.max_length, data_args.length_policy
    train_records = data.fit_records(train_records, tokenizer, max_length, data_args.train_data, "sft", policy, STAGE)
    eval_records = data.fit_records(eval_records, tokenizer, max_length, data_args.eval_data, "sft", policy, STAGE)
    config, lock, finished, resume_from = open_trl_output(  # noqa: F841 (lock held until the process ends)
        STAGE, model_args, data_args, training_args, stage_args, parent)
    if finished:
        return finished

    # Model
    from rlhf.models import load_start_model, lora_config

    model = load_start_model(model_args, tokenizer, base_model, parent)

    # Trainer
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=data.to_dataset(train_records),
        eval_dataset=data.to_dataset(eval_records) if eval_records else None,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
        callbacks=stage_callbacks(output_dir),
    )
    train_result = train(trainer, STAGE, resume_from)
    metrics = training_metrics(trainer, train_result)
    if eval_records:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]

    # Save
    return finish_stage(
        trainer, STAGE, output_dir, model_args, data_args=data_args, config=config,
        base_model=base_model, parent=parent, metrics=metrics, push_to=push_to,
        extra={"assistant_only_loss": training_args.assistant_only_loss},
        save_merged=stage_args.save_merged, gold_prompts=gold_prompts,
    )


if __name__ == "__main__":
    sys.exit(run_main(main, STAGE))
