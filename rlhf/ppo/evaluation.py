"""PPO's periodic evaluation on held-out prompts (eval_data): one sampled response per prompt, scored as a rollout is.

Every eval_steps iterations and after the last, the live policy answers every held-out prompt with the rollout's
sampling settings (temperature, top_p, max_new_tokens), so eval/kl is the same quantity as the training kl/sequence,
measured on prompts it never trains on. The rollout code (rollout.collect) samples and scores them: the reward model
and reward functions, weighed as in training. Sampling runs under its own random state, seeded the same at every
evaluation (each evaluation draws the same random numbers, so successive points differ by the policy, not the
draw), and training continues with exactly the random state it had: a run trains the same with or without it.

With several processes each samples its share of the prompts; the means are reduced over all of them. Every process
holds the same number of prompts (the last shares are padded with repeats that count for nothing), so each runs the
same forward passes: sharded models (fsdp) gather their blocks in step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from rlhf.evaluate.devices import devices_to_fork
from rlhf.ppo.config import PPOArgs
from rlhf.ppo.distributed import Distributed
from rlhf.ppo.rollout import collect

EVAL_SEED_OFFSET = 7_919  # keeps the evaluation's random numbers apart from every training step's


@dataclass
class HeldOutPrompts:
    prompts: list[list[dict]]
    prompt_ids: list[list[int]]
    columns: dict[str, list]  # the records' other columns, for reward functions
    eval_steps: int
    total_steps: int

    def due(self, step: int) -> bool:
        return step == self.total_steps or bool(self.eval_steps and step % self.eval_steps == 0)

    def share(self, rank: int, world: int) -> tuple[list[int], torch.Tensor]:
        """This process's prompt indices and their weights (0 for the padding repeats)."""
        per_process = math.ceil(len(self.prompts) / world)
        positions = range(rank * per_process, (rank + 1) * per_process)
        return ([position % len(self.prompts) for position in positions],
                torch.tensor([float(position < len(self.prompts)) for position in positions]))

    @torch.no_grad()
    def evaluate(self, models, tokenizer, reward_tokenizer, args: PPOArgs, reward_stats, distributed: Distributed,
                 reward_functions=(), reward_weights=None) -> dict[str, float]:
        """eval/score (the weighted reward before clipping and the missing-EOS penalty, as score/combined), eval/
        score_raw (the reward model's own score, with a reward model), eval/kl, eval/length, eval/eos_rate and
        time/eval, each a mean over every held-out prompt."""
        started = time.perf_counter()
        accelerator = distributed.accelerator
        rows, weights = self.share(accelerator.process_index, distributed.world)
        device = accelerator.device
        names = ["eval/score"] + (["eval/score_raw"] if models.has_reward_model else []) + [
            "eval/kl", "eval/length", "eval/eos_rate"]
        totals = torch.zeros(len(names) + 1, dtype=torch.float64)
        # Fork the GPU's generator too (the one sampling draws from there), not only the CPU's.
        with torch.random.fork_rng(devices=devices_to_fork(device)):
            torch.manual_seed(args.seed * 100_003 + EVAL_SEED_OFFSET + accelerator.process_index)
            for start in range(0, len(rows), args.rollout_batch_size):
                end = start + args.rollout_batch_size
                chunk, weight = rows[start:end], weights[start:end]
                rollout = collect(models, tokenizer, reward_tokenizer, [self.prompts[i] for i in chunk],
                                  [self.prompt_ids[i] for i in chunk], args, 0.0, reward_stats, distributed.gathered,
                                  distributed.synced_generation, reward_functions=reward_functions,
                                  reward_weights=reward_weights,
                                  columns={name: [values[i] for i in chunk] for name, values in self.columns.items()})
                per_prompt = [rollout.combined_scores] + ([rollout.raw_scores] if models.has_reward_model else []) + [
                    rollout.kl.sum(1), rollout.response_mask.sum(1), rollout.ended.float()]
                totals += torch.stack([(values.double().cpu() * weight).sum() for values in per_prompt]
                                      + [weight.sum().double()])
        totals = distributed.sum(totals.to(device)).cpu()
        return {**{name: (total / totals[-1]).item() for name, total in zip(names, totals)},
                "time/eval": time.perf_counter() - started}
