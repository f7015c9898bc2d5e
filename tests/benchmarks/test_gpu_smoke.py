"""benchmarks/gpu: the wheels slimmed for the device run, the shipped model shapes, and run.sh --smoke end to end."""

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))

import slim_wheels  # noqa: E402


def test_slim_wheels_drops_unused_pyarrow_files_and_rewrites_record(tmp_path):
    wheel = tmp_path / "pyarrow-26.0.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    kept = ["pyarrow/__init__.py", "pyarrow/libarrow.so.2600", "pyarrow/_parquet.cpython-312-x86_64-linux-gnu.so",
            "pyarrow/libarrow_python.so.2600", "pyarrow-26.0.1.dist-info/RECORD"]
    dropped = ["pyarrow/include/arrow/api.h", "pyarrow/tests/test_io.py", "pyarrow/lib.pxd",
               "pyarrow/libarrow_flight.so.2600", "pyarrow/_flight.cpython-312-x86_64-linux-gnu.so",
               "pyarrow/libarrow_s3.so.2600", "pyarrow/libarrow_python.so", "pyarrow/libarrow_python.so.2600.1.0"]
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in kept[:-1] + dropped:
            archive.writestr(name, "x" * 1000)
        archive.writestr(kept[-1], "".join(f"{name},sha256=abc,1000\n" for name in kept[:-1] + dropped) +
                         f"{kept[-1]},,\n")

    before, after = slim_wheels.slim(wheel)

    assert after < before
    with zipfile.ZipFile(wheel) as archive:
        assert sorted(archive.namelist()) == sorted(kept)
        record = [line.split(",")[0] for line in archive.read(kept[-1]).decode().splitlines()]
    assert sorted(record) == sorted(kept)
    other = tmp_path / "dill-0.4.1-py3-none-any.whl"
    zipfile.ZipFile(other, "w").close()
    assert slim_wheels.slim(other) is None  # only pyarrow and pandas are slimmed


@pytest.mark.parametrize("config, params", [("smollm2-360m.json", 361_821_120), ("llama-1.5b.json", 1_459_718_144)])
def test_shipped_configs_have_the_sizes_they_are_named_for(config, params):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    fields = json.loads((REPO / "benchmarks" / "gpu" / "configs" / config).read_text())
    fields.pop("architectures"), fields.pop("model_type")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**fields))
    assert sum(parameter.numel() for parameter in model.parameters()) == params  # SmolLM2-360M's own count


def numbers(figures: dict, path: str = ""):
    for key, value in figures.items():
        if isinstance(value, dict):
            yield from numbers(value, f"{path}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{path}{key}", value


@pytest.mark.slow  # 70-150 s on 2 CPU cores: eleven stage processes
def test_smoke_run_fills_every_section_with_positive_figures(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    finished = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--smoke"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert (tmp_path / "logs.tar.gz").is_file()

    sections = {"matmul": result["matmul"], "sft": result["training"]["tiny"]["sft"],
                "reward": result["training"]["tiny"]["reward"], "dpo": result["training"]["tiny"]["dpo"],
                "ppo separate critic": result["ppo"]["separate_critic"],
                "ppo shared critic": result["ppo"]["shared_critic"], "grpo": result["grpo"],
                "tiny pipeline": result["tiny_pipeline_bf16"], "generation engines": result["generation_engines"]}
    for name, figures in sections.items():
        assert "skipped" not in figures, f"{name}: {figures['skipped']}"
        for key, value in numbers(figures):
            assert math.isfinite(value) and value > 0, f"{name}: {key} = {value}"
    for stage in ("sft", "reward", "dpo"):
        assert {"tokens_per_second", "model_flops_per_second", "fraction_of_matmul"} <= sections[stage].keys()
    for name in ("ppo separate critic", "ppo shared critic", "grpo"):
        assert set(sections[name]["split"]) == {"generate", "score", "train"}
        assert sum(sections[name]["split"].values()) == pytest.approx(sections[name]["seconds_per_step"], rel=0.1)
        assert {"tokens_per_second", "peak_memory_mib"} <= sections[name].keys()
    assert {"sft_gold", "ppo_gold", "rises"} <= sections["tiny pipeline"].keys()
    engines = sections["generation engines"]["engines"]
    assert set(engines) == {"dynamic", "static", "paged"} and all("tokens_per_s" in figures for figures in engines.values())
    assert sections["generation engines"]["roofline"]["tokens_per_s"] > 0
    assert "skipped" in result["ppo_trl_0_26_2"]
    assert int(result["versions"]["transformers"].split(".")[0]) >= 5
