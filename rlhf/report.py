"""The pipeline's closing report: per-stage time and metrics, the reward-model evaluation, and every policy stage
(DPO, PPO, GRPO, RLOO) side by side against SFT on held-out prompts (reward-model score and win-rate vs SFT, KL,
length, EOS rate, wall time, peak memory; gold reward and win-rate by it when the recipes name a gold reward), a flag
on possible reward hacking, plots of score against KL (PPO's training trajectory included) and of per-prompt score
distributions, and the held-out gold reward and reward-model score against training seconds. Written to
<output_dir>/report.md."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.config import ModelArgs
from rlhf.data import BEST_OF_N
from rlhf.evaluate.plots import CAPTIONS, pyplot, save, write_policy_plots
from rlhf.evaluate.policy import MISSING, format_interval, policy_table
from rlhf.manifest import atomic_write, is_complete, read_jsonl_log, read_manifest


def stage_summary(stage: str, metrics: dict) -> str:
    """One line of what matters for each stage."""
    parts = []
    if "first_logged_loss" in metrics:
        parts.append(f"loss {metrics['first_logged_loss']:.3f} → {metrics['last_logged_loss']:.3f}")
    if "eval_loss" in metrics:
        parts.append(f"eval loss {metrics['eval_loss']:.3f}")
    if metrics.get("eval_accuracy") is not None:
        parts.append(f"held-out accuracy {metrics['eval_accuracy']:.3f}")
    if "first_logged_reward" in metrics:
        parts.append(f"training reward {metrics['first_logged_reward']:.2f} → {metrics['last_logged_reward']:.2f}")
    if "reward_mean" in metrics:
        parts.append(f"reward mean/std {metrics['reward_mean']:.2f}/{metrics['reward_std']:.2f}")
    if stage == "ppo" and metrics.get("last"):
        first, last = metrics["first"], metrics["last"]
        name, key = ("RM score", "score/raw") if "score/raw" in first else ("score", "score/combined")  # functions only
        parts.append(f"{name} {first[key]:.2f} → {last[key]:.2f}, KL {last['kl/sequence']:.2f}")
    if "gold" in metrics:
        parts.append(f"gold reward {format_interval(metrics['gold']['gold_reward'])}")
    return "; ".join(parts) or MISSING


def plot_ppo_curves(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    steps = [row["step"] for row in rows]
    keys = [key for key in ("score/raw", "score/gold", "kl/sequence", "response/length") if key in rows[0]]
    figure, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
    for axis, key in zip(axes, keys):
        axis.plot(steps, [row[key] for row in rows])
        axis.set_title(key)
        axis.set_xlabel("PPO step")
    save(plt, figure, path)


CURVE_KEYS = {"gold_reward": "held-out gold reward", "reward_model_score": "held-out reward-model score"}


def curve_measures(curves: dict[str, list[dict]]) -> list[str]:
    """The CURVE_KEYS some point of some curve has."""
    return [key for key in CURVE_KEYS if any(key in row for rows in curves.values() for row in rows)]


def plot_curves(curves: dict[str, list[dict]], path: Path) -> None:
    """Held-out gold reward and/or reward-model score against training seconds, one line per policy stage (each from
    its starting policy at 0 s), a panel per measure."""
    plt = pyplot()
    keys = curve_measures(curves)
    figure, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.4), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for stage, rows in curves.items():
            points = [(row["seconds"], row[key]) for row in rows if key in row]
            axis.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3, label=stage)
        axis.set_xlabel("training seconds (evaluation excluded)")
        axis.set_ylabel(CURVE_KEYS[key])
        axis.legend(fontsize=8)
    save(plt, figure, path)


def curve_table(curves: dict[str, list[dict]]) -> list[str]:
    """Markdown: each stage's held-out measures at its start and at its last point, and the seconds between."""
    keys = curve_measures(curves)
    lines = ["| stage | points | training seconds | " + " | ".join(CURVE_KEYS[key] for key in keys) + " |",
             "|---" * (3 + len(keys)) + "|"]
    for stage, rows in curves.items():
        cells = []
        for key in keys:
            values = [row[key] for row in rows if key in row]
            cells.append(f"{values[0]:.3f} → {values[-1]:.3f}" if values else MISSING)
        lines.append(f"| {stage} | {len(rows)} | {rows[-1]['seconds']:.0f} | " + " | ".join(cells) + " |")
    return lines


def format_seconds(timing: dict) -> str:
    return f"{timing['seconds']:.0f}" if "seconds" in timing else MISSING


def reward_model_summary(rm_report: dict) -> str:
    """The eval-rm report in a sentence: preference pairs get accuracy, margin and calibration; best-of-N records
    (RewardBench 2) their best-of-N accuracy against chance and the gap, having no margin or calibration."""
    if rm_report.get("layout") == BEST_OF_N:
        return (f"Held-out best-of-N accuracy {format_interval(rm_report['accuracy'])} on {rm_report['n_records']} "
                f"records (chance {rm_report['chance']:.3f}), mean gap (lowest chosen - highest rejected) "
                f"{rm_report['gap']['mean']:.3f}.")
    return (f"Held-out accuracy {format_interval(rm_report['accuracy'])} on {rm_report['n_pairs']} pairs, "
            f"mean margin {rm_report['margin']['mean']:.3f}, ECE {rm_report['calibration']['ece']:.3f}.")


def model_flags(model_args: ModelArgs | None) -> list[str]:
    """--dtype and --trust_remote_code for the evaluation commands, as the stages loaded their models."""
    if model_args is None:
        return []
    return ["--dtype", model_args.dtype, "--trust_remote_code", str(model_args.trust_remote_code).lower()]


def write_pipeline_report(args, out: Path, stages: list[str], timings: dict, gold_reward: str | None = None,
                          model_args: ModelArgs | None = None) -> Path:
    """The pipeline's report. `gold_reward` is the one the pipeline's own stage recipes name (never read from the
    stage folders' manifests, which eval-policy does not trust); `model_args` likewise the recipes' dtype and
    trust_remote_code, which the evaluations load the models with (default: float32, no remote code)."""
    from rlhf.evaluate import policy as policy_eval
    from rlhf.evaluate import rm as rm_eval
    from rlhf.evaluate.devices import pick_device

    lines = [f"# Pipeline report: {args.name}", "", "## Stages", "", "| stage | time (s) | summary |", "|---|---|---|"]
    manifests = {stage: read_manifest(out / stage) for stage in stages if is_complete(out / stage)}
    for stage, manifest in manifests.items():
        timing = timings.get(stage, {})
        seconds = "skipped (up to date)" if timing.get("skipped") else format_seconds(timing)
        lines.append(f"| {stage} | {seconds} | {stage_summary(stage, manifest.metrics)} |")

    if "reward" in manifests and args.eval_preferences:
        results = rm_eval.main(["--model", str(out / "reward"), "--data", args.eval_preferences,
                                "--out", str(out / "eval_rm"), *model_flags(model_args)])
        lines += ["", "## Reward model", "", f"{reward_model_summary(next(iter(results.values())))} "
                  "Full report: [eval_rm/report.md](eval_rm/report.md)."]

    policy_stages = [stage for stage in manifests if stage not in ("sft", "reward")]
    ppo_rows = read_jsonl_log(out / "ppo" / "metrics.jsonl") if "ppo" in manifests else []
    policies = [str(out / stage) for stage in policy_stages]
    if policies and args.eval_prompts and "sft" in manifests:
        argv = ["--policy", *policies, "--reference", str(out / "sft"), "--prompts", args.eval_prompts,
                "--max_samples", str(args.eval_samples), "--max_new_tokens", str(args.eval_max_new_tokens), "--out", str(out / "eval_policy")]
        if "reward" in manifests:
            argv += ["--reward_model", str(out / "reward")]
        if gold_reward:
            argv += ["--gold_reward", gold_reward]
        policy_report = policy_eval.main(argv + model_flags(model_args))
        training = {"ppo": ppo_rows} if ppo_rows else None
        plots = write_policy_plots(policy_report, out, "sft", training)
        peaks = {str(out / stage): manifests[stage].metrics.get("peak_memory_mib") for stage in policy_stages}
        extra = {"time (s)": {str(out / stage): format_seconds(timings.get(stage, {})) for stage in policy_stages},
                 "peak memory (MiB)": {path: f"{peak:.0f}" for path, peak in peaks.items() if peak}}
        judged = "reward" in manifests
        lines += ["", "## Policies on held-out prompts", "",
                  f"Every policy stage starts from the same SFT policy{' and reward model' if judged else ''}. "
                  f"Reference: SFT. {policy_report['n_prompts']} prompts; means with 95% CIs."
                  f"{' RM: scored by the reward model.' if judged else ''} KL in nats per sequence on each policy's "
                  "own samples; time is the stage's wall time, memory its main process's peak." + (
                      " A policy is flagged as possible reward hacking when the reward model clearly prefers it to "
                      "SFT while its length or KL drifted far." if judged else ""),
                  "", *policy_table(policy_report, "sft", extra)]
        notes = {"reward_vs_kl.png": "Each policy is a point on the held-out prompts" + (
            "; the line is PPO's training trajectory (per-step means over its rollout batches, smoothed), not "
            "held-out values." if training else ".")}
        for name in plots:
            lines += ["", f"![{CAPTIONS[name]}]({name})", *(["", notes[name]] if name in notes else [])]
        lines += ["", "Samples side by side: [eval_policy/report.md](eval_policy/report.md)."]
    from rlhf.evaluate.curve import CURVE_NAME, read_curve, score_curves

    curves = {stage: read_curve(out / stage / CURVE_NAME) for stage in policy_stages}
    curves = {stage: rows for stage, rows in curves.items() if rows}
    if curves and "reward" in manifests:
        reward_model, reward_tokenizer = rm_eval.load_reward_model(str(out / "reward"), model_args or ModelArgs())
        curves = score_curves(curves, reward_model.to(pick_device()), reward_tokenizer)
    # The samples stay in the stage folders; what was measured of them goes with the report.
    curves = {stage: [{key: value for key, value in row.items() if key != "samples"} for row in rows]
              for stage, rows in curves.items()}
    if curve_measures(curves):  # without a gold reward or a reward stage nothing scored the samples
        atomic_write(out / "curves.json", json.dumps(curves, indent=1) + "\n")
        plot_curves(curves, out / "reward_vs_time.png")
        measures = " and ".join(CURVE_KEYS[key] for key in curve_measures(curves))
        lines += ["", "## Alignment per second", "",
                  f"The {measures} while each policy stage trained, against its training seconds (the evaluations "
                  "themselves excluded); every line starts from the policy the stage started from (SFT). Points: "
                  "[curves.json](curves.json).", "", *curve_table(curves), "",
                  "![held-out reward against training seconds](reward_vs_time.png)"]
    if ppo_rows:
        plot_ppo_curves(ppo_rows, out / "ppo_training.png")
        lines += ["", "## PPO training", "", "![PPO curves](ppo_training.png)"]
    report_path = out / "report.md"
    atomic_write(report_path, "\n".join(lines) + "\n")
    return report_path
