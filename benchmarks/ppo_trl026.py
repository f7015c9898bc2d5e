"""PPO with TRL 0.26.2 (`trl.experimental.ppo.PPOTrainer`, the last TRL PPO; needs transformers < 5): the TRL side
of the PPO benchmark. Run it with the interpreter of benchmarks/.venv-trl026 (built by benchmarks/setup_trl026.sh):

    benchmarks/.venv-trl026/bin/python benchmarks/ppo_trl026.py --policy runs/tiny/sft/merged \
        --reward_model runs/tiny/reward/merged --prompts data/tiny/prompts_train.jsonl --steps 4 --json_out out.json

Local model folders only (nothing is fetched). Four full fp32 models, as TRL does without peft: policy, reference
(TRL's own copy of the policy), value (from the reward model or the policy) and reward.

How our PPO settings map onto TRL 0.26.2 (see `trl/experimental/ppo/ppo_trainer.py`):
  * TRL's rollout batch per iteration is per_device_train_batch_size * gradient_accumulation_steps * world_size, split
    into num_mini_batches mini-batches, each cut into micro-batches of per_device_train_batch_size. Every micro-batch
    runs inside `accelerator.accumulate`, so the optimizer really steps only every gradient_accumulation_steps
    micro-batches (counted across mini-batches). To get one optimizer step per mini-batch of mini_batch_size, as our
    PPO does, we use per_device_train_batch_size = rollout_batch_size, gradient_accumulation_steps = 1 and
    num_mini_batches = rollout_batch_size / mini_batch_size: each mini-batch is then one micro-batch and one step.
  * total_episodes = steps * rollout_batch_size gives exactly `steps` iterations (num_total_batches).
  * stop_token='eos' uses tokenizer.eos_token (<|im_end|>); response_length = max_new_tokens.
  * TRL PPO has no gradient clipping (max_grad_norm is ignored) and no reward normalisation/clipping; the LR
    schedule (linear by default) is stepped once per iteration, as ours.

Timing: PPOTrainer.train is left untouched; this script wraps the module-level helpers it calls
(`batch_generation`, `forward`, `get_reward`) and adds a callback whose on_step_end marks the end of each iteration.
Per iteration: generation = time inside batch_generation; scoring = from the end of generation to the first forward
with gradients (reference, value and reward forwards, log-probs, rewards, GAE); training = from that first forward
with gradients to on_step_end (the PPO epochs, metrics, LR step). `other` is what is left (fetching the batch).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--policy", required=True, help="Causal LM folder (safetensors, tokenizer.json, chat template).")
    parser.add_argument("--reward_model", required=True, help="Sequence-classification folder (num_labels 1).")
    parser.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field (text or messages) per line.")
    parser.add_argument("--value_init", choices=["reward", "policy"], default="reward",
                        help="Value model from the reward model (TRL's examples; our PPOArgs default) or from the "
                             "policy with a freshly initialised score head.")
    parser.add_argument("--steps", type=int, default=40, help="PPO iterations (one rollout batch each).")
    parser.add_argument("--rollout_batch_size", type=int, default=32, help="Prompts per iteration.")
    parser.add_argument("--mini_batch_size", type=int, default=16, help="Rollouts per optimizer step.")
    parser.add_argument("--ppo_epochs", type=int, default=4, help="Passes over each rollout batch.")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="Longest response (TRL response_length).")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lr_scheduler", choices=["linear", "constant"], default="linear")
    parser.add_argument("--kl_coef", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--cliprange", type=float, default=0.2)
    parser.add_argument("--cliprange_value", type=float, default=0.2)
    parser.add_argument("--vf_coef", type=float, default=0.1)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--lam", type=float, default=0.95)
    parser.add_argument("--missing_eos_penalty", type=float, default=1.0, help="Negative value = none.")
    parser.add_argument("--rollout_forward_batch_size", type=int, default=None,
                        help="TRL local_rollout_forward_batch_size (generation/scoring chunk); default: the whole "
                             "rollout batch, as our PPO generates and scores it in one go.")
    parser.add_argument("--device", choices=["cpu", "auto"], default="cpu", help="cpu: fp32 on CPU (use_cpu).")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", default="/tmp/ppo_trl026", help="TRL output_dir (nothing is saved there).")
    parser.add_argument("--json_out", default=None, help="Write the measurements here.")
    args = parser.parse_args(argv)
    if args.rollout_batch_size % args.mini_batch_size:
        parser.error("--rollout_batch_size must be a multiple of --mini_batch_size")
    return args


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class RSSSampler(threading.Thread):
    """Samples the RSS every `interval` s, for the peak during training alone (ru_maxrss covers loading too)."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, 0.0, threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, rss_mib())
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()
        self.peak = max(self.peak, rss_mib())


def load_tokenizer(folder: str):
    """Our tokenizer folders are written by transformers 5 (tokenizer_class 'TokenizersBackend', unknown to 4.x), so
    load tokenizer.json with PreTrainedTokenizerFast; tokenizer_config.json (eos/pad) and chat_template.jinja still
    apply."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    if tokenizer.chat_template is None and (Path(folder) / "chat_template.jinja").exists():
        tokenizer.chat_template = (Path(folder) / "chat_template.jinja").read_text()
    if tokenizer.chat_template is None:
        sys.exit(f"{folder}: no chat template")
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        sys.exit(f"{folder}: need an eos token and a distinct pad token (got eos={tokenizer.eos_token!r}, "
                 f"pad={tokenizer.pad_token!r}); TRL PPO finds response ends by the pad token")
    tokenizer.padding_side = "left"  # DataCollatorWithPadding pads the prompts for generation
    return tokenizer


def load_prompt_ids(path: str, tokenizer) -> list[list[int]]:
    """One user message, rendered with the chat template and add_generation_prompt=True, as
    rlhf.generation.encode_prompts does (a 'prompt' given as messages is used as is, less a trailing assistant turn)."""
    encoded = []
    with open(path) as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            prompt = record["prompt"] if "prompt" in record else record["messages"]
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            if messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            encoded.append(list(ids))
    return encoded


class StepTimer:
    """Wraps the helpers PPOTrainer.train calls and records per-iteration times (see the module docstring)."""

    def __init__(self):
        self.steps: list[dict] = []
        self.reset()
        self.last_end = None

    def reset(self):
        self.generation = 0.0
        self.generation_end = None
        self.train_start = None
        self.forwards = {"reference": 0.0, "value": 0.0, "reward": 0.0}

    def install(self, ppo_module, trainer_ref):
        import torch

        original_batch_generation = ppo_module.batch_generation
        original_forward = ppo_module.forward
        original_get_reward = ppo_module.get_reward
        timer = self

        def batch_generation(*args, **kwargs):
            start = time.perf_counter()
            out = original_batch_generation(*args, **kwargs)
            timer.generation_end = time.perf_counter()
            timer.generation += timer.generation_end - start
            return out

        def forward(model, *args, **kwargs):
            if torch.is_grad_enabled():
                if timer.train_start is None:
                    timer.train_start = time.perf_counter()
                return original_forward(model, *args, **kwargs)
            start = time.perf_counter()
            out = original_forward(model, *args, **kwargs)
            timer.forwards["reference"] += time.perf_counter() - start
            return out

        def get_reward(model, *args, **kwargs):
            start = time.perf_counter()
            out = original_get_reward(model, *args, **kwargs)
            kind = "reward" if model is trainer_ref().reward_model else "value"
            timer.forwards[kind] += time.perf_counter() - start
            return out

        ppo_module.batch_generation = batch_generation
        ppo_module.forward = forward
        ppo_module.get_reward = get_reward

    def begin(self):
        self.last_end = time.perf_counter()
        self.reset()

    def end_step(self):
        now = time.perf_counter()
        total = now - self.last_end
        generation_end = self.generation_end or self.last_end
        train_start = self.train_start or now
        generation = self.generation
        scoring = train_start - generation_end
        training = now - train_start
        self.steps.append({
            "total": total, "generation": generation, "scoring": scoring, "training": training,
            "other": total - generation - scoring - training,
            "forwards": dict(self.forwards),
        })
        self.last_end = now
        self.reset()


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import weakref

    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    import trl.experimental.ppo.ppo_trainer as ppo_module
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.set_seed(args.seed)
    setup_start = time.perf_counter()

    tokenizer = load_tokenizer(args.policy)
    prompt_ids = load_prompt_ids(args.prompts, tokenizer)
    n_prompts = len(prompt_ids)
    if n_prompts < args.rollout_batch_size:
        sys.exit(f"{args.prompts}: {n_prompts} prompts, fewer than --rollout_batch_size {args.rollout_batch_size}")
    train_dataset = datasets.Dataset.from_dict({"input_ids": prompt_ids})
    eval_dataset = datasets.Dataset.from_dict({"input_ids": prompt_ids[: args.rollout_batch_size]})  # never used

    dtype = torch.float32
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=dtype)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1, dtype=dtype)
    value_source = args.reward_model if args.value_init == "reward" else args.policy
    value_model = AutoModelForSequenceClassification.from_pretrained(value_source, num_labels=1, dtype=dtype)
    for model in (reward_model, value_model):
        model.config.pad_token_id = tokenizer.pad_token_id
    policy_params = sum(p.numel() for p in policy.parameters())
    value_params = sum(p.numel() for p in value_model.parameters())

    forward_batch = args.rollout_forward_batch_size or args.rollout_batch_size
    config = PPOConfig(
        output_dir=args.output_dir,
        exp_name="ppo_trl026",
        seed=args.seed,
        per_device_train_batch_size=args.rollout_batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=args.rollout_batch_size // args.mini_batch_size,
        total_episodes=args.steps * args.rollout_batch_size,
        local_rollout_forward_batch_size=forward_batch,
        num_ppo_epochs=args.ppo_epochs,
        response_length=args.max_new_tokens,
        stop_token="eos",
        temperature=args.temperature,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler,
        optim="adamw_torch",  # torch.optim.AdamW, as our PPO (4.57 may otherwise pick the fused variant)
        weight_decay=0.0,
        kl_coef=args.kl_coef,
        kl_estimator="k1",
        cliprange=args.cliprange,
        cliprange_value=args.cliprange_value,
        vf_coef=args.vf_coef,
        gamma=args.gamma,
        lam=args.lam,
        whiten_rewards=False,
        missing_eos_penalty=args.missing_eos_penalty if args.missing_eos_penalty >= 0 else None,
        num_sample_generations=0,  # no sample-completion tables during training
        eval_strategy="no",
        save_strategy="no",
        push_to_hub=False,
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        bf16=False,  # OnPolicyConfig defaults bf16 to True when fp16 is off; keep fp32
        fp16=False,
        gradient_checkpointing=False,  # OnPolicyConfig default True (PPOTrainer itself does not enable it)
        dataloader_num_workers=0,
    )

    timer = StepTimer()
    logs: list[dict] = []

    class Marks(TrainerCallback):
        def on_train_begin(self, *_, **__):
            timer.begin()

        def on_log(self, _args, _state, _control, logs_=None, **kwargs):
            entry = kwargs.get("logs", logs_)
            if entry:
                logs.append(dict(entry))

        def on_step_end(self, *_, **__):
            timer.end_step()

    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,  # TRL makes its own (deep) copy of the policy
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=[Marks()],
    )
    timer.install(ppo_module, weakref.ref(trainer))
    # Count the optimizer steps that really happen (accelerate skips them while accumulating).
    inner_optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    optimizer_steps = [0]

    def count_step(*_):
        optimizer_steps[0] += 1

    inner_optimizer.register_step_post_hook(count_step)
    setup_seconds = time.perf_counter() - setup_start
    rss_after_setup = rss_mib()
    peak_after_setup = peak_rss_mib()

    sampler = RSSSampler()
    sampler.start()
    train_start = time.perf_counter()
    trainer.train()
    seconds_total_train = time.perf_counter() - train_start
    sampler.stop()
    peak_rss = peak_rss_mib()

    n = len(timer.steps)
    if n != args.steps:
        print(f"warning: timed {n} iterations, expected {args.steps}", file=sys.stderr)

    def mean(rows, key):
        return sum(row[key] for row in rows) / len(rows) if rows else None

    split = {key: mean(timer.steps, key) for key in ("generation", "scoring", "training", "other")}
    later = timer.steps[1:]
    metric_keys = ("objective/scores", "objective/kl", "objective/rlhf_reward", "objective/entropy",
                   "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
                   "val/num_eos_tokens", "lr")
    result = {
        "framework": "trl.experimental.ppo.PPOTrainer",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
        "device": str(trainer.accelerator.device),
        "torch_threads": torch.get_num_threads(),
        "steps": n,
        "seconds_setup": setup_seconds,
        "seconds_total_train": seconds_total_train,
        "seconds_per_step": seconds_total_train / n if n else None,
        "seconds_per_step_after_first": mean(later, "total"),
        "split": split,
        "split_after_first": {key: mean(later, key) for key in ("generation", "scoring", "training", "other")},
        "scoring_forwards_per_step": {key: sum(row["forwards"][key] for row in timer.steps) / n
                                      for key in ("reference", "value", "reward")} if n else None,
        "per_step": timer.steps,
        "rss_after_setup_mib": rss_after_setup,
        "peak_rss_setup_mib": peak_after_setup,
        "peak_rss_train_sampled_mib": sampler.peak,
        "peak_rss_mib": peak_rss,
        "params": {"policy": policy_params, "value": value_params,
                   "reward": sum(p.numel() for p in reward_model.parameters()),
                   "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)},
        "optimizer_steps_per_iteration": optimizer_steps[0] / n if n else None,
        "optimizer_steps_per_iteration_expected": args.ppo_epochs * (args.rollout_batch_size // args.mini_batch_size),
        "metrics": [{key: entry[key] for key in metric_keys if key in entry} for entry in logs],
        "settings": {
            **{key: value for key, value in vars(args).items() if key != "json_out"},
            "prompts_in_file": n_prompts,
            "trl_config": {key: getattr(config, key) for key in (
                "per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches", "total_episodes",
                "num_total_batches", "batch_size", "mini_batch_size", "local_rollout_forward_batch_size",
                "response_length", "num_ppo_epochs", "stop_token", "temperature", "kl_coef", "kl_estimator",
                "missing_eos_penalty", "optim", "lr_scheduler_type", "bf16", "gradient_checkpointing")},
        },
    }
    for key in ("optim", "lr_scheduler_type"):  # enums -> their names
        value = result["settings"]["trl_config"][key]
        result["settings"]["trl_config"][key] = getattr(value, "value", value)

    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")

    first, last = (logs[0], logs[-1]) if logs else ({}, {})
    print(f"\nTRL {trl.__version__} PPO (transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{result['device']}, {result['torch_threads']} threads)")
    print(f"  policy {policy_params / 1e6:.2f}M params; value from {args.value_init}; {n} iterations x "
          f"{args.rollout_batch_size} prompts, {args.ppo_epochs} epochs x {args.rollout_batch_size // args.mini_batch_size} "
          f"mini-batches of {args.mini_batch_size}, <= {args.max_new_tokens} new tokens; "
          f"{result['optimizer_steps_per_iteration']:g} optimizer steps per iteration")
    print(f"  setup {setup_seconds:.1f}s; train {seconds_total_train:.1f}s = {result['seconds_per_step']:.2f}s/step "
          f"(generation {split['generation']:.2f} + scoring {split['scoring']:.2f} + training {split['training']:.2f}"
          f" + other {split['other']:.3f})")
    print(f"  RSS after setup {rss_after_setup:.0f} MiB; peak during training {sampler.peak:.0f} MiB; "
          f"peak (ru_maxrss) {peak_rss:.0f} MiB")
    for key in ("objective/scores", "objective/kl", "policy/approxkl_avg", "loss/value_avg", "val/num_eos_tokens"):
        if key in first:
            print(f"  {key}: first {first[key]:.4g} -> last {last[key]:.4g}")
    if args.json_out:
        print(f"  wrote {args.json_out}")
    return result


if __name__ == "__main__":
    main()
