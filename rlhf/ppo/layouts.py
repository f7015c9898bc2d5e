"""The four roles PPO needs (policy, reference, value, reward) and two ways to hold them in memory.

shared (default): one frozen base model (the SFT policy) carries three LoRA adapters: `default` = policy
(trainable), `value` (trainable, + a linear value head) and `reward` (frozen, + the reward model's score head). The
reference is the same base with every adapter disabled. One copy of the weights, whatever the number of roles.

separate: four full models, as the original RLHF recipes hold them: policy (SFT copy + LoRA), reference (SFT copy),
value (reward-model copy + LoRA + head) and reward (reward-model copy). Kept so the two can be compared.

Without a reward model (PPO on reward functions only) neither layout loads one: no reward adapter or model, and
`scores` is never called (`has_reward_model` is False).

Both expose the same methods; the trainer never knows which one it has.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from rlhf.config import ConfigError, ModelArgs
from rlhf.manifest import Manifest
from rlhf.models import (
    CAUSAL_LM,
    load_stage_output,
    lora_config,
    lora_merged,
    read_adapter,
    split_head_weights,
)

POLICY, VALUE, REWARD_ADAPTER = "default", "value", "reward"
NO_REWARD_MODEL = "none (reward functions)"


def body_of(causal_lm) -> nn.Module:
    """The transformer without its LM head (LlamaModel inside LlamaForCausalLM): hidden states for the heads."""
    return causal_lm.base_model


def last_hidden(body, input_ids, attention_mask, position_ids) -> torch.Tensor:
    return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state


class Head(nn.Linear):
    """A one-output linear head that reads hidden states of any dtype: the value head trains in fp32 on a bf16 base."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden.to(self.weight.dtype))


def head_from_weights(weights: dict | None, hidden_size: int, dtype) -> Head:
    """A one-output linear head, from saved classifier weights or zero-initialised (a value of 0 everywhere)."""
    head = Head(hidden_size, 1, bias=False, dtype=dtype)
    with torch.no_grad():
        if weights:
            (weight,) = [tensor for key, tensor in weights.items() if key.endswith("weight")]
            head.weight.copy_(weight.to(dtype))
        else:
            head.weight.zero_()
    return head


def _role(name: str):
    def call(self, *args, **kwargs):
        return self(name, *args, **kwargs)

    call.__name__ = name
    return call


class Roles(nn.Module):
    """What both layouts share: each role is called through forward(), so hooks on the module's forward run around
    it (FSDP2 gathers the sharded parameters of the roles module there). A layout implements `_<role>`."""

    policy_logits = _role("policy_logits")
    reference_logits = _role("reference_logits")
    values = _role("values")
    policy_logits_and_values = _role("policy_logits_and_values")
    scores = _role("scores")
    autocast_dtype: torch.dtype | None = None  # mixed precision (use_mixed_precision); None: the weights' own dtype
    # sampling_dtype: the merged policy weights sampling reads are made in this dtype (generate() samples under
    # autocast to it), so decoding does not cast every weight again at every step
    sampling_dtype: torch.dtype | None = None

    def forward(self, role: str | None, *args, **kwargs):
        # role None runs nothing: a first forward through the root sets FSDP up before generation runs the blocks
        if not role:
            return None
        with self.autocast():
            return getattr(self, "_" + role)(*args, **kwargs)

    def use_mixed_precision(self, dtype: torch.dtype | None) -> None:
        """Run every role and generation under autocast to `dtype` (bf16/fp16); the trainable weights keep theirs."""
        self.autocast_dtype = dtype

    @torch.no_grad()
    def generate(self, **kwargs):
        with self.sampling() as policy:
            return policy.generate(**kwargs)

    @torch.no_grad()
    def generate_batch(self, *args, **kwargs):  # the paged generation engine
        with self.sampling() as policy:
            return policy.generate_batch(*args, **kwargs)

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(next(self.parameters()).device.type, dtype=self.autocast_dtype)

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every transformer block of the trained models (transformers' own checkpointing, non-reentrant,
        so the frozen inputs need no requires_grad hook). transformers checkpoints a block only in training mode;
        the roles stay in eval mode (dropout off), and only the blocks themselves are flagged as training, only
        inside `recomputing()` (the update). Rollouts and generation run outside it: no recompute, and the KV
        cache stays on (transformers 5.17 drops the cache of a block flagged as training, even without gradients)."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = []
        for model in self.trained_models():
            enable = getattr(model, "activation_checkpointing_enable", None)  # the name in recent transformers 5
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            blocks += [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
        self._checkpointed_blocks = blocks
        self.train(self.training)

    _checkpointed_blocks: list[nn.Module] = []  # a plain list: not registered as submodules

    def train(self, mode: bool = True):
        super().train(mode)
        for block in self._checkpointed_blocks:
            block.training = False  # the block only (its children keep `mode`): flagged in recomputing() alone
        return self

    @contextmanager
    def recomputing(self):
        """The update's forward passes: checkpointed blocks (if any) save only their inputs and run again in the
        backward pass."""
        for block in self._checkpointed_blocks:
            block.training = True
        try:
            yield
        finally:
            for block in self._checkpointed_blocks:
                block.training = False


class SharedBaseModels(Roles):
    layout = "shared"

    def __init__(self, policy_base, model_args: ModelArgs, reward: Manifest | None, value_init: str,
                 separate_reward=None, critic: str = "separate"):
        super().__init__()
        from peft import get_peft_model, set_peft_model_state_dict

        self.shared_critic = critic == "shared"
        if self.shared_critic and getattr(policy_base.config, "final_logit_softcapping", None):
            raise ConfigError("critic: shared applies the LM head itself and does not know this model's logit "
                              "soft-capping; use critic: separate")

        self.model = get_peft_model(policy_base, lora_config(model_args), adapter_name=POLICY)
        hidden_size, dtype = policy_base.config.hidden_size, policy_base.dtype
        self.reward_model = separate_reward
        self.has_reward_model = reward is not None
        if reward is None:  # reward functions only
            check_value_init(value_init, critic, reward)
        elif separate_reward is None:  # the reward model is an adapter + score head on this same base
            reward_config, reward_tensors = read_adapter(reward.path(reward.adapter_path))
            reward_lora, reward_head = split_head_weights(reward_tensors)
            reward_config.modules_to_save, reward_config.task_type, reward_config.inference_mode = None, "CAUSAL_LM", False
            self.model.add_adapter(REWARD_ADAPTER, reward_config)
            set_peft_model_state_dict(self.model, reward_lora, adapter_name=REWARD_ADAPTER)
            self.reward_head = head_from_weights(reward_head, hidden_size, dtype).requires_grad_(False)
        else:
            self.reward_model.requires_grad_(False).eval()
            if value_init == "reward" and not self.shared_critic:
                raise ConfigError(
                    "value_init: reward copies the reward model's adapter and head, but this reward model was trained "
                    "in full (no adapter on the policy's base). Use value_init: policy, or layout: separate."
                )
        # The value head trains, so it is fp32 (as peft keeps the adapters) whatever the base's dtype.
        if self.shared_critic:  # the value head reads the policy's own hidden states: no value adapter
            self.value_head = head_from_weights(None, hidden_size, torch.float32)
        elif value_init == "reward":
            self.model.add_adapter(VALUE, reward_config)
            set_peft_model_state_dict(self.model, reward_lora, adapter_name=VALUE)
            self.value_head = head_from_weights(reward_head, hidden_size, torch.float32)
        else:
            self.model.add_adapter(VALUE, lora_config(model_args))
            self.value_head = head_from_weights(None, hidden_size, torch.float32)
        self._active = None
        self._use(POLICY)

    @property
    def reward_placement(self) -> str:
        if self.reward_model is not None:
            return "separate model (trained in full)"
        return "adapter on the shared base" if self.has_reward_model else NO_REWARD_MODEL

    def _use(self, adapter: str) -> None:
        # Every method that runs an adapter names it here; switching only when it changes saves peft's walk over
        # every module (a measurable share of a CPU step). set_adapter freezes the other adapters; policy and value
        # both train, so turn them back on.
        if adapter == self._active:
            return
        self._active = adapter
        self.model.set_adapter(adapter)
        for parameter in self.policy_parameters() + self.value_parameters():
            parameter.requires_grad_(True)

    def policy_parameters(self):
        return [p for n, p in self.model.named_parameters() if f".{POLICY}." in n]

    def value_parameters(self):
        return [p for n, p in self.model.named_parameters() if f".{VALUE}." in n] + list(self.value_head.parameters())

    def _policy_logits(self, input_ids, attention_mask, position_ids, keep: int = 0):
        self._use(POLICY)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                          logits_to_keep=keep).logits

    @torch.no_grad()
    def _reference_logits(self, input_ids, attention_mask, position_ids, keep: int = 0):
        try:
            with self.model.disable_adapter():
                return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False, logits_to_keep=keep).logits
        finally:
            self._active = None  # re-enabling leaves only the active adapter trainable: the next _use restores both

    def _values(self, input_ids, attention_mask, position_ids):
        if self.shared_critic:
            return self._policy_logits_and_values(input_ids, attention_mask, position_ids, keep=1)[1]
        self._use(VALUE)
        hidden = last_hidden(body_of(self.model.get_base_model()), input_ids, attention_mask, position_ids)
        return self.value_head(hidden).squeeze(-1)

    def _policy_logits_and_values(self, input_ids, attention_mask, position_ids, keep: int):
        """Shared critic: one pass of the policy gives the logits of the last `keep` positions and every value."""
        self._use(POLICY)
        hidden = last_hidden(body_of(self.model.get_base_model()), input_ids, attention_mask, position_ids)
        logits = self.model.get_base_model().get_output_embeddings()(hidden[:, -keep:])
        return logits, self.value_head(hidden).squeeze(-1)

    @torch.no_grad()
    def _scores(self, input_ids, attention_mask):
        """Reward at the last real token of each sequence, left- or right-padded."""
        if self.reward_model is not None:
            return self.reward_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()
        self._use(REWARD_ADAPTER)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        hidden = last_hidden(body_of(self.model.get_base_model()), input_ids, attention_mask, position_ids)
        # The column of the last 1 in the mask; mask.sum - 1 would land on padding when it is on the left.
        columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (columns * attention_mask.long()).argmax(1)
        return self.reward_head(hidden[torch.arange(len(last)), last]).squeeze(-1).float()

    def trained_models(self):
        return [self.model.get_base_model()]

    @contextmanager
    def sampling(self):
        """The policy as sampling uses it (its LoRA merged); generate and generate_batch run inside."""
        self._use(POLICY)
        try:
            with lora_merged(self.model, POLICY, self.sampling_dtype), self.autocast():
                yield self.model
        finally:
            self._active = None  # lora_merged disables the adapters around generation; see reference_logits

    def get_output_embeddings(self):
        return self.model.get_base_model().get_output_embeddings()

    def policy_for_saving(self):
        return self.model  # save_pretrained(selected_adapters=[POLICY]) writes a plain adapter folder

    @property
    def generation_config(self):
        return self.model.generation_config


class SeparateModels(Roles):
    layout = "separate"
    shared_critic = False

    def __init__(self, policy_base, reference, reward_model, model_args: ModelArgs, value_init: str, value_body):
        super().__init__()
        from peft import get_peft_model

        self.policy = get_peft_model(policy_base, lora_config(model_args))
        self.reference = reference.requires_grad_(False).eval()
        self.has_reward_model = reward_model is not None
        if reward_model is None:
            check_value_init(value_init, "separate", None)
        self.reward_model = reward_model.requires_grad_(False).eval() if reward_model is not None else None
        self.value_model = get_peft_model(value_body, lora_config(model_args))
        score = reward_model.score.weight.detach().clone() if value_init == "reward" else None
        # The head reads the value body's hidden states: a reward model's copy may be wider than the policy.
        self.value_head = head_from_weights({"weight": score} if score is not None else None,
                                            value_body.config.hidden_size, torch.float32)

    @property
    def reward_placement(self) -> str:
        return "separate model" if self.has_reward_model else NO_REWARD_MODEL

    def policy_parameters(self):
        return [p for p in self.policy.parameters() if p.requires_grad]

    def value_parameters(self):
        return [p for p in self.value_model.parameters() if p.requires_grad] + list(self.value_head.parameters())

    def _policy_logits(self, input_ids, attention_mask, position_ids, keep: int = 0):
        return self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                           logits_to_keep=keep).logits

    @torch.no_grad()
    def _reference_logits(self, input_ids, attention_mask, position_ids, keep: int = 0):
        return self.reference(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, logits_to_keep=keep).logits

    def _values(self, input_ids, attention_mask, position_ids):
        hidden = last_hidden(body_of(self.value_model.get_base_model()), input_ids, attention_mask, position_ids)
        return self.value_head(hidden).squeeze(-1)

    @torch.no_grad()
    def _scores(self, input_ids, attention_mask):
        return self.reward_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()

    def trained_models(self):
        return [self.policy.get_base_model(), self.value_model.get_base_model()]

    @contextmanager
    def sampling(self):
        with lora_merged(self.policy, "default", self.sampling_dtype), self.autocast():
            yield self.policy

    def get_output_embeddings(self):
        return self.policy.get_base_model().get_output_embeddings()

    def policy_for_saving(self):
        return self.policy

    @property
    def generation_config(self):
        return self.policy.generation_config


def check_value_init(value_init: str, critic: str, reward: Manifest | None) -> None:
    """value_init: reward copies the reward model; without one there is nothing to copy."""
    if reward is None and value_init == "reward" and critic != "shared":
        raise ConfigError("value_init: reward initialises the value model from the reward model, but this run has "
                          "none (reward_funcs only); use value_init: policy")


def check_value_tokenizer(layout: str, value_init: str, tokenizer, reward_tokenizer) -> None:
    """layout: separate with value_init: reward makes the value model a copy of the reward model, and it reads the
    policy's token ids: refused unless the reward model's tokenizer gives every token the policy's id. (In the shared
    layout a reward adapter sits on the policy's own base.)"""
    if layout != "separate" or value_init != "reward" or reward_tokenizer is None:
        return
    if tokenizer.get_vocab() != reward_tokenizer.get_vocab():
        raise ConfigError(f"value_init: reward copies the reward model into the value model, which reads the policy's "
                          f"token ids, but the reward model's tokenizer ({len(reward_tokenizer)} tokens) is not the "
                          f"policy's ({len(tokenizer)} tokens), so an id may name another token in it. Use "
                          "value_init: policy")


def build_models(layout: str, policy_parent: Manifest, reward: Manifest | None, model_args: ModelArgs,
                 value_init: str, critic: str = "separate"):
    """Load the roles for the chosen layout. In the shared layout a LoRA reward model must sit on the same base as
    the policy (trained from the same SFT stage), since its adapter is applied to that base; a reward model trained in
    full is held as its own model beside the shared base. reward None: no reward model (reward functions only)."""
    from rlhf.models import REWARD

    check_value_init(value_init, critic, reward)  # before any model loads
    policy_base = load_stage_output(policy_parent, model_args, CAUSAL_LM)
    if layout == "shared" and reward is None:
        return SharedBaseModels(policy_base, model_args, None, value_init, critic=critic)
    if layout == "shared":
        if not reward.adapter_path:  # trained in full: it cannot ride on the policy's base
            return SharedBaseModels(policy_base, model_args, reward, value_init, load_stage_output(reward, model_args, REWARD),
                                    critic)
        if reward.parent is None or Path(reward.parent).resolve() != Path(policy_parent.output_dir).resolve():
            raise ConfigError(
                f"layout 'shared' applies the reward adapter to the policy's base, so the reward model must be trained "
                f"from the same stage as the policy ({policy_parent.output_dir}); {reward.output_dir} was trained from "
                f"{reward.parent}. Use layout: separate."
            )
        return SharedBaseModels(policy_base, model_args, reward, value_init, critic=critic)
    if critic == "shared":
        raise ConfigError("critic: shared puts the value head on the shared base's policy adapter; use layout: shared "
                          "(or critic: separate)")
    reference = load_stage_output(policy_parent, model_args, CAUSAL_LM)
    reward_model = load_stage_output(reward, model_args, REWARD) if reward is not None else None
    value_body = load_stage_output(reward if value_init == "reward" else policy_parent, model_args, CAUSAL_LM)
    return SeparateModels(policy_base, reference, reward_model, model_args, value_init, value_body)

