"""The rollout metrics of two processes whose numbers disagree in kind, as rank r of a two-process launch: rank 1's
one-token responses have returns without variance (explained variance undefined, NaN there alone), and in a second
rollout rank 1's reward is inf. test_trainer.py runs it under `accelerate launch` and compares what the ranks wrote.

    python metrics_worker.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch


def rollout(rank: int, score: float):
    from rlhf.ppo.rollout import Rollout

    length = 3 if rank == 0 else 1
    mask = torch.ones(2, length)
    returns = torch.arange(2.0 * length).reshape(2, length) if rank == 0 else torch.ones(2, 1)
    scores = torch.tensor([score, 1.0])
    zeros = torch.zeros(2, length)
    return Rollout(prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1),
                   response_ids=torch.zeros(2, length, dtype=torch.long), response_mask=mask,
                   ended=torch.ones(2, dtype=torch.bool), logprobs=zeros, ref_logprobs=zeros, values=zeros,
                   raw_scores=scores, scores=scores, rewards=zeros, kl=zeros, advantages=zeros, returns=returns,
                   combined_scores=scores)


def run(out_dir: str):
    from accelerate import Accelerator

    from rlhf.ppo.config import PPOArgs
    from rlhf.ppo.distributed import Distributed
    from rlhf.ppo.trainer import rollout_metrics, stop_if_not_finite
    from rlhf.processes import StageError, start_processes

    start_processes(20)  # collectives that pair up wrongly fail in 20 s, not in the default ddp_timeout's 1800
    accelerator = Accelerator()
    rank, distributed = accelerator.process_index, Distributed(accelerator)
    args = PPOArgs(output_dir=out_dir)
    report = {"undefined_variance": rollout_metrics(rollout(rank, 2.0), None, distributed)}
    stop_if_not_finite("metrics", report["undefined_variance"], 1, args)  # explained variance alone: no stop
    report["inf_reward"] = rollout_metrics(rollout(rank, float("inf") if rank == 1 else 2.0), None, distributed)
    try:
        stop_if_not_finite("metrics", report["inf_reward"], 2, args)
    except StageError as error:
        report["stopped"] = str(error)
    report["memory"] = distributed.memory_mib()  # the trainer's next collective pairs up as it should
    accelerator.wait_for_everyone()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    run(sys.argv[1])
