"""Benchmark 3: SFT training against the physical limit of this machine.

Measures the fp32 matmul FLOP/s torch reaches here (large square matmuls, best of several), then runs our SFT stage
(full fine-tuning, as the 6·N·T rule assumes weight gradients) on a ~30M-parameter Llama of the tiny family with
sequences filled to max_length, and reports the model FLOP/s it achieves, 6 · params · tokens / training second,
as a fraction of the matmul FLOP/s (target >= 0.4).

    python benchmarks/flops.py [--steps 8] [--batch 4] [--seq 512]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import REPO, build_model, print_table, python_module, run_measured, write_result
from ppo_vs_trl026 import MODEL_30M


def matmul_flops(sizes=(1024, 2048, 4096), repeats: int = 5) -> dict:
    """Best fp32 matmul FLOP/s over a few square sizes (2·n³ per product)."""
    import torch

    best = {}
    for size in sizes:
        left, right = torch.randn(size, size), torch.randn(size, size)
        left @ right  # warm up the kernels and the allocator
        rates = []
        for _ in range(repeats):
            started = time.perf_counter()
            left @ right
            rates.append(2 * size**3 / (time.perf_counter() - started))
        best[size] = max(rates)
    return {"by_size": best, "peak": max(best.values())}


def long_sft_records(path: Path, count: int) -> None:
    """Conversations whose answers run past max_length, so every training sequence is exactly max_length tokens."""
    from rlhf.data import load_sft

    records = load_sft(str(REPO / "data" / "tiny" / "sft_train.jsonl"))
    answers = [record["messages"][-1]["content"] for record in records]
    with open(path, "w") as handle:
        for index in range(count):
            answer = " ".join(answers[(index * 40 + offset) % len(answers)] for offset in range(40))
            handle.write(json.dumps({"messages": [records[index]["messages"][0],
                                                  {"role": "assistant", "content": answer}]}) + "\n")


def sft_flops(work: Path, steps: int, batch: int, seq: int, model: dict, tag: str) -> dict:
    base = work / f"base_{tag}"
    params = build_model(base, max_position_embeddings=max(seq, 512), **model)
    data = work / "long_sft.jsonl"
    if not data.is_file():
        long_sft_records(data, 512)
    out = work / f"sft_{tag}"
    measured = run_measured(python_module(
        "rlhf.sft", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path", base, "--train_data", data,
        "--output_dir", out, "--use_lora", "false", "--max_length", seq, "--per_device_train_batch_size", batch,
        "--max_steps", steps, "--save_strategy", "no", "--eval_data", "", "--gold_eval_prompts", "",
        "--assistant_only_loss", "false", "--logging_steps", "1", "--save_merged", "false"),
        work / "logs" / f"sft_{tag}.log")
    manifest = json.loads((out / "manifest.json").read_text())
    seconds = manifest["metrics"]["train_seconds"]
    tokens = steps * batch * seq
    return {"params": params, "tokens": tokens, "train_seconds": seconds, "tokens_per_second": tokens / seconds,
            "model_flops_per_second": 6 * params * tokens / seconds, **measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()

    peak = matmul_flops()
    with tempfile.TemporaryDirectory(prefix="bench_flops_") as tmp:
        sft = sft_flops(Path(tmp), args.steps, args.batch, args.seq, MODEL_30M, "30m")
    fraction = sft["model_flops_per_second"] / peak["peak"]
    print(f"\nSFT model FLOP/s vs fp32 matmul FLOP/s ({sft['params'] / 1e6:.1f}M params, batch {args.batch} x "
          f"{args.seq} tokens, {args.steps} steps; target >= 0.4)")
    print_table(["matmul GFLOP/s", "SFT tokens/s", "SFT model GFLOP/s", "fraction"],
                [[peak["peak"] / 1e9, sft["tokens_per_second"], sft["model_flops_per_second"] / 1e9, fraction]])
    path = write_result("flops", {"matmul": peak, "sft": sft, "fraction": fraction, "target": 0.4,
                                  "settings": vars(args)})
    print(f"written {path}")


if __name__ == "__main__":
    main()
