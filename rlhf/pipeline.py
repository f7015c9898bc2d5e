"""The whole pipeline in one command: SFT -> reward model -> DPO and/or PPO -> evaluation -> report.

    rlhf pipeline --config recipes/tiny/pipeline.yaml
    rlhf pipeline --config recipes/tiny/pipeline.yaml --force            # rerun every stage
    rlhf pipeline --config recipes/tiny/pipeline.yaml --only sft reward  # just these stages

Each stage runs as `accelerate launch --config_file <accelerate config> -m rlhf.<stage> --config <stage recipe>`,
with the hand-off (init_from, reward_model, output_dir) filled in by the pipeline. A stage whose manifest holds the
same configuration hash as this run would produce is skipped; a stage that was interrupted resumes from its last
checkpoint; a stage whose configuration changed starts over. The report lands in <output_dir>/report.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.config import ConfigError, parse_args

STAGE_MODULES = {"sft": "rlhf.sft", "reward": "rlhf.reward", "dpo": "rlhf.dpo", "ppo": "rlhf.ppo"}
STAGE_ORDER = ["sft", "reward", "dpo", "ppo"]
HASH_FILE = ".pipeline_hash"


@dataclass
class PipelineArgs:
    name: str = field(default="run", metadata={"help": "Run name (shown in the report)."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder for every stage's output and the report."})
    stages: list[str] = field(default_factory=lambda: list(STAGE_ORDER),
                              metadata={"help": "Stages to run, in order: sft reward dpo ppo (dpo/ppo optional)."})
    sft_recipe: str | None = field(default=None, metadata={"help": "Recipe of the SFT stage."})
    reward_recipe: str | None = field(default=None, metadata={"help": "Recipe of the reward-model stage."})
    dpo_recipe: str | None = field(default=None, metadata={"help": "Recipe of the DPO stage."})
    ppo_recipe: str | None = field(default=None, metadata={"help": "Recipe of the PPO stage."})
    accelerate_config: str = field(default="recipes/accelerate/cpu.yaml",
                                   metadata={"help": "Accelerate config every stage is launched with."})
    sft_args: list[str] = field(default_factory=list, metadata={"help": "Extra flags for the SFT stage."})
    reward_args: list[str] = field(default_factory=list, metadata={"help": "Extra flags for the reward stage."})
    dpo_args: list[str] = field(default_factory=list, metadata={"help": "Extra flags for the DPO stage."})
    ppo_args: list[str] = field(default_factory=list, metadata={"help": "Extra flags for the PPO stage, "
                                                                 "e.g. [--steps, 10]."})
    eval_prompts: str | None = field(default=None, metadata={"help": "Held-out prompts for the policy evaluation."})
    eval_preferences: str | None = field(default=None, metadata={"help": "Held-out pairs for the reward-model report."})
    eval_samples: int = field(default=128, metadata={"help": "Prompts sampled per policy in the evaluation."})
    force: bool = field(default=False, metadata={"help": "Rerun every stage even if its manifest matches."})
    only: list[str] = field(default_factory=list, metadata={"help": "Run only these stages (others must be done)."})


ARG_TYPES = (PipelineArgs,)


def stage_argv(stage: str, args: PipelineArgs, out: Path) -> list[str]:
    recipe = getattr(args, f"{stage}_recipe")
    if not recipe:
        raise ConfigError(f"pipeline: stage '{stage}' is listed but {stage}_recipe is not set")
    argv = ["--config", recipe, "--output_dir", str(out / stage)]
    if stage in ("reward", "dpo", "ppo"):
        argv += ["--init_from", str(out / "sft")]
    if stage == "ppo":
        argv += ["--reward_model", str(out / "reward")]
    return argv + [str(item) for item in getattr(args, f"{stage}_args")]


def expected_hash(stage: str, argv: list[str]) -> str:
    """The config hash the stage will record, computed the way the stage computes it (without loading a model)."""
    import importlib

    from rlhf.manifest import config_hash, resolve_parent
    from rlhf.stage import stage_config

    module = importlib.import_module(STAGE_MODULES[stage] + (".trainer" if stage == "ppo" else ""))
    model_args, data_args, training_args, *rest = parse_args(module.ARG_TYPES, argv)
    parent = resolve_parent(model_args.init_from, module.PARENT_STAGES) if model_args.init_from else None
    return config_hash(stage_config(model_args, data_args, training_args, rest[0] if rest else None, parent))


def run_stage(stage: str, argv: list[str], accelerate_config: str) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
               "-m", STAGE_MODULES[stage], *argv]
    print(f"[rlhf] pipeline: {stage}: {' '.join(command[2:])}", flush=True)
    import os

    import torch

    # Without a GPU, accelerate's multi-process launcher runs CPU processes (gloo) only when told so.
    env = {**os.environ, **({} if torch.cuda.is_available() else {"ACCELERATE_USE_CPU": "1"})}
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise ConfigError(f"pipeline: stage '{stage}' failed (exit {result.returncode}); its output is above. "
                          f"Fix it and rerun: finished stages are skipped and this one resumes from its checkpoints.")


def main(argv: list[str] | None = None) -> Path:
    (args,) = parse_args(ARG_TYPES, argv, prog="rlhf pipeline", description=__doc__)
    if not args.output_dir:
        raise ConfigError("pipeline: output_dir is required")
    unknown = [stage for stage in args.stages + args.only if stage not in STAGE_ORDER]
    if unknown:
        raise ConfigError(f"pipeline: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGE_ORDER)}")
    if not Path(args.accelerate_config).is_file():
        raise ConfigError(f"pipeline: accelerate config {args.accelerate_config}: file not found")
    for stage in args.stages:
        recipe = getattr(args, f"{stage}_recipe")
        if not recipe or not Path(recipe).is_file():
            raise ConfigError(f"pipeline: {stage}_recipe {recipe!r}: file not found")

    from rlhf.manifest import is_complete

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "pipeline.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for stage in [stage for stage in STAGE_ORDER if stage in args.stages]:
        stage_dir = out / stage
        argv = stage_argv(stage, args, out)
        if args.only and stage not in args.only:
            if not is_complete(stage_dir):
                raise ConfigError(f"pipeline: --only skips '{stage}', but {stage_dir} has no finished manifest")
            continue
        wanted = expected_hash(stage, argv)
        if not args.force and is_complete(stage_dir, wanted):
            print(f"[rlhf] pipeline: {stage}: up to date (config {wanted}), skipped", flush=True)
            timings.setdefault(stage, {})["skipped"] = True
            timings_path.write_text(json.dumps(timings, indent=2))
            continue
        recorded = (stage_dir / HASH_FILE).read_text().strip() if (stage_dir / HASH_FILE).is_file() else None
        if args.force or (stage_dir.exists() and recorded != wanted):
            shutil.rmtree(stage_dir, ignore_errors=True)  # changed or forced: start over, not from stale checkpoints
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / HASH_FILE).write_text(wanted)
        started = time.perf_counter()
        run_stage(stage, argv, args.accelerate_config)
        timings[stage] = {"seconds": time.perf_counter() - started, "skipped": False, "config_hash": wanted}
        timings_path.write_text(json.dumps(timings, indent=2))

    from rlhf.report import write_pipeline_report

    report = write_pipeline_report(args, out, timings)
    print(f"[rlhf] pipeline done. Report: {report}")
    return report


if __name__ == "__main__":
    main()
