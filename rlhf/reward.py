"""Reward-model training: a one-output sequence classifier with a LoRA adapter (TRL RewardTrainer, Bradley-Terry).

    rlhf reward --config recipes/tiny/reward.yaml
    accelerate launch --config_file recipes/accelerate/cpu.yaml -m rlhf.reward --config recipes/tiny/reward.yaml

Starts from the SFT stage's policy (init_from) or any base model, reads preference pairs (explicit or implicit
prompt, HH-RLHF raw text), and saves the adapter with the score head (modules_to_save). The manifest records the
reward mean and std over the training responses, which PPO uses to normalise rewards.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field

from trl import RewardConfig

from rlhf.config import DataArgs, ModelArgs, parse_args
from rlhf.processes import run_main
from rlhf.stage import (
    StageOutputArgs,
    finish_stage,
    open_trl_output,
    stage_callbacks,
    start_trl_stage,
    train,
    training_metrics,
)

STAGE = "reward"
PARENT_STAGES = ("sft", "reward")


@dataclass
class RewardStageArgs(StageOutputArgs):
    save_merged: bool = field(default=True, metadata={"help": "Also write <output_dir>/merged (base + adapters merged)."})
    stats_samples: int = field(
        default=256, metadata={"help": "Training pairs scored after training for the reward mean/std that PPO "
                               "normalises with (0 = skip). 256 pairs = 512 scores: the mean is known to ~5% of a std."}
    )
    score_batch_size: int = field(default=64, metadata={"help": "Batch size when scoring for the statistics."})


ARG_TYPES = (ModelArgs, DataArgs, RewardConfig, RewardStageArgs)


def main(argv: list[str] | None = None):
    # Config
    model_args, data_args, training_args, stage_args = parse_args(ARG_TYPES, argv, prog="rlhf reward", description=__doc__)
    push_to = start_trl_stage(STAGE, training_args, stage_args, train_data=data_args.train_data)
    output_dir = training_args.output_dir

    # Data
    from rlhf import data
    from rlhf.models import start_tokenizer

    train_pairs, eval_pairs = data.load_train(data_args, "preference"), data.load_eval(data_args, "preference")
    tokenizer, base_model, parent = start_tokenizer(model_args, PARENT_STAGES)
    # TRL's RewardTrainer does not truncate: it leaves out pairs longer than max_length, evaluation pairs too (all of
    # them, and evaluate() had no eval_loss). Do that here, where it is counted and said (and an empty result is an
    # error naming the file), rather than silently in the trainer.
    max_length = training_args.max_length
    policy = "drop" if data_args.length_policy == "truncate" else data_args.length_policy
    why = "reward models are not trained on truncated responses" if policy != data_args.length_policy else None
    train_pairs = data.fit_records(train_pairs, tokenizer, max_length, data_args.train_data, "preference", policy,
                                   STAGE, why)
    eval_pairs = data.fit_records(eval_pairs, tokenizer, max_length, data_args.eval_data, "preference", policy,
                                  STAGE, why)
    config, lock, finished, resume_from = open_trl_output(  # noqa: F841 (lock held until the process ends)
        STAGE, model_args, data_args, training_args, stage_args, parent)
    if finished:
        return finished

    # Model: the parent's body with a fresh one-output score head.
    from rlhf.models import REWARD, load_start_model, lora_config

    model = load_start_model(model_args, tokenizer, base_model, parent, head=REWARD)

    # Trainer
    from trl import RewardTrainer

    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=data.to_dataset(train_pairs),
        eval_dataset=data.to_dataset(eval_pairs) if eval_pairs else None,
        processing_class=tokenizer,
        peft_config=lora_config(model_args, task_type="SEQ_CLS", modules_to_save=["score"], tokenizer=tokenizer),
        callbacks=stage_callbacks(output_dir),
    )
    train_result = train(trainer, STAGE, resume_from)
    metrics = training_metrics(trainer, train_result)
    if eval_pairs:
        evaluation = trainer.evaluate()
        metrics.update(eval_loss=evaluation["eval_loss"], eval_accuracy=evaluation.get("eval_accuracy"),
                       eval_margin=evaluation.get("eval_margin"))

    def reward_statistics(manifest):
        """Mean/std of the trained model's rewards over training responses (chosen and rejected)."""
        if not stage_args.stats_samples:
            return {}
        from rlhf.evaluate.scoring import score_pairs
        from rlhf.models import load_stage_output

        reward_model = load_stage_output(manifest, model_args)
        scores = score_pairs(reward_model, tokenizer, train_pairs[: stage_args.stats_samples],
                             stage_args.score_batch_size, show_progress=stage_args.verbose)
        rewards = scores["chosen"] + scores["rejected"]
        return {"reward_mean": statistics.fmean(rewards), "reward_std": statistics.pstdev(rewards),
                "train_accuracy": statistics.fmean(c > r for c, r in zip(scores["chosen"], scores["rejected"]))}

    # Save
    return finish_stage(
        trainer, STAGE, output_dir, model_args, data_args=data_args, config=config,
        base_model=base_model, parent=parent, metrics=metrics, push_to=push_to,
        extra={"head": REWARD}, save_merged=stage_args.save_merged,
        after_save=reward_statistics,
    )


if __name__ == "__main__":
    sys.exit(run_main(main, STAGE))
