#!/usr/bin/env bash
# Builds benchmarks/.venv-trl026: TRL 0.26.2 (the last release with trl.experimental.ppo.PPOTrainer on
# transformers < 5) for the "last TRL PPO" side of the PPO benchmark. Idempotent; safe to run from any cwd.
# torch is pinned to 2.13.0 in every pip command so pip never swaps in a (multi-GB) CUDA build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/benchmarks/.venv-trl026"
PY="$VENV/bin/python"
TORCH="torch==2.13.0"

if [ -x "$PY" ] && "$PY" -c 'import sys, trl; sys.exit(trl.__version__ != "0.26.2")' 2>/dev/null; then
    echo "setup_trl026: $VENV already has trl 0.26.2; nothing to do."
    exit 0
fi

python3 -m venv "$VENV"
"$PY" -m pip install --upgrade pip
# torch first (the CPU wheel on local disk), then everything else with torch still pinned.
"$PY" -m pip install "$TORCH"
"$PY" -m pip install "$TORCH" "trl==0.26.2" "transformers>=4.57,<4.58" "accelerate>=1.4" "peft>=0.17" \
    "datasets>=3,<5" psutil
"$PY" -c 'import torch, transformers, trl, accelerate, peft, datasets; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__, "accelerate", accelerate.__version__, "peft", peft.__version__, "datasets", datasets.__version__)'
