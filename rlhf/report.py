"""The pipeline's closing report: per-stage time and metrics, the reward-model evaluation, and SFT vs DPO vs PPO
on held-out prompts (gold reward, reward-model win-rate, KL), with plots. Written to <output_dir>/report.md."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.evaluate.policy import format_interval
from rlhf.manifest import atomic_write, is_complete, read_manifest


def stage_summary(stage: str, metrics: dict) -> str:
    """One line of what matters for each stage."""
    parts = []
    if "first_logged_loss" in metrics:
        parts.append(f"loss {metrics['first_logged_loss']:.3f} → {metrics['last_logged_loss']:.3f}")
    if "eval_loss" in metrics:
        parts.append(f"eval loss {metrics['eval_loss']:.3f}")
    if metrics.get("eval_accuracy") is not None:
        parts.append(f"held-out accuracy {metrics['eval_accuracy']:.3f}")
    if "reward_mean" in metrics:
        parts.append(f"reward mean/std {metrics['reward_mean']:.2f}/{metrics['reward_std']:.2f}")
    if stage == "ppo" and metrics.get("last"):
        first, last = metrics["first"], metrics["last"]
        name, key = ("RM score", "score/raw") if "score/raw" in first else ("score", "score/combined")  # functions only
        parts.append(f"{name} {first[key]:.2f} → {last[key]:.2f}, KL {last['kl/sequence']:.2f}")
    if "gold" in metrics:
        parts.append(f"gold reward {format_interval(metrics['gold']['gold_reward'])}")
    return "; ".join(parts)


def plot_policies(policy_report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, means, errors = [], [], []
    entries = ([("sft (reference)", policy_report["reference"])] if "reference" in policy_report else []) + [
        (Path(name).name, summary) for name, summary in policy_report["policies"].items()]
    for name, summary in entries:
        if "gold_reward" in summary:
            names.append(name)
            means.append(summary["gold_reward"]["mean"])
            errors.append(summary["gold_reward"]["mean"] - summary["gold_reward"]["ci95"][0])
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.bar(names, means, yerr=errors, capsize=4, color=["#999999"] + ["#3b75af"] * (len(names) - 1))
    axis.set_ylabel("mean gold reward (95% CI)")
    axis.set_title("Held-out prompts")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_ppo_curves(metrics_path: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steps = [row["step"] for row in rows]
    keys = [key for key in ("score/raw", "score/gold", "kl/sequence", "response/length") if key in rows[0]]
    figure, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
    for axis, key in zip(axes, keys):
        axis.plot(steps, [row[key] for row in rows])
        axis.set_title(key)
        axis.set_xlabel("PPO step")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_pipeline_report(args, out: Path, timings: dict, gold_reward: str | None = None) -> Path:
    """The pipeline's report. `gold_reward` is the one the pipeline's own stage recipes name (never read from the
    stage folders' manifests, which eval-policy does not trust)."""
    from rlhf.evaluate import policy as policy_eval
    from rlhf.evaluate import rm as rm_eval

    lines = [f"# Pipeline report: {args.name}", "", "## Stages", "", "| stage | time (s) | summary |", "|---|---|---|"]
    manifests = {stage: read_manifest(out / stage) for stage in args.stages if is_complete(out / stage)}
    for stage, manifest in manifests.items():
        timing = timings.get(stage, {})
        seconds = "skipped (up to date)" if timing.get("skipped") else f"{timing.get('seconds', float('nan')):.0f}"
        lines.append(f"| {stage} | {seconds} | {stage_summary(stage, manifest.metrics)} |")

    if "reward" in manifests and args.eval_preferences:
        results = rm_eval.main(["--model", str(out / "reward"), "--data", args.eval_preferences,
                                "--out", str(out / "eval_rm")])
        rm_report = next(iter(results.values()))
        lines += ["", "## Reward model", "",
                  f"Held-out accuracy {format_interval(rm_report['accuracy'])} on {rm_report['n_pairs']} pairs, "
                  f"mean margin {rm_report['margin']['mean']:.3f}, ECE {rm_report['calibration']['ece']:.3f}. "
                  f"Full report: [eval_rm/report.md](eval_rm/report.md)."]

    policies = [str(out / stage) for stage in ("dpo", "ppo") if stage in manifests]
    if policies and args.eval_prompts and "sft" in manifests:
        argv = ["--policy", *policies, "--reference", str(out / "sft"), "--prompts", args.eval_prompts,
                "--max_samples", str(args.eval_samples), "--out", str(out / "eval_policy")]
        if "reward" in manifests:
            argv += ["--reward_model", str(out / "reward")]
        if gold_reward:
            argv += ["--gold_reward", gold_reward]
        policy_report = policy_eval.main(argv)
        lines += ["", "## Policies on held-out prompts", "", f"Reference: SFT. {policy_report['n_prompts']} prompts.", "",
                  "| policy | gold reward | win-rate vs SFT (RM) | win-rate vs SFT (gold) | KL to SFT | EOS rate |",
                  "|---|---|---|---|---|---|"]
        reference = policy_report.get("reference", {})
        lines.append(f"| sft | {format_interval(reference.get('gold_reward'))} | – | – | 0 | {reference.get('eos_rate', 0):.2f} |")
        for name, summary in policy_report["policies"].items():
            lines.append(f"| {Path(name).name} | {format_interval(summary.get('gold_reward'))} | "
                         f"{format_interval(summary.get('win_rate_vs_reference_rm'))} | "
                         f"{format_interval(summary.get('win_rate_vs_reference_gold'))} | "
                         f"{format_interval(summary.get('kl_to_reference'))} | {summary['eos_rate']:.2f} |")
        plot_policies(policy_report, out / "policies.png")
        lines += ["", "![gold reward by policy](policies.png)", "",
                  "Samples side by side: [eval_policy/report.md](eval_policy/report.md)."]
    if "ppo" in manifests and (out / "ppo" / "metrics.jsonl").is_file():
        plot_ppo_curves(out / "ppo" / "metrics.jsonl", out / "ppo_training.png")
        lines += ["", "## PPO training", "", "![PPO curves](ppo_training.png)"]
    report_path = out / "report.md"
    atomic_write(report_path, "\n".join(lines) + "\n")
    return report_path
