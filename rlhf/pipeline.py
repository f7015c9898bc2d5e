"""The whole pipeline in one command: SFT -> reward model -> any of DPO, PPO, GRPO, RLOO -> evaluation -> report.

    rlhf pipeline --config recipes/tiny/pipeline.yaml
    rlhf pipeline --config recipes/tiny/pipeline.yaml --force            # rerun every stage
    rlhf pipeline --config recipes/tiny/pipeline.yaml --only sft reward  # just these stages

Each stage runs as `accelerate launch --config_file <accelerate config> -m rlhf.<stage> --config <stage recipe>`,
with the hand-off (init_from, reward_model, output_dir) filled in by the pipeline. A stage whose manifest holds the
same configuration hash as this run would produce is skipped; a stage that was interrupted resumes from its last
checkpoint; a stage whose configuration changed starts over. The report lands in <output_dir>/report.md: every
policy stage side by side on the same SFT policy and reward model (reward-model score and win-rate vs SFT, KL, length,
EOS rate, wall time, peak memory; gold reward and win-rate by it only when the stage recipes name a gold reward), a
possible-reward-hacking flag, score-against-KL and score-distribution plots, and, with a gold reward, the held-out
gold reward against training seconds.
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

STAGE_MODULES = {"sft": "rlhf.sft", "reward": "rlhf.reward", "dpo": "rlhf.dpo", "ppo": "rlhf.ppo",
                 "grpo": "rlhf.grpo", "rloo": "rlhf.rloo"}
STAGE_ORDER = ["sft", "reward", "dpo", "ppo", "grpo", "rloo"]
POLICY_STAGES = ["dpo", "ppo", "grpo", "rloo"]
HASH_FILE = ".pipeline_hash"
UPSTREAM = {"reward": ("sft",), "dpo": ("sft",), "ppo": ("sft", "reward"), "grpo": ("sft", "reward"),
            "rloo": ("sft", "reward")}  # the stages each one starts from or is rewarded by


@dataclass
class PipelineArgs:
    name: str = field(default="run", metadata={"help": "Run name (shown in the report)."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder for every stage's output and the report."})
    stages: list[str] = field(default_factory=lambda: ["sft", "reward"],
                              metadata={"help": "Stages to run besides policy_stages: sft, reward (policy stages may "
                                        "be listed here too)."})
    policy_stages: list[str] = field(default_factory=list,
                                     metadata={"help": "Policy methods to train from the same SFT policy and reward "
                                               "model and compare side by side: any of dpo, ppo, grpo, rloo."})
    sft_recipe: str | None = field(default=None, metadata={"help": "Recipe of the SFT stage."})
    reward_recipe: str | None = field(default=None, metadata={"help": "Recipe of the reward-model stage."})
    dpo_recipe: str | None = field(default=None, metadata={"help": "Recipe of the DPO stage."})
    ppo_recipe: str | None = field(default=None, metadata={"help": "Recipe of the PPO stage."})
    grpo_recipe: str | None = field(default=None, metadata={"help": "Recipe of the GRPO stage."})
    rloo_recipe: str | None = field(default=None, metadata={"help": "Recipe of the RLOO stage."})
    accelerate_config: str = field(default="recipes/accelerate/cpu.yaml",
                                   metadata={"help": "Accelerate config every stage is launched with."})
    sft_args: list[str] = field(default_factory=list, metadata={"help": "Extra flags for the SFT stage."})
    reward_args: list[str] = field(default_factory=list, metadata={"help": "Extra flags for the reward stage."})
    dpo_args: list[str] = field(default_factory=list, metadata={"help": "Extra flags for the DPO stage."})
    ppo_args: list[str] = field(default_factory=list, metadata={"help": "Extra flags for the PPO stage, "
                                                                 "e.g. [--steps, 10]."})
    grpo_args: list[str] = field(default_factory=list, metadata={"help": "Extra flags for the GRPO stage."})
    rloo_args: list[str] = field(default_factory=list, metadata={"help": "Extra flags for the RLOO stage."})
    eval_prompts: str | None = field(default=None, metadata={"help": "Held-out prompts for the policy evaluation."})
    eval_preferences: str | None = field(default=None, metadata={"help": "Held-out pairs for the reward-model report."})
    eval_samples: int = field(default=128, metadata={"help": "Prompts sampled per policy in the evaluation."})
    eval_max_new_tokens: int = field(default=64, metadata={
        "help": "Longest response sampled in the evaluation: as long as the policies answer in training, or the reward "
                "model judges cut-off answers."})
    force: bool = field(default=False, metadata={"help": "Rerun every stage even if its manifest matches."})
    only: list[str] = field(default_factory=list, metadata={"help": "Run only these stages (others must be done)."})


ARG_TYPES = (PipelineArgs,)


def run_stages(args: PipelineArgs) -> list[str]:
    """Every stage to run, in pipeline order: `stages` and `policy_stages` together."""
    return [stage for stage in STAGE_ORDER if stage in args.stages or stage in args.policy_stages]


def stage_argv(stage: str, args: PipelineArgs, out: Path) -> list[str]:
    recipe = getattr(args, f"{stage}_recipe")
    if not recipe:
        raise ConfigError(f"pipeline: stage '{stage}' is listed but {stage}_recipe is not set")
    argv = ["--config", recipe, "--output_dir", str(out / stage)]
    if stage != "sft":
        argv += ["--init_from", str(out / "sft")]
    if stage in ("ppo", "grpo", "rloo"):  # a recipe's extra flags may still set --reward_model null
        argv += ["--reward_model", str(out / "reward")]
    return argv + [str(item) for item in getattr(args, f"{stage}_args")]


def parsed_stage_args(stage: str, argv: list[str]) -> tuple:
    """The stage's own argument dataclasses, filled from its recipe and flags exactly as the stage will fill them."""
    import importlib

    module = importlib.import_module(STAGE_MODULES[stage] + (".trainer" if stage == "ppo" else ""))
    return module.PARENT_STAGES, parse_args(module.ARG_TYPES, argv)


def expected_hash(stage: str, argv: list[str]) -> str:
    """The config hash the stage will record, computed the way the stage computes it (without loading a model)."""
    from rlhf.manifest import config_hash, resolve_parent
    from rlhf.stage import stage_config

    parent_stages, (model_args, data_args, training_args, *rest) = parsed_stage_args(stage, argv)
    parent = resolve_parent(model_args.init_from, parent_stages) if model_args.init_from else None
    return config_hash(stage_config(model_args, data_args, training_args, rest[0] if rest else None, parent))


def recipe_gold_reward(args: PipelineArgs, out: Path, stages: list[str]) -> str | None:
    """The gold reward that the first of `stages` naming one names in its recipe (and extra flags). The user named it
    in the pipeline's recipes, so the policy evaluation may import it."""
    for stage in stages:
        _, (_model_args, data_args, *_rest) = parsed_stage_args(stage, stage_argv(stage, args, out))
        if data_args.gold_reward:
            return data_args.gold_reward
    return None


def retrained_upstream(stage: str, out: Path, stages: list[str]) -> str | None:
    """The stage of this pipeline that `stage` starts from (sft; reward for the online methods) when that one
    finished after `stage` did: its config is unchanged, so the config hash cannot tell (--force --only reward)."""
    from datetime import datetime

    from rlhf.manifest import ManifestError, read_manifest

    def finished(name: str) -> datetime:
        return datetime.strptime(read_manifest(out / name).created, "%Y-%m-%dT%H:%M:%S%z")

    try:
        return next((name for name in UPSTREAM.get(stage, ()) if name in stages
                     and finished(name) > finished(stage)), None)
    except (ManifestError, ValueError):  # not finished (or no time recorded): nothing to compare
        return None


def read_timings(path: Path) -> dict:
    """pipeline.json: each stage's seconds, config hash and whether the last run skipped it. Written atomically, but
    one a crash or a person left unreadable only loses timings, never the run."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"[rlhf] pipeline: {path} is not valid JSON; the stage timings start afresh", flush=True)
        return {}


def run_stage(stage: str, argv: list[str], accelerate_config: str, stage_dir: Path) -> None:
    """Launch one stage and wait for it. The stage runs in its own process group, which a signal to the pipeline
    (Ctrl-C, SIGTERM, SIGHUP) takes down with it; its processes also watch the pipeline's pid and stop when it is
    gone, even after a SIGKILL. So a killed pipeline leaves nothing training, and a rerun resumes the stage."""
    import os
    import signal

    import torch

    from rlhf.processes import ERROR_FILE_ENV, PIPELINE_PID_ENV

    argv, hub_token = without_hub_token(argv)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", accelerate_config,
               "-m", STAGE_MODULES[stage], *argv]
    print(f"[rlhf] pipeline: {stage}: {' '.join(command[2:])}", flush=True)
    error_file = stage_dir / ".error"
    error_file.unlink(missing_ok=True)
    env = {**os.environ, PIPELINE_PID_ENV: str(os.getpid()), ERROR_FILE_ENV: str(error_file),
           **({"HF_TOKEN": hub_token} if hub_token else {}),
           # Without a GPU, accelerate's multi-process launcher runs CPU processes (gloo) only when told so.
           **({} if torch.cuda.is_available() else {"ACCELERATE_USE_CPU": "1"})}
    process = subprocess.Popen(command, env=env, start_new_session=True)

    def stop(signum, frame):
        print(f"[rlhf] pipeline: {signal.Signals(signum).name}: stopping stage '{stage}'", file=sys.stderr, flush=True)
        stop_process_group(process)
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        returncode = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if returncode != 0:
        reason = error_file.read_text().strip() if error_file.is_file() else f"exit {returncode}; its output is above"
        raise ConfigError(f"stage '{stage}' failed: {reason}. Fix it and rerun: finished stages are skipped and this "
                          "one resumes from its checkpoints.")


def without_hub_token(argv: list[str]) -> tuple[list[str], str | None]:
    """(argv without --hub_token, the token): the stage gets the token as HF_TOKEN, which huggingface_hub reads,
    so it is neither printed with the command nor visible to other users in the process list."""
    kept, token, position = [], None, 0
    while position < len(argv):
        item = argv[position]
        if item == "--hub_token" and position + 1 < len(argv):
            token, position = argv[position + 1], position + 2
            continue
        if item.startswith("--hub_token="):
            token = item.partition("=")[2]
        else:
            kept.append(item)
        position += 1
    return kept, token


def stop_process_group(process, grace_seconds: float = 10.0) -> None:
    """SIGTERM a launched stage's process group, then SIGKILL what is left after grace_seconds."""
    import os
    import signal

    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_seconds)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> Path:
    (args,) = parse_args(ARG_TYPES, argv, prog="rlhf pipeline", description=__doc__)
    if not args.output_dir:
        raise ConfigError("pipeline: output_dir is required")
    unknown = [stage for stage in args.stages + args.only if stage not in STAGE_ORDER]
    if unknown:
        raise ConfigError(f"pipeline: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGE_ORDER)}")
    unknown = [stage for stage in args.policy_stages if stage not in POLICY_STAGES]
    if unknown:
        raise ConfigError(f"pipeline: policy_stages: unknown {', '.join(unknown)}; pick any of {', '.join(POLICY_STAGES)}")
    stages = run_stages(args)
    if not Path(args.accelerate_config).is_file():
        raise ConfigError(f"pipeline: accelerate config {args.accelerate_config}: file not found")
    for stage in stages:
        recipe = getattr(args, f"{stage}_recipe")
        if not recipe or not Path(recipe).is_file():
            raise ConfigError(f"pipeline: {stage}_recipe {recipe!r}: file not found")

    from rlhf.manifest import atomic_write, is_complete

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "pipeline.json"
    timings = read_timings(timings_path)
    for stage in stages:
        stage_dir = out / stage
        argv = stage_argv(stage, args, out)
        if args.only and stage not in args.only:
            if not is_complete(stage_dir):
                raise ConfigError(f"pipeline: --only skips '{stage}', but {stage_dir} has no finished manifest")
            continue
        wanted = expected_hash(stage, argv)
        retrained = retrained_upstream(stage, out, stages)
        if retrained and is_complete(stage_dir, wanted):
            print(f"[rlhf] pipeline: {stage}: '{retrained}' was trained again after it, so it runs again", flush=True)
        elif not args.force and is_complete(stage_dir, wanted):
            print(f"[rlhf] pipeline: {stage}: up to date (config {wanted}), skipped", flush=True)
            timings.setdefault(stage, {})["skipped"] = True
            atomic_write(timings_path, json.dumps(timings, indent=2))
            continue
        recorded = (stage_dir / HASH_FILE).read_text().strip() if (stage_dir / HASH_FILE).is_file() else None
        resumed = not args.force and not retrained and stage_dir.exists() and recorded == wanted
        if stage_dir.exists() and not resumed:
            shutil.rmtree(stage_dir, ignore_errors=True)  # changed or forced: start over, not from stale checkpoints
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(stage_dir / HASH_FILE, wanted)
        # A resumed stage's time includes its runs before the kill (they are what it cost), as they were recorded.
        earlier = timings.get(stage, {})
        spent = earlier.get("seconds_so_far", 0.0) if resumed and earlier.get("config_hash") == wanted else 0.0
        timings[stage] = {"seconds_so_far": spent, "skipped": False, "config_hash": wanted}
        atomic_write(timings_path, json.dumps(timings, indent=2))
        started = time.perf_counter()
        try:
            run_stage(stage, argv, args.accelerate_config, stage_dir)
        finally:  # failed or stopped too: a rerun resumes the stage and adds on
            timings[stage]["seconds_so_far"] = spent + time.perf_counter() - started
            atomic_write(timings_path, json.dumps(timings, indent=2))
        timings[stage]["seconds"] = timings[stage].pop("seconds_so_far")
        atomic_write(timings_path, json.dumps(timings, indent=2))

    from rlhf.report import write_pipeline_report

    gold_reward = recipe_gold_reward(args, out, [stage for stage in POLICY_STAGES if stage in stages])
    # The evaluations load the models as the first stage's recipe did (dtype, trust_remote_code).
    model_args = parsed_stage_args(stages[0], stage_argv(stages[0], args, out))[1][0]
    report = write_pipeline_report(args, out, stages, timings, gold_reward, model_args)
    print(f"[rlhf] pipeline done. Report: {report}")
    return report


if __name__ == "__main__":
    from rlhf.processes import run_main

    sys.exit(run_main(main, "pipeline"))
