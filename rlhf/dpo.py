"""Direct preference optimisation with a LoRA adapter (TRL DPOTrainer) on the SFT stage's policy.

    rlhf dpo --config recipes/tiny/dpo.yaml
    accelerate launch --config_file recipes/accelerate/cpu.yaml -m rlhf.dpo --config recipes/tiny/dpo.yaml

The reference model is the SFT policy itself: the SFT adapter is merged into the base, a new DPO adapter is trained
on top, and the reference log-probs come from the same model with the DPO adapter disabled. One copy of the weights
is in memory. With use_lora: false the reference is a second, frozen copy of the parent policy. Every TRL loss is
available (loss_type: sigmoid, ipo, hinge, robust, apo_zero, ...; several with loss_weights), with beta,
label_smoothing and precompute_ref_log_probs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from trl import DPOConfig

from rlhf.config import DataArgs, ModelArgs, parse_args
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

STAGE = "dpo"
PARENT_STAGES = ("sft", "dpo")
REFERENCE = "parent policy (parent adapter merged into the base) with this stage's adapter disabled"


@dataclass
class DPOStageArgs(StageOutputArgs):
    save_merged: bool = field(default=True, metadata={"help": "Also write <output_dir>/merged (base + adapters merged)."})


ARG_TYPES = (ModelArgs, DataArgs, DPOConfig, DPOStageArgs)


def main(argv: list[str] | None = None):
    # Config
    model_args, data_args, training_args, stage_args = parse_args(ARG_TYPES, argv, prog="rlhf dpo", description=__doc__)
    push_to = start_trl_stage(STAGE, training_args, stage_args, train_data=data_args.train_data)
    output_dir = training_args.output_dir

    # Data
    from rlhf import data
    from rlhf.models import start_tokenizer

    train_pairs, eval_pairs = data.load_train(data_args, "preference"), data.load_eval(data_args, "preference")
    gold_prompts = load_gold_prompts(data_args)
    tokenizer, base_model, parent = start_tokenizer(model_args, PARENT_STAGES)
    # Training and evaluation pairs alike: TRL would silently drop pairs whose prompt fills max_length, and wrap text
    # already in chat-template form in the template again.
    max_length, policy = training_args.max_length, data_args.length_policy
    train_pairs = data.fit_records(train_pairs, tokenizer, max_length, data_args.train_data, "preference", policy,
                                   STAGE)
    eval_pairs = data.fit_records(eval_pairs, tokenizer, max_length, data_args.eval_data, "preference", policy, STAGE)
    config, lock, finished, resume_from = open_trl_output(  # noqa: F841 (lock held until the process ends)
        STAGE, model_args, data_args, training_args, stage_args, parent)
    if finished:
        return finished

    # Model: with LoRA one model, whose reference is itself with the DPO adapter switched off; in full
    # fine-tuning a second, frozen copy of the parent policy.
    from rlhf.models import load_start_model, lora_config

    model = load_start_model(model_args, tokenizer, base_model, parent)
    reference_model = None
    if not model_args.use_lora:
        # Without an adapter to disable, TRL would rebuild the reference from config._name_or_path, which for a
        # parent rebuilt as base + adapter (no merged copy saved) is the base model's path: hand it the parent.
        reference_model = load_start_model(model_args, tokenizer, base_model, parent)
        reference_model.requires_grad_(False).eval()

    # Trainer
    from trl import DPOTrainer

    trainer = DPOTrainer(
        model=model,
        ref_model=reference_model,
        args=training_args,
        train_dataset=data.to_dataset(train_pairs),
        eval_dataset=data.to_dataset(eval_pairs) if eval_pairs else None,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
        callbacks=stage_callbacks(output_dir, data_args, gold_prompts),
    )
    train_result = train(trainer, STAGE, resume_from)
    metrics = training_metrics(trainer, train_result)
    if eval_pairs:
        evaluation = trainer.evaluate()
        metrics.update({key: value for key, value in evaluation.items() if key.startswith("eval_")})

    # Save
    reference = REFERENCE if model_args.use_lora else "separate frozen copy of the parent policy (full fine-tuning)"
    return finish_stage(
        trainer, STAGE, output_dir, model_args, data_args=data_args, config=config,
        base_model=base_model, parent=parent, metrics=metrics, push_to=push_to,
        extra={"reference": reference, "parent_adapter": "merged" if parent else None,
               "loss_type": list(training_args.loss_type), "beta": training_args.beta},
        save_merged=stage_args.save_merged, gold_prompts=gold_prompts,
    )


if __name__ == "__main__":
    sys.exit(run_main(main, STAGE))
