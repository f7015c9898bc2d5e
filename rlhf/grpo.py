"""GRPO (TRL GRPOTrainer) with a LoRA adapter on a policy stage, rewarded by a reward model and/or reward functions.

    rlhf grpo --config recipes/tiny/grpo.yaml
    rlhf grpo --config recipes/tiny/grpo.yaml --reward_model null --reward_funcs rlhf.tiny.task.gold_rewards
    accelerate launch --config_file recipes/accelerate/cpu.yaml -m rlhf.grpo --config recipes/tiny/grpo.yaml

Each step samples num_generations completions per prompt, scores them (reward_model, then reward_funcs, weighed by
reward_weights), and takes each completion's advantage against its group: no critic, no value model. The parent
policy's adapter is merged into the base and a new adapter trains on top; the reference (KL term, beta > 0) is the
same model with that adapter disabled. Every TRL option applies (num_generations, beta, loss_type, epsilon,
scale_rewards, temperature, max_completion_length, ...). eval_data (prompts) is scored after training, and every
eval_steps with eval_strategy: steps (TRL's evaluation: eval_reward, eval_loss, ...). `rlhf rloo` is the same stage
on TRL's RLOOTrainer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import GRPOConfig, RLOOConfig

from rlhf.config import ConfigError, DataArgs, ModelArgs, parse_args
from rlhf.processes import run_main
from rlhf.rewards import RewardArgs
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

STAGE = "grpo"
PARENT_STAGES = ("sft", "dpo", "ppo", "grpo", "rloo")
CONFIGS = {"grpo": GRPOConfig, "rloo": RLOOConfig}


@dataclass
class OnlineStageArgs(RewardArgs, StageOutputArgs):
    save_merged: bool = field(default=True, metadata={"help": "Also write <output_dir>/merged (base + adapters merged)."})


def arg_types(method: str) -> tuple:
    return (ModelArgs, DataArgs, CONFIGS[method], OnlineStageArgs)


ARG_TYPES = arg_types(STAGE)


def check_eval_batches(method: str, training_args) -> None:
    """TRL evaluates whole groups of num_generations_eval completions per prompt (num_generations when unset), so an
    evaluation batch must hold whole groups; TRL checks only when eval_strategy evaluates during training, and the
    evaluation after training would otherwise fail with a shape error once the model has trained."""
    group = training_args.num_generations_eval or training_args.num_generations
    batch = training_args.per_device_eval_batch_size * training_args.world_size
    if batch % group:
        raise ConfigError(f"{method}: eval_data is scored in groups of {group} completions per prompt "
                          f"(num_generations_eval, else num_generations), so per_device_eval_batch_size x processes "
                          f"({batch}) must be a multiple of {group}")


def main(argv: list[str] | None = None, method: str = STAGE, description: str = __doc__):
    # Config
    model_args, data_args, training_args, stage_args = parse_args(
        arg_types(method), argv, prog=f"rlhf {method}", description=description)
    push_to = start_trl_stage(method, training_args, stage_args, train_data=data_args.train_data)
    output_dir = training_args.output_dir

    # Data, the rewards checked (the reward model's gate, a probe call of every function), before any model loads
    from rlhf import data, rewards
    from rlhf.models import start_tokenizer

    prompt_records, eval_records = data.load_train(data_args, "prompt"), data.load_eval(data_args, "prompt")
    if eval_records:
        check_eval_batches(method, training_args)
    gold_prompts = load_gold_prompts(data_args)
    tokenizer, base_model, parent = start_tokenizer(model_args, PARENT_STAGES)
    # TRL's GRPO and RLOO do not cut prompts (no max_prompt_length): only the check for chat-template text applies.
    policy = data_args.length_policy
    prompt_records = data.fit_records(prompt_records, tokenizer, None, data_args.train_data, "prompt", policy, method)
    eval_records = data.fit_records(eval_records, tokenizer, None, data_args.eval_data, "prompt", policy, method)
    reward_manifest = rewards.reward_manifest(stage_args)
    rewards.check_reward_sources(method, stage_args, reward_manifest)
    statistics = rewards.reward_statistics(method, reward_manifest, stage_args.normalize_reward) if reward_manifest else None
    functions = rewards.load_reward_functions(stage_args.reward_funcs, prompt_records[:2])
    if eval_records:  # the evaluation prompts' columns reach the functions too
        try:
            rewards.load_reward_functions(stage_args.reward_funcs, eval_records[:2])
        except ConfigError as error:
            raise ConfigError(f"eval_data {data_args.eval_data}: {error}") from None
    n_rewards = bool(stage_args.reward_source) + len(functions)
    if training_args.reward_weights is not None and len(training_args.reward_weights) != n_rewards:
        raise ConfigError(f"{method}: reward_weights has {len(training_args.reward_weights)} weights for {n_rewards} "
                          "rewards (the reward model first, then each of reward_funcs)")
    check_full_fine_tuning_reference(method, model_args, training_args.beta, parent)
    config, lock, finished, resume_from = open_trl_output(  # noqa: F841 (lock held until the process ends)
        method, model_args, data_args, training_args, stage_args, parent)
    if finished:
        return finished

    # Model: the parent merged, a new adapter on top; TRL's reference is this model with the adapter disabled
    from accelerate import PartialState

    from rlhf.models import load_start_model, lora_config

    model = load_start_model(model_args, tokenizer, base_model, parent)
    reward_funcs = []
    if reward_manifest:
        reward_funcs.append(rewards.RewardModelFunction(reward_manifest, model_args, statistics, PartialState().device))
    elif stage_args.reward_model_name_or_path:
        reward_funcs.append(stage_args.reward_model_name_or_path)  # a plain sequence classifier: TRL loads it
    reward_funcs += functions

    # Trainer
    import trl

    trainer_class = {"grpo": trl.GRPOTrainer, "rloo": trl.RLOOTrainer}[method]
    trainer = trainer_class(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=data.to_dataset(prompt_records),
        eval_dataset=data.to_dataset(eval_records) if eval_records else None,
        processing_class=tokenizer,
        peft_config=lora_config(model_args) if model_args.use_lora else None,
        callbacks=stage_callbacks(output_dir, data_args, gold_prompts),
    )
    train_result = train(trainer, method, resume_from)
    metrics = training_metrics(trainer, train_result)
    if eval_records:  # the mean reward (and loss, KL, ...) of num_generations completions per held-out prompt
        evaluation = trainer.evaluate()
        metrics.update({key: value for key, value in evaluation.items() if key.startswith("eval_")})

    # Save
    reference = ("parent policy (parent adapter merged into the base) with this stage's adapter disabled"
                 if model_args.use_lora else "separate frozen copy of the parent policy (full fine-tuning)")
    return finish_stage(
        trainer, method, output_dir, model_args, data_args=data_args, config=config,
        base_model=base_model, parent=parent, metrics=metrics, push_to=push_to,
        extra={"reference": reference, "parent_adapter": "merged" if parent else None,
               "rewards": trainer.reward_func_names, "reward_weights": trainer.reward_weights.tolist(),
               "reward_model": stage_args.reward_source, "num_generations": training_args.num_generations,
               "beta": training_args.beta},
        save_merged=stage_args.save_merged, gold_prompts=gold_prompts,
    )


def check_full_fine_tuning_reference(method: str, model_args, beta: float, parent) -> None:
    """Full fine-tuning with a KL term: TRL loads its reference from the policy's config._name_or_path, which is the
    base model's folder when the parent stage is rebuilt as base + adapter (no merged/ saved), not the parent."""
    if model_args.use_lora or not beta or parent is None:
        return
    if not (parent.merged_path and Path(parent.path(parent.merged_path)).is_dir()):
        raise ConfigError(f"{method}: use_lora false with beta {beta:g} needs the parent stage's merged copy as the KL "
                          f"reference, and {parent.output_dir} has no merged/ (it was saved with save_merged: "
                          "false); rerun it with save_merged: true, or set use_lora: true or beta: 0")


if __name__ == "__main__":
    sys.exit(run_main(main, STAGE))
