"""Plots of a policy evaluation (the report dict of rlhf eval-policy): mean scores with 95% CIs, score against KL to
the reference (each policy a point, a training run's trajectory a line), and every policy's per-prompt score
distribution. Scores are the reward model's and, when a gold reward was given, the gold reward's, each on a panel of
its own; a plot with nothing to show (no reward model and no gold reward) is not drawn.
"""

from __future__ import annotations

from pathlib import Path

# (per-prompt key, summary key, axis label), in the order the panels are drawn
SCORES = [("rm", "reward_model_score", "reward-model score"), ("gold", "gold_reward", "gold reward")]
REFERENCE_COLOR, POLICY_COLOR = "#999999", "#3b75af"
CAPTIONS = {"policies.png": "mean score by policy", "reward_vs_kl.png": "score against KL to the reference",
            "score_distributions.png": "per-prompt scores by policy"}  # file written by write_policy_plots -> alt text


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rows(report: dict, reference_name: str) -> list[tuple[str, dict, bool]]:
    """(name, summary, is_reference) for the reference, then every policy by its folder's name."""
    from rlhf.evaluate.names import display_names

    names = display_names(list(report["policies"]))
    if reference_name in names.values():  # a category axis would draw both on one spot
        reference_name = f"{reference_name} (reference)"
    return ([(reference_name, report["reference"], True)] if "reference" in report else []) + [
        (names[path], summary, False) for path, summary in report["policies"].items()]


def scored(report: dict) -> list[tuple[str, str, str]]:
    """The SCORES some row of the report has."""
    summaries = [report.get("reference", {}), *report["policies"].values()]
    return [score for score in SCORES if any(score[1] in summary for summary in summaries)]


def save(plt, figure, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_scores(report: dict, path: Path, reference_name: str = "reference") -> bool:
    """Mean score of every policy and the reference, with 95% CIs; one panel per score."""
    kinds = scored(report)
    if not kinds:
        return False
    plt = pyplot()
    figure, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.2), squeeze=False)
    for axis, (_, key, label) in zip(axes[0], kinds):
        entries = [(name, summary[key], is_reference) for name, summary, is_reference in rows(report, reference_name)
                   if key in summary]
        means = [value["mean"] for _, value, _ in entries]
        axis.bar([name for name, _, _ in entries], means, capsize=4,
                 yerr=[[mean - value["ci95"][0] for mean, (_, value, _) in zip(means, entries)],
                       [value["ci95"][1] - mean for mean, (_, value, _) in zip(means, entries)]],
                 color=[REFERENCE_COLOR if is_reference else POLICY_COLOR for _, _, is_reference in entries])
        axis.set_ylabel(f"mean {label} (95% CI)")
    figure.suptitle(f"{report['n_prompts']} held-out prompts", fontsize=10)
    save(plt, figure, path)
    return True


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is so far)."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def plot_reward_vs_kl(report: dict, path: Path, reference_name: str = "reference",
                      training: dict[str, list[dict]] | None = None) -> bool:
    """Score against KL to the reference on the held-out prompts: each policy a point with its CIs, labelled, the
    reference at KL 0. `training`: {stage: metrics rows} of a run logging per-step `kl/sequence` and `score/raw` (the
    reward model's score) and/or `score/gold`, like PPO's metrics.jsonl; drawn as a smoothed line, the training batches'
    values rather than held-out ones."""
    kinds = scored(report)
    if not kinds:
        return False
    training_keys = {"rm": "score/raw", "gold": "score/gold"}
    plt = pyplot()
    figure, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    for axis, (kind, key, label) in zip(axes[0], kinds):
        for name, summary, is_reference in rows(report, reference_name):
            if key not in summary or not (is_reference or "kl_to_reference" in summary):
                continue
            kl = {"mean": 0.0, "ci95": [0.0, 0.0]} if is_reference else summary["kl_to_reference"]
            score = summary[key]
            axis.errorbar(kl["mean"], score["mean"], fmt="o", capsize=3,
                          color=REFERENCE_COLOR if is_reference else POLICY_COLOR,
                          xerr=[[kl["mean"] - kl["ci95"][0]], [kl["ci95"][1] - kl["mean"]]],
                          yerr=[[score["mean"] - score["ci95"][0]], [score["ci95"][1] - score["mean"]]])
            axis.annotate(name, (kl["mean"], score["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        for stage, metrics in (training or {}).items():
            steps = [row for row in metrics if training_keys[kind] in row and "kl/sequence" in row]
            if steps:
                window = max(1, len(steps) // 10)
                axis.plot(smoothed([row["kl/sequence"] for row in steps], window),
                          smoothed([row[training_keys[kind]] for row in steps], window), linewidth=1, alpha=0.7,
                          label=f"{stage} training (batch means, smoothed)")
                axis.legend(fontsize=7)
        axis.set_xlabel(f"KL to {reference_name} (nats per sequence)")
        axis.set_ylabel(f"mean {label}")
    save(plt, figure, path)
    return True


def plot_score_distributions(report: dict, path: Path, reference_name: str = "reference") -> bool:
    """Every policy's per-prompt scores (box: quartiles, whiskers: 1.5 IQR, triangle: mean); one panel per score."""
    kinds = [score for score in scored(report)
             if any(score[0] in summary.get("per_prompt", {}) for _, summary, _ in rows(report, reference_name))]
    if not kinds:
        return False
    plt = pyplot()
    figure, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.4), squeeze=False)
    for axis, (kind, _, label) in zip(axes[0], kinds):
        entries = [(name, summary["per_prompt"][kind]) for name, summary, _ in rows(report, reference_name)
                   if kind in summary.get("per_prompt", {})]
        axis.boxplot([values for _, values in entries], showmeans=True)
        axis.set_xticks(range(1, len(entries) + 1), [name for name, _ in entries])
        axis.set_ylabel(f"{label} per prompt")
    save(plt, figure, path)
    return True


def write_policy_plots(report: dict, out_dir: Path, reference_name: str = "reference",
                       training: dict[str, list[dict]] | None = None) -> list[str]:
    """Every plot there is something to show for, into out_dir; their file names."""
    plots = {"policies.png": lambda path: plot_scores(report, path, reference_name),
             "reward_vs_kl.png": lambda path: plot_reward_vs_kl(report, path, reference_name, training),
             "score_distributions.png": lambda path: plot_score_distributions(report, path, reference_name)}
    return [name for name, plot in plots.items() if plot(Path(out_dir) / name)]
