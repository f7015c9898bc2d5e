"""PPO settings. Defaults follow "The N Implementation Details of RLHF with PPO" (Huang et al., 2024) where the tiny
task does not need otherwise."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rlhf.config import ConfigError
from rlhf.rewards import RewardArgs
from rlhf.stage import StageOutputArgs


@dataclass
class PPOArgs(RewardArgs, StageOutputArgs):
    """The reward comes from RewardArgs: reward_model (a reward stage folder; PPO runs that stage's model itself, so
    a hub classifier is not accepted) and/or reward_funcs, weighed by reward_weights."""

    output_dir: str | None = field(default=None, metadata={"help": "Stage output folder."})
    layout: str = field(
        default="shared",
        metadata={"help": "shared: one frozen base; policy, value and reward are LoRA adapters on it and the reference "
                  "is the base with adapters disabled. separate: four full models (policy, reference, value, reward).",
                  "choices": ["shared", "separate"]},
    )
    value_init: str = field(
        default="reward", metadata={"help": "Initialise the value model from the reward model (adapter + head; needs "
                                    "reward_model) or from the policy (fresh adapter, zero head).",
                                    "choices": ["reward", "policy"]}
    )
    critic: str = field(
        default="separate",
        metadata={"help": "separate: the value model is its own LoRA adapter (or model) with its own forward passes. "
                  "shared: a value head on the policy's last hidden states (layout shared only): one forward and "
                  "backward serve both, about half the update compute, but the value loss also moves the policy "
                  "adapter (weighted by vf_coef) and value_init does not apply (the head starts at zero).",
                  "choices": ["separate", "shared"]},
    )
    fsdp: bool = field(
        default=False,
        metadata={"help": "Shard the models over the processes with torch FSDP2 (fully_shard on each transformer block): "
                  "each process holds 1/N of the frozen base and of the adapters, so a model that does not fit one "
                  "device can still be trained. Also on when the accelerate config's distributed_type is FSDP. Off: "
                  "data parallel, every process holds the whole model."},
    )
    gather_for_generation: bool = field(
        default=True,
        metadata={"help": "With fsdp: gather the whole model on every process while it samples a rollout (fast; each "
                  "process briefly holds the whole model). false: blocks stay sharded and are gathered one at a time "
                  "for every decoded token, so memory stays at the shard size, at the cost of much slower sampling "
                  "(TRL's ds3_gather_for_generation)."},
    )
    # Precision and memory
    bf16: bool = field(
        default=False,
        metadata={"help": "bf16 mixed precision (accelerate's mixed_precision bf16): every forward runs under bf16 "
                  "autocast while the trainable LoRA weights and value head, their gradients and AdamW stay fp32. "
                  "ModelArgs dtype (bfloat16) is the separate switch that loads the frozen weights in bf16. Works "
                  "on CPU too (slowly: useful to test a recipe). Also on when the accelerate config's "
                  "mixed_precision is bf16."})
    fp16: bool = field(
        default=False,
        metadata={"help": "fp16 mixed precision: fp16 autocast with a gradient scaler (a step whose gradients "
                  "overflow is skipped), fp32 trainable weights. GPU only; not with fsdp. Prefer bf16 where the GPU "
                  "has it. Also on when the accelerate config's mixed_precision is fp16."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute each transformer block's activations in the backward of the update instead of "
                  "keeping them (use_reentrant false): less memory, about a third more update compute. Rollouts "
                  "and sampling are unaffected (no gradients: the KV cache stays on)."})
    # Schedule
    steps: int = field(default=40, metadata={"help": "PPO iterations (each: one rollout, then ppo_epochs of updates)."})
    rollout_batch_size: int = field(default=32, metadata={"help": "Prompts per process per iteration."})
    mini_batch_size: int = field(default=16, metadata={"help": "Rollouts per process per optimizer step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per mini-batch."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (policy and value)."})
    lr_scheduler: str = field(
        default="linear", metadata={"help": "Learning-rate schedule over `steps` (transformers.get_scheduler): "
                                    "constant, linear decay to 0, or cosine; each after warmup_steps of linear warmup.",
                                    "choices": ["constant", "linear", "cosine"]})
    warmup_steps: int = field(default=0, metadata={"help": "Iterations of linear learning-rate warmup from 0."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    # Rollout
    max_prompt_length: int = field(
        default=512, metadata={"help": "Longest prompt in tokens (chat template applied). Longer prompts follow "
                               "length_policy: error stops before any model loads, drop leaves them out, truncate "
                               "keeps their last max_prompt_length tokens."})
    max_new_tokens: int = field(default=48, metadata={"help": "Longest response sampled."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also used for log-probs)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    generation_engine: str = field(
        default="dynamic", metadata={"help": "How rollouts are sampled: dynamic (transformers' generate, growing KV "
                                     "cache), static (preallocated KV cache, compiled by transformers on GPUs) or "
                                     "paged (continuous batching; log-probs and values then come from a forward "
                                     "pass). benchmarks/generation_engines.py measures them.",
                                     "choices": ["dynamic", "static", "paged"]})
    sampling_dtype: str | None = field(
        default=None, metadata={"help": "Sample rollouts under autocast in this dtype (bfloat16) while the weights and "
                                "the update stay as they are: 0.55x the generation time of fp32 at 32M parameters "
                                "on a CPU with bf16 instructions. The rollout log-probs are then recomputed in the "
                                "training precision, so the update stays exactly on-policy for the samples drawn.",
                                "choices": ["bfloat16", "float16"]})
    logprobs_from_generation: bool | None = field(
        default=None,
        metadata={"help": "Take the rollout log-probs (and, with critic: shared, the values) from the logits and hidden "
                  "states that sampling computed, instead of a second forward pass of the policy. The two agree to "
                  "float rounding in fp32; in bf16 the KV-cached decode and a full forward differ more, and a "
                  "recomputed forward (false) keeps the first update exactly on-policy. null (default): true in "
                  "fp32, false with bf16/fp16, 16-bit weights (dtype), sampling_dtype or the paged engine."},
    )
    # Rewards
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward, the reward model first (when there is one), then each "
                                "of reward_funcs in order; the score is their weighted sum (a function's None counts "
                                "0). Default: 1.0 each."})
    kl_coef: float = field(default=0.05, metadata={"help": "Initial per-token KL penalty coefficient."})
    kl_estimator: str = field(default="k1", metadata={"help": "k1 (log ratio) or k3 (non-negative).", "choices": ["k1", "k3"]})
    target_kl: float | None = field(default=None, metadata={"help": "Adaptive KL: target KL per sequence (None = fixed)."})
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL horizon (samples)."})
    missing_eos_penalty: float | None = field(
        default=1.0,
        metadata={"help": "Subtracted from the score of each response that never emits EOS, as the last step of "
                  "scoring: after normalize_reward and after reward_clip, from the combined score (reward model and "
                  "reward_funcs, weighed). Its units are therefore those of that score: for the reward model, "
                  "reward-model standard deviations when normalize_reward is on (raw reward-model units when off). "
                  "Clipping never absorbs it: a truncated response scores between -(reward_clip + this) and "
                  "reward_clip - this. null = no penalty."},
    )
    reward_clip: float | None = field(default=5.0, metadata={"help": "Clip the combined score to ±this."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards (keeping their mean)."})
    # Advantages and losses
    gamma: float = field(default=1.0, metadata={"help": "Discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages over the global batch."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip around the rollout values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    # Output
    save_steps: int = field(default=10, metadata={"help": "Checkpoint every N iterations (0 = only at the end)."})
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the newest N checkpoints in <output_dir>/checkpoints (null = all)."})
    logging_steps: int = field(default=1, metadata={"help": "Log every N iterations."})
    eval_steps: int = field(
        default=0,
        metadata={"help": "With eval_data: every N iterations, and after the last, sample one response per held-out "
                  "prompt (max_eval_samples of them) with the rollout's sampling settings and log eval/score (the "
                  "reward model's score, or the weighted sum with reward_funcs, as score/combined), eval/kl (sequence "
                  "KL to the reference, as kl/sequence), eval/length and eval/eos_rate at that step. 0 = only after "
                  "the last. Under its own random state: training is the same with or without it."})
    save_merged: bool = field(default=True, metadata={"help": "Also write <output_dir>/merged."})
    seed: int = field(default=42, metadata={"help": "Seed for prompt order, sampling and initialisation."})
    ddp_timeout: int = field(default=1800, metadata={"help": "Seconds a process waits for the others in a collective "
                                                    "before the run ends, naming the rank that stopped answering."})
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={"help": "Trackers that get every metric of metrics.jsonl each iteration (tensorboard, wandb, ...; "
                  "all; or none), written under logging_dir."})

    def __post_init__(self):
        """Ranges and divisibility, checked before anything loads (the rewards themselves: in the trainer's main)."""
        super().__post_init__()
        positive_ints = ("steps", "rollout_batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs",
                         "max_new_tokens", "max_prompt_length", "kl_horizon", "ddp_timeout")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ppo: {name}: expected an integer >= 1, got {value!r}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"ppo: save_total_limit: expected an integer >= 1 (or null to keep all), got "
                              f"{self.save_total_limit!r}")
        if self.warmup_steps >= self.steps:
            raise ConfigError(f"ppo: warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if self.bf16 and self.fp16:
            raise ConfigError("ppo: bf16 and fp16 are both on; pick one")
        for name in ("save_steps", "logging_steps", "warmup_steps", "eval_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ppo: {name}: expected an integer >= 0 (0 = off), got {getattr(self, name)!r}")
        bounds = {"learning_rate": (0, None, "a number >= 0"), "weight_decay": (0, None, "a number >= 0"),
                  "max_grad_norm": (0, None, "a number > 0"), "temperature": (0, None, "a number > 0"),
                  "top_p": (0, 1, "a number in (0, 1]"), "kl_coef": (0, None, "a number >= 0"),
                  "gamma": (0, 1, "a number in [0, 1]"), "lam": (0, 1, "a number in [0, 1]"),
                  "cliprange": (0, None, "a number > 0"), "cliprange_value": (0, None, "a number > 0"),
                  "vf_coef": (0, None, "a number >= 0")}
        strict = {"max_grad_norm", "temperature", "top_p", "cliprange", "cliprange_value"}
        for name, (low, high, expected) in bounds.items():
            value = getattr(self, name)
            below = value <= low if name in strict else value < low
            if below or (high is not None and value > high):
                raise ConfigError(f"ppo: {name}: expected {expected}, got {value!r}")
        for name in ("target_kl", "reward_clip"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"ppo: {name}: expected a number > 0 (or null to turn it off), got {getattr(self, name)!r}")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ConfigError(f"ppo: rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                              f"mini_batch_size ({self.mini_batch_size})")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ConfigError(f"ppo: mini_batch_size ({self.mini_batch_size}) must be a multiple of "
                              f"gradient_accumulation_steps ({self.gradient_accumulation_steps}), so every "
                              "micro-batch holds the same number of rollouts")
        if self.reward_weights is not None and not all(
                isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
                for weight in self.reward_weights):
            raise ConfigError(f"ppo: reward_weights: expected a list of numbers, got {self.reward_weights!r}")
        if self.logprobs_from_generation and (self.sampling_dtype or self.generation_engine == "paged"):
            cause = (f"sampling_dtype {self.sampling_dtype}" if self.sampling_dtype
                     else "the paged engine, which hands back no per-step log-probs")
            raise ConfigError(f"ppo: logprobs_from_generation true cannot be kept with {cause}: the log-probs must "
                              "come from a forward pass in the training precision; leave logprobs_from_generation "
                              "unset (or false)")
        if self.critic == "shared" and self.layout != "shared":
            raise ConfigError("ppo: critic: shared puts the value head on the shared policy; use layout: shared")

    def resolve_precision(self, mixed_precision: str, device_type: str, sharded: bool, weights_dtype: str) -> None:
        """Once the accelerator is up: record the precision that runs (the flags, else the accelerate config's),
        refuse fp16 where it cannot run, and take the rollout log-probs from sampling only in fp32 (where they match
        a forward to float rounding), unless logprobs_from_generation says otherwise."""
        if mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"ppo: mixed_precision {mixed_precision!r} (from the accelerate config): PPO runs no, "
                              "bf16 or fp16")
        if mixed_precision == "fp16" and device_type == "cpu":
            raise ConfigError("ppo: fp16 is for GPUs (fp16 autocast on the CPU is slow and overflows easily); use "
                              "bf16, which PPO also runs on the CPU, or neither")
        if mixed_precision == "fp16" and sharded:
            raise ConfigError("ppo: fp16 with fsdp is not supported (the gradient scaler would see only this "
                              "process's shards); use bf16")
        self.bf16, self.fp16 = mixed_precision == "bf16", mixed_precision == "fp16"
        if self.logprobs_from_generation is None:
            self.logprobs_from_generation = (mixed_precision == "no" and weights_dtype == "float32"
                                             and not self.sampling_dtype and self.generation_engine != "paged")
