"""Benchmark: the memory sampling holds while it gathers a rollout's log-probs, at two vocabulary sizes.

Samples from random tiny Llamas (hidden 32, 2 layers) that differ only in their vocabulary, and measures how far the
process's resident set grows while sampling runs: its peak (VmHWM, reset through /proc/self/clear_refs just before)
minus the resident set before. Two ways of getting the log-prob of every sampled token:

- per-step log-probs: `generate(return_logprobs=True)`, which reduces each step to the sampled token's log-prob
  while decoding goes and keeps (batch, steps) floats;
- full logits: what `generate(return_logits=True)` did before, transformers' `output_logits` stacked into
  (batch, steps, vocab). At 49,152 tokens, 64 prompts x 512 new tokens that is 6.4 GB in fp32.

glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so that freed tensors go back to the system at once and the
resident set follows the live tensors, not malloc's heap. Linux only. tests/test_generation.py runs it small.

    python benchmarks/rollout_memory.py [--vocab 1000 49152] [--batch 8] [--steps 256] [--json] [--no-full-logits]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MMAP_THRESHOLD = "65536"


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_growth(run):
    """(peak resident set during run() minus the resident set before, run's result)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = status_bytes("VmRSS")
    result = run()
    return status_bytes("VmHWM") - before, result


class NumberTokenizer:
    """What generate() needs of a tokenizer, for models whose vocabulary no real tokenizer matches."""

    pad_token_id, eos_token_id = 0, 1

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in ids.tolist()]


def tiny_llama(vocab: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(config).eval()


def prompts(batch: int) -> list[list[int]]:
    # Different lengths, so sampling runs with left padding as rollouts do.
    return [[3 + row % 5] * (2 + row % 3) for row in range(batch)]


def measure(vocab: int, batch: int, steps: int, full_logits: bool) -> dict:
    import torch

    from rlhf.generation import generate, pad_batch

    model, tokenizer = tiny_llama(vocab), NumberTokenizer()
    generate(model, tokenizer, prompts(batch), max_new_tokens=2, return_logprobs=True)  # first-call allocations
    torch.manual_seed(0)
    grown, sample = peak_growth(lambda: generate(model, tokenizer, prompts(batch), max_new_tokens=steps,
                                                 return_logprobs=True))
    result = {"vocab": vocab, "batch": batch, "steps": sample.response_ids.shape[1],
              "logprobs_shape": list(sample.logprobs.shape), "logprobs_bytes": sample.logprobs.nbytes,
              "peak_growth_bytes": grown}
    del sample
    if full_logits:
        ids, mask = pad_batch(prompts(batch), tokenizer.pad_token_id, side="left")

        def keep_every_step():  # the former generate(return_logits=True)
            output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=True, top_k=0,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                    return_dict_in_generate=True, output_logits=True)
            return torch.stack(output.logits, dim=1)

        torch.manual_seed(0)
        grown, logits = peak_growth(keep_every_step)
        result.update(full_logits_bytes=logits.nbytes, full_logits_peak_growth_bytes=grown)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[1000, 49152])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--no-full-logits", dest="full_logits", action="store_false",
                        help="Measure only the per-step log-probs, not the former full-logits way.")
    parser.add_argument("--json", action="store_true", help="Print the figures as one JSON line; write no results.")
    args = parser.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        # glibc reads it at start-up only: run again with it set.
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(1)  # figures about memory; one thread keeps per-thread scratch out of them
    rows = [measure(vocab, args.batch, args.steps, args.full_logits) for vocab in args.vocab]
    if args.json:
        print(json.dumps(rows))
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import print_table, write_result

    mib = 1 / 2**20
    headers = ["vocab", "batch x steps", "log-probs kept MiB", "peak growth MiB"]
    if args.full_logits:
        headers += ["full logits kept MiB", "peak growth MiB (full logits)"]
    table = []
    for row in rows:
        line = [row["vocab"], f"{row['batch']} x {row['steps']}", row["logprobs_bytes"] * mib,
                row["peak_growth_bytes"] * mib]
        if args.full_logits:
            line += [row["full_logits_bytes"] * mib, row["full_logits_peak_growth_bytes"] * mib]
        table.append(line)
    print_table(headers, table)
    print(f"written to {write_result('rollout_memory', {'rows': rows})}")


if __name__ == "__main__":
    main()
