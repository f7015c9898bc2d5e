"""RLOO (TRL RLOOTrainer) with a LoRA adapter on a policy stage, rewarded by a reward model and/or reward functions.

    rlhf rloo --config recipes/tiny/rloo.yaml
    accelerate launch --config_file recipes/accelerate/cpu.yaml -m rlhf.rloo --config recipes/tiny/rloo.yaml

REINFORCE with a leave-one-out baseline: each of the num_generations completions of a prompt is judged against the
mean reward of the others. No critic. Everything else (rewards, reference = this adapter disabled, resume, manifest)
is as in `rlhf grpo`; TRL's RLOO options apply (num_generations, beta, epsilon, normalize_advantages, ...).
"""

from __future__ import annotations

import sys

from rlhf import grpo
from rlhf.processes import run_main

STAGE = "rloo"
PARENT_STAGES = grpo.PARENT_STAGES
ARG_TYPES = grpo.arg_types(STAGE)


def main(argv: list[str] | None = None):
    return grpo.main(argv, method=STAGE, description=__doc__)


if __name__ == "__main__":
    sys.exit(run_main(main, STAGE))
