"""`rlhf <command> [options]`: one entry point for every stage and report.

Each command is a module with a `main(argv)`; the same modules run under `accelerate launch -m rlhf.<module>`.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "pipeline": ("rlhf.pipeline", "run SFT -> reward -> DPO/PPO/GRPO/RLOO -> evaluation from one pipeline recipe"),
    "sft": ("rlhf.sft", "supervised fine-tuning with a LoRA adapter"),
    "reward": ("rlhf.reward", "reward-model training (Bradley-Terry) from the SFT stage"),
    "dpo": ("rlhf.dpo", "direct preference optimisation from the SFT stage (reference = adapter off)"),
    "ppo": ("rlhf.ppo.trainer", "RLHF-PPO on the SFT policy with the reward model (LoRA, shared base)"),
    "grpo": ("rlhf.grpo", "GRPO (TRL): group-relative policy optimisation, reward model and/or reward functions"),
    "rloo": ("rlhf.rloo", "RLOO (TRL): REINFORCE with a leave-one-out baseline, reward model and/or functions"),
    "eval-rm": ("rlhf.evaluate.rm", "evaluate reward models on preference pairs (report, plots, scores)"),
    "eval-policy": ("rlhf.evaluate.policy", "sample policies on held-out prompts: gold reward, win-rates, KL"),
    "build-tiny": ("rlhf.tiny.build", "rebuild the offline tiny default (data, tokenizer, base model)"),
}


def usage() -> str:
    lines = ["usage: rlhf <command> [--config recipe.yaml] [--key value ...]", "", "commands:"]
    lines += [f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`rlhf <command> --help` lists every option of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"rlhf: unknown command '{command}'\n\n{usage()}", file=sys.stderr)
        return 2
    from rlhf.processes import run_main

    module = importlib.import_module(COMMANDS[command][0])
    return run_main(module.main, command, rest)

if __name__ == "__main__":
    sys.exit(main())
