"""Benchmark 7: figures from one GPU. Started by run.sh, which installs trl and datasets from .whl/ first.

    bash benchmarks/gpu/run.sh [--smoke]
    python benchmarks/gpu/bench.py [--smoke] [--budget 440] [--out FILE]

- matmul: the bf16 matmul FLOP/s torch reaches on this device (best over a few large square products);
- training: bf16 SFT, reward and DPO (full fine-tuning, fp32 weights with bf16 autocast) on random-init Llamas shaped
  like SmolLM2-360M and a 1.5B model (configs/), sequences filled to max_length: tokens/s after the first step, and
  model FLOP/s (6 · matmul parameters · tokens/s; attention scores and DPO's reference forward not counted) as a
  fraction of the matmul rate;
- ppo (separate and shared critic) and grpo on the 360M SFT and reward outputs: seconds per iteration after the first,
  split into generate / score / train, tokens/s (prompt + response tokens per iteration second), peak memory;
- tiny_pipeline_bf16: the tiny task's SFT and reward stages as their recipes run them (on the CPU, beside the GPU
  parts), then its PPO recipe in bf16 on the GPU: the held-out gold reward after PPO against SFT's.

Every part is its own process with its own time cap, the whole run has a budget (parts that no longer fit are skipped,
saying so), and the JSON is rewritten after every part, so a run cut short still returns what it measured. It goes to
$OUT/gpu_<card>.json when OUT is set, else to benchmarks/results/. --smoke: the tiny model, 2 steps each, on whatever
device there is (a test runs it on CPU). Peak memory (peak_memory_mib) is what torch allocated on the GPU at most, or
the process's peak resident set on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: the helpers every benchmark shares
from common import REPO, RESULTS, build_model, machine, python_module, run_measured  # noqa: E402
from flops import long_sft_records  # noqa: E402
from scaling import fitted_preference_records, mean_prompt_tokens  # noqa: E402

# PPO: frozen weights stored in bf16, bf16 autocast, the trained LoRA and value head in fp32
PPO_BF16 = ["--dtype", "bfloat16", "--bf16", "true"]
TRL_BF16 = ["--bf16", "true", "--dtype", "float32"]  # TRL stages: fp32 master weights, bf16 autocast
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "4"}
TRL_026 = ("TRL 0.26.2 needs transformers < 4.58, which cannot share the site folder with the transformers 5 that "
           "rlhf needs, and a second site folder (transformers 4.57 and its dependencies) does not fit in the 64 MiB a "
           "device run carries beside datasets' pyarrow; benchmarks/ppo_vs_trl026.py compares them on CPU")
FULL = {
    "models": {"360m": "smollm2-360m.json", "1.5b": "llama-1.5b.json"},
    "seq": 1024, "steps": 12, "batch": {"360m": 16, "1.5b": 8}, "matmul_sizes": [4096, 8192],
    "ppo": {"steps": 4, "rollout_batch_size": 64, "mini_batch_size": 32, "ppo_epochs": 2, "max_new_tokens": 128},
    "grpo": {"max_steps": 4, "per_device_train_batch_size": 64, "num_generations": 8, "max_completion_length": 128},
    "tiny": [],  # the tiny recipes as they are
    "caps": {"matmul": 90, "build": 300, "stage_360m": 100, "stage_1.5b": 150, "ppo": 150, "grpo": 150,
             "tiny_cpu": 360, "tiny_ppo": 240, "generation": 120},
    # benchmarks/generation_engines.py on the 360M model: which engine the GPU default should be
    "generation": ["--batch", "32", "--new_tokens", "64", "--repeats", "2",
                   "--engines", "dynamic", "dynamic_bf16", "static", "paged"],
}
SMOKE = {
    "models": {"tiny": None},
    "seq": 128, "steps": 2, "batch": {"tiny": 4}, "matmul_sizes": [256, 512],
    "ppo": {"steps": 2, "rollout_batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 16},
    "grpo": {"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 16},
    "tiny": ["--max_steps", "2", "--gold_eval_samples", "8", "--stats_samples", "16"],
    "caps": {name: 300 for name in ("matmul", "build", "stage_tiny", "ppo", "grpo", "tiny_cpu", "tiny_ppo",
                                    "generation")},
    "generation": ["--batch", "4", "--new_tokens", "8", "--repeats", "1", "--engines", "dynamic", "static", "paged"],
}
NOT_IN_CONFIG = ("architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "transformers_version")


class OutOfTime(Exception):
    pass


class Run:
    """The JSON being filled, the time left, and the part runner."""

    def __init__(self, settings: dict, budget: float, path: Path, work: Path, smoke: bool):
        self.settings, self.path, self.work, self.smoke = settings, path, work, smoke
        self.deadline = time.monotonic() + budget
        self.result = {"machine": machine(), "versions": versions(), "budget_s": budget, "smoke": smoke,
                       "settings": settings, "ppo_trl_0_26_2": {"skipped": TRL_026}, "part_seconds": {}}
        self.started = time.monotonic()
        import torch

        # TRL refuses bf16 without a GPU unless told to train on the CPU (the smoke test's case)
        self.trl_bf16 = TRL_BF16 + ([] if torch.cuda.is_available() else ["--use_cpu", "true"])

    def cap(self, name: str) -> int:
        """This part's time cap: its own, or what is left of the budget when that is less."""
        left = self.deadline - time.monotonic() - 5
        if left < 20:
            raise OutOfTime(f"skipped: out of time (budget {self.result['budget_s']:.0f} s)")
        return int(min(self.settings["caps"][name], left))

    def part(self, keys: tuple[str, ...], measure, *args) -> dict | None:
        """Run one part and file its figures (or why there are none) under result[keys...]; write the JSON."""
        started = time.monotonic()
        try:
            figures = measure(*args)
        except OutOfTime as reason:
            figures = {"skipped": str(reason)}
        except Exception as error:  # a failed part is a figure too; the rest still run
            figures = {"skipped": f"failed: {error_text(error)}"}
        target = self.result
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = figures
        self.result["part_seconds"]["/".join(keys)] = round(time.monotonic() - started, 1)
        self.write()
        print(f"[bench] {'/'.join(keys)}: {json.dumps(figures)[:400]}", flush=True)
        return None if "skipped" in figures else figures

    def write(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.result, indent=2) + "\n")
        partial.replace(self.path)

    def command(self, name: str, cap: int, command: list, env: dict | None = None) -> dict:
        """run_measured under a time cap (coreutils timeout: the command's own exit 124 reads the same)."""
        try:
            return run_measured(["timeout", "-k", "10", str(cap), *map(str, command)],
                                self.work / "logs" / f"{name}.log", env=env)
        except RuntimeError as error:
            # timeout's own exit codes; 137 is also what the OOM killer leaves
            if "(exit 124)" in str(error) or "(exit 137)" in str(error):
                raise RuntimeError(f"{name}: stopped at its {cap} s cap or killed; {error}") from None
            raise


def error_text(error: Exception, lines: int = 12) -> str:
    return "\n".join(str(error).splitlines()[-lines:])


def versions() -> dict:
    found = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def card_name() -> str:
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
        return names[0].strip() or "cpu"
    except (OSError, subprocess.SubprocessError):
        return "cpu"


# ------------------------------------------------------------------------------------------------ in-process parts
def matmul_rate(sizes: list[int], repeats: int = 10) -> dict:
    """Best bf16 matmul FLOP/s over square sizes (2·n³ per product), on the GPU when there is one; and the device."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    by_size = {}
    for size in sizes:
        left, right = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
        left @ right  # warm up the kernels and the allocator
        sync()
        for _ in range(3):  # best of three rounds: the clocks may still be rising in the first
            started = time.perf_counter()
            for _ in range(repeats):
                left @ right
            sync()
            by_size[size] = max(by_size.get(size, 0), 2 * size**3 * repeats / (time.perf_counter() - started))
    card = {"type": device.type, "torch_cuda": torch.version.cuda}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        card.update(name=properties.name, memory_gib=properties.total_memory / 2**30,
                    capability=f"{properties.major}.{properties.minor}")
    return {"bf16_flops_per_second": max(by_size.values()), "by_size": by_size, "device": card}


def model_config(name: str | None) -> dict:
    """Architecture fields of a shipped config, laid over the tiny base's config (its tokenizer's token ids stay)."""
    if name is None:
        return {}
    fields = json.loads((HERE / "configs" / name).read_text())
    return {key: value for key, value in fields.items() if key not in NOT_IN_CONFIG}


# ------------------------------------------------------------------------------------------------------- the parts
def run_matmul(run: Run) -> dict:
    out = run.work / "matmul.json"
    run.command("matmul", run.cap("matmul"), [sys.executable, __file__, "--matmul", out,
                                              "--sizes", *run.settings["matmul_sizes"]])
    figures = json.loads(out.read_text())
    run.result["device"] = figures.pop("device")
    return figures


def build_models(run: Run) -> dict:
    """Every benchmark model, built on the CPU (a process of its own, beside the GPU parts). Returns {tag: params}."""
    params = {}
    for tag, config in run.settings["models"].items():
        out = run.work / f"params_{tag}.json"
        run.command(f"build_{tag}", run.cap("build"), [sys.executable, __file__, "--build", config or "",
                                                       run.work / f"base_{tag}", out], env={"OMP_NUM_THREADS": "8"})
        params[tag] = json.loads(out.read_text())
    return params


def step_seconds(profile: Path, steps: int, train_seconds: float) -> float:
    """Seconds per optimizer step after the first, from the log times (logging_steps 1); train_seconds / steps when
    fewer than two steps were logged."""
    times = [entry["time"] for entry in json.loads(profile.read_text())["logs"] if "loss" in entry]
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) >= 2 else train_seconds / steps


def run_training(run: Run, tag: str, stage: str, built: dict) -> dict:
    """One TRL stage from the random base, filled sequences: tokens/s and model FLOP/s against the matmul rate."""
    seq, steps, batch = run.settings["seq"], run.settings["steps"], run.settings["batch"][tag]
    matmul_params = built["params"] - (built["embedding_params"] if stage == "reward" else 0)  # no LM head
    if stage == "sft":
        data, tokens_per_step = run.work / "long_sft.jsonl", batch * seq
    else:  # pairs: half the batch, both sides trained
        batch = max(1, batch // 2)
        data = run.work / f"prefs_{seq}.jsonl"
        tokens_per_step = 2 * batch * json.loads((run.work / f"prefs_{seq}.json").read_text())["mean_length"]
    out, profile = run.work / f"{stage}_{tag}", run.work / f"{stage}_{tag}.profile.json"
    measured = run.command(f"{stage}_{tag}", run.cap(f"stage_{tag}"), [
        sys.executable, HERE / "profiled_stage.py", profile, f"rlhf.{stage}", "--config", f"recipes/tiny/{stage}.yaml",
        "--init_from", "", "--model_name_or_path", built["path"], "--train_data", data, "--output_dir", out,
        "--use_lora", "false", "--max_length", seq, "--max_steps", steps, "--per_device_train_batch_size", batch,
        "--save_strategy", "no", "--eval_data", "", "--gold_eval_prompts", "", "--logging_steps", "1",
        "--warmup_steps", "0", "--activation_checkpointing", "false", "--report_to", "none", "--save_merged", "false",
        *(["--assistant_only_loss", "false"] if stage == "sft" else []),
        *(["--stats_samples", "64"] if stage == "reward" else []), *run.trl_bf16])
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    seconds = step_seconds(profile, steps, metrics["train_seconds"])
    matmul = run.result.get("matmul", {}).get("bf16_flops_per_second")
    model_flops = 6 * matmul_params * tokens_per_step / seconds
    return {"params": built["params"], "matmul_params": matmul_params, "batch": batch, "seq": seq, "steps": steps,
            "tokens_per_step": tokens_per_step, "seconds_per_step": seconds,
            "tokens_per_second": tokens_per_step / seconds,
            "model_flops_per_second": model_flops, "fraction_of_matmul": model_flops / matmul if matmul else None,
            "train_seconds": metrics["train_seconds"], "peak_memory_mib": metrics.get("peak_memory_mib"), **measured}


def run_ppo(run: Run, critic: str, sft: Path, reward: Path) -> dict:
    settings = run.settings["ppo"]
    out = run.work / f"ppo_{critic}"
    measured = run.command(f"ppo_{critic}", run.cap("ppo"), python_module(
        "rlhf.ppo", "--config", "recipes/tiny/ppo.yaml", "--init_from", sft, "--reward_model", reward,
        "--output_dir", out, "--layout", "shared", "--critic", critic, "--value_init", "policy", "--gold_reward", "",
        "--gold_eval_prompts", "", "--gold_curve_points", "0", "--save_steps", "0", "--save_merged", "false",
        "--min_reward_accuracy", "0",  # a few-step reward model without eval_data: no accuracy to gate on
        *flags(settings), *PPO_BF16))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = steps[1:] or steps
    seconds = statistics.mean(step["time/step"] for step in later)
    response = statistics.mean(step["response/length"] for step in later)
    tokens = settings["rollout_batch_size"] * (mean_prompt_tokens() + response)
    split = {name: statistics.mean(step[f"time/{key}"] for step in later)
             for name, key in (("generate", "generation"), ("score", "scoring"), ("train", "training"))}
    return {"seconds_per_step": seconds, "split": split, "tokens_per_second": tokens / seconds,
            "peak_memory_mib": max(step["memory/peak_mib"] for step in steps), "flags": PPO_BF16, **settings,
            **measured}


def run_generation(run: Run, base: Path) -> dict:
    """Tokens/s of each generation engine against the card's decode roofline (benchmarks/generation_engines.py)."""
    out = run.work / "generation_engines.json"
    run.command("generation", run.cap("generation"), [
        sys.executable, REPO / "benchmarks" / "generation_engines.py", "--base", base, "--out", out,
        *run.settings["generation"]])
    return json.loads(out.read_text())


def run_grpo(run: Run, sft: Path, reward: Path) -> dict:
    settings = run.settings["grpo"]
    out, profile = run.work / "grpo", run.work / "grpo.profile.json"
    measured = run.command("grpo", run.cap("grpo"), [
        sys.executable, HERE / "profiled_stage.py", profile, "rlhf.grpo", "--config", "recipes/tiny/grpo.yaml",
        "--init_from", sft, "--reward_model", reward, "--output_dir", out, "--min_reward_accuracy", "0",
        "--gold_reward", "", "--gold_eval_prompts", "", "--gold_curve_points", "0", "--logging_steps", "1",
        "--save_strategy", "no", "--save_merged", "false", "--report_to", "none", *flags(settings), *run.trl_bf16])
    recorded = json.loads(profile.read_text())
    logs = [entry for entry in recorded["logs"] if "step_time" in entry]
    later = logs[1:] or logs
    seconds = statistics.mean(entry["step_time"] for entry in later)
    split = {"generate": 0.0, "score": 0.0}
    skipped_step = min(span["step"] for span in recorded["spans"]) if len(logs) > 1 else None
    for span in recorded["spans"]:
        part = ("generate" if re.search(r"\.generate(_batch)?$", span["name"]) else
                "score" if span["name"].endswith("._calculate_rewards") else None)
        if part and span["step"] != skipped_step:
            split[part] += span["seconds"] / len(later)
    split["train"] = seconds - split["generate"] - split["score"]
    completion = statistics.mean(entry["completions/mean_length"] for entry in later)
    tokens = settings["per_device_train_batch_size"] * (mean_prompt_tokens() + completion)
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds_per_step": seconds, "split": split, "tokens_per_second": tokens / seconds,
            "peak_memory_mib": manifest["metrics"].get("peak_memory_mib"), "flags": run.trl_bf16, **settings,
            **measured}


def tiny_stages(run: Run) -> tuple[Path, Path]:
    """The tiny task's SFT and reward stages as their recipes run them (fp32, CPU), beside the GPU parts."""
    sft, reward = run.work / "tiny_sft", run.work / "tiny_reward"
    cap = run.cap("tiny_cpu")
    started = time.monotonic()
    run.command("tiny_sft", cap, python_module("rlhf.sft", "--config", "recipes/tiny/sft.yaml", "--output_dir", sft,
                                               *tiny_flags(run, "--max_steps", "--gold_eval_samples")), env=CPU_ONLY)
    run.command("tiny_reward", max(20, int(cap - (time.monotonic() - started))), python_module(
        "rlhf.reward", "--config", "recipes/tiny/reward.yaml", "--init_from", sft, "--output_dir", reward,
        *tiny_flags(run, "--max_steps", "--stats_samples")), env=CPU_ONLY)
    return sft, reward


def tiny_flags(run: Run, *names: str) -> list[str]:
    pairs = zip(run.settings["tiny"][::2], run.settings["tiny"][1::2])
    return [item for name, value in pairs if name in names for item in (name, value)]


def run_tiny_ppo(run: Run, stages) -> dict:
    sft, reward = stages.result()  # the CPU stages' own failure, or their folders
    out = run.work / "tiny_ppo"
    measured = run.command("tiny_ppo", run.cap("tiny_ppo"), python_module(
        "rlhf.ppo", "--config", "recipes/tiny/ppo.yaml", "--init_from", sft, "--reward_model", reward,
        "--output_dir", out, "--gold_curve_points", "0", "--save_merged", "false", *PPO_BF16,
        *(["--steps", "2", "--gold_eval_samples", "8", "--min_reward_accuracy", "0"] if run.smoke else [])))
    gold = {name: json.loads((folder / "manifest.json").read_text())["metrics"]["gold"]["gold_reward"]
            for name, folder in (("sft", sft), ("ppo", out))}
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"sft_gold": gold["sft"]["mean"], "ppo_gold": gold["ppo"]["mean"], "sft_gold_ci95": gold["sft"]["ci95"],
            "ppo_gold_ci95": gold["ppo"]["ci95"], "rises": gold["ppo"]["mean"] > gold["sft"]["mean"],
            "ppo_steps": len(steps), "seconds_per_step": statistics.mean(s["time/step"] for s in steps[1:] or steps),
            "peak_memory_mib": max(step["memory/peak_mib"] for step in steps), "flags": PPO_BF16, **measured}


def flags(settings: dict) -> list[str]:
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


def prepare_data(run: Run) -> None:
    """Sequences that fill max_length: flops.py's long SFT conversations with each answer said three times (it
    writes them for 512 tokens), and preference pairs fitted just under max_length."""
    seq, steps, batch = run.settings["seq"], run.settings["steps"], max(run.settings["batch"].values())
    path = run.work / "long_sft.jsonl"
    long_sft_records(path, steps * batch)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record["messages"][-1]["content"] = " ".join([record["messages"][-1]["content"]] * 3)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    mean_length = fitted_preference_records(run.work / f"prefs_{seq}.jsonl", seq, steps * max(1, batch // 2))
    (run.work / f"prefs_{seq}.json").write_text(json.dumps({"mean_length": mean_length}))


def benchmark(run: Run) -> None:
    major = (run.result["versions"]["transformers"] or "0").split(".")[0]
    if not major.isdigit() or int(major) < 5:
        reason = f"skipped: transformers {run.result['versions']['transformers']} here; rlhf needs >= 5"
        for section in ("training", "ppo", "grpo", "tiny_pipeline_bf16"):
            run.result[section] = {"skipped": reason}
        run.part(("matmul",), run_matmul, run)
        return
    with ThreadPoolExecutor(max_workers=3) as background:
        tiny = background.submit(tiny_stages, run)  # CPU only
        built = background.submit(build_models, run)  # CPU only
        data = background.submit(prepare_data, run)
        run.part(("matmul",), run_matmul, run)
        tags = list(run.settings["models"])
        first = tags[0]
        models = {}
        try:
            params, _ = built.result(), data.result()
            models = {tag: {"path": run.work / f"base_{tag}", **params[tag]} for tag in tags}
        except Exception as error:
            run.result["training"] = {"skipped": f"failed: building the models or data: {error_text(error)}"}
        if models:
            for stage in ("sft", "reward", "dpo"):
                run.part(("training", first, stage), run_training, run, first, stage, models[first])
        sft, reward = run.work / f"sft_{first}", run.work / f"reward_{first}"
        have_parents = all((folder / "manifest.json").is_file() for folder in (sft, reward))
        for critic in ("separate", "shared"):
            run.part(("ppo", f"{critic}_critic"), needs(have_parents, run_ppo), run, critic, sft, reward)
        run.part(("grpo",), needs(have_parents, run_grpo), run, sft, reward)
        if models:
            run.part(("generation_engines",), run_generation, run, models[first]["path"])
        run.part(("tiny_pipeline_bf16",), run_tiny_ppo, run, tiny)
        for tag in tags[1:]:
            for stage in ("sft", "reward", "dpo") if models else ():
                run.part(("training", tag, stage), run_training, run, tag, stage, models[tag])
                shutil.rmtree(run.work / f"{stage}_{tag}", ignore_errors=True)  # GBs, and nothing starts from them


def needs(ready: bool, measure):
    def measure_if_ready(*args):
        if not ready:
            raise RuntimeError("the 360M SFT and reward stages it starts from did not finish")
        return measure(*args)
    return measure_if_ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny model, 2 steps each (runs on CPU in a test).")
    parser.add_argument("--budget", type=float, default=440, help="Seconds for the whole run (parts that no longer "
                        "fit are skipped).")
    parser.add_argument("--out", type=Path, help="JSON path (default: $OUT/gpu_<card>.json or benchmarks/results/).")
    parser.add_argument("--matmul", type=Path, help=argparse.SUPPRESS)  # a part's own process: write the rate here
    parser.add_argument("--sizes", type=int, nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=3, help=argparse.SUPPRESS)  # CONFIG OUT_DIR PARAMS_JSON
    args = parser.parse_args()
    if args.matmul:
        args.matmul.write_text(json.dumps(matmul_rate(args.sizes)))
        return
    if args.build:
        config, out_dir, params_out = args.build
        fields = model_config(config or None)
        params = build_model(Path(out_dir), **fields)
        base = json.loads((Path(out_dir) / "config.json").read_text())
        Path(params_out).write_text(json.dumps({"params": params, "config": config or "data/tiny-base",
                                                "embedding_params": base["vocab_size"] * base["hidden_size"]}))
        return

    card = "smoke" if args.smoke else re.sub(r"[^a-z0-9]+", "_", card_name().lower()).strip("_")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS) / f"gpu_{card}.json"
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run.sh's hard stop: still pack the logs
    run = Run(SMOKE if args.smoke else FULL, args.budget, out, work, args.smoke)
    print(f"[bench] versions {json.dumps(run.result['versions'])}; writing {out}", flush=True)
    try:
        benchmark(run)
    finally:
        run.write()
        if os.environ.get("OUT") and (work / "logs").is_dir():  # every part's log comes back with the figures
            with tarfile.open(Path(os.environ["OUT"]) / "logs.tar.gz", "w:gz") as logs:
                logs.add(work / "logs", arcname="logs")
        shutil.rmtree(work, ignore_errors=True)
    print(f"[bench] written {out}")


if __name__ == "__main__":
    main()
