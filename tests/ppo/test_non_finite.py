"""A non-finite number stops a PPO run on every process at once, before it is stepped, logged or saved."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from test_layouts import tiny_separate_models


def test_ranks_agree_on_metrics_one_of_them_cannot_compute(tmp_path):
    """Two gloo processes, rank 1 alone with returns without variance (explained variance NaN there) and then an inf
    reward: both make the same reductions and get the same metrics, NaN where either rank's was not finite. So an
    undefined explained variance stops neither, the inf reward stops both with the same error, and the next
    collective pairs up. Before, the NaN rank skipped an all-reduce, so the ranks paired later collectives wrongly
    (a trainer hung until ddp_timeout)."""
    worker = str(REPO / "tests" / "ppo" / "metrics_worker.py")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml",
               "--main_process_port", "29627", worker, str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert json.dumps(rank0, sort_keys=True) == json.dumps(rank1, sort_keys=True)  # NaNs included
    undefined = rank0["undefined_variance"]
    assert math.isnan(undefined["value/explained_variance"])
    assert undefined["response/length"] == 2.0 and undefined["score/raw"] == 1.5  # means over both ranks
    inf_reward = rank0["inf_reward"]
    assert all(math.isnan(inf_reward[key]) for key in ("score/raw", "score/combined", "score/shaped"))
    assert inf_reward["response/length"] == 2.0
    assert rank0["stopped"].startswith("ppo: non-finite metrics at step 2 (")


def test_non_finite_gradient_norm_stops_the_update_before_the_optimizer_steps(tmp_path):
    """Without a gradient scaler (fp32, bf16) nothing skips a step whose gradients are NaN: the update stops the run
    naming the step and the last good checkpoint, and the weights are the ones it started from. Before, the step
    ran, NaN weights were trained on and saved as checkpoints, and only grad_norm went missing from the metrics. A
    finite batch steps as usual."""
    from types import SimpleNamespace

    from rlhf.ppo.config import PPOArgs
    from rlhf.ppo.distributed import Distributed
    from rlhf.ppo.rollout import Rollout
    from rlhf.ppo.trainer import update
    from rlhf.processes import StageError

    models, _ = tiny_separate_models(policy_hidden=64, reward_hidden=64)
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000002" / "state.json").write_text("{}")
    args = PPOArgs(output_dir=str(tmp_path), rollout_batch_size=2, mini_batch_size=2, ppo_epochs=1)
    zeros = torch.zeros(2, 4)
    trainable = models.policy_parameters() + models.value_parameters()
    distributed = Distributed(SimpleNamespace(num_processes=1, device=torch.device("cpu")))
    for advantage, finite in ((1.0, True), (math.nan, False)):
        rollout = Rollout(prompt_ids=torch.randint(1, 128, (2, 3)), prompt_mask=torch.ones(2, 3),
                          response_ids=torch.randint(1, 128, (2, 4)), response_mask=torch.ones(2, 4),
                          ended=torch.ones(2, dtype=torch.bool), logprobs=zeros - 5, ref_logprobs=zeros - 5,
                          values=zeros, raw_scores=None, scores=torch.zeros(2), rewards=zeros, kl=zeros,
                          advantages=torch.full((2, 4), advantage), returns=zeros)
        start = [parameter.detach().clone() for parameter in trainable]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
        if finite:
            stats = update(models, optimizer, rollout, args, distributed, torch.Generator().manual_seed(0), step=3)
            assert math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
        else:
            with pytest.raises(StageError, match=r"non-finite gradient norm at step 3 \(\{'grad_norm': nan\}\); last "
                                                 r"good checkpoint: \S*step-000002\. Lower learning_rate"):
                update(models, optimizer, rollout, args, distributed, torch.Generator().manual_seed(0), step=3)
        moved = any(not torch.equal(before, parameter) for before, parameter in zip(start, trainable))
        assert moved == finite and all(parameter.isfinite().all() for parameter in trainable)
