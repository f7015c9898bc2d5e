"""Sampling: left padding, cutting responses after the first stop token, and the log-probs sampling hands back."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO
from rlhf.generation import generate, pad_batch, truncate_after_stop

PAD, EOS = 0, 9


def test_pad_batch_left_and_right():
    ids, mask = pad_batch([[5, 6, 7], [8]], PAD, side="left")
    assert ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], PAD, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_truncate_keeps_first_eos_and_masks_the_rest():
    responses = torch.tensor([
        [4, EOS, 5, EOS],  # stops at position 1; later tokens are junk
        [4, 5, 6, 7],  # never stops
        [EOS, 3, 3, 3],  # stops immediately
    ])
    ids, mask, ended = truncate_after_stop(responses, [EOS], PAD)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ids.tolist() == [[4, EOS, PAD, PAD], [4, 5, 6, 7], [EOS, PAD, PAD, PAD]]
    assert ended.tolist() == [True, False, True]


def test_any_of_several_stop_tokens_ends_a_response():
    ids, mask, ended = truncate_after_stop(torch.tensor([[4, 8, 5]]), [EOS, 8], PAD)
    assert mask.tolist() == [[1, 1, 0]]
    assert ended.tolist() == [True]


class NumberTokenizer:
    """What generate() needs of a tokenizer, for a random model whose vocabulary no real tokenizer matches."""

    pad_token_id, eos_token_id = PAD, EOS

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in ids.tolist()]


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_logprobs_equal_a_full_forward(temperature, top_p):
    # A small vocabulary, so that some responses stop at EOS and the masking after it is exercised too.
    model = tiny_llama(vocab=24)
    prompts = [[3, 4, 5, 6], [7], [8, 3], [5, 5, 5], [6, 2, 4], [4]]
    torch.manual_seed(0)
    sample = generate(model, NumberTokenizer(), prompts, max_new_tokens=20, temperature=temperature, top_p=top_p,
                      return_logprobs=True)
    assert sample.ended.any() and not sample.ended.all()
    assert sample.logprobs.shape == sample.response_ids.shape

    ids = torch.cat([sample.prompt_ids, sample.response_ids], dim=1)
    mask = torch.cat([sample.prompt_mask, sample.response_mask], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    # The distribution PPO scores: all of it at the sampling temperature, not the top-p truncation sampling drew from.
    scaled = logits[:, sample.prompt_ids.shape[1] - 1 : -1] / temperature
    expected = torch.log_softmax(scaled, dim=-1).gather(2, sample.response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(sample.logprobs, expected * sample.response_mask, atol=1e-5, rtol=1e-5)
    assert (sample.logprobs[sample.response_mask == 0] == 0).all()


@pytest.mark.parametrize("engine", ["dynamic", "static", "paged"])
def test_sampling_ignores_the_settings_a_checkpoint_ships(engine):
    # Checkpoints ship sampling defaults in generation_config.json (repetition_penalty, top_k, ...). generate() would
    # apply them, and the log-probs PPO scores (of the model's raw logits) would belong to another distribution.
    model = tiny_llama(vocab=24)
    prompts = [[3, 4, 5, 6], [7], [8, 3], [5, 5, 5], [6, 2, 4], [4]]
    plain = generate(model, NumberTokenizer(), prompts, max_new_tokens=12, do_sample=False, engine=engine)
    shipped = model.generation_config
    shipped.update(repetition_penalty=5.0, no_repeat_ngram_size=1, min_new_tokens=12, top_k=1)
    sample = generate(model, NumberTokenizer(), prompts, max_new_tokens=12, do_sample=False, engine=engine)
    assert sample.texts == plain.texts and sample.ended.tolist() == plain.ended.tolist()
    assert plain.ended.any()  # min_new_tokens, had it applied, would have kept every response from ending
    assert model.generation_config is shipped and shipped.repetition_penalty == 5.0  # given back as it was
    # Each greedy token is the argmax of the raw logits: what the returned log-probs are computed from.
    ids = torch.cat([sample.prompt_ids, sample.response_ids], dim=1)
    mask = torch.cat([sample.prompt_mask, sample.response_mask], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    argmax = logits[:, sample.prompt_ids.shape[1] - 1 : -1].argmax(-1)
    real = sample.response_mask == 1
    assert (argmax[real] == sample.response_ids[real]).all()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak resident set is read from Linux /proc")
def test_rollout_memory_grows_with_batch_and_steps_not_with_the_vocabulary():
    batch, steps, vocabs = 4, 256, (1000, 50000)
    # A fresh process (the benchmark, run small), so the resident set it measures holds nothing of other tests.
    command = [sys.executable, str(REPO / "benchmarks" / "rollout_memory.py"), "--json", "--batch", str(batch),
               "--steps", str(steps), "--vocab", *map(str, vocabs)]
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    small, large = json.loads(run.stdout.strip().splitlines()[-1])
    for row in small, large:
        assert row["steps"] == steps and row["logprobs_shape"] == [batch, steps]
    # The measurement sees logits kept for every step: the former way holds (batch, steps, vocab) at least once.
    assert large["full_logits_peak_growth_bytes"] >= large["full_logits_bytes"] == batch * steps * vocabs[1] * 4
    # Per-step log-probs: 49,000 more tokens in the vocabulary cost at most a tenth of one such tensor
    # (what remains is one step's logits at a time, 0.8 MB here).
    kept_logits_difference = batch * steps * (vocabs[1] - vocabs[0]) * 4
    assert large["peak_growth_bytes"] - small["peak_growth_bytes"] < kept_logits_difference / 10


def test_engines_agree_on_greedy_responses():
    # Greedy decoding takes no random draws, so every engine must produce the same tokens (paged attention packs
    # the batch differently, so only to float rounding of the logits; none of these prompts sits on a tie).
    model = tiny_llama(vocab=24)
    prompts = [[3, 4, 5, 6], [7], [8, 3], [5, 5, 5], [6, 2, 4], [4]]
    samples = {engine: generate(model, NumberTokenizer(), prompts, max_new_tokens=12, do_sample=False, engine=engine)
               for engine in ("dynamic", "static", "paged")}
    reference = samples["dynamic"]
    assert reference.ended.any() and not reference.ended.all()
    for engine, sample in samples.items():
        assert sample.texts == reference.texts, engine
        assert sample.response_mask.tolist() == reference.response_mask.tolist(), engine
        assert sample.ended.tolist() == reference.ended.tolist(), engine


def test_low_precision_sampling_keeps_the_weights_and_hands_back_close_logprobs():
    model = tiny_llama(vocab=24)
    prompts = [[3, 4, 5, 6], [7], [8, 3], [5, 5, 5]]
    torch.manual_seed(0)
    full = generate(model, NumberTokenizer(), prompts, max_new_tokens=8, do_sample=False, return_logprobs=True)
    torch.manual_seed(0)
    low = generate(model, NumberTokenizer(), prompts, max_new_tokens=8, do_sample=False, return_logprobs=True,
                   sampling_dtype=torch.bfloat16)
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert low.logprobs.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: log-probs agree to about 1e-2, not to float32 rounding. Compared where both
    # greedy paths are still the same tokens.
    same_so_far = (low.response_ids == full.response_ids).int().cumprod(dim=1).bool()
    together = same_so_far & (low.response_mask * full.response_mask).bool()
    assert together.sum() > 10
    difference = (low.logprobs - full.logprobs)[together].abs()
    assert 0 < difference.mean() < 0.03 and difference.max() < 0.5


def test_paged_engine_refuses_what_it_cannot_hand_back():
    with pytest.raises(ValueError, match="paged generation engine cannot return per-step log-probs"):
        generate(tiny_llama(vocab=24), NumberTokenizer(), [[3, 4]], max_new_tokens=4, engine="paged",
                 return_logprobs=True)
    with pytest.raises(ValueError, match="expected one of dynamic, static, paged"):
        generate(tiny_llama(vocab=24), NumberTokenizer(), [[3, 4]], max_new_tokens=4, engine="vllm")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the peak resident set is read from Linux /proc")
def test_paged_cache_is_sized_to_the_batch_not_to_free_memory():
    # Left to itself, transformers sizes the paged cache to 90% of free memory: 11 GB of RAM for this model on the
    # CPU (all of a GPU that PPO's training still needs). A fresh process, so its peak holds nothing of other tests.
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from test_generation import NumberTokenizer, tiny_llama\n"
        "from rlhf.generation import generate\n"
        "from rlhf.processes import resident_mib\n"
        "model, prompts = tiny_llama(vocab=24), [[3, 4, 5, 6], [7], [8, 3], [5, 5, 5]]\n"
        "generate(model, NumberTokenizer(), prompts, max_new_tokens=16)\n"
        "before = resident_mib()[1]\n"
        "sample = generate(model, NumberTokenizer(), prompts, max_new_tokens=16, engine='paged')\n"
        "print(len(sample.texts), resident_mib()[1] - before)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    responses, growth_mib = run.stdout.split()[-2:]
    assert int(responses) == 4 and float(growth_mib) < 200
