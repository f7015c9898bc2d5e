"""Benchmark 4: how each stage's cost grows as the sequence length and the model size double.

Models are random-initialised Llamas of the tiny family (same tokenizer): 4, 8 and 16 layers (1.9M, 3.7M, 7.2M
parameters), and sequences of 128, 256 and 512 tokens on the 4-layer model. Training data is the tiny task's text run
long, so every SFT sequence fills max_length and every preference conversation comes within a sentence of it; PPO samples max_new_tokens = length / 4 (a random model
rarely stops early). Each point runs the stage chain SFT -> reward -> DPO, PPO as the pipeline does, for a few steps.

    python benchmarks/scaling.py [--steps 8]

Prints tokens/s (tokens trained per training second; PPO: prompt + response tokens per iteration second) and peak
RSS per stage and point, and writes results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import REPO, build_model, print_table, python_module, run_measured, write_result
from flops import long_sft_records

LAYERS = (4, 8, 16)
LENGTHS = (128, 256, 512)
BATCH = 8
PPO_ROLLOUT = 16


def fitted_preference_records(path: Path, length: int, count: int) -> float:
    """Preference pairs whose answers are the tiny task's sentences run on until the rendered conversation would pass
    `length` tokens: TRL's RewardTrainer leaves out longer pairs rather than truncating them. Returns the mean
    rendered length of a chosen or rejected conversation."""
    from rlhf.data import load_preferences
    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(str(REPO / "data" / "tiny-base"))
    pairs = load_preferences(str(REPO / "data" / "tiny" / "prefs_train.jsonl"))
    sentences = [pair[side][0]["content"] for pair in pairs for side in ("chosen", "rejected")]

    def rendered(prompt, answer):
        return len(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True,
                                                 return_dict=False))

    lengths = []
    with open(path, "w") as handle:
        for index in range(count):
            prompt, record = pairs[index]["prompt"], {"prompt": pairs[index]["prompt"]}
            for offset, side in enumerate(("chosen", "rejected")):
                answer, cursor = sentences[index * 7 + offset], index * 7 + offset + 1
                while rendered(prompt, answer + " " + sentences[cursor % len(sentences)]) <= length:
                    answer, cursor = answer + " " + sentences[cursor % len(sentences)], cursor + 1
                record[side] = [{"role": "assistant", "content": answer}]
                lengths.append(rendered(prompt, answer))
            handle.write(json.dumps(record) + "\n")
    return statistics.mean(lengths)


def mean_prompt_tokens() -> float:
    """PPO's prompts as the policy sees them (chat template + generation prompt), in tokens, on average."""
    from rlhf.data import load_prompts
    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(str(REPO / "data" / "tiny-base"))
    prompts = load_prompts(str(REPO / "data" / "tiny" / "prompts_train.jsonl"))
    return statistics.mean(len(tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True,
                                                             tokenize=True, return_dict=False)) for record in prompts)


def trained_tokens(stage_dir: Path, steps: int, tokens_per_step: int) -> dict:
    seconds = json.loads((stage_dir / "manifest.json").read_text())["metrics"]["train_seconds"]
    return {"train_seconds": seconds, "tokens_per_second": steps * tokens_per_step / seconds}


def run_point(work: Path, tag: str, layers: int, length: int, steps: int) -> dict:
    base = work / f"base_{tag}"
    params = build_model(base, num_hidden_layers=layers, max_position_embeddings=max(512, length))
    common = ["--max_length", str(length), "--max_steps", str(steps), "--per_device_train_batch_size", str(BATCH),
              "--save_strategy", "no", "--eval_data", "", "--gold_eval_prompts", "", "--logging_steps", "1",
              "--warmup_steps", "0"]
    stages = {}

    def stage(name: str, module: str, *argv) -> Path:
        out = work / f"{name}_{tag}"
        stages[name] = run_measured(python_module(module, *argv, "--output_dir", out), work / "logs" / f"{name}_{tag}.log")
        return out

    sft = stage("sft", "rlhf.sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", base,
                "--train_data", work / "long_sft.jsonl", *common)
    stages["sft"].update(trained_tokens(sft, steps, BATCH * length))
    prefs = work / f"prefs_{length}.jsonl"
    pair_length = fitted_preference_records(prefs, length, steps * BATCH)
    reward = stage("reward", "rlhf.reward", "--config", "recipes/tiny/reward.yaml", "--init_from", sft,
                   "--train_data", prefs, "--stats_samples", "16", *common)
    stages["reward"].update(trained_tokens(reward, steps, 2 * BATCH * pair_length))
    dpo = stage("dpo", "rlhf.dpo", "--config", "recipes/tiny/dpo.yaml", "--init_from", sft, "--train_data", prefs, *common)
    stages["dpo"].update(trained_tokens(dpo, steps, 2 * BATCH * pair_length))
    ppo = stage("ppo", "rlhf.ppo", "--config", "recipes/tiny/ppo.yaml", "--init_from", sft, "--reward_model", reward,
                "--steps", "3", "--rollout_batch_size", str(PPO_ROLLOUT), "--mini_batch_size", str(BATCH),
                "--ppo_epochs", "2", "--max_new_tokens", str(length // 4), "--gold_reward", "",
                "--gold_eval_prompts", "", "--save_steps", "0", "--save_merged", "false",
                "--min_reward_accuracy", "0")  # a few-step reward model without eval_data: no accuracy to gate on
    later = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines()][1:]
    prompt_tokens = mean_prompt_tokens()
    seconds = statistics.mean(step["time/step"] for step in later)
    response = statistics.mean(step["response/length"] for step in later)
    stages["ppo"].update(seconds_per_step=seconds, tokens_per_second=PPO_ROLLOUT * (prompt_tokens + response) / seconds)
    return {"layers": layers, "params": params, "length": length, "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps per SFT/reward/DPO run.")
    args = parser.parse_args()
    points = [(f"L{layers}_S{LENGTHS[0]}", layers, LENGTHS[0]) for layers in LAYERS]
    points += [(f"L{LAYERS[0]}_S{length}", LAYERS[0], length) for length in LENGTHS[1:]]

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        work = Path(tmp)
        long_sft_records(work / "long_sft.jsonl", 256)
        for tag, layers, length in points:
            results[tag] = run_point(work, tag, layers, length, args.steps)
            print(f"[bench] scaling {tag}: " + ", ".join(
                f"{name} {stage['tokens_per_second']:.0f} tok/s" for name, stage in results[tag]["stages"].items()),
                flush=True)

    for axis, chosen in (("model size (sequence 128)", [tag for tag in results if tag.endswith(f"S{LENGTHS[0]}")]),
                         ("sequence length (4 layers)", [tag for tag in results if tag.startswith(f"L{LAYERS[0]}_")])):
        print(f"\nScaling with {axis}: tokens/s and peak RSS (MiB)")
        rows = []
        for tag in chosen:
            point = results[tag]
            rows.append([f"{point['params'] / 1e6:.1f}M", point["length"]] + [
                f"{point['stages'][name]['tokens_per_second']:.0f} / {point['stages'][name]['peak_rss_mib']:.0f}"
                for name in ("sft", "reward", "dpo", "ppo")])
        print_table(["params", "seq", "sft", "reward", "dpo", "ppo"], rows)
    path = write_result("scaling", {"batch": BATCH, "steps": args.steps, "ppo_rollout": PPO_ROLLOUT, "points": results})
    print(f"written {path}")


if __name__ == "__main__":
    main()
