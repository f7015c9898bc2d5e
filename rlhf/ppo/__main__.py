"""`python -m rlhf.ppo` / `accelerate launch -m rlhf.ppo`: the PPO stage."""

import sys

from rlhf.ppo.trainer import STAGE, main
from rlhf.processes import run_main

sys.exit(run_main(main, STAGE))
