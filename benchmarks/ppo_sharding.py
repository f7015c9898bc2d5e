"""PPO on two processes, replicated (data parallel) against sharded (torch FSDP2, `fsdp: true`), at the 32M model.

The same SFT policy and LoRA reward model as ppo_vs_trl026.py (a random 10-layer, 512-wide Llama of the tiny family,
one-step SFT and reward stages), the same PPO settings; three runs under recipes/accelerate/cpu_2proc.yaml:

- replicated: every process holds the whole model; gradients summed in one flat all-reduce per optimizer step;
- sharded: each process holds half of every parameter; the model is gathered whole while sampling a rollout
  (`gather_for_generation: true`, the default);
- sharded, blocks never gathered whole (`gather_for_generation: false`): memory stays at the shard size throughout.

    python benchmarks/ppo_sharding.py [--steps 4]

Per-process memory is given two ways: the peak resident set of the largest process over the whole run (loading
included: every process reads the whole checkpoint before it shards it), and what the largest process holds at the
end of each iteration (`memory/now_mib`, logged by the stage; the max over iterations after the first).

Each mode runs twice: with glibc's default allocator settings, and with MALLOC_MMAP_THRESHOLD_=65536. By default
glibc raises its mmap threshold as large blocks are freed, so the block buffers FSDP gathers and frees several times
per iteration end up in its heap and stay resident after they are freed; a fixed threshold returns them to the
system (and costs time on every large allocation). On a GPU, torch's caching allocator manages this memory instead.
Writes results/ppo_sharding.json.
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


ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def run_ppo(sft: Path, reward: Path, settings: list[str], work: Path, tag: str, flags: list[str],
            env: dict | None = None) -> dict:
    out = work / "".join(character if character.isalnum() else "_" for character in tag)
    measured = run_measured(launch(
        "rlhf.ppo", "--config", "recipes/tiny/ppo.yaml", "--init_from", sft, "--reward_model", reward,
        "--output_dir", out, "--value_init", "reward", "--gold_reward", "", "--gold_eval_prompts", "",
        "--save_steps", "0", "--save_merged", "false", "--min_reward_accuracy", "0",  # one-step RM: no eval
        *settings, *flags,
        accelerate_config="recipes/accelerate/cpu_2proc.yaml"), work / "logs" / f"{out.name}.log",
        env={"ACCELERATE_USE_CPU": "1", **(env or {})})
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = steps[1:] or steps
    split = {part: statistics.mean(step[f"time/{part}"] for step in later) for part in ("generation", "scoring", "training")}
    return {**measured, "seconds_per_step": statistics.mean(step["time/step"] for step in later), "split": split,
            "held_mib": max(step["memory/now_mib"] for step in later),
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
        for allocator, env in ALLOCATORS.items():
            for mode, flags in RUNS.items():
                tag = f"{mode} ({allocator})"
                results[tag] = run_ppo(sft, reward, settings, work, tag, flags, env)
                print(f"[bench] {tag}: {results[tag]['seconds_per_step']:.2f} s/step, peak "
                      f"{results[tag]['peak_rss_mib']:.0f} MiB, held after each iteration "
                      f"{results[tag]['held_mib']:.0f} MiB", flush=True)
    ratios = {}
    for allocator in ALLOCATORS:
        base = results[f"replicated ({allocator})"]
        for mode in list(RUNS)[1:]:
            run = results[f"{mode} ({allocator})"]
            ratios[f"{mode} ({allocator})"] = {"time": run["seconds_per_step"] / base["seconds_per_step"],
                                               "peak_rss": run["peak_rss_mib"] / base["peak_rss_mib"],
                                               "held": run["held_mib"] / base["held_mib"]}

    print(f"\nPPO, 32M model, 2 CPU processes ({args.steps} iterations, {args.rollout_batch_size} prompts per process, "
          f"{args.max_new_tokens} new tokens)")
    rows = [[tag, run["seconds_per_step"], run["split"]["generation"], run["split"]["scoring"],
             run["split"]["training"], run["peak_rss_mib"], run["held_mib"]] for tag, run in results.items()]
    rows += [[f"{tag} / replicated", ratio["time"], "", "", "", ratio["peak_rss"], ratio["held"]]
             for tag, ratio in ratios.items()]
    print_table(["run", "s/step", "generate", "score", "train", "peak MiB (run)", "held MiB"], rows)
    path = write_result("ppo_sharding", {"settings": settings, "runs": results, "ratios": ratios})
    print(f"written {path}")


if __name__ == "__main__":
    main()
