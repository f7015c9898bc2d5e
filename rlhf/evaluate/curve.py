"""Held-out gold reward against training wall-clock time, measured a few times while a policy stage trains.

The pipeline plots these curves for every policy stage on one chart, so a user sees which method buys the most
alignment per second on their machine. Each point samples the held-out prompts with the live policy under its own
random state (training draws exactly what it would without the curve), and the seconds exclude the evaluations.
Points land in <output_dir>/gold_curve.jsonl: {"step", "seconds", "gold_reward", "eos_rate", "response_length"}.
"""

from __future__ import annotations

import json
import random
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

    def start(self, resumed_step: int = 0) -> None:
        """Begin timing; a resumed run keeps the points up to its checkpoint and counts on from their seconds."""
        from rlhf.manifest import atomic_write

        rows = [row for row in read_curve(self.path) if row["step"] <= resumed_step]
        atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in rows))
        self.offset = rows[-1]["seconds"] if rows else 0.0
        self.started = time.perf_counter()

    def leave_out(self, seconds: float) -> None:
        """Time spent on something other than training (an evaluation) is not counted."""
        self.started += seconds

    def due(self, step: int) -> bool:
        return step in self.steps

    @torch.no_grad()
    def record(self, model, tokenizer, step: int) -> dict:
        from rlhf.evaluate.policy import gold_report

        paused = time.perf_counter()
        was_training, padding_side = model.training, tokenizer.padding_side
        model.eval()
        python_state = random.getstate()  # sampling reseeds Python's generator too
        with torch.random.fork_rng(devices=[]):
            report = gold_report(model, tokenizer, self.prompts, self.gold_reward, seed=self.seed,
                                 max_new_tokens=self.max_new_tokens)
        random.setstate(python_state)
        model.train(was_training)
        tokenizer.padding_side = padding_side
        row = {"step": step, "seconds": self.offset + paused - self.started,
               "gold_reward": report["gold_reward"]["mean"], "eos_rate": report["eos_rate"],
               "response_length": report["response_length"]}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        self.leave_out(time.perf_counter() - paused)  # the evaluation is not training time
        return row


def gold_curve(data_args, output_dir: str, total_steps: int, seed: int = 0) -> GoldCurve | None:
    """The curve a stage's data arguments ask for (gold_curve_points > 0 with a gold reward and held-out prompts)."""
    if not (data_args.gold_curve_points and data_args.gold_reward and data_args.gold_eval_prompts):
        return None
    from rlhf.data import load_prompts
    from rlhf.evaluate.policy import load_gold_reward

    prompts = [record["prompt"] for record in load_prompts(data_args.gold_eval_prompts)][: data_args.gold_eval_samples]
    return GoldCurve(output_dir, prompts, load_gold_reward(data_args.gold_reward), data_args.gold_curve_points,
                     total_steps, seed)
