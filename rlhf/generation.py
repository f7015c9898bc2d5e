"""Batched sampling from a causal LM: left-padded prompts, KV cache, responses cut after the first EOS.

Shared by the gold-reward checks of every stage, policy evaluation and PPO rollouts. Engines (measured in
benchmarks/generation_engines.py):
- dynamic: transformers' generate with a growing KV cache. The default: on this CPU no other engine was faster
  once its start-up is counted.
- static: generate with a preallocated KV cache, which transformers compiles with torch.compile on GPUs.
- paged: transformers' continuous batching (generate_batch, paged attention): finished sequences leave the batch.
  1.7x slower than dynamic on CPU; meant for GPUs. It cannot hand back per-step log-probs or head outputs.
`sampling_dtype` (e.g. bfloat16) samples under autocast in that dtype while the weights stay as they are: on a CPU
with bf16 instructions 0.6x the time of fp32 at 32M parameters. Its log-probs are the low-precision model's, so a
PPO rollout recomputes them in the training dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

ENGINES = ("dynamic", "static", "paged")


@dataclass
class Generation:
    prompt_ids: torch.Tensor  # (batch, prompt_len), left-padded
    prompt_mask: torch.Tensor  # (batch, prompt_len)
    response_ids: torch.Tensor  # (batch, response_len), pad after the first EOS
    response_mask: torch.Tensor  # (batch, response_len), 1 up to and including the first EOS
    ended: torch.Tensor  # (batch,) bool: the response stopped with EOS inside max_new_tokens
    texts: list[str]  # decoded responses without special tokens
    # With return_logprobs: log softmax(logits / temperature) at each response token, 0 where masked
    # (batch, response_len).
    logprobs: torch.Tensor | None = None
    # With step_head: step_head(last hidden state) at the position before each response token (batch, response_len).
    head_outputs: torch.Tensor | None = None


def encode_prompts(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    """Render conversational prompts with the chat template, ready for the assistant's turn."""
    encoded = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        encoded.append(list(ids))
    return encoded


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into (ids, attention mask); left padding for generation, right for scoring/training."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        columns = slice(width - len(sequence), width) if side == "left" else slice(0, len(sequence))
        ids[row, columns] = torch.tensor(sequence, dtype=torch.long)
        mask[row, columns] = 1
    return ids, mask


def stop_token_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(ids)


def truncate_after_stop(response_ids: torch.Tensor, stop_ids: list[int], pad_id: int):
    """Mask everything after the first stop token; return (ids with pad after stop, mask, ended)."""
    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, device=response_ids.device))
    ended = is_stop.any(dim=1)
    # Index of the first stop token, or the full length when there is none.
    first_stop = torch.where(ended, is_stop.int().argmax(dim=1), torch.full_like(ended, response_ids.shape[1], dtype=torch.long))
    positions = torch.arange(response_ids.shape[1], device=response_ids.device).unsqueeze(0)
    mask = (positions <= first_stop.unsqueeze(1)).long()
    return response_ids.masked_fill(mask == 0, pad_id), mask, ended


class _SampledLogprobs(StoppingCriteria):
    """Reduces each step's logits to the log-prob of the token drawn from them while decoding goes, so a rollout keeps
    (batch, steps) floats rather than (batch, steps, vocab): 6.4 GB at 64 prompts x 512 tokens x 49k vocab in fp32.

    `record` sees the LM head's raw output (before any logits processor, like a training forward); the token is only
    known once generate() has appended it, which is when stopping criteria run, so the step's logits wait until then."""

    def __init__(self, temperature: float, softcap: float | None = None):
        self.temperature, self.softcap = temperature, softcap
        self.pending = None  # (batch, vocab) of the step being sampled; one step's worth at most
        self.steps = []

    def record(self, logits: torch.Tensor) -> None:
        logits = logits[:, -1:].float()
        if self.softcap:  # Gemma-style models cap their logits after the LM head; the model's forward does too
            logits = torch.tanh(logits / self.softcap) * self.softcap
        self.pending = logits / self.temperature

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        if self.pending is not None:
            self.steps.append(token_logprobs(self.pending, input_ids[:, -1:])[:, 0])
            self.pending = None
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    return_logprobs: bool = False,
    step_head=None,
    synced_gpus: bool = False,
    engine: str = "dynamic",
    sampling_dtype: torch.dtype | None = None,
) -> Generation:
    """Sample responses. PPO asks for what decoding computes anyway, so it need not run the policy again: the
    log-prob of each sampled token at `temperature` (return_logprobs; of the untruncated distribution, as the PPO
    update scores it, even with top_p < 1) and a head over the last hidden state of every step (step_head: a value
    head), both read at the LM head, which decoding calls once per new token. synced_gpus keeps this process
    running forward passes until every process has finished (for a model sharded block by block); the steps past
    its own end are dropped. `engine` and `sampling_dtype`: see the module's docstring."""
    if engine not in ENGINES:
        raise ValueError(f"generation engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "paged" and (return_logprobs or step_head is not None or synced_gpus):
        raise ValueError("the paged generation engine cannot return per-step log-probs or value-head outputs, nor "
                         "keep sharded processes in step; use the dynamic or static engine")
    device = next(model.parameters()).device
    ids, mask = pad_batch(prompt_ids, tokenizer.pad_token_id, side="left")
    ids, mask = ids.to(device), mask.to(device)
    stops = stop_token_ids(tokenizer, model)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
    low_precision = (torch.autocast(device.type, dtype=sampling_dtype) if sampling_dtype is not None
                     else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    if engine == "paged":
        try:
            with low_precision, _only_these_settings(model):
                response_ids = _generate_paged(model, prompt_ids, max_new_tokens, stops, tokenizer.pad_token_id,
                                               sampling).to(device)
        finally:
            model.train(was_training)
        return _finish(tokenizer, ids, mask, response_ids, stops)
    head_outputs = []
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    logprobs = _SampledLogprobs(temperature, softcap) if return_logprobs else None

    def at_lm_head(module, inputs, output):
        # generate() keeps only the last position for the LM head (prefill included): one call per step.
        if step_head is not None:
            head_outputs.append(step_head(inputs[0][:, -1]).squeeze(-1).float())
        if logprobs is not None:
            logprobs.record(output)

    hooks = []
    if return_logprobs or step_head is not None:
        hooks.append(model.get_output_embeddings().register_forward_hook(at_lm_head))
    if engine == "static" and sampling_dtype is not None:
        # Under autocast over fp32 weights the residual stream stays fp32, so the keys (rotated with fp32 cos/sin)
        # come out fp32 and the values in sampling_dtype; transformers <= 5.17 sizes the static cache from the keys
        # and then cannot store the values. Starting the stream in sampling_dtype gives both the same dtype.
        hooks.append(model.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: output.to(sampling_dtype)))
    try:
        with low_precision, _only_these_settings(model):
            output = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                return_dict_in_generate=True,
                stopping_criteria=StoppingCriteriaList([logprobs]) if logprobs is not None else None,
                synced_gpus=synced_gpus,
                # static: transformers compiles the decoding step with torch.compile on GPUs (not on CPU, where the
                # compile costs more than it saves); dynamic never compiles.
                **({"cache_implementation": "static"} if engine == "static" else {"disable_compile": True}),
                **sampling,
            )
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    sample = _finish(tokenizer, ids, mask, output.sequences[:, ids.shape[1]:], stops)
    steps = sample.response_ids.shape[1]
    if return_logprobs:
        sample.logprobs = torch.stack(logprobs.steps[:steps], dim=1) * sample.response_mask
    if step_head is not None:
        sample.head_outputs = torch.stack(head_outputs[:steps], dim=1)
    return sample


@contextlib.contextmanager
def _only_these_settings(model):
    """Sample with the settings given here and nothing else. generate() fills every setting left unset from the
    model's own generation_config, and checkpoints ship sampling defaults there (repetition_penalty, top_k, min_p,
    no_repeat_ngram_size, ...): they would change the distribution the responses are drawn from but not the one
    their log-probs are computed from (PPO's ratio and KL), and the paged engine would ignore them."""
    # Every model inside (a peft wrapper's base, PPO's roles) that holds one, whichever generate() reads.
    holders = [module for module in model.modules() if isinstance(vars(module).get("generation_config"),
                                                                   GenerationConfig)]
    shipped = [holder.generation_config for holder in holders]
    for holder in holders:
        holder.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for holder, config in zip(holders, shipped):
            holder.generation_config = config


def _finish(tokenizer, prompt_ids, prompt_mask, response_ids, stops) -> Generation:
    response_ids, response_mask, ended = truncate_after_stop(response_ids, stops, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    return Generation(prompt_ids, prompt_mask, response_ids, response_mask, ended, texts)


def _generate_paged(model, prompt_ids: list[list[int]], max_new_tokens: int, stops: list[int], pad_id: int,
                    sampling: dict) -> torch.Tensor:
    """Continuous batching (transformers' generate_batch): (batch, longest response) token ids, right-padded.

    The paged cache is sized to this batch. Left to itself it takes 90% of the free memory (all of a GPU that
    training still needs; gigabytes of RAM on a CPU, where building that cache and its attention masks made a tiny
    model's batch take 5 s instead of 0.6 s)."""
    from transformers import ContinuousBatchingConfig

    defaults = ContinuousBatchingConfig()
    page_size = getattr(defaults, "page_size", None) or defaults.block_size  # block_size in transformers <= 5.17
    blocks = sum(-(-(len(prompt) + max_new_tokens) // page_size) for prompt in prompt_ids)  # whole pages per request
    # Every prompt's prefill fits one forward (at most transformers' own default of 8192 tokens).
    batch_tokens = min(max(sum(len(prompt) for prompt in prompt_ids), len(prompt_ids)), 8192)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_id, **sampling)
    outputs = model.generate_batch(prompt_ids, generation_config=config, progress_bar=False,
                                   continuous_batching_config=ContinuousBatchingConfig(
                                       num_blocks=blocks, max_batch_tokens=batch_tokens))
    # generate_batch hands results back in the order of the inputs.
    responses = [output.generated_tokens[:max_new_tokens] for output in outputs.values()]
    if len(responses) != len(prompt_ids) or any(output.error for output in outputs.values()):
        errors = [output.error for output in outputs.values() if output.error]
        raise RuntimeError(f"paged generation returned {len(responses)} of {len(prompt_ids)} responses"
                           + (f": {errors[0]}" if errors else ""))
    return pad_batch([response or [pad_id] for response in responses], pad_id, side="right")[0]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() uses, so scoring a sampled sequence sees the same positions."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] without materialising the full log-softmax (large vocabularies)."""
    picked = torch.gather(logits, 2, token_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature: float = 1.0,
                      return_logits: bool = False):
    """Per-token log-probs of each response given its prompt, at the sampling temperature; 0 where masked.

    Dividing the logits by the same temperature used for sampling makes these the log-probs of the distribution
    the responses were actually drawn from (a PPO ratio against anything else is biased)."""
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    output = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    # The logit at position t predicts token t+1: responses are predicted from the last prompt column on.
    logits = output.logits[:, prompt_ids.shape[1] - 1 : -1].float() / temperature
    logprobs = token_logprobs(logits, response_ids) * response_mask
    return (logprobs, logits) if return_logits else logprobs
