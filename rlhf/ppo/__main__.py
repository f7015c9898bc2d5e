"""`python -m rlhf.ppo` / `accelerate launch -m rlhf.ppo`: the PPO stage."""

from rlhf.ppo.trainer import main

main()
