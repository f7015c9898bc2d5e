"""Benchmark 1: our SFT / reward / DPO / GRPO stages against TRL's own CLI (`trl sft|reward|dpo|grpo`) on the same work.

Both sides get the same model, the same records (ours normalises the tiny task's files; TRL reads the normalised
copy), the same hyperparameters and steps, and both are started through `accelerate launch` with the same config
(`trl <cmd>` is itself an accelerate launcher). Our stages do what TRL's scripts do plus their own bookkeeping
(validation, manifest, merged copy, checkpoints config); that bookkeeping is the overhead measured here.

GRPO: both sides start from the same SFT policy (ours through its stage folder, whose merged copy it loads; TRL from
that merged copy), read the same prompts, and are rewarded by the same function, the tiny task's gold reward
(`--reward_funcs rlhf.tiny.task.gold_rewards`, imported with the repository root as working directory); no reward
model. What ours adds there: the prompt file validated and normalised, the reward function imported and probed once
on two prompts before any model loads, the output lock and configuration hash, the non-finite-loss guard, a merged
copy of the policy and the manifest. The end-of-stage gold sampling is off (`--gold_eval_prompts ""`), as TRL's
script has none.

    python benchmarks/overhead_vs_trl.py [--steps 60] [--repeats 2] [--stages sft reward dpo grpo]

Prints a table of wall time and peak RSS, ours / TRL (target <= 1.05), and writes benchmarks/results/overhead_vs_trl.json
(overhead_vs_trl_<stages>.json when --stages picks only some, so a partial run keeps the full run's file).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import REPO, launch, print_table, run_measured, write_result

SFT_DATA = REPO / "data" / "tiny" / "sft_train.jsonl"
PREF_DATA = REPO / "data" / "tiny" / "prefs_train.jsonl"
PROMPT_DATA = REPO / "data" / "tiny" / "prompts_train.jsonl"
STAGES = ("sft", "reward", "dpo", "grpo")


def run_flags(steps: int, output_dir: Path) -> list[str]:
    """What every stage on both sides shares (a log line at least once, so short runs show their metrics too)."""
    return ["--output_dir", str(output_dir), "--max_steps", str(steps), "--logging_steps", str(min(10, steps)),
            "--save_strategy", "no", "--report_to", "none", "--bf16", "false", "--seed", "42"]


def shared_flags(steps: int, output_dir: Path) -> list[str]:
    """SFT, reward and DPO."""
    return [*run_flags(steps, output_dir), "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
            "--max_length", "256", "--lr_scheduler_type", "cosine", "--warmup_steps", "10"]


def grpo_flags(steps: int, output_dir: Path) -> list[str]:
    """recipes/tiny/grpo.yaml's GRPO settings: 4 prompts x 8 completions of up to 48 tokens per step."""
    return [*run_flags(steps, output_dir), "--num_generations", "8", "--per_device_train_batch_size", "32",
            "--gradient_accumulation_steps", "1", "--max_completion_length", "48", "--temperature", "1.0",
            "--beta", "0.05", "--loss_type", "dapo", "--scale_rewards", "group", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "5",
            "--reward_funcs", "rlhf.tiny.task.gold_rewards"]


LORA = ["--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.0", "--lora_target_modules", "all-linear"]
NO_EXTRAS = ["--eval_data", "", "--gold_eval_prompts", ""]  # TRL's scripts neither evaluate nor sample here


def write_trl_dataset(records: list[dict], folder: Path) -> str:
    """TRL's scripts load a dataset folder; give them exactly the records our stage trains on."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return str(folder)


def trl_datasets(work: Path) -> dict[str, str]:
    """The records our stages train on, normalised, as dataset folders for TRL's scripts."""
    from rlhf.data import load_preferences, load_prompts, load_sft

    return {"sft": write_trl_dataset(load_sft(str(SFT_DATA)), work / "trl_data" / "sft"),
            "prefs": write_trl_dataset(load_preferences(str(PREF_DATA)), work / "trl_data" / "prefs"),
            "prompts": write_trl_dataset(load_prompts(str(PROMPT_DATA)), work / "trl_data" / "prompts")}


def commands(datasets: dict[str, str], out: Path, steps: int,
             sft_model: Path) -> dict[str, tuple[list[str], list[str]]]:
    """stage -> (our command, TRL's command), writing under `out`. Every run needs a fresh `out`: our stages find a
    finished run of the same configuration in their output folder and return it without training."""
    sft_dataset, pref_dataset, prompt_dataset = datasets["sft"], datasets["prefs"], datasets["prompts"]
    trl = [str(Path(sys.executable).parent / "trl")]  # TRL's console script, from the same environment
    accelerate = ["--accelerate_config", str(REPO / "recipes" / "accelerate" / "cpu.yaml")]
    return {
        "sft": (
            launch("rlhf.sft", "--model_name_or_path", "data/tiny-base", "--train_data", SFT_DATA,
                   "--learning_rate", "2e-3", "--assistant_only_loss", "true", *LORA, *NO_EXTRAS,
                   *shared_flags(steps, out / "ours_sft")),
            [*trl, "sft", *accelerate, "--model_name_or_path", "data/tiny-base", "--dataset_name", sft_dataset,
             "--learning_rate", "2e-3", "--assistant_only_loss", "true", "--use_peft", *LORA,
             *shared_flags(steps, out / "trl_sft")],
        ),
        "reward": (
            launch("rlhf.reward", "--init_from", sft_model.parent, "--train_data", PREF_DATA, "--use_lora", "false",
                   "--learning_rate", "3e-4", "--center_rewards_coefficient", "0.01", *NO_EXTRAS,
                   *shared_flags(steps, out / "ours_reward")),
            [*trl, "reward", *accelerate, "--model_name_or_path", sft_model, "--dataset_name", pref_dataset,
             "--learning_rate", "3e-4", "--center_rewards_coefficient", "0.01",
             *shared_flags(steps, out / "trl_reward")],
        ),
        "dpo": (
            launch("rlhf.dpo", "--init_from", sft_model.parent, "--train_data", PREF_DATA, "--learning_rate", "1e-3",
                   "--beta", "0.1", *LORA, *NO_EXTRAS, *shared_flags(steps, out / "ours_dpo")),
            [*trl, "dpo", *accelerate, "--model_name_or_path", sft_model, "--dataset_name", pref_dataset,
             "--learning_rate", "1e-3", "--beta", "0.1", "--use_peft", *LORA, *shared_flags(steps, out / "trl_dpo")],
        ),
        "grpo": (
            launch("rlhf.grpo", "--init_from", sft_model.parent, "--train_data", PROMPT_DATA, "--reward_model", "null",
                   *LORA, *NO_EXTRAS, *grpo_flags(steps, out / "ours_grpo")),
            [*trl, "grpo", *accelerate, "--model_name_or_path", sft_model, "--dataset_name", prompt_dataset,
             "--use_peft", *LORA, *grpo_flags(steps, out / "trl_grpo")],
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="Optimizer steps per run.")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per side (alternating); the median is kept.")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--work_dir", default=None,
                        help="Keep the runs' outputs and logs (logs/<stage>_<side>_<repeat>.log) here; default: a "
                        "temporary folder, removed at the end.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        # Reward, DPO and GRPO start from an SFT stage, as in the pipeline: a short SFT run gives both sides one.
        run_measured(launch("rlhf.sft", "--config", "recipes/tiny/sft.yaml", "--max_steps", "20", *NO_EXTRAS,
                            "--output_dir", work / "sft_parent"), work / "logs" / "sft_parent.log")
        datasets = trl_datasets(work)
        results = {}
        for stage in args.stages:
            runs = {"ours": [], "trl": []}
            for repeat in range(args.repeats):
                out = work / "runs" / f"{stage}_{repeat}"
                shutil.rmtree(out, ignore_errors=True)  # a kept --work_dir must not hand ours a finished run
                ours_command, trl_command = commands(datasets, out, args.steps, work / "sft_parent" / "merged")[stage]
                order = ["ours", "trl"] if repeat % 2 == 0 else ["trl", "ours"]  # alternate: drift hits both
                for side in order:
                    command = ours_command if side == "ours" else trl_command
                    runs[side].append(run_measured(command, work / "logs" / f"{stage}_{side}_{repeat}.log"))
            median = {side: {key: statistics.median(run[key] for run in runs[side]) for key in ("wall_s", "peak_rss_mib")}
                      for side in runs}
            results[stage] = {**median, "runs": runs,
                              "wall_ratio": median["ours"]["wall_s"] / median["trl"]["wall_s"],
                              "rss_ratio": median["ours"]["peak_rss_mib"] / median["trl"]["peak_rss_mib"],
                              "commands": {"ours": list(map(str, ours_command)), "trl": list(map(str, trl_command))}}
            print(f"[bench] {stage}: ours {median['ours']['wall_s']:.1f} s / {median['ours']['peak_rss_mib']:.0f} MiB, "
                  f"trl {median['trl']['wall_s']:.1f} s / {median['trl']['peak_rss_mib']:.0f} MiB", flush=True)

    print(f"\nOverhead vs TRL's CLI ({args.steps} steps, median of {args.repeats}; target ratio <= 1.05)")
    print_table(["stage", "ours s", "trl s", "wall ratio", "ours MiB", "trl MiB", "RSS ratio"],
                [[stage, r["ours"]["wall_s"], r["trl"]["wall_s"], r["wall_ratio"], r["ours"]["peak_rss_mib"],
                  r["trl"]["peak_rss_mib"], r["rss_ratio"]] for stage, r in results.items()])
    name = "overhead_vs_trl" if set(args.stages) == set(STAGES) else "_".join(["overhead_vs_trl", *args.stages])
    path = write_result(name, {"steps": args.steps, "repeats": args.repeats, "target": 1.05, "stages": results})
    print(f"written {path}")


if __name__ == "__main__":
    main()
