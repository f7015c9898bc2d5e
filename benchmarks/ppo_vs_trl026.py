"""Benchmark 2: our PPO against the last TRL PPO (TRL 0.26.2 `trl.experimental.ppo.PPOTrainer`, in its own venv).

Both sides start from the same SFT policy and reward model, see the same prompts (identical token ids), and run the
same number of PPO iterations with the same rollout batch, mini-batch, PPO epochs, response length, learning rate,
KL coefficient and clipping. Ours runs its default layout (one frozen base; policy, value and reward as LoRA adapters;
the reference = base with adapters off), and again with `critic: shared` (the value head on the policy's own forward
pass); TRL runs its default (four full models: policy, reference, value, reward).

Two model sizes: the tiny task's trained SFT/RM (1.9M parameters), and a ~30M-parameter random Llama of the same
family (SFT and RM stages run for one step to give both sides stage outputs to start from).

    bash benchmarks/setup_trl026.sh          # once: builds benchmarks/.venv-trl026 (TRL 0.26.2, transformers 4.57)
    python benchmarks/ppo_vs_trl026.py [--sizes tiny 30m] [--steps 3]

Prints seconds per PPO iteration (after the first, which warms up), its split into generation / scoring / training,
and peak RSS of each whole process, ours / TRL (targets: time <= 0.6, RSS <= 0.6). Writes results/ppo_vs_trl026.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import REPO, build_model, print_table, python_module, run_measured, write_result

TRL_PYTHON = REPO / "benchmarks" / ".venv-trl026" / "bin" / "python"
PROMPTS = REPO / "data" / "tiny" / "prompts_train.jsonl"
# ~30M parameters (31.9M with the tiny vocabulary): the size the FLOP/s benchmark uses too.
MODEL_30M = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=10, num_attention_heads=8,
                 num_key_value_heads=8, head_dim=64)


def ppo_settings(steps: int, rollout: int, mini: int, epochs: int, new_tokens: int) -> list[str]:
    """Flags both PPO implementations take under the same names."""
    return ["--steps", str(steps), "--rollout_batch_size", str(rollout), "--mini_batch_size", str(mini),
            "--ppo_epochs", str(epochs), "--max_new_tokens", str(new_tokens), "--learning_rate", "1e-4",
            "--kl_coef", "0.05", "--temperature", "1.0", "--cliprange", "0.2", "--cliprange_value", "0.2",
            "--vf_coef", "0.1", "--gamma", "1.0", "--lam", "0.95", "--missing_eos_penalty", "1.0", "--seed", "42"]


def stage_outputs(size: str, work: Path) -> tuple[Path, Path]:
    """(SFT stage folder, reward stage folder) to start PPO from."""
    if size == "tiny":
        sft, reward = REPO / "runs" / "tiny" / "sft", REPO / "runs" / "tiny" / "reward"
        if not (sft / "manifest.json").is_file() or not (reward / "manifest.json").is_file():
            sys.exit("ppo_vs_trl026: the tiny SFT and reward stages are needed first: "
                     "rlhf pipeline --config recipes/tiny/pipeline.yaml --only sft reward (or the whole pipeline)")
        return sft, reward
    base = work / f"base_{size}"
    build_model(base, **MODEL_30M)
    one_step = ["--max_steps", "1", "--save_strategy", "no", "--eval_data", "", "--gold_eval_prompts", "",
                "--max_train_samples", "16", "--report_to", "none"]
    run_measured(python_module("rlhf.sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", base,
                               "--output_dir", work / f"sft_{size}", *one_step), work / "logs" / f"sft_{size}.log")
    # A LoRA reward model, as real-model recipes train it: our PPO then holds it as one more adapter on the base.
    run_measured(python_module("rlhf.reward", "--config", "recipes/tiny/reward.yaml", "--init_from", work / f"sft_{size}",
                               "--use_lora", "true", "--stats_samples", "32", "--output_dir", work / f"reward_{size}",
                               *one_step), work / "logs" / f"reward_{size}.log")
    return work / f"sft_{size}", work / f"reward_{size}"


def run_ours(sft: Path, reward: Path, settings: list[str], work: Path, tag: str, critic: str) -> dict:
    out = work / f"ours_{tag}"
    # A LoRA reward model's adapter seeds the value adapter; the tiny task's RM is a full model (no adapter to copy).
    value_init = "reward" if json.loads((reward / "manifest.json").read_text())["adapter_path"] else "policy"
    measured = run_measured(python_module(
        "rlhf.ppo", "--config", "recipes/tiny/ppo.yaml", "--init_from", sft, "--reward_model", reward,
        "--output_dir", out, "--layout", "shared", "--value_init", value_init, "--gold_reward", "",
        "--gold_eval_prompts", "", "--save_steps", "0", "--save_merged", "false", "--lr_scheduler", "linear",
        "--reward_clip", "5.0", "--critic", critic,
        "--min_reward_accuracy", "0",  # the 30M points' one-step reward model has no eval_data to gate on
        *settings), work / "logs" / f"ours_{tag}.log")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = steps[1:] or steps
    split = {part: statistics.mean(step[f"time/{part}"] for step in later) for part in ("generation", "scoring", "training")}
    return {**measured, "seconds_per_step": statistics.mean(step["time/step"] for step in later), "split": split,
            "score_first_last": [steps[0]["score/raw"], steps[-1]["score/raw"]]}


def run_trl(sft: Path, reward: Path, settings: list[str], work: Path, tag: str) -> dict:
    if not TRL_PYTHON.is_file():
        sys.exit(f"ppo_vs_trl026: {TRL_PYTHON} is missing; run: bash benchmarks/setup_trl026.sh")
    json_out = work / f"trl_{tag}.json"
    measured = run_measured(
        [str(TRL_PYTHON), str(REPO / "benchmarks" / "ppo_trl026.py"), "--policy", sft / "merged",
         "--reward_model", reward / "merged", "--prompts", PROMPTS, "--value_init", "reward",
         "--output_dir", work / f"trl_out_{tag}", "--json_out", json_out, *settings],
        work / "logs" / f"trl_{tag}.log", env={"TRL_EXPERIMENTAL_SILENCE": "1"})
    report = json.loads(json_out.read_text())
    split = report["split_after_first"] if report["steps"] > 1 else report["split"]
    return {**measured, "seconds_per_step": report["seconds_per_step_after_first"],
            "split": {part: split[part] for part in ("generation", "scoring", "training")},
            "score_first_last": [report["metrics"][0]["objective/scores"], report["metrics"][-1]["objective/scores"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "30m"], choices=["tiny", "30m"])
    parser.add_argument("--steps", type=int, default=5, help="PPO iterations per run (the first is not timed).")
    parser.add_argument("--rollout_batch_size", type=int, default=16)
    parser.add_argument("--mini_batch_size", type=int, default=8)
    parser.add_argument("--ppo_epochs", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args()
    settings = ppo_settings(args.steps, args.rollout_batch_size, args.mini_batch_size, args.ppo_epochs,
                            args.max_new_tokens)

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        work = Path(tmp)
        for size in args.sizes:
            sft, reward = stage_outputs(size, work)
            ours = run_ours(sft, reward, settings, work, size, "separate")
            shared_critic = run_ours(sft, reward, settings, work, f"{size}_shared_critic", "shared")
            trl = run_trl(sft, reward, settings, work, size)
            results[size] = {"ours": ours, "ours_shared_critic": shared_critic, "trl_0_26_2": trl,
                             "time_ratio": ours["seconds_per_step"] / trl["seconds_per_step"],
                             "rss_ratio": ours["peak_rss_mib"] / trl["peak_rss_mib"],
                             "time_ratio_shared_critic": shared_critic["seconds_per_step"] / trl["seconds_per_step"],
                             "rss_ratio_shared_critic": shared_critic["peak_rss_mib"] / trl["peak_rss_mib"]}
            print(f"[bench] ppo {size}: ours {ours['seconds_per_step']:.2f} s/step {ours['peak_rss_mib']:.0f} MiB; "
                  f"trl {trl['seconds_per_step']:.2f} s/step {trl['peak_rss_mib']:.0f} MiB", flush=True)

    print(f"\nPPO vs TRL 0.26.2 ({args.steps} iterations, rollout {args.rollout_batch_size}, mini-batch "
          f"{args.mini_batch_size}, {args.ppo_epochs} epochs, {args.max_new_tokens} new tokens; targets <= 0.6)")
    rows = []
    for size, result in results.items():
        for side in ("ours", "ours_shared_critic", "trl_0_26_2"):
            run = result[side]
            rows.append([size, side, run["seconds_per_step"], run["split"]["generation"], run["split"]["scoring"],
                         run["split"]["training"], run["peak_rss_mib"]])
        rows.append([size, "ours / trl", result["time_ratio"], "", "", "", result["rss_ratio"]])
        rows.append([size, "ours (shared critic) / trl", result["time_ratio_shared_critic"], "", "", "",
                     result["rss_ratio_shared_critic"]])
    print_table(["model", "side", "s/step", "generate", "score", "train", "peak MiB"], rows)
    path = write_result("ppo_vs_trl026", {"settings": settings, "sizes": results, "targets": {"time": 0.6, "rss": 0.6}})
    print(f"written {path}")


if __name__ == "__main__":
    main()
