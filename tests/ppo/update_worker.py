"""One PPO update on a saved rollout, as rank r of N processes holding rows [r*n/N, (r+1)*n/N) of it. The parity tests
in test_trainer.py run it in-process (one process, the whole batch) and under `accelerate launch` (two processes,
data parallel or sharded with FSDP2).

    python update_worker.py SFT_DIR REWARD_DIR ROLLOUT OUT MINI_BATCH_SIZE GRADIENT_ACCUMULATION_STEPS [fsdp] [shared]
"""

import sys

import torch


def run(sft_dir: str, reward_dir: str, rollout_path: str, out_path: str, mini_batch_size: int, accumulation: int,
        fsdp: bool = False, critic: str = "separate"):
    from accelerate import Accelerator

    from rlhf.config import ModelArgs
    from rlhf.manifest import read_manifest
    from rlhf.ppo.config import PPOArgs
    from rlhf.ppo.distributed import Distributed
    from rlhf.ppo.layouts import build_models
    from rlhf.ppo.rollout import Rollout
    from rlhf.ppo.trainer import update

    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    saved = torch.load(rollout_path, weights_only=False)
    n = saved["response_ids"].shape[0]
    rows = slice(rank * n // world, (rank + 1) * n // world)
    rollout = Rollout(**{key: value[rows] if isinstance(value, torch.Tensor) else value for key, value in saved.items()})
    args = PPOArgs(output_dir="unused", reward_model=reward_dir, rollout_batch_size=n // world,
                   mini_batch_size=mini_batch_size, gradient_accumulation_steps=accumulation, ppo_epochs=2,
                   critic=critic)
    torch.manual_seed(0)
    models = build_models("shared", read_manifest(sft_dir), read_manifest(reward_dir), ModelArgs(), "policy",
                          critic).eval()
    distributed = Distributed(accelerator, sharded=fsdp)
    distributed.prepare(models, models.policy_parameters() + models.value_parameters())
    if fsdp:  # really sharded: this process holds half of every block's weights
        from rlhf.ppo.distributed import is_sharded

        assert all(is_sharded(parameter) for parameter in models.parameters())
    optimizer = torch.optim.AdamW(models.policy_parameters() + models.value_parameters(), lr=1e-3)
    update(models, optimizer, rollout, args, distributed, torch.Generator().manual_seed(0), step=1)
    state = distributed.full_state(models)
    if accelerator.is_main_process:
        torch.save(state, out_path)


if __name__ == "__main__":
    sft_dir, reward_dir, rollout_path, out_path, mini_batch_size, accumulation = sys.argv[1:7]
    run(sft_dir, reward_dir, rollout_path, out_path, int(mini_batch_size), int(accumulation), "fsdp" in sys.argv[7:],
        "shared" if "shared" in sys.argv[7:] else "separate")
