#!/usr/bin/env bash
# Downloads into .whl/ the wheels benchmarks/gpu/run.sh installs on the GPU machine, slims them, and checks that
# they fit beside the working tree in the 64 MiB a device run carries.
#   PYTHON=.venv/bin/python bash benchmarks/gpu/fetch_wheels.sh
# The GPU machine's Python (3.12, x86-64, no network) has torch, transformers, peft and accelerate but not trl or
# datasets: these are trl, datasets and what datasets needs beyond a transformers install. Versions are those of
# $PYTHON (the environment the tests pass in). transformers 5 itself does not fit as well (with tokenizers,
# huggingface_hub 1.x and its dependencies about 25 MB more), so run.sh stops early, saying so, where it is older.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
TARGET_PYTHON="${WHEEL_PYTHON_VERSION:-3.12}"   # the GPU machine's
BUDGET=$((64 * 1024 * 1024))
NAMES=(trl datasets pyarrow pandas python-dateutil tzdata dill multiprocess xxhash fsspec psutil)

PINS=$("$PYTHON" - "${NAMES[@]}" <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
)
cd "$ROOT"
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086  # PINS is a list of name==version words
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $PINS
"$PYTHON" benchmarks/gpu/slim_wheels.py .whl

wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
printf 'fetch_wheels: %s\n' "$PINS"
printf 'fetch_wheels: wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of %d MiB\n' \
    "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" \
    "$(echo "($wheels + $tree) / 1048576" | bc -l)" $((BUDGET / 1048576))
if [ $((wheels + tree)) -gt $BUDGET ]; then
    echo "fetch_wheels: over the 64 MiB a device run carries" >&2
    exit 1
fi
