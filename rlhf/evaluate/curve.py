"""Held-out reward against training wall-clock time, measured a few times while a policy stage trains.

The pipeline plots these curves for every policy stage on one chart, so a user sees which method buys the most
alignment per second on their machine. Each point samples the held-out prompts with the live policy under its own
random state (training draws exactly what it would without the curve), and the seconds exclude the evaluations.
The first point (step 0) is the policy the stage starts from, so every line starts where training did.

Points land in <output_dir>/gold_curve.jsonl: {"step", "seconds", "eos_rate", "response_length", "samples"} plus
"gold_reward" when the task has a gold function. Real data has none: the samples ({"prompt", "response"}) are kept so
that a reward model can score them afterwards (`score_curves`, which the pipeline runs with its reward stage).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

import torch

from rlhf.manifest import read_jsonl_log as read_curve

CURVE_NAME = "gold_curve.jsonl"


class GoldCurve:
    def __init__(self, output_dir: str, prompts: list[list[dict]], gold_reward, points: int, total_steps: int,
                 seed: int = 0, max_new_tokens: int = 64):
        self.path = Path(output_dir) / CURVE_NAME
        self.prompts, self.gold_reward, self.seed, self.max_new_tokens = prompts, gold_reward, seed, max_new_tokens
        # Evenly spaced steps, the last one the end of training.
        self.steps = sorted({max(1, round(total_steps * (index + 1) / points)) for index in range(points)})
        self.started = None
        self.offset = 0.0

    def start(self, model, tokenizer, resumed_step: int = 0) -> None:
        """Begin timing; a fresh run first records the starting policy (step 0), a resumed run keeps the points up to
        its checkpoint and counts on from their seconds."""
        from rlhf.manifest import atomic_write

        rows = [row for row in read_curve(self.path) if row["step"] <= resumed_step]
        atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in rows))
        self.offset = rows[-1]["seconds"] if rows else 0.0
        self.started = time.perf_counter()
        if resumed_step == 0 and not rows:  # a resumed run's policy is not the starting one
            self.record(model, tokenizer, 0)

    def leave_out(self, seconds: float) -> None:
        """Time spent on something other than training (an evaluation) is not counted."""
        self.started += seconds

    def due(self, step: int) -> bool:
        return step in self.steps

    @torch.no_grad()
    def record(self, model, tokenizer, step: int) -> dict:
        paused = time.perf_counter()
        from rlhf.data import prompt_text
        from rlhf.evaluate.devices import devices_to_fork
        from rlhf.evaluate.policy import sample_responses, summarise

        was_training, padding_side = model.training, tokenizer.padding_side
        model.eval()
        python_state = random.getstate()  # sampling reseeds Python's generator too
        # Sampling seeds torch's generators (the GPU's too) and draws from the one where the model is: fork that one.
        with torch.random.fork_rng(devices=devices_to_fork(next(model.parameters()).device)):
            samples = sample_responses(model, tokenizer, self.prompts, seed=self.seed,
                                       max_new_tokens=self.max_new_tokens)
        random.setstate(python_state)
        model.train(was_training)
        tokenizer.padding_side = padding_side
        texts = samples["texts"]
        scores = ({"gold": [self.gold_reward(prompt_text(prompt), text) for prompt, text in zip(self.prompts, texts)]}
                  if self.gold_reward is not None else {})
        summary = summarise(samples, scores)
        row = {"step": step, "seconds": self.offset + paused - self.started, "eos_rate": summary["eos_rate"],
               "response_length": summary["response_length"],
               **({"gold_reward": summary["gold_reward"]["mean"]} if scores else {}),
               "samples": [{"prompt": prompt, "response": text} for prompt, text in zip(self.prompts, texts)]}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        self.leave_out(time.perf_counter() - paused)  # the evaluation is not training time
        return row


def gold_curve(data_args, prompts: list[list[dict]] | None, output_dir: str, total_steps: int,
               seed: int = 0) -> GoldCurve | None:
    """The curve a stage's data arguments ask for (gold_curve_points > 0) on its held-out prompts, scored by the gold
    reward when there is one."""
    if not (data_args.gold_curve_points and prompts):
        return None
    from rlhf.evaluate.policy import load_gold_reward

    gold = load_gold_reward(data_args.gold_reward) if data_args.gold_reward else None
    return GoldCurve(output_dir, prompts, gold, data_args.gold_curve_points, total_steps, seed,
                     data_args.gold_eval_max_new_tokens)


def score_curves(curves: dict[str, list[dict]], reward_model, reward_tokenizer) -> dict[str, list[dict]]:
    """The curves with every point's mean reward-model score over its samples (points without samples as they
    are)."""
    from rlhf.evaluate.scoring import score_conversations

    scored = {}
    for stage, rows in curves.items():
        scored[stage] = []
        for row in rows:
            point = dict(row)
            if row.get("samples"):
                conversations = [sample["prompt"] + [{"role": "assistant", "content": sample["response"]}]
                                 for sample in row["samples"]]
                scores = score_conversations(reward_model, reward_tokenizer, conversations, show_progress=False)[0]
                point["reward_model_score"] = statistics.fmean(scores)
            scored[stage].append(point)
    return scored
