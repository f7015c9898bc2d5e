#!/usr/bin/env bash
# GPU figures (benchmarks/README.md, section 7): one run of benchmarks/gpu/bench.py, within 8 minutes on one H100.
#   bash benchmarks/gpu/run.sh            # the GPU run: JSON to $OUT/gpu_<card>.json (or benchmarks/results/)
#   bash benchmarks/gpu/run.sh --smoke    # tiny model, 2 steps each: any machine, CPU included
# The GPU machine has torch, transformers, peft and accelerate but neither trl nor datasets, and no network: when
# they are missing, the wheels in .whl/ (benchmarks/gpu/fetch_wheels.sh, carried with the tree) go into $BENCH_SITE.
# PYTHON: the interpreter (default python3); BENCH_BUDGET: seconds for the benchmark itself (default 440; the
# wheel install and a hard stop 30 s after the budget come on top).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
# "site-packages" in the path: dill (datasets' fingerprints) pickles a module by reference only when its file is under
# sys.prefix or a site-packages folder, and by value otherwise, which fails on pyarrow's types.
SITE="${BENCH_SITE:-/tmp/bench/site-packages}"
BUDGET="${BENCH_BUDGET:-440}"
for arg in "$@"; do
    if [ "$arg" = "--smoke" ]; then BUDGET="${BENCH_BUDGET:-900}"; fi
done
cd "$ROOT"

if ! "$PYTHON" -c 'import trl, datasets' 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "run.sh: trl or datasets is missing and .whl/ has no wheels (run benchmarks/gpu/fetch_wheels.sh here" \
             "and carry .whl with the tree)" >&2
        exit 1
    fi
    started=$SECONDS
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "run.sh: installed $(ls .whl/*.whl | wc -l) wheels into $SITE in $((SECONDS - started)) s"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # rlhf from this tree, not installed there
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" - <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
found = {}
for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "numpy"):
    try:
        found[name] = version(name)
    except PackageNotFoundError:
        found[name] = "missing"
print("run.sh: python", sys.version.split()[0], " ".join(f"{name} {value}" for name, value in found.items()))
if not found["transformers"].split(".")[0].isdigit() or int(found["transformers"].split(".")[0]) < 5:
    print("run.sh: rlhf needs transformers >= 5; only the matmul rate will be measured", file=sys.stderr)
PY
exec timeout -k 10 $((${BUDGET%.*} + 30)) "$PYTHON" benchmarks/gpu/bench.py --budget "$BUDGET" "$@"
