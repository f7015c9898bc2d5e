"""TRL's names for our keys, so a TRL or alignment-handbook recipe (or command line) runs as written: each TRL name
is replaced by ours before the recipe or flags are checked, and an unknown name gets the closest of ours and TRL's.

A TRL name counts for a command that has no key of its own by that name and has one of the keys it stands for (the
first it has): dataset_name is train_data for a training stage, data for eval-rm and prompts for eval-policy; max_steps
is PPO's steps (SFTConfig has its own max_steps)."""

from __future__ import annotations

import difflib

from rlhf.config import ConfigError

# From TRL's ScriptArguments, ModelConfig and the PPOConfig of TRL 0.x, and transformers' former torch_dtype.
# (dataset_config is not here: it is a DataArgs key of its own, the hub dataset's configuration name.)
ALIASES = {
    "dataset_name": ("train_data", "data", "prompts"),
    "dataset_train_split": ("train_split",),
    "dataset_test_split": ("eval_split", "split"),
    "use_peft": ("use_lora",),
    "torch_dtype": ("dtype",),
    "max_steps": ("steps",),  # a PPO iteration: one rollout batch and its ppo_epochs of updates
    "num_ppo_epochs": ("ppo_epochs",),
    "lr_scheduler_type": ("lr_scheduler",),
    "response_length": ("max_new_tokens",),
    "max_completion_length": ("max_new_tokens",),
    "reward_model_path": ("reward_model",),
    # transformers' newer TrainingArguments name: where the installed release (5.17 and before) has only the old one,
    # recipes written for the newer name still run.
    "activation_checkpointing": ("gradient_checkpointing",),
}
# TRL keys PPO counts differently, each with the PPO key that marks a command as PPO and what to set instead.
UNMAPPED_HINTS = {
    "per_device_train_batch_size": ("rollout_batch_size", "PPO sizes batches in rollouts: set rollout_batch_size "
                                    "(prompts per process per iteration), mini_batch_size (per optimizer step) and "
                                    "gradient_accumulation_steps"),
    "num_train_epochs": ("steps", "PPO runs a number of iterations: set steps (or max_steps)"),
    "total_episodes": ("steps", "PPO runs steps iterations of rollout_batch_size prompts per process: set steps"),
    "num_mini_batches": ("mini_batch_size", "set mini_batch_size (rollout_batch_size / num_mini_batches)"),
}


def aliases_for(known) -> dict[str, str]:
    """The TRL names that count for a command with these keys, each with the key it stands for."""
    found = {}
    for alias, targets in ALIASES.items():
        target = next((name for name in targets if name in known), None)
        if alias not in known and target:
            found[alias] = target
    return found


def canonical(pairs, aliases: dict[str, str], where: str, show) -> tuple[list, set[str]]:
    """(name, value) pairs with TRL's names replaced by ours, and which TRL names were used. The same key given under
    two names with different values is refused (with the same value it counts once)."""
    seen: dict[str, tuple[str, object]] = {}
    result, used = [], set()
    for name, value in pairs:
        target = aliases.get(name, name)
        if target in seen and seen[target][0] != name and seen[target][1] != value:
            raise ConfigError(f"{where}{show(seen[target][0])} and {show(name)} are the same setting ({target}) with "
                              f"different values ({seen[target][1]!r} and {value!r}): give one of them")
        seen[target] = (name, value)
        used |= {name} if target != name else set()
        result.append((target, value))
    return result, used


def did_you_mean(name: str, candidates, show=str) -> str:
    """'did you mean X?' for the closest one of candidates (our names and TRL's; argparse's dashed spellings left
    out), or what PPO sets instead of a TRL key it counts differently, or ''."""
    candidates = [item for item in candidates if "-" not in item]
    marker, hint = UNMAPPED_HINTS.get(name, (None, ""))
    if marker in candidates:
        return hint
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"did you mean {show(close[0])}?" if close else ""


def flag_groups(args: list[str]) -> list[list]:
    """[name, values, written with '='] for each --flag of a command line (name None for anything before the first)."""
    groups = []
    for token in args:
        if token.startswith("--") and len(token) > 2:
            name, equals, value = token[2:].partition("=")
            groups.append([name, [value] if equals else [], bool(equals)])
        elif groups:
            groups[-1][1].append(token)
        else:
            groups.append([None, [token], False])
    return groups


def canonical_flags(args: list[str], parser, aliases: dict[str, str]) -> tuple[list[str], set[str]]:
    """The command line with TRL's flag names replaced by ours and the TRL names it used. An unknown flag fails in
    one line with the closest names (ours and TRL's), not argparse's usage text."""
    options = {option[2:] for action in parser._actions for option in action.option_strings if option.startswith("--")}
    flag_aliases = {**aliases, **{f"no_{alias}": f"no_{target}" for alias, target in aliases.items()
                                  if f"no_{target}" in options}}
    groups = flag_groups(args)
    for name, _, _ in groups:
        if name is not None and flag_aliases.get(name, name) not in options:
            hint = did_you_mean(name, [*options, *flag_aliases], show=lambda item: f"--{item}")
            raise ConfigError(f"unknown option --{name}{'; ' + hint if hint else ''} (--help lists the options)")
    # Values compare as written after the flag (--x=1 and --x 1 agree).
    _, used = canonical([(name, " ".join(values)) for name, values, _ in groups if name is not None], flag_aliases,
                        "", show=lambda item: f"--{item}")
    tokens = []
    for name, values, equals in groups:
        if name is None:
            tokens += values
        else:
            name = flag_aliases.get(name, name)
            tokens += [f"--{name}={values[0]}"] if equals else [f"--{name}", *values]
    return tokens, used
