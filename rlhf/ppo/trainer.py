"""RLHF with PPO on the SFT policy and the reward model, our own implementation on the current stack.

    rlhf ppo --config recipes/tiny/ppo.yaml
    rlhf ppo --config recipes/tiny/ppo.yaml --reward_model null --reward_funcs rlhf.tiny.task.gold_rewards
    ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m rlhf.ppo --config recipes/tiny/ppo.yaml

Each iteration: sample responses to a batch of prompts (KV cache, left-padded prompts, cut after the first EOS),
score them with the reward model at the last real token and/or reward functions (a weighted sum, reward_weights),
add a per-token KL penalty against the reference (the SFT policy), estimate advantages with GAE, then run several
epochs of clipped policy and value updates. With several
processes each holds rollout_batch_size prompts; losses are token-means over the global mini-batch, gradients are
summed and whitening uses global statistics, so the update equals one process holding the whole batch.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf.config import ConfigError, DataArgs, ModelArgs, parse_args
from rlhf.ppo import math as ppo_math
from rlhf.ppo.config import PPOArgs
from rlhf.ppo.distributed import Distributed, prompt_batches
from rlhf.processes import StageError, run_main
from rlhf.ppo.rollout import (Rollout, collect, finish_advantages, policy_logprobs, policy_logprobs_and_values,
                              value_predictions)

STAGE = "ppo"
PARENT_STAGES = ("sft", "dpo", "ppo")
ARG_TYPES = (ModelArgs, DataArgs, PPOArgs)


def update(models, optimizer, rollout: Rollout, args: PPOArgs, distributed: Distributed, generator,
           scaler=None, *, step: int) -> dict:
    """ppo_epochs passes of clipped policy + value updates over the rollout, in mini-batches of mini_batch_size rows
    per process. Each loss is the token-mean over the whole global mini-batch: a micro-batch's token sum is divided
    by the mini-batch's token count over every process, and the processes' gradients are summed. So the update is
    the same whether one process holds the batch whole or several hold parts of it, with or without accumulation.
    scaler (fp16): a torch GradScaler; a step whose gradients overflow is skipped, and its norm is not logged.
    Without one, a non-finite gradient norm stops the run (StageError naming `step`) before the optimizer steps."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def backward(loss):
        (scaler.scale(loss) if scaler else loss).backward()

    batch_size = rollout.response_ids.shape[0]
    micro_size = args.mini_batch_size // args.gradient_accumulation_steps
    stats: dict[str, list[float]] = {}
    for _ in range(args.ppo_epochs):
        order = torch.randperm(batch_size, generator=generator)
        for start in range(0, batch_size, args.mini_batch_size):
            mini_batch = order[start : start + args.mini_batch_size]
            tokens = distributed.sum(rollout.response_mask[mini_batch].sum()).clamp(min=1)
            for rows in mini_batch.split(micro_size):
                mask = rollout.response_mask[rows]

                def policy_objective(logprobs):
                    return ppo_math.policy_loss(logprobs, rollout.logprobs[rows], rollout.advantages[rows], mask,
                                                args.cliprange, tokens)

                def value_objective(values):
                    return ppo_math.value_loss(values, rollout.values[rows], rollout.returns[rows], mask,
                                               args.cliprange_value, tokens)

                with models.recomputing():  # gradient_checkpointing: the blocks recompute in this backward only
                    if models.shared_critic:  # one forward gives both, so one backward of the summed loss
                        logprobs, logits, values = policy_logprobs_and_values(models, rollout, rows, args.temperature,
                                                                              grad=True)
                        (pg_loss, pg_stats), (vf_loss, vf_stats) = policy_objective(logprobs), value_objective(values)
                        backward(pg_loss + args.vf_coef * vf_loss)
                    else:
                        # Policy and value share no trainable parameter, so backpropagating their losses one after the
                        # other gives the gradients of the summed loss with one graph's activations alive at a time.
                        logprobs, logits = policy_logprobs(models, rollout, rows, args.temperature, grad=True)
                        pg_loss, pg_stats = policy_objective(logprobs)
                        backward(pg_loss)
                        vf_loss, vf_stats = value_objective(value_predictions(models, rollout, rows, grad=True))
                        backward(args.vf_coef * vf_loss)
                with torch.no_grad():
                    entropy = ppo_math.masked_mean(ppo_math.entropy_from_logits(logits), mask).item()
                # Logged as this micro-batch's own token-means, comparable whatever the split.
                share = tokens.item() / max(mask.sum().item(), 1)
                for key, value in {**pg_stats, **vf_stats, "loss/policy": pg_loss.item() * share,
                                   "loss/value": vf_loss.item() * share, "policy/entropy": entropy}.items():
                    stats.setdefault(key, []).append(value)
            distributed.sum_gradients(parameters)
            if scaler:  # every process holds the same summed gradients, so all skip an overflowing step alike
                scaler.unscale_(optimizer)
            grad_norm = distributed.clip_gradients(parameters, args.max_grad_norm)
            if not scaler:  # nothing else would skip a non-finite step, whose NaN weights would be checkpointed
                stop_if_not_finite("gradient norm", {"grad_norm": grad_norm}, step, args)
            if math.isfinite(grad_norm):
                stats.setdefault("grad_norm", []).append(grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {key: sum(values) / len(values) for key, values in stats.items()}


def rollout_metrics(rollout: Rollout, gold_scores: list[float] | None, distributed: Distributed) -> dict:
    mask = rollout.response_mask
    metrics = {
        **({"score/raw": rollout.raw_scores.mean().item()} if rollout.raw_scores is not None else {}),
        "score/combined": rollout.combined_scores.mean().item(),
        "score/shaped": rollout.scores.mean().item(),
        "kl/sequence": rollout.kl.sum(1).mean().item(),
        "response/length": mask.sum(1).mean().item(),
        "response/eos_rate": rollout.ended.float().mean().item(),
        "value/explained_variance": ppo_math.explained_variance(rollout.values, rollout.returns, mask),
        "advantage/mean": ppo_math.masked_mean(rollout.advantages, mask).item(),
    }
    if gold_scores is not None:
        metrics["score/gold"] = sum(gold_scores) / len(gold_scores)
    return {**distributed.means(metrics), **function_means(rollout, distributed)}


def stop_if_not_finite(what: str, values: dict[str, float], step: int, args: PPOArgs) -> None:
    """Stop the run at a non-finite number, before it is stepped, logged or saved. The values are the same on every
    process (reduced over them), so all processes stop together. An undefined explained variance is no failure."""
    if not all(math.isfinite(value) for key, value in values.items() if key != "value/explained_variance"):
        raise StageError(f"ppo: non-finite {what} at step {step} ({values}); last good checkpoint: "
                         f"{latest_checkpoint(Path(args.output_dir) / 'checkpoints')}. Lower learning_rate or check "
                         "the rewards.")


def function_means(rollout: Rollout, distributed: Distributed) -> dict:
    """score/<name>: each reward function's mean over the responses it judged on every process (its Nones left out;
    left out altogether when it judged none, so every logged number is finite)."""
    means = {}
    if not rollout.function_names:
        return means
    for name, values in zip(rollout.function_names, rollout.function_scores.T):
        judged = ~values.isnan()
        total, count = distributed.sum(torch.stack([values[judged].sum(), judged.sum().float()])).tolist()
        if count:
            means[f"score/{name}"] = total / count
    return means


def fit_prompts(records: list[dict], tokenizer, max_prompt_length: int, data_args: DataArgs, say=print,
                source: str | None = None):
    """(records, prompt token ids) within max_prompt_length, by data_args.length_policy: error names the first prompt
    that is too long, drop leaves such prompts out, truncate keeps their last max_prompt_length tokens. The records
    kept are returned whole: reward functions get their other columns. source: where they came from (train_data)."""
    from rlhf import data
    from rlhf.generation import encode_prompts

    source, policy = source or data_args.train_data, data_args.length_policy
    if policy in ("error", "drop"):
        kept = data.check_lengths(records, tokenizer, max_prompt_length, source, "prompt", policy)
        if len(kept) < len(records):
            say(f"[rlhf] ppo: {len(records) - len(kept)} of {len(records)} prompts in {source} are longer than "
                f"max_prompt_length {max_prompt_length} tokens and are left out (length_policy: drop)")
        records = kept
    else:  # truncate cuts the token ids below; text already in chat-template form is refused all the same
        data.check_chat_markup(records, tokenizer, source, "prompt")
    prompt_ids = encode_prompts(tokenizer, [record["prompt"] for record in records])
    if policy == "truncate":
        cut = sum(len(ids) > max_prompt_length for ids in prompt_ids)
        if cut:
            say(f"[rlhf] ppo: {cut} of {len(prompt_ids)} prompts in {source} are longer than max_prompt_length "
                f"{max_prompt_length} tokens; keeping their last {max_prompt_length} tokens (length_policy: truncate)")
        prompt_ids = [ids[-max_prompt_length:] for ids in prompt_ids]
    return records, prompt_ids


def reward_sources(args: PPOArgs, prompt_records: list[dict]):
    """The run's rewards, checked before any model loads: at least one; a reward model that is a reward stage
    accurate enough to train against (min_reward_accuracy); one weight per reward; every function imported and
    probe-called on the first prompts. Returns (the reward stage's manifest or None, the functions, the weights)."""
    from rlhf import rewards
    from rlhf.ppo.layouts import check_value_init

    manifest = rewards.reward_manifest(args)
    if args.reward_source and manifest is None:
        raise ConfigError(f"ppo: reward_model_name_or_path: {args.reward_source!r} is not a reward stage folder (no "
                          "manifest.json); PPO runs the reward model itself and needs one trained by `rlhf reward` "
                          "(a hub sequence classifier works with rlhf grpo or rloo)")
    rewards.check_reward_sources(STAGE, args, manifest)
    n_rewards = (manifest is not None) + len(args.reward_funcs)
    if args.reward_weights is not None and len(args.reward_weights) != n_rewards:
        raise ConfigError(f"ppo: reward_weights has {len(args.reward_weights)} weights for {n_rewards} rewards (the "
                          "reward model first, when there is one, then each of reward_funcs)")
    check_value_init(args.value_init, args.critic, manifest)
    functions = rewards.load_reward_functions(args.reward_funcs, prompt_records[:2])
    taken = {"raw", "combined", "shaped", "gold"} | ({"reward_model"} if manifest else set())
    for spec, function in zip(args.reward_funcs, functions):
        if function.__name__ in taken:  # each reward logs score/<name>: two of one name would mix in one number
            raise ConfigError(f"reward_funcs: {spec}: the name {function.__name__!r} is taken (PPO logs "
                              f"score/<name> for each reward beside score/raw, score/combined, score/shaped and "
                              "score/gold); list each function once, under a name of its own")
        taken.add(function.__name__)
    weights = args.reward_weights if args.reward_weights is not None else [1.0] * n_rewards
    return manifest, functions, [float(weight) for weight in weights]


# ----------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(models, optimizer, distributed: Distributed, step: int, kl_coef: float,
                    checkpoint_root: Path, scaler=None) -> dict[str, torch.Tensor]:
    """checkpoints/step-N: the trainable parameters and the optimizer state whole, by name (so a run may resume on
    another number of processes, sharded or not). Every process takes part in gathering them; the main process
    writes them into a temp folder and renames it: a killed run never leaves half a checkpoint. Returns the
    gathered trainable parameters."""
    import shutil

    from safetensors.torch import save_file

    trainable, optimizer_state = distributed.full_state(models), distributed.optimizer_state(models, optimizer)
    if not distributed.accelerator.is_main_process:
        return trainable
    final = checkpoint_root / f"step-{step:06d}"
    temporary = checkpoint_root / f".step-{step:06d}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(trainable, str(temporary / "trainable.safetensors"))
    torch.save(optimizer_state, temporary / "optimizer.pt")
    (temporary / "state.json").write_text(json.dumps({"step": step, "kl_coef": kl_coef,
                                                      **({"grad_scaler": scaler.state_dict()} if scaler else {})}))
    shutil.rmtree(final, ignore_errors=True)
    temporary.rename(final)
    return trainable


def policy_adapter_state(models, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The policy's peft model's share of the whole trainable parameters, named as in that model (what peft's
    save_pretrained picks the policy adapter from)."""
    policy = models.policy_for_saving()
    prefix = next(name for name, module in models.named_modules() if module is policy) + "."
    return {name[len(prefix):]: tensor for name, tensor in trainable.items() if name.startswith(prefix)}


def tracker_config(config: dict) -> dict:
    """The stage configuration as the flat scalars trackers take as hyperparameters (TensorBoard's hparams)."""
    flat = {}
    for section, values in config.items():
        for key, value in (values.items() if isinstance(values, dict) else [(section, values)]):
            if isinstance(value, (bool, int, float, str)):
                flat[key if key not in flat else f"{section}.{key}"] = value
    return flat


def without_steps(config: dict) -> dict:
    """A PPO configuration less its length: a longer run of it may continue from its checkpoints."""
    return {**config, "training": {key: value for key, value in config["training"].items() if key != "steps"}}


def rotate_checkpoints(checkpoint_root: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` complete checkpoints (the newest is what a resume needs)."""
    import shutil

    if keep:
        done = sorted(path for path in checkpoint_root.glob("step-*") if (path / "state.json").is_file())
        for old in done[:-keep]:
            shutil.rmtree(old)


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    done = sorted(path for path in checkpoint_root.glob("step-*") if (path / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(models, optimizer, distributed: Distributed, checkpoint: Path) -> dict:
    """Every process loads the whole checkpoint and keeps its part."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = load_file(str(checkpoint / "trainable.safetensors"))
    trainable = {name for name, parameter in models.named_parameters() if parameter.requires_grad}
    missing = trainable - set(state)
    if missing:
        raise ConfigError(f"checkpoint {checkpoint} does not match this configuration (missing {sorted(missing)[:3]})")
    set_model_state_dict(models, state, options=StateDictOptions(full_state_dict=True, strict=False))
    distributed.load_optimizer_state(models, optimizer, torch.load(checkpoint / "optimizer.pt", weights_only=True))
    return json.loads((checkpoint / "state.json").read_text())


# ----------------------------------------------------------------------------------------------- the stage

def main(argv: list[str] | None = None):
    # Config (PPOArgs checks its own ranges)
    model_args, data_args, args = parse_args(ARG_TYPES, argv, prog="rlhf ppo", description=__doc__)
    for name, value in [("train_data", data_args.train_data), ("output_dir", args.output_dir),
                        ("init_from", model_args.init_from)]:
        if not value:
            raise ConfigError(f"ppo: '{name}' is required (set it in the recipe or pass --{name})")
    if args.eval_steps and not data_args.eval_data:
        raise ConfigError(f"ppo: eval_steps {args.eval_steps} evaluates on eval_data, which is not set; set "
                          "eval_data (held-out prompts) or eval_steps: 0")
    from rlhf import console
    from rlhf.stage import start_stage

    push_to = start_stage(STAGE, args, args.output_dir)  # the console (--verbose); push_to_hub checked

    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from rlhf import data
    from rlhf.checkpoints import check_checkpoint_config
    from rlhf.manifest import config_hash, resolve_parent, truncate_jsonl_log
    from rlhf.models import check_revision, stage_tokenizer
    from rlhf.ppo.layouts import POLICY, build_models, check_value_tokenizer
    from rlhf.processes import start_processes
    from rlhf.rewards import record_columns, reward_statistics
    from rlhf.stage import load_gold_prompts, logs_folder, open_output, point_trackers, stage_config, trackers, write_stage

    report_to = trackers(args.report_to)
    start_processes(args.ddp_timeout)
    accelerator = Accelerator(log_with=report_to or None, project_dir=str(logs_folder(args.output_dir, args.logging_dir)))
    distributed = Distributed(accelerator, sharded=args.fsdp or accelerator.distributed_type == DistributedType.FSDP,
                              gather_for_generation=args.gather_for_generation)
    # As transformers' TrainingArguments: the flags, else the accelerate config's mixed_precision. PPO autocasts its
    # models itself (layouts.py), so the process-wide AcceleratorState is left as it is.
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    requested = copy.copy(args)  # hashed as asked: the pipeline computes the same hash without an accelerator
    args.resolve_precision(precision, accelerator.device.type, distributed.sharded, model_args.dtype)
    output_dir = Path(args.output_dir)

    # Data and rewards: prompts validated, length-checked and tokenised, every reward checked, before any model loads.
    prompt_records = data.load_train(data_args, "prompt")
    reward_manifest, reward_functions, reward_weights = reward_sources(args, prompt_records)
    reward_stats = reward_statistics(STAGE, reward_manifest, args.normalize_reward) if reward_manifest else None
    check_revision(model_args)
    policy_parent = resolve_parent(model_args.init_from, PARENT_STAGES)
    config = stage_config(model_args, data_args, requested, parent=policy_parent)
    tokenizer = stage_tokenizer(policy_parent, model_args)
    reward_tokenizer = stage_tokenizer(reward_manifest, model_args) if reward_manifest else None
    check_value_tokenizer(args.layout, args.value_init, tokenizer, reward_tokenizer)
    records, prompt_ids = fit_prompts(prompt_records, tokenizer, args.max_prompt_length, data_args, accelerator.print)
    prompts, columns = [record["prompt"] for record in records], record_columns(records)
    gold_prompts = load_gold_prompts(data_args)
    held_out = None
    if data_args.eval_data:
        from rlhf.ppo.evaluation import HeldOutPrompts

        eval_records, eval_ids = fit_prompts(
            data.load_eval(data_args, "prompt"), tokenizer, args.max_prompt_length, data_args, accelerator.print,
            source=data_args.eval_data)
        held_out = HeldOutPrompts([record["prompt"] for record in eval_records], eval_ids, record_columns(eval_records),
                                  args.eval_steps, args.steps)
    gold = None
    if data_args.gold_reward:
        from rlhf.evaluate.policy import load_gold_reward

        gold = load_gold_reward(data_args.gold_reward)
    lock, finished = open_output(STAGE, str(output_dir), config, args.overwrite,  # noqa: F841 (held until exit)
                                 extends=lambda done: (config_hash(without_steps(done.config)) ==
                                                       config_hash(without_steps(config))
                                                       and args.steps > done.metrics.get("steps", args.steps)),
                                 push_to=push_to)
    if finished:
        return finished
    console.say_header(STAGE, model_args, str(output_dir))
    if report_to:  # TensorBoard writes to <logging_dir>/ppo, wandb to <logging_dir>/wandb
        point_trackers(str(output_dir), args.logging_dir)
        accelerator.init_trackers(STAGE, config=tracker_config(config))

    # Models: identical initialisation on every process.
    torch.manual_seed(args.seed)
    models = build_models(args.layout, policy_parent, reward_manifest, model_args, args.value_init, args.critic)
    models.to(accelerator.device).eval()  # eval: dropout off, so rollout and update log-probs agree
    models.use_mixed_precision(torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None)
    models.sampling_dtype = getattr(torch, args.sampling_dtype) if args.sampling_dtype else None
    if args.gradient_checkpointing:
        models.enable_gradient_checkpointing()
    distributed.prepare(models, models.policy_parameters() + models.value_parameters())
    trainable = models.policy_parameters() + models.value_parameters()  # after prepare: the shards, when sharded
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler("constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler,
                              optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.steps)
    kl_control = ppo_math.kl_controller(args.kl_coef, args.target_kl, args.kl_horizon)
    scaler = torch.amp.GradScaler(accelerator.device.type) if args.fp16 else None

    # Resume
    checkpoint_root = output_dir / "checkpoints"
    # Training longer (more steps) may continue from the checkpoints; any other change may not.
    check_checkpoint_config(checkpoint_root, config_hash(without_steps(config)))
    start_step = 0
    last = latest_checkpoint(checkpoint_root)
    if last is not None:
        state = load_checkpoint(models, optimizer, distributed, last)
        start_step, kl_control.value = state["step"], state["kl_coef"]
        if scaler and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        for _ in range(start_step):
            scheduler.step()
        accelerator.print(f"[rlhf] ppo: resuming from {last} (step {start_step})")
    per_step = args.rollout_batch_size * accelerator.num_processes
    if accelerator.is_main_process:
        resumed = f", from step {start_step}" if start_step else ""
        console.say(STAGE, f"training {args.steps} steps on {len(prompts)} prompts ({per_step} per step, "
                           f"{args.steps * per_step / len(prompts):.2g} passes){resumed}")

    # Train
    log_path = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        truncate_jsonl_log(log_path, start_step)  # steps after the checkpoint are trained (and logged) again
    from rlhf.evaluate.curve import gold_curve

    # The held-out curve (gold_curve_points): sampled by the main process, so not when the model is sharded.
    curve = None
    if accelerator.is_main_process and not distributed.sharded:
        curve = gold_curve(data_args, gold_prompts, str(output_dir), args.steps, args.seed)
    if curve:
        curve.start(models, tokenizer, start_step)
    training_started = time.perf_counter()
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="ppo",
                    disable=not accelerator.is_local_main_process or not console.is_verbose())
    for step in progress:
        step_started = time.perf_counter()
        # Seeds depend on (seed, step, rank) only, so a resumed run continues exactly as an uninterrupted one.
        torch.manual_seed(args.seed * 100_003 + step * 1_009 + accelerator.process_index)
        rows = prompt_batches(len(prompts), args.rollout_batch_size, accelerator.num_processes,
                              accelerator.process_index, args.seed, step)
        rollout = collect(models, tokenizer, reward_tokenizer, [prompts[i] for i in rows], [prompt_ids[i] for i in rows],
                          args, kl_control.value, reward_stats, distributed.gathered, distributed.synced_generation,
                          reward_functions=reward_functions, reward_weights=reward_weights,
                          columns={name: [values[i] for i in rows] for name, values in columns.items()})
        finish_advantages(rollout, args, distributed.masked_stats)
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(args.seed + step)
        update_stats = update(models, optimizer, rollout, args, distributed, generator, scaler, step=step + 1)
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step's updates used
        scheduler.step()
        gold_scores = ([gold(data.prompt_text(prompts[i]), text) for i, text in zip(rows, rollout.texts)]
                       if gold else None)
        metrics = {"step": step + 1, **rollout_metrics(rollout, gold_scores, distributed),
                   **distributed.means(update_stats),
                   "kl_coef": kl_control.value, "lr": learning_rate,
                   **rollout.timings, "time/training": time.perf_counter() - started,
                   "time/step": time.perf_counter() - step_started, **distributed.memory_mib()}
        if held_out and held_out.due(step + 1):
            metrics.update(held_out.evaluate(models, tokenizer, reward_tokenizer, args, reward_stats, distributed,
                                             reward_functions, reward_weights))
            if curve:  # the evaluation is not training time on the gold curve either
                curve.leave_out(metrics["time/eval"])
        kl_control.update(metrics["kl/sequence"], per_step)
        stop_if_not_finite("metrics", metrics, step + 1, args)
        if accelerator.is_main_process:
            with open(log_path, "a") as log_file:
                log_file.write(json.dumps(metrics) + "\n")
            accelerator.log(metrics, step=step + 1)
        progress.set_postfix(score=f"{metrics['score/combined']:.3f}", kl=f"{metrics['kl/sequence']:.3f}")
        if args.logging_steps and ((step + 1) % args.logging_steps == 0 or step + 1 == args.steps):
            accelerator.print(f"[rlhf] ppo: {console.step_line(step + 1, args.steps, metrics)}")
        if curve and curve.due(step + 1):
            curve.record(models, tokenizer, step + 1)
        if args.save_steps and (step + 1) % args.save_steps == 0 and step + 1 < args.steps:
            save_checkpoint(models, optimizer, distributed, step + 1, kl_control.value, checkpoint_root, scaler)
            if accelerator.is_main_process:
                rotate_checkpoints(checkpoint_root, args.save_total_limit)
        accelerator.wait_for_everyone()

    # Save: the policy adapter (plain LoRA folder), the value adapter + head for further training, then the manifest.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        console.say(STAGE, f"trained {args.steps - start_step} steps in {time.perf_counter() - training_started:.1f} s")
    trainable_state = save_checkpoint(models, optimizer, distributed, args.steps, kl_control.value, checkpoint_root,
                                      scaler)
    if not accelerator.is_main_process:
        accelerator.end_training()
        return None
    models.policy_for_saving().save_pretrained(output_dir / "adapter", selected_adapters=[POLICY],
                                               state_dict=policy_adapter_state(models, trainable_state))
    tokenizer.save_pretrained(output_dir / "adapter")
    rotate_checkpoints(checkpoint_root, args.save_total_limit)
    from rlhf.manifest import read_jsonl_log

    logged = read_jsonl_log(log_path)  # every step once, whether or not the run was resumed
    metrics = {"steps": args.steps, "first": logged[0] if logged else {}, "last": logged[-1] if logged else {}}
    manifest = write_stage(
        STAGE, str(output_dir), model_args, data_args=data_args, config=config,
        base_model=policy_parent.base_model, parent=policy_parent, metrics=metrics, tokenizer=tokenizer,
        extra={"layout": models.layout, "precision": precision,
               "logprobs_from_generation": args.logprobs_from_generation, "reference": "parent policy: "
               + ("the shared base with every adapter disabled" if models.layout == "shared" else "a separate frozen copy"),
               "reward_model": str(Path(args.reward_source).resolve()) if reward_manifest else None,
               "rewards": (["reward_model"] if reward_manifest else []) + [f.__name__ for f in reward_functions],
               "reward_weights": reward_weights, "reward_placement": models.reward_placement,
               "value_init": args.value_init,
               "world_size": accelerator.num_processes},
        save_merged=args.save_merged, gold_prompts=gold_prompts, push_to=push_to,
    )
    accelerator.end_training()
    return manifest


if __name__ == "__main__":
    sys.exit(run_main(main, STAGE))
