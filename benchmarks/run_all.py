"""Run every benchmark in turn (about 15 minutes on 2 CPU cores) and print a summary against the targets.

    python benchmarks/run_all.py            # builds benchmarks/.venv-trl026 first if it is missing
    python benchmarks/run_all.py --only flops scaling rollout_memory

Run it on an otherwise idle machine: every figure is a ratio of two runs taken side by side, but another process on
the same cores skews one side more than the other. Results land in benchmarks/results/*.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "overhead": ["overhead_vs_trl.py", "--steps", "60", "--repeats", "2"],
    "ppo": ["ppo_vs_trl026.py"],
    "flops": ["flops.py"],
    "scaling": ["scaling.py"],
    "rollout_memory": ["rollout_memory.py"],
    "sharding": ["ppo_sharding.py"],
}


def summary() -> list[str]:
    lines = []
    results = HERE / "results"
    if (results / "overhead_vs_trl.json").is_file():
        overhead = json.loads((results / "overhead_vs_trl.json").read_text())
        for stage, result in overhead["stages"].items():
            lines.append(f"overhead vs trl {stage}: wall {result['wall_ratio']:.2f}, RSS {result['rss_ratio']:.2f} "
                         f"(target <= {overhead['target']})")
    if (results / "ppo_vs_trl026.json").is_file():
        ppo = json.loads((results / "ppo_vs_trl026.json").read_text())
        for size, result in ppo["sizes"].items():
            lines.append(f"ppo vs trl 0.26.2 {size}: time {result['time_ratio']:.2f}, RSS {result['rss_ratio']:.2f} "
                         f"(targets <= {ppo['targets']['time']}, {ppo['targets']['rss']})")
    if (results / "flops.json").is_file():
        flops = json.loads((results / "flops.json").read_text())
        lines.append(f"SFT model FLOP/s / matmul FLOP/s: {flops['fraction']:.2f} (target >= {flops['target']})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    args = parser.parse_args()
    if "ppo" in args.only:
        subprocess.run(["bash", str(HERE / "setup_trl026.sh")], check=True)
    started = time.perf_counter()
    for name in args.only:
        print(f"\n=== {name} ===", flush=True)
        subprocess.run([sys.executable, str(HERE / BENCHMARKS[name][0]), *BENCHMARKS[name][1:]], check=True, cwd=HERE)
    print(f"\n=== summary ({(time.perf_counter() - started) / 60:.1f} min) ===")
    print("\n".join(summary()))


if __name__ == "__main__":
    main()
