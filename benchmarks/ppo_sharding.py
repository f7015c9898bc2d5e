"""PPO on two processes, replicated (data parallel) against sharded (torch FSDP2, `fsdp: true`), at the 32M model.

The same SFT policy and LoRA reward model as ppo_vs_trl026.py (a random 10-layer, 512-wide Llama of the tiny family,
one-step SFT and reward stages), the same PPO settings; three runs under recipes/accelerate/cpu_2proc.yaml:

- replicated: every process holds the whole model; gradients summed in one flat all-reduce per optimizer step;
- sharded: each process holds half of every parameter; the model is gathered whole while sampling a rollout
  (`gather_for_generation: true`, the default);
- sharded, blocks never gathered whole (`gather_for_generation: false`): memory stays at the shard size throughout.

    python benchmarks/ppo_sharding.py [--steps 4]

Per-process memory is given two ways: the peak resident set of the largest process over the whole run (loading
included: every process reads the whole checkpoint before it shards it), and the largest per-iteration peak that the
stage itself logs after loading (`memory/peak_mib`, the max over processes; iterations after the first). Writes
results/ppo_sharding.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import launch, print_table, run_measured, write_result
from ppo_vs_trl026 import ppo_settings, stage_outputs

RUNS = {"replicated": ["--fsdp", "false"],
        "sharded": ["--fsdp", "true"],
        "sharded, blocks gathered per token": ["--fsdp", "true", "--gather_for_generation", "false"]}


def run_ppo(sft: Path, reward: Path, settings: list[str], work: Path, tag: str, flags: list[str]) -> dict:
    out = work / tag.replace(" ", "_").replace(",", "")
    measured = run_measured(launch(
        "rlhf.ppo", "--config", "recipes/tiny/ppo.yaml", "--init_from", sft, "--reward_model", reward,
        "--output_dir", out, "--value_init", "reward", "--gold_reward", "", "--gold_eval_prompts", "",
        "--save_steps", "0", "--save_merged", "false", *settings, *flags,
        accelerate_config="recipes/accelerate/cpu_2proc.yaml"), work / "logs" / f"{out.name}.log",
        env={"ACCELERATE_USE_CPU": "1"})
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = steps[1:] or steps
    split = {part: statistics.mean(step[f"time/{part}"] for step in later) for part in ("generation", "scoring", "training")}
    return {**measured, "seconds_per_step": statistics.mean(step["time/step"] for step in later), "split": split,
            "training_peak_mib": max(step["memory/peak_mib"] for step in later),
            "score_first_last": [steps[0]["score/raw"], steps[-1]["score/raw"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="PPO iterations per run (the first is not timed).")
    parser.add_argument("--rollout_batch_size", type=int, default=8, help="Prompts per process per iteration.")
    parser.add_argument("--mini_batch_size", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args()
    settings = ppo_settings(args.steps, args.rollout_batch_size, args.mini_batch_size, 1, args.max_new_tokens)

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_sharding_") as tmp:
        work = Path(tmp)
        sft, reward = stage_outputs("30m", work)
        for tag, flags in RUNS.items():
            results[tag] = run_ppo(sft, reward, settings, work, tag, flags)
            print(f"[bench] {tag}: {results[tag]['seconds_per_step']:.2f} s/step, peak {results[tag]['peak_rss_mib']:.0f}"
                  f" MiB, training peak {results[tag]['training_peak_mib']:.0f} MiB", flush=True)
    base = results["replicated"]
    ratios = {tag: {"time": run["seconds_per_step"] / base["seconds_per_step"],
                    "peak_rss": run["peak_rss_mib"] / base["peak_rss_mib"],
                    "training_peak": run["training_peak_mib"] / base["training_peak_mib"]}
              for tag, run in results.items() if tag != "replicated"}

    print(f"\nPPO, 32M model, 2 CPU processes ({args.steps} iterations, {args.rollout_batch_size} prompts per process, "
          f"{args.max_new_tokens} new tokens)")
    rows = [[tag, run["seconds_per_step"], run["split"]["generation"], run["split"]["scoring"],
             run["split"]["training"], run["peak_rss_mib"], run["training_peak_mib"]] for tag, run in results.items()]
    rows += [[f"{tag} / replicated", ratio["time"], "", "", "", ratio["peak_rss"], ratio["training_peak"]]
             for tag, ratio in ratios.items()]
    print_table(["run", "s/step", "generate", "score", "train", "peak MiB (run)", "peak MiB (iterations)"], rows)
    path = write_result("ppo_sharding", {"settings": settings, "runs": results, "ratios": ratios})
    print(f"written {path}")


if __name__ == "__main__":
    main()
