"""What every benchmark shares: run a command and measure it, build a model of a given size, record the machine.

Measurements are of whole commands in fresh processes, so imports, model loading and saving count the same way for
every side. Peak RSS is the largest resident set of the command or any process it started and waited for (Linux
wait4 rusage), so `accelerate launch` and the training process it starts are both covered.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
TINY_BASE = REPO / "data" / "tiny-base"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def run_measured(command: list[str], log_path: Path, env: dict | None = None, cwd: Path = REPO) -> dict:
    """Run `command` to completion; return wall seconds, peak RSS (MiB) over its process tree, exit code."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"command failed (exit {process.returncode}): {' '.join(map(str, command))}\n"
                           f"log {log_path}, last lines:\n{tail}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def build_model(out_dir: Path, with_score_head: bool = False, seed: int = 0, **config_changes) -> int:
    """A randomly initialised Llama of the tiny base's family (same tokenizer and template), saved as safetensors.
    Returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(TINY_BASE)
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    if with_score_head:
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY_BASE / name, out_dir / name)
    if (TINY_BASE / "generation_config.json").is_file() and not with_score_head:
        shutil.copy(TINY_BASE / "generation_config.json", out_dir / "generation_config.json")
    return sum(parameter.numel() for parameter in model.parameters())


def machine() -> dict:
    """What the figures were taken on."""
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    return path


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def launch(module: str, *args: str, accelerate_config: str = "recipes/accelerate/cpu.yaml") -> list[str]:
    """A stage as users start it under Accelerate."""
    return python_module("accelerate.commands.launch", "--config_file", accelerate_config, "-m", module, *args)


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[f"{value:.3g}" if isinstance(value, float) else str(value) for value in row] for row in rows]
    widths = [max(len(str(item)) for item in column) for column in zip(headers, *cells)]
    for row in [headers, ["-" * width for width in widths], *cells]:
        print("  ".join(str(item).ljust(width) for item, width in zip(row, widths)))
