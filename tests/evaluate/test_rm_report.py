"""Reward-model report: statistics checked against hand arithmetic, and the files it writes."""

import json
import math
from pathlib import Path

import pytest

from rlhf.evaluate.rm_report import (
    best_of_n_rows,
    build_best_of_n_report,
    build_report,
    pair_rows,
    write_comparison,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_pair(user: str, chosen: str, rejected: str, subset: str | None = None) -> dict:
    pair = {"prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": user}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}
    if subset is not None:
        pair["subset"] = subset
    return pair


# Margins 2, 1, 0 (a tie), -1: wins 1, 1, 0.5, 0.
PAIRS = [make_pair("q0", "good answer", "bad", "b"), make_pair("q1", "fine", "meh", "a"),
         make_pair("q2", "same", "same", "a"), make_pair("q3", "right", "wrong")]
CHOSEN = [3.0, 2.0, 1.0, 0.0]
REJECTED = [1.0, 1.0, 1.0, 1.0]


def test_accuracy_margin_and_rewards():
    report = build_report(PAIRS, CHOSEN, REJECTED)
    assert report["n_pairs"] == 4
    assert report["accuracy"]["mean"] == pytest.approx(2.5 / 4)
    assert report["accuracy"]["n"] == 4
    assert report["margin"]["mean"] == pytest.approx(0.5)
    assert report["margin"]["median"] == pytest.approx(0.5)
    assert report["margin"]["std"] == pytest.approx(math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 4))
    assert report["chosen_reward"] == pytest.approx({"mean": 1.5, "std": math.sqrt(1.25), "min": 0.0, "max": 3.0})
    assert report["rejected_reward"] == pytest.approx({"mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0})


def test_wilson_interval_counts_ties_as_half():
    p, n, z = 2.5 / 4, 4, 1.96
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = build_report(PAIRS, CHOSEN, REJECTED)["accuracy"]["ci95"]
    assert (lo, hi) == pytest.approx((center - half, center + half))
    assert 0.0 < lo < 0.625 < hi < 1.0


def test_calibration_bins_and_ece():
    calibration = build_report(PAIRS, CHOSEN, REJECTED, n_bins=5)["calibration"]
    s2, s1 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))  # 0.881, 0.731
    bins = calibration["bins"]
    assert [b["count"] for b in bins] == [1, 0, 2, 1, 0]
    assert [b["lower"] for b in bins] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert bins[-1]["upper"] == pytest.approx(1.0)
    # Bin 0.5-0.6: the tie (p = 0.5, half correct).
    assert bins[0]["confidence"] == pytest.approx(0.5) and bins[0]["accuracy"] == pytest.approx(0.5)
    assert bins[1]["confidence"] is None and bins[1]["accuracy"] is None
    # Bin 0.7-0.8: margin +1 (right) and margin -1 (wrong, confidence 1 - sigmoid(-1) = sigmoid(1)).
    assert bins[2]["confidence"] == pytest.approx(s1) and bins[2]["accuracy"] == pytest.approx(0.5)
    assert bins[3]["confidence"] == pytest.approx(s2) and bins[3]["accuracy"] == pytest.approx(1.0)
    expected_ece = 1 / 4 * abs(0.5 - 0.5) + 2 / 4 * abs(0.5 - s1) + 1 / 4 * abs(1.0 - s2)
    assert calibration["ece"] == pytest.approx(expected_ece)


def test_extreme_margins_land_in_the_last_bin_without_overflow():
    pairs = [make_pair("q", "a", "b"), make_pair("q", "a", "b")]
    calibration = build_report(pairs, [1000.0, -1000.0], [0.0, 0.0], n_bins=4)["calibration"]
    assert [b["count"] for b in calibration["bins"]] == [0, 0, 0, 2]
    assert calibration["bins"][-1]["accuracy"] == pytest.approx(0.5)
    assert calibration["ece"] == pytest.approx(0.5)


def test_all_ties():
    report = build_report(PAIRS[:2], [1.0, 1.0], [1.0, 1.0])
    assert report["accuracy"]["mean"] == 0.5
    assert report["margin"] == {"mean": 0.0, "median": 0.0, "std": 0.0}
    assert report["calibration"]["bins"][0]["count"] == 2
    assert report["calibration"]["ece"] == pytest.approx(0.0)


def test_subsets_sorted_and_pairs_without_subset_left_out():
    subsets = build_report(PAIRS, CHOSEN, REJECTED)["subsets"]
    assert list(subsets) == ["a", "b"]
    assert subsets["a"]["n"] == 2 and subsets["a"]["accuracy"] == pytest.approx(0.75)  # win + tie
    assert subsets["b"]["n"] == 1 and subsets["b"]["accuracy"] == pytest.approx(1.0)
    assert subsets["a"]["ci95"][0] < 0.75 < subsets["a"]["ci95"][1]
    no_subsets = [{key: value for key, value in pair.items() if key != "subset"} for pair in PAIRS]
    assert build_report(no_subsets, CHOSEN, REJECTED)["subsets"] == {}


def test_length_bias_with_given_lengths():
    chosen_lengths, rejected_lengths = [10, 5, 7, 3], [5, 5, 9, 1]
    bias = build_report(PAIRS, CHOSEN, REJECTED, chosen_lengths=chosen_lengths,
                        rejected_lengths=rejected_lengths)["length_bias"]
    # Pair 1 has equal lengths and is left out; of pairs 0, 2, 3 the chosen is longer in 0 and 3.
    assert bias["data_longer_chosen_rate"] == pytest.approx(2 / 3)
    # The baseline is scored on every pair, as the model's accuracy is: the equal-length pair is a coin flip.
    assert bias["longer_wins_baseline_accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    # Longer scored higher: pair 0 yes (3 > 1), pair 2 tie (1 = 1) counts half, pair 3 no (0 < 1).
    assert bias["model_prefers_longer_rate"] == pytest.approx(1.5 / 3)
    rewards = [3, 2, 1, 0, 1, 1, 1, 1]
    lengths = [10, 5, 7, 3, 5, 5, 9, 1]
    mean_r, mean_l = sum(rewards) / 8, sum(lengths) / 8
    covariance = sum((r - mean_r) * (l - mean_l) for r, l in zip(rewards, lengths))
    expected = covariance / math.sqrt(sum((r - mean_r) ** 2 for r in rewards)
                                      * sum((l - mean_l) ** 2 for l in lengths))
    assert bias["reward_length_correlation"] == pytest.approx(expected)


def test_length_bias_defaults_to_character_lengths_and_handles_all_equal():
    # Chosen texts: "good answer"(11) vs "bad"(3), "fine"(4) vs "meh"(3), equal, "right"(5) vs "wrong"(5).
    bias = build_report(PAIRS, CHOSEN, REJECTED)["length_bias"]
    assert bias["data_longer_chosen_rate"] == pytest.approx(1.0)
    assert bias["model_prefers_longer_rate"] == pytest.approx(1.0)
    equal = build_report(PAIRS[2:], [1.0, 0.0], [1.0, 1.0])["length_bias"]
    assert equal["data_longer_chosen_rate"] is None and equal["model_prefers_longer_rate"] is None
    assert equal["longer_wins_baseline_accuracy"] == 0.5  # length tells nothing: chance
    # Rewards vary but lengths are all the same: the correlation is undefined.
    constant = build_report(PAIRS[2:], [1.0, 0.0], [1.0, 1.0], chosen_lengths=[4, 4], rejected_lengths=[4, 4])
    assert constant["length_bias"]["reward_length_correlation"] is None


def test_worst_pairs_most_negative_margin_first():
    worst = build_report(PAIRS, CHOSEN, REJECTED, n_worst=2)["worst_pairs"]
    assert [w["index"] for w in worst] == [3, 2]
    assert worst[0] == {"index": 3, "prompt": "q3", "chosen": "right", "rejected": "wrong",
                        "chosen_score": 0.0, "rejected_score": 1.0, "margin": -1.0}
    assert len(build_report(PAIRS, CHOSEN, REJECTED, n_worst=10)["worst_pairs"]) == 4


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError):
        build_report(PAIRS, CHOSEN[:3], REJECTED)
    with pytest.raises(ValueError):
        build_report([], [], [])


def test_pair_rows():
    rows = pair_rows(PAIRS, CHOSEN, REJECTED)
    assert rows[0] == {"index": 0, "prompt": "q0", "chosen": "good answer", "rejected": "bad", "chosen_score": 3.0,
                       "rejected_score": 1.0, "margin": 2.0, "correct": 1.0, "subset": "b"}
    assert rows[2]["correct"] == 0.5
    assert "subset" not in rows[3]


def test_write_report_creates_all_files(tmp_path):
    long_pairs = PAIRS[:3] + [make_pair("q3", "x" * 500, "wrong | pipe")]
    report = build_report(long_pairs, CHOSEN, REJECTED)
    rows = pair_rows(long_pairs, CHOSEN, REJECTED)
    paths = write_report(report, tmp_path / "out", rows, title="My RM")
    assert json.loads(open(paths["json"]).read()) == json.loads(json.dumps(report))
    assert [json.loads(line) for line in open(paths["scores"])] == rows
    markdown = open(paths["markdown"]).read()
    assert markdown.startswith("# My RM")
    assert "0.625" in markdown and "## Subsets" in markdown and "## Calibration" in markdown
    assert "x" * 500 not in markdown and "wrong \\| pipe" in markdown
    assert len(paths["plots"]) == 3
    for path in paths["plots"]:
        data = open(path, "rb").read()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000
        assert f"]({path.split('/')[-1]})" in markdown
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_write_report_without_plots(tmp_path):
    report = build_report(PAIRS, CHOSEN, REJECTED)
    paths = write_report(report, tmp_path, pair_rows(PAIRS, CHOSEN, REJECTED), plots=False)
    assert paths["plots"] == [] and not list(tmp_path.glob("*.png"))
    assert "## Plots" not in open(paths["markdown"]).read()


def test_write_comparison_has_a_column_per_model(tmp_path):
    reports = {"rm-small": build_report(PAIRS, CHOSEN, REJECTED),
               "rm-large": build_report(PAIRS[:2], [5.0, 4.0], [0.0, 0.0])}
    path = write_comparison(reports, tmp_path)
    lines = open(path).read().splitlines()
    header = next(line for line in lines if line.startswith("| metric"))
    assert header == "| metric | rm-small | rm-large |"
    accuracy_row = next(line for line in lines if line.startswith("| accuracy (95% CI)"))
    assert "0.625" in accuracy_row and "1.000" in accuracy_row
    assert any(line.startswith("| accuracy: a |") for line in lines)
    assert all(line.count("|") == 4 for line in lines if line.startswith("|"))
    summary = json.loads((tmp_path / "comparison.json").read_text())
    assert list(summary) == ["rm-small", "rm-large"]
    assert summary["rm-large"]["subsets"] == {"a": 1.0, "b": 1.0}


# ----------------------------------------------------------------------------------------------- best-of-N

def make_set(user: str, chosen: list[str], rejected: list[str], subset: str) -> dict:
    return {"prompt": [{"role": "user", "content": user}], "subset": subset,
            "chosen": [[{"role": "assistant", "content": text}] for text in chosen],
            "rejected": [[{"role": "assistant", "content": text}] for text in rejected]}


# Correct when the lowest chosen score is above the highest rejected one; a tie is wrong.
# Hand count: Math 1 of 3 (m0 right, m1 a tie, m2 wrong), Focus 1 of 1, Ties 1 of 2 (t1's second chosen loses).
SETS = [make_set("m0", ["m0 right"], ["x", "y", "z"], "Math"), make_set("m1", ["m1 right"], ["x", "y", "z"], "Math"),
        make_set("m2", ["m2 right"], ["m2 best wrong", "y", "z"], "Math"),
        make_set("f0", ["f0 right"], ["x", "y", ""], "Focus"),
        make_set("t0", ["a", "b"], ["c", "d"], "Ties"),
        make_set("t1", ["t1 good", "t1 weak"], ["t1 strong", "d"], "Ties")]
SET_CHOSEN = [[2.0], [1.0], [0.0], [3.0], [2.0, 1.5], [2.0, 0.5]]
SET_REJECTED = [[1.0, 0.5, 1.9], [0.0, 1.0, -1.0], [0.5, -1.0, -2.0], [1.0, 2.0, 2.5], [1.0, 1.4], [1.0, 0.0]]


def test_best_of_n_accuracy_overall_and_per_subset_is_the_hand_count():
    report = build_best_of_n_report(SETS, SET_CHOSEN, SET_REJECTED, n_worst=2)
    assert report["layout"] == "best_of_n" and report["n_records"] == 6
    assert report["accuracy"]["mean"] == pytest.approx(3 / 6) and report["accuracy"]["n"] == 6
    subsets = report["subsets"]
    assert list(subsets) == ["Focus", "Math", "Ties"]
    assert {name: (s["n"], s["accuracy"]) for name, s in subsets.items()} == {
        "Focus": (1, 1.0), "Math": (3, pytest.approx(1 / 3)), "Ties": (2, 0.5)}
    # Random scores: 1 chosen of 4 on top is 1/4; 2 chosen above 2 rejected is 1 / C(4, 2) = 1/6.
    assert subsets["Math"]["chance"] == pytest.approx(0.25) and subsets["Ties"]["chance"] == pytest.approx(1 / 6)
    assert report["chance"] == pytest.approx((4 * 0.25 + 2 / 6) / 6)
    assert report["gap"]["mean"] == pytest.approx((0.1 + 0.0 - 0.5 + 0.5 + 0.1 - 0.5) / 6)
    assert report["worst_records"] == [
        {"index": 2, "prompt": "m2", "gap": pytest.approx(-0.5), "worst_chosen": "m2 right",
         "best_rejected": "m2 best wrong"},
        {"index": 5, "prompt": "t1", "gap": pytest.approx(-0.5), "worst_chosen": "t1 weak",
         "best_rejected": "t1 strong"}]
    with pytest.raises(ValueError, match="one score per response"):
        build_best_of_n_report(SETS, SET_CHOSEN, [scores[:1] for scores in SET_REJECTED])


def test_best_of_n_files_and_comparison(tmp_path):
    report = build_best_of_n_report(SETS, SET_CHOSEN, SET_REJECTED)
    rows = best_of_n_rows(SETS, SET_CHOSEN, SET_REJECTED)
    assert rows[1] == {"index": 1, "prompt": "m1", "chosen_scores": [1.0], "rejected_scores": [0.0, 1.0, -1.0],
                       "gap": 0.0, "correct": False, "subset": "Math"}
    paths = write_report(report, tmp_path / "out", rows, title="RB2")
    assert sorted(Path(path).name for path in paths["plots"]) == [
        "margin_histogram.png", "reward_histogram.png", "subset_accuracy.png"]  # no calibration: a gap is no probability
    markdown = open(paths["markdown"]).read()
    for path in paths["plots"]:
        assert Path(path).read_bytes().startswith(b"\x89PNG") and f"]({Path(path).name})" in markdown
    assert "| best-of-N accuracy (95% CI) | 0.500 [" in markdown
    assert "| Math | 3 | 0.333 [" in markdown and "| Ties | 2 | 0.500 [" in markdown
    assert json.loads(open(paths["json"]).read())["subsets"]["Focus"]["accuracy"] == 1.0
    comparison = write_comparison({"pairs": build_report(PAIRS, CHOSEN, REJECTED), "rb2": report}, tmp_path)
    summary = json.loads((tmp_path / "comparison.json").read_text())
    assert summary["rb2"]["accuracy"] == 0.5 and summary["rb2"]["ece"] is None
    assert summary["rb2"]["subsets"]["Ties"] == 0.5
    assert "| accuracy: Ties | n/a | 0.500 |" in open(comparison).read()


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """The tiny base with a fresh (seeded) score head, saved as a plain sequence-classification folder."""
    import torch

    from conftest import TINY_BASE
    from rlhf.config import ModelArgs
    from rlhf.models import REWARD, load_pretrained, load_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm") / "model"
    load_pretrained(TINY_BASE, ModelArgs(), REWARD).save_pretrained(path)
    load_tokenizer(TINY_BASE).save_pretrained(path)
    return str(path)


def test_eval_rm_scores_a_rewardbench2_file_as_best_of_n(tmp_path, reward_model_dir):
    from rlhf.config import ModelArgs
    from rlhf.evaluate import rm
    from rlhf.evaluate.scoring import score_conversations

    rows = [{"id": str(i), "prompt": f"Review item {i}.", "chosen": chosen, "rejected": rejected, "subset": subset,
             "num_correct": len(chosen), "num_incorrect": len(rejected)}
            for i, (chosen, rejected, subset) in enumerate([
                (["Great."], ["Bad.", "Awful.", ""], "Focus"), (["Fine."], ["No.", "Meh.", "Poor."], "Focus"),
                (["Good kettle."], ["Bad lamp.", "Lamp.", "Kettle?"], "Math"),
                (["Yes.", "Sure."], ["No.", "Never."], "Ties")])]
    data = tmp_path / "rb2.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = rm.main(["--model", reward_model_dir, "--data", str(data), "--out", str(tmp_path / "out"),
                      "--batch_size", "3"])[reward_model_dir]

    # The hand count, from scores taken one record at a time.
    model, tokenizer = rm.load_reward_model(reward_model_dir, ModelArgs())
    scored = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    correct = {}
    for row, saved in zip(rows, scored, strict=True):
        prompt = [{"role": "user", "content": row["prompt"]}]
        chosen, _ = score_conversations(model, tokenizer, [prompt + [{"role": "assistant", "content": text}]
                                                           for text in row["chosen"]], show_progress=False)
        rejected, _ = score_conversations(model, tokenizer, [prompt + [{"role": "assistant", "content": text}]
                                                             for text in row["rejected"]], show_progress=False)
        # Each response's score lands on its own record and place, whatever the batching.
        assert saved["chosen_scores"] == pytest.approx(chosen, abs=1e-5)
        assert saved["rejected_scores"] == pytest.approx(rejected, abs=1e-5)
        correct.setdefault(row["subset"], []).append(min(chosen) > max(rejected))
    assert report["n_records"] == 4
    assert report["accuracy"]["mean"] == pytest.approx(sum(map(sum, correct.values())) / 4)
    assert {name: s["accuracy"] for name, s in report["subsets"].items()} == pytest.approx(
        {name: sum(values) / len(values) for name, values in correct.items()})
    assert (tmp_path / "out" / "report.md").read_text().startswith(f"# Reward model evaluation: {reward_model_dir}")


def test_eval_rm_scores_pairs_with_an_empty_response_and_skips_bad_ones(tmp_path, reward_model_dir, capsys):
    from rlhf.data import DataError
    from rlhf.evaluate import rm

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "", "rejected": "bad"}) + "\n"
                    + json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "q2", "chosen": "good", "rejected": ""}) + "\n")
    args = ["--model", reward_model_dir, "--data", str(data), "--out", str(tmp_path / "out"), "--plots", "false"]
    with pytest.raises(DataError, match=r"pairs\.jsonl line 2, field 'prompt': prompt is empty"):
        rm.main(args)
    report = rm.main(args + ["--on_bad_record", "skip"])[reward_model_dir]
    assert "skipped 1 of 3 records" in capsys.readouterr().out
    assert report["n_pairs"] == 2 and "layout" not in report
    scores = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["chosen_score"]) and math.isfinite(row["rejected_score"]) for row in scores)
    assert scores[0]["chosen"] == "" and scores[1]["rejected"] == ""


def test_eval_rm_tells_apart_two_models_of_the_same_folder_name(tmp_path, reward_model_dir):
    import shutil

    from rlhf.evaluate import rm
    from rlhf.evaluate.names import display_names

    for parent in ("a", "b"):
        shutil.copytree(reward_model_dir, tmp_path / parent / "reward")
    models = [str(tmp_path / "a" / "reward"), str(tmp_path / "b" / "reward")]
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}) + "\n")
    results = rm.main(["--model", *models, "--data", str(data), "--out", str(tmp_path / "cmp"), "--plots", "false"])
    assert list(results) == models
    # Each its own sub-folder and comparison column, named by as many parent folders as tell them apart.
    for name in ("a/reward", "b/reward"):
        assert json.loads((tmp_path / "cmp" / name / "report.json").read_text())["n_pairs"] == 1
    assert list(json.loads((tmp_path / "cmp" / "comparison.json").read_text())) == ["a/reward", "b/reward"]
    assert display_names(["runs/a/reward", "runs/b/reward", "runs/b/dpo"]) == {
        "runs/a/reward": "a/reward", "runs/b/reward": "b/reward", "runs/b/dpo": "dpo"}
    # A folder that ends another's path, "." and one folder given twice: still relative, distinct names (or the same
    # name for the same folder).
    names = display_names(["/x/reward", "/y/x/reward", ".", "./"])
    assert names == {"/x/reward": "x/reward", "/y/x/reward": "y/x/reward", ".": Path.cwd().name, "./": Path.cwd().name}
