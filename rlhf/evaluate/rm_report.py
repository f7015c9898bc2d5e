"""Reward-model evaluation report (`rlhf eval-rm`): statistics from given scores, and the files that show them.

Scoring with a model happens elsewhere; everything here is plain arithmetic on the chosen/rejected scores so it can
be tested by hand and rerun on saved scores without a GPU. Preference pairs get accuracy, margins, calibration, length
bias; best-of-N records (RewardBench 2: one chosen, three rejected) get best-of-N accuracy, overall and per subset.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from rlhf.data import BEST_OF_N, prompt_text
from rlhf.manifest import atomic_write

WILSON_Z = 1.96
MARKDOWN_TEXT_LIMIT = 200


# ----------------------------------------------------------------------------------------------- small helpers

def _response_text(messages: list[dict]) -> str:
    return "\n".join(message["content"] for message in messages)


def _response_length(messages: list[dict]) -> int:
    # Character length of the concatenated contents (callers with a tokenizer pass token lengths instead).
    return sum(len(message["content"]) for message in messages)


def _sigmoid(x: float) -> float:
    # Split by sign so math.exp never overflows on large margins.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    exp_x = math.exp(x)
    return exp_x / (1.0 + exp_x)


def _win(score: float, other: float) -> float:
    """1 when score beats other, 0.5 for a tie, 0 otherwise."""
    return 1.0 if score > other else 0.5 if score == other else 0.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    """Population standard deviation (ddof=0)."""
    mean = _mean(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / len(values))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def wilson_interval(successes: float, n: int, z: float = WILSON_Z) -> list[float]:
    """Wilson score interval; unlike the normal approximation it stays inside [0, 1] at accuracies near 0 or 1."""
    p_hat = successes / n
    denominator = 1 + z * z / n
    center = (p_hat + z * z / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p_hat * (1 - p_hat) / n + z * z / (4 * n * n))
    return [max(0.0, center - half_width), min(1.0, center + half_width)]


def _accuracy(wins: list[float]) -> dict:
    return {"mean": _mean(wins), "ci95": wilson_interval(sum(wins), len(wins)), "n": len(wins)}


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation, or None when either side is constant (the correlation is undefined)."""
    if len(xs) < 2:
        return None
    mean_x, mean_y = _mean(xs), _mean(ys)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    spread = math.sqrt(sum((x - mean_x) ** 2 for x in xs) * sum((y - mean_y) ** 2 for y in ys))
    return covariance / spread if spread > 0 else None


# ----------------------------------------------------------------------------------------------- statistics

def _calibration(margins: list[float], n_bins: int) -> dict:
    """Reliability of the Bradley-Terry probability sigmoid(margin), binned by confidence over [0.5, 1]."""
    width = 0.5 / n_bins
    members: list[list[tuple[float, float]]] = [[] for _ in range(n_bins)]
    for margin in margins:
        p = _sigmoid(margin)
        confidence = max(p, 1 - p)
        correct = 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0
        members[min(int((confidence - 0.5) / width), n_bins - 1)].append((confidence, correct))  # 1.0 -> last bin
    bins, ece = [], 0.0
    for index, entries in enumerate(members):
        confidence = _mean([c for c, _ in entries]) if entries else None
        accuracy = _mean([a for _, a in entries]) if entries else None
        if entries:
            ece += len(entries) / len(margins) * abs(accuracy - confidence)
        bins.append({"lower": 0.5 + index * width, "upper": 0.5 + (index + 1) * width, "count": len(entries),
                     "confidence": confidence, "accuracy": accuracy})
    return {"bins": bins, "ece": ece}


def _length_bias(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths) -> dict:
    unequal = [i for i in range(len(chosen_lengths)) if chosen_lengths[i] != rejected_lengths[i]]
    longer_chosen = model_longer = None
    # Picking the longer response, over every pair as the model's accuracy is: equal lengths are a coin flip (0.5).
    longer_wins = _mean([_win(chosen, rejected) for chosen, rejected in zip(chosen_lengths, rejected_lengths)])
    if unequal:
        longer_chosen = _mean([1.0 if chosen_lengths[i] > rejected_lengths[i] else 0.0 for i in unequal])
        # Score of the longer response against the shorter one; a score tie counts half, as in accuracy.
        model_longer = _mean([_win(chosen_scores[i], rejected_scores[i]) if chosen_lengths[i] > rejected_lengths[i]
                              else _win(rejected_scores[i], chosen_scores[i]) for i in unequal])
    correlation = _pearson(list(chosen_scores) + list(rejected_scores),
                           [float(n) for n in list(chosen_lengths) + list(rejected_lengths)])
    return {"data_longer_chosen_rate": longer_chosen, "model_prefers_longer_rate": model_longer,
            "longer_wins_baseline_accuracy": longer_wins, "reward_length_correlation": correlation}


def _summary(scores: list[float]) -> dict:
    return {"mean": _mean(scores), "std": _std(scores), "min": min(scores), "max": max(scores)}


def build_report(pairs: list[dict], chosen_scores: list[float], rejected_scores: list[float], *, n_bins: int = 10,
                 n_worst: int = 5, chosen_lengths: list[int] | None = None,
                 rejected_lengths: list[int] | None = None) -> dict:
    """Accuracy, margins, calibration, subsets, length bias and worst pairs, as a JSON-serialisable dict."""
    n = len(pairs)
    if n == 0:
        raise ValueError("build_report needs at least one pair")
    if not (len(chosen_scores) == len(rejected_scores) == n):
        raise ValueError(f"{n} pairs but {len(chosen_scores)} chosen and {len(rejected_scores)} rejected scores")
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    chosen_scores = [float(score) for score in chosen_scores]
    rejected_scores = [float(score) for score in rejected_scores]
    chosen_lengths = chosen_lengths if chosen_lengths is not None else [_response_length(p["chosen"]) for p in pairs]
    rejected_lengths = (rejected_lengths if rejected_lengths is not None
                        else [_response_length(p["rejected"]) for p in pairs])
    if not (len(chosen_lengths) == len(rejected_lengths) == n):
        raise ValueError("chosen_lengths and rejected_lengths must have one entry per pair")

    margins = [c - r for c, r in zip(chosen_scores, rejected_scores)]
    wins = [_win(c, r) for c, r in zip(chosen_scores, rejected_scores)]

    by_subset: dict[str, list[float]] = {}
    for pair, win in zip(pairs, wins):
        if "subset" in pair:
            by_subset.setdefault(str(pair["subset"]), []).append(win)
    subsets = {}
    for name in sorted(by_subset):
        accuracy = _accuracy(by_subset[name])
        subsets[name] = {"n": accuracy["n"], "accuracy": accuracy["mean"], "ci95": accuracy["ci95"]}

    # Most negative margin first; ties keep dataset order so the report is deterministic.
    worst = sorted(range(n), key=lambda i: (margins[i], i))[:max(n_worst, 0)]
    worst_pairs = [{"index": i, "prompt": prompt_text(pairs[i]["prompt"]),
                    "chosen": _response_text(pairs[i]["chosen"]), "rejected": _response_text(pairs[i]["rejected"]),
                    "chosen_score": chosen_scores[i], "rejected_score": rejected_scores[i], "margin": margins[i]}
                   for i in worst]

    return {
        "n_pairs": n,
        "accuracy": _accuracy(wins),
        "margin": {"mean": _mean(margins), "median": _median(margins), "std": _std(margins)},
        "chosen_reward": _summary(chosen_scores),
        "rejected_reward": _summary(rejected_scores),
        "calibration": _calibration(margins, n_bins),
        "subsets": subsets,
        "length_bias": _length_bias(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths),
        "worst_pairs": worst_pairs,
    }


def pair_rows(pairs: list[dict], chosen_scores: list[float], rejected_scores: list[float]) -> list[dict]:
    """One row per pair for scores.jsonl, so individual judgements can be inspected or re-analysed later."""
    rows = []
    for index, (pair, chosen, rejected) in enumerate(zip(pairs, chosen_scores, rejected_scores)):
        chosen, rejected = float(chosen), float(rejected)
        row = {"index": index, "prompt": prompt_text(pair["prompt"]), "chosen": _response_text(pair["chosen"]),
               "rejected": _response_text(pair["rejected"]), "chosen_score": chosen, "rejected_score": rejected,
               "margin": chosen - rejected, "correct": _win(chosen, rejected)}
        if "subset" in pair:
            row["subset"] = pair["subset"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- best-of-N

def _best_of_n_chance(n_chosen: int, n_rejected: int) -> float:
    """Accuracy of random scores: the chance that every chosen response lands above every rejected one."""
    return 1 / math.comb(n_chosen + n_rejected, n_chosen)


def _scored_response(responses: list[list[dict]], scores: list[float], pick) -> str:
    """The text of the response with the lowest (pick=min) or highest (pick=max) score."""
    return _response_text(responses[pick(range(len(scores)), key=scores.__getitem__)])


def build_best_of_n_report(records: list[dict], chosen_scores: list[list[float]],
                           rejected_scores: list[list[float]], *, n_worst: int = 5) -> dict:
    """Best-of-N accuracy overall and per subset. A record is correct when its lowest chosen score is above its
    highest rejected score (strictly: a tie is wrong), so with several chosen (RewardBench 2's Ties subset) all of
    them must beat all rejected. `gap` = lowest chosen - highest rejected, > 0 exactly when correct."""
    n = len(records)
    if n == 0:
        raise ValueError("build_best_of_n_report needs at least one record")
    shapes = [(len(r["chosen"]), len(r["rejected"])) for r in records]
    if [(len(c), len(r)) for c, r in zip(chosen_scores, rejected_scores)] != shapes or len(chosen_scores) != n:
        raise ValueError("chosen_scores and rejected_scores must have one score per response of every record")
    gaps = [min(map(float, c)) - max(map(float, r)) for c, r in zip(chosen_scores, rejected_scores)]
    correct = [1.0 if gap > 0 else 0.0 for gap in gaps]
    chance = [_best_of_n_chance(*shape) for shape in shapes]

    by_subset: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        if "subset" in record:
            by_subset.setdefault(str(record["subset"]), []).append(index)
    subsets = {}
    for name in sorted(by_subset):
        accuracy = _accuracy([correct[i] for i in by_subset[name]])
        subsets[name] = {"n": accuracy["n"], "accuracy": accuracy["mean"], "ci95": accuracy["ci95"],
                         "chance": _mean([chance[i] for i in by_subset[name]])}

    worst = sorted(range(n), key=lambda i: (gaps[i], i))[:max(n_worst, 0)]
    worst_records = [{"index": i, "prompt": prompt_text(records[i]["prompt"]), "gap": gaps[i],
                      "worst_chosen": _scored_response(records[i]["chosen"], chosen_scores[i], min),
                      "best_rejected": _scored_response(records[i]["rejected"], rejected_scores[i], max)}
                     for i in worst]
    return {"layout": BEST_OF_N, "n_records": n, "accuracy": _accuracy(correct), "chance": _mean(chance),
            "gap": {"mean": _mean(gaps), "median": _median(gaps)}, "subsets": subsets,
            "worst_records": worst_records}


def best_of_n_rows(records: list[dict], chosen_scores: list[list[float]],
                   rejected_scores: list[list[float]]) -> list[dict]:
    """One row per record for scores.jsonl: every response's score, the gap and whether the record is correct."""
    rows = []
    for index, (record, chosen, rejected) in enumerate(zip(records, chosen_scores, rejected_scores)):
        gap = min(map(float, chosen)) - max(map(float, rejected))
        row = {"index": index, "prompt": prompt_text(record["prompt"]),
               "chosen_scores": [float(x) for x in chosen], "rejected_scores": [float(x) for x in rejected],
               "gap": gap, "correct": gap > 0}
        if "subset" in record:
            row["subset"] = record["subset"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- files

def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_accuracy(mean: float, ci95: list[float]) -> str:
    return f"{mean:.3f} [{ci95[0]:.3f}, {ci95[1]:.3f}]"


def _cell(text: str) -> str:
    """Shortened, single-line text that cannot break a markdown table."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= MARKDOWN_TEXT_LIMIT else text[:MARKDOWN_TEXT_LIMIT - 1] + "…"


def _markdown(report: dict, title: str, plot_names: list[str]) -> str:
    accuracy, margin, bias = report["accuracy"], report["margin"], report["length_bias"]
    chosen, rejected = report["chosen_reward"], report["rejected_reward"]
    lines = [f"# {title}", "", "| metric | value |", "|---|---|",
             f"| pairs | {report['n_pairs']} |",
             f"| accuracy (95% CI) | {_fmt_accuracy(accuracy['mean'], accuracy['ci95'])} |",
             f"| mean margin | {_fmt(margin['mean'])} |",
             f"| chosen reward | {_fmt(chosen['mean'])} ± {_fmt(chosen['std'])} |",
             f"| rejected reward | {_fmt(rejected['mean'])} ± {_fmt(rejected['std'])} |",
             f"| ECE | {_fmt(report['calibration']['ece'])} |",
             f"| data: longer is chosen | {_fmt(bias['data_longer_chosen_rate'])} |",
             f"| model prefers longer | {_fmt(bias['model_prefers_longer_rate'])} |",
             f"| always-longer baseline accuracy | {_fmt(bias['longer_wins_baseline_accuracy'])} |",
             f"| reward-length correlation | {_fmt(bias['reward_length_correlation'])} |", ""]
    if report["subsets"]:
        lines += ["## Subsets", "", "| subset | n | accuracy (95% CI) |", "|---|---|---|"]
        lines += [f"| {_cell(name)} | {s['n']} | {_fmt_accuracy(s['accuracy'], s['ci95'])} |"
                  for name, s in report["subsets"].items()] + [""]
    lines += ["## Calibration", "", "| confidence bin | count | mean confidence | accuracy |", "|---|---|---|---|"]
    lines += [f"| {b['lower']:.2f}–{b['upper']:.2f} | {b['count']} | {_fmt(b['confidence'])} | {_fmt(b['accuracy'])} |"
              for b in report["calibration"]["bins"]] + [""]
    lines += ["## Worst pairs", "", "| index | margin | prompt | chosen | rejected |", "|---|---|---|---|---|"]
    lines += [f"| {w['index']} | {_fmt(w['margin'])} | {_cell(w['prompt'])} | {_cell(w['chosen'])} "
              f"| {_cell(w['rejected'])} |" for w in report["worst_pairs"]] + [""]
    return "\n".join(lines + _plot_lines(plot_names))


def _best_of_n_markdown(report: dict, title: str, plot_names: list[str]) -> str:
    accuracy, gap = report["accuracy"], report["gap"]
    lines = [f"# {title}", "", "A record is correct when every chosen response scores above every rejected one.", "",
             "| metric | value |", "|---|---|", f"| records | {report['n_records']} |",
             f"| best-of-N accuracy (95% CI) | {_fmt_accuracy(accuracy['mean'], accuracy['ci95'])} |",
             f"| chance | {_fmt(report['chance'])} |",
             f"| mean gap (lowest chosen - highest rejected) | {_fmt(gap['mean'])} |", ""]
    if report["subsets"]:
        lines += ["## Subsets", "", "| subset | n | accuracy (95% CI) | chance |", "|---|---|---|---|"]
        lines += [f"| {_cell(name)} | {s['n']} | {_fmt_accuracy(s['accuracy'], s['ci95'])} | {_fmt(s['chance'])} |"
                  for name, s in report["subsets"].items()] + [""]
    lines += ["## Worst records", "", "| index | gap | prompt | lowest chosen | highest rejected |",
              "|---|---|---|---|---|"]
    lines += [f"| {w['index']} | {_fmt(w['gap'])} | {_cell(w['prompt'])} | {_cell(w['worst_chosen'])} "
              f"| {_cell(w['best_rejected'])} |" for w in report["worst_records"]] + [""]
    return "\n".join(lines + _plot_lines(plot_names))


def _plots(report: dict, rows: list[dict]) -> dict[str, bytes]:
    """PNG bytes by file name; drawn in memory so each file can be written atomically. Pairs: reward histograms,
    calibration and margins; best-of-N records: reward histograms, gaps and (with subsets) accuracy per subset."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    import numpy as np

    def png(figure) -> bytes:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        return buffer.getvalue()

    best_of_n = report.get("layout") == BEST_OF_N
    if best_of_n:
        chosen = [score for row in rows for score in row["chosen_scores"]]
        rejected = [score for row in rows for score in row["rejected_scores"]]
        gaps, unit, gap_name = [row["gap"] for row in rows], "records", "lowest chosen - highest rejected"
    else:
        chosen, rejected = [row["chosen_score"] for row in rows], [row["rejected_score"] for row in rows]
        gaps, unit, gap_name = [row["margin"] for row in rows], "pairs", "chosen - rejected"
    images = {}
    edges = np.histogram_bin_edges(chosen + rejected, bins=30)  # shared edges so the two histograms compare
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.hist(chosen, bins=edges, alpha=0.6, label="chosen")
    axes.hist(rejected, bins=edges, alpha=0.6, label="rejected")
    axes.set(xlabel="reward", ylabel="responses" if best_of_n else "pairs", title="Rewards: chosen vs rejected")
    axes.legend()
    images["reward_histogram.png"] = png(figure)

    if not best_of_n:  # a pair's margin is a probability under Bradley-Terry; a best-of-N gap is not
        filled = [b for b in report["calibration"]["bins"] if b["count"]]
        figure, axes = plt.subplots(figsize=(5, 5))
        axes.plot([0.5, 1.0], [0.5, 1.0], linestyle="--", color="grey", label="perfect calibration")
        axes.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], marker="o", label="model")
        axes.set(xlim=(0.5, 1.0), ylim=(0.0, 1.0), xlabel="confidence max(p, 1-p)", ylabel="accuracy",
                 title=f"Reliability (ECE {report['calibration']['ece']:.3f})")
        axes.legend()
        images["calibration.png"] = png(figure)

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.hist(gaps, bins=30)
    axes.axvline(0.0, color="red", linestyle="--")
    axes.set(xlabel=gap_name, ylabel=unit, title="Best-of-N gap" if best_of_n else "Reward margin")
    images["margin_histogram.png"] = png(figure)

    if best_of_n and report["subsets"]:
        names = list(report["subsets"])
        subsets = [report["subsets"][name] for name in names]
        figure, axes = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 4))
        positions = np.arange(len(names))
        errors = [[s["accuracy"] - s["ci95"][0] for s in subsets], [s["ci95"][1] - s["accuracy"] for s in subsets]]
        axes.bar(positions, [s["accuracy"] for s in subsets], yerr=errors, capsize=3, ecolor="#555555",
                 label="accuracy (95% CI)")
        axes.scatter(positions, [s["chance"] for s in subsets], color="red", marker="_", s=400, zorder=3,
                     label="chance")
        axes.set_xticks(positions, names, rotation=30, ha="right")
        axes.set(ylim=(0.0, 1.0), ylabel="best-of-N accuracy", title="Accuracy by subset")
        axes.legend()
        images["subset_accuracy.png"] = png(figure)
    return images


def _plot_lines(plot_names: list[str]) -> list[str]:
    return ["## Plots", ""] + [f"![{name}]({name})" for name in plot_names] + [""] if plot_names else []


def write_report(report: dict, out_dir: str | Path, rows: list[dict], title: str = "Reward model evaluation",
                 plots: bool = True) -> dict[str, str]:
    """report.json, report.md, scores.jsonl and (optionally) PNG plots in out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    best_of_n = report.get("layout") == BEST_OF_N
    plot_paths = []
    if plots:
        for name, data in _plots(report, rows).items():
            atomic_write(out_dir / name, data)
            plot_paths.append(str(out_dir / name))
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "scores": out_dir / "scores.jsonl"}
    atomic_write(paths["scores"], "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))
    plot_names = [Path(path).name for path in plot_paths]
    atomic_write(paths["markdown"], _best_of_n_markdown(report, title, plot_names) if best_of_n
                 else _markdown(report, title, plot_names))
    # JSON last: its presence means the rest of the report is complete.
    atomic_write(paths["json"], json.dumps(report, indent=2, allow_nan=False) + "\n")
    return {**{key: str(path) for key, path in paths.items()}, "plots": plot_paths}


def write_comparison(reports: dict[str, dict], out_dir: str | Path) -> str:
    """comparison.md / comparison.json with one column per model; returns the markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(reports)
    subset_names = sorted({subset for report in reports.values() for subset in report.get("subsets", {})})
    summary = {}
    for name, report in reports.items():
        if report.get("layout") == BEST_OF_N:  # no margins, calibration or length bias to compare
            summary[name] = {"accuracy": report["accuracy"]["mean"], "ci95": report["accuracy"]["ci95"],
                             "mean_margin": None, "ece": None, "model_prefers_longer_rate": None,
                             "subsets": {subset: values["accuracy"] for subset, values in report["subsets"].items()}}
            continue
        summary[name] = {
            "accuracy": report["accuracy"]["mean"], "ci95": report["accuracy"]["ci95"],
            "mean_margin": report["margin"]["mean"], "ece": report["calibration"]["ece"],
            "model_prefers_longer_rate": report["length_bias"]["model_prefers_longer_rate"],
            "subsets": {subset: report["subsets"][subset]["accuracy"] for subset in report.get("subsets", {})},
        }
    rows = [("accuracy (95% CI)", [_fmt_accuracy(s["accuracy"], s["ci95"]) for s in summary.values()]),
            ("mean margin", [_fmt(s["mean_margin"]) for s in summary.values()]),
            ("ECE", [_fmt(s["ece"]) for s in summary.values()]),
            ("prefers longer", [_fmt(s["model_prefers_longer_rate"]) for s in summary.values()])]
    rows += [(f"accuracy: {subset}", [_fmt(s["subsets"].get(subset)) for s in summary.values()])
             for subset in subset_names]
    lines = ["# Reward model comparison", "", "| metric | " + " | ".join(_cell(n) for n in names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {_cell(label)} | " + " | ".join(cells) + " |" for label, cells in rows] + [""]
    atomic_write(out_dir / "comparison.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    markdown_path = out_dir / "comparison.md"
    atomic_write(markdown_path, "\n".join(lines))
    return str(markdown_path)
