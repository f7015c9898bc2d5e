"""The pipeline's closing report: per-stage time and metrics, the reward-model evaluation, and every policy stage
(DPO, PPO, GRPO, RLOO) side by side against SFT on held-out prompts (gold reward, reward-model win-rate, KL, length,
EOS rate, wall time, peak memory), with the gold reward against training seconds. Written to <output_dir>/report.md."""

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


def plot_gold_curves(curves: dict[str, list[dict]], sft_gold: float | None, path: Path) -> None:
    """Held-out gold reward against training seconds, one line per policy stage, each starting from SFT at 0 s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    start = [(0.0, sft_gold)] if sft_gold is not None else []
    for stage, rows in curves.items():
        points = start + [(row["seconds"], row["gold_reward"]) for row in rows]
        axis.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3, label=stage)
    if sft_gold is not None:
        axis.axhline(sft_gold, color="#999999", linestyle="--", linewidth=1, label="sft")
    axis.set_xlabel("training seconds (evaluation excluded)")
    axis.set_ylabel("held-out gold reward")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_seconds(timing: dict) -> str:
    return f"{timing['seconds']:.0f}" if "seconds" in timing else "–"


def write_pipeline_report(args, out: Path, stages: list[str], timings: dict, gold_reward: str | None = None) -> Path:
    """The pipeline's report. `gold_reward` is the one the pipeline's own stage recipes name (never read from the
    stage folders' manifests, which eval-policy does not trust)."""
    from rlhf.evaluate import policy as policy_eval
    from rlhf.evaluate import rm as rm_eval

    lines = [f"# Pipeline report: {args.name}", "", "## Stages", "", "| stage | time (s) | summary |", "|---|---|---|"]
    manifests = {stage: read_manifest(out / stage) for stage in stages if is_complete(out / stage)}
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

    policy_stages = [stage for stage in manifests if stage not in ("sft", "reward")]
    policies = [str(out / stage) for stage in policy_stages]
    if policies and args.eval_prompts and "sft" in manifests:
        argv = ["--policy", *policies, "--reference", str(out / "sft"), "--prompts", args.eval_prompts,
                "--max_samples", str(args.eval_samples), "--out", str(out / "eval_policy")]
        if "reward" in manifests:
            argv += ["--reward_model", str(out / "reward")]
        if gold_reward:
            argv += ["--gold_reward", gold_reward]
        policy_report = policy_eval.main(argv)
        lines += ["", "## Policies on held-out prompts", "",
                  f"Every policy stage starts from the same SFT policy and reward model. Reference: SFT. "
                  f"{policy_report['n_prompts']} prompts. Time is the stage's wall time, memory its main process's peak.",
                  "", "| policy | gold reward | win-rate vs SFT (RM) | win-rate vs SFT (gold) | KL to SFT | length | "
                  "EOS rate | time (s) | peak memory (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
        reference = policy_report.get("reference", {})
        lines.append(f"| sft | {format_interval(reference.get('gold_reward'))} | – | – | 0 | "
                     f"{reference.get('response_length', float('nan')):.1f} | {reference.get('eos_rate', 0):.2f} | – | – |")
        for name, summary in policy_report["policies"].items():
            stage = Path(name).name
            peak = manifests[stage].metrics.get("peak_memory_mib") if stage in manifests else None
            lines.append(f"| {stage} | {format_interval(summary.get('gold_reward'))} | "
                         f"{format_interval(summary.get('win_rate_vs_reference_rm'))} | "
                         f"{format_interval(summary.get('win_rate_vs_reference_gold'))} | "
                         f"{format_interval(summary.get('kl_to_reference'))} | {summary['response_length']:.1f} | "
                         f"{summary['eos_rate']:.2f} | {format_seconds(timings.get(stage, {}))} | "
                         f"{f'{peak:.0f}' if peak else '–'} |")
        plot_policies(policy_report, out / "policies.png")
        lines += ["", "![gold reward by policy](policies.png)", "",
                  "Samples side by side: [eval_policy/report.md](eval_policy/report.md)."]
    from rlhf.evaluate.curve import CURVE_NAME, read_curve

    curves = {stage: read_curve(out / stage / CURVE_NAME) for stage in policy_stages}
    curves = {stage: rows for stage, rows in curves.items() if rows}
    if curves:
        sft_gold = manifests["sft"].metrics.get("gold", {}).get("gold_reward", {}).get("mean") if "sft" in manifests else None
        plot_gold_curves(curves, sft_gold, out / "gold_vs_time.png")
        lines += ["", "## Alignment per second", "",
                  "Held-out gold reward while each policy stage trained, against its training seconds (the "
                  "evaluations themselves excluded); every line starts from SFT.", "",
                  "![gold reward against training seconds](gold_vs_time.png)"]
    if "ppo" in manifests and (out / "ppo" / "metrics.jsonl").is_file():
        plot_ppo_curves(out / "ppo" / "metrics.jsonl", out / "ppo_training.png")
        lines += ["", "## PPO training", "", "![PPO curves](ppo_training.png)"]
    report_path = out / "report.md"
    atomic_write(report_path, "\n".join(lines) + "\n")
    return report_path
