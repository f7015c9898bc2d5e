"""The pipeline report on real data's terms: without a gold reward (recipes/smollm2/pipeline.yaml: reward, DPO and PPO
stages, no gold) the policy table leads with the reward model and has no empty or n/a cell; a gold reward adds its
columns; without a reward stage the reward-model columns go. The policy evaluation is a hand-made report (no model
runs), the stage folders hand-written manifests."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY_BASE
from rlhf.config import parse_args
from rlhf.evaluate import policy as policy_eval
from rlhf.evaluate import rm as rm_eval
from rlhf.evaluate.curve import CURVE_NAME
from rlhf.evaluate.policy import format_interval
from rlhf.manifest import Manifest, write_manifest
from rlhf.pipeline import ARG_TYPES, run_stages
from rlhf.report import write_pipeline_report


def interval(mean: float, half: float = 0.05) -> dict:
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": 4}


def summary(rm: float | None, length: float, kl: float | None = None, win_rm: float | None = None,
            gold: float | None = None, win_gold: float | None = None) -> dict:
    """An eval-policy summary; only what was measured is present, as compare_policies leaves it."""
    values = {"response_length": length, "eos_rate": 0.97, "per_prompt": {"length": [length] * 4}}
    for key, value in [("reward_model_score", rm), ("kl_to_reference", kl), ("win_rate_vs_reference_rm", win_rm),
                       ("gold_reward", gold), ("win_rate_vs_reference_gold", win_gold)]:
        if value is not None:
            values[key] = interval(value)
    if rm is not None:
        values["per_prompt"]["rm"] = [rm - 0.3, rm - 0.1, rm + 0.1, rm + 0.3]
    if gold is not None:
        values["per_prompt"]["gold"] = [gold] * 4
    return values


def fake_policy_report(out, reward: bool, gold: bool) -> dict:
    rm = (lambda value: value if reward else None)
    gl = (lambda value: value if gold else None)
    # ppo: the reward model clearly prefers it, at 2.1x SFT's length: the flag the report must raise.
    report = {
        "n_prompts": 4, "sampling": {}, "reference": summary(rm(0.10), 20.0, gold=gl(0.40)),
        "policies": {str(out / "dpo"): summary(rm(0.60), 19.0, 0.5, rm(0.69), gl(0.56), gl(0.68)),
                     str(out / "ppo"): summary(rm(1.90), 42.0, 5.0, rm(0.83), gl(0.57), gl(0.68))},
    }
    if reward:
        report["reward_hacking"] = {str(out / "ppo"): "win-rate 0.83 while length 2.1x sft"}
    return report


def write_stages(out, stages: list[str]) -> None:
    metrics = {"sft": {"first_logged_loss": 2.0, "last_logged_loss": 1.2},
               "reward": {"eval_accuracy": 0.71},
               "dpo": {"first_logged_loss": 0.69, "last_logged_loss": 0.4, "peak_memory_mib": 985.0},
               "ppo": {"first": {"score/raw": 0.1, "kl/sequence": 0.0}, "last": {"score/raw": 1.5, "kl/sequence": 5.0},
                       "peak_memory_mib": 618.0}}
    for stage in stages:
        write_manifest(Manifest(stage=stage, output_dir=str(out / stage), base_model=TINY_BASE, metrics=metrics[stage]))
    if "ppo" in stages:
        rows = [{"step": step, "score/raw": 0.1 * step, "score/combined": 0.1 * step, "kl/sequence": 0.3 * step,
                 "response/length": 20.0 + step} for step in range(1, 21)]
        (out / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def run_report(tmp_path, monkeypatch, recipe: str, stages: list[str] | None = None, gold: str | None = None,
               flags: tuple[str, ...] = (), curves: dict[str, list[dict]] | None = None, model_args=None):
    """The pipeline's report of `recipe` (and flags) over hand-written stage folders (and held-out curves); returns
    (report text, eval-policy argv)."""
    (args,) = parse_args(ARG_TYPES, ["--config", recipe, "--output_dir", str(tmp_path), *flags])
    stages = stages or run_stages(args)
    write_stages(tmp_path, stages)
    for stage, rows in (curves or {}).items():
        (tmp_path / stage / CURVE_NAME).write_text("".join(json.dumps(row) + "\n" for row in rows))
    calls = []

    def fake_eval_policy(argv):
        calls.append(argv)
        return fake_policy_report(tmp_path, "--reward_model" in argv, "--gold_reward" in argv)

    monkeypatch.setattr(policy_eval, "main", fake_eval_policy)
    timings = {stage: {"seconds": 10.0 * (index + 1), "skipped": False} for index, stage in enumerate(stages)}
    path = write_pipeline_report(args, tmp_path, stages, timings, gold, model_args)
    return path.read_text(), calls[0]


def table(text: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table after `heading`, header row first (the |---| row left out)."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def assert_no_empty_cell(rows: list[list[str]]) -> None:
    for row in rows:
        assert len(row) == len(rows[0]), row
        for cell in row:
            assert cell and cell.lower() not in ("n/a", "nan", "none"), row


def test_smollm2_report_without_gold_leads_with_the_reward_model(tmp_path, monkeypatch):
    recipe = "recipes/smollm2/pipeline.yaml"
    (args,) = parse_args(ARG_TYPES, ["--config", recipe, "--output_dir", str(tmp_path)])
    assert run_stages(args) == ["sft", "reward", "dpo", "ppo"] and not args.eval_preferences
    # Real data: no stage recipe names a gold reward, so the pipeline passes none (recipe_gold_reward parses the
    # stage recipes, which want a GPU for bf16, so the recipes are read here).
    for stage in ("dpo", "ppo"):
        assert "gold_reward" not in yaml.safe_load(Path(getattr(args, f"{stage}_recipe")).read_text())
    assert not args.dpo_args and not args.ppo_args
    text, argv = run_report(tmp_path, monkeypatch, recipe, gold=None)
    assert "--gold_reward" not in argv and argv[argv.index("--reward_model") + 1] == str(tmp_path / "reward")
    assert argv[argv.index("--max_new_tokens") + 1] == "256"  # as long as PPO's answers, not cut at 64

    stages = table(text, "## Stages")
    assert_no_empty_cell(stages)
    policies = table(text, "## Policies on held-out prompts")
    assert_no_empty_cell(policies)
    assert policies[0] == ["policy", "RM score", "win-rate vs sft (RM)", "KL to sft", "length", "EOS rate", "time (s)",
                           "peak memory (MiB)"]
    assert [row[0] for row in policies[1:]] == ["sft", "dpo", "ppo"]
    assert policies[1][1] == "0.100 [0.050, 0.150]"  # SFT's own reward-model score
    assert policies[1][2] == "–" and policies[1][3] == "0"  # no win-rate against itself
    assert policies[3][6:] == ["40", "618"]  # ppo: its stage's time and peak memory
    assert "gold" not in text.split("## Policies")[1].split("![")[0]
    assert "possible reward hacking: ppo — win-rate 0.83 while length 2.1x sft" in text
    assert "possible reward hacking: dpo" not in text
    for plot in ("policies.png", "reward_vs_kl.png", "score_distributions.png", "ppo_training.png"):
        assert (tmp_path / plot).stat().st_size > 0 and f"]({plot})" in text
    assert "PPO's training trajectory" in text


def test_a_gold_reward_adds_its_columns(tmp_path, monkeypatch):
    text, argv = run_report(tmp_path, monkeypatch, "recipes/tiny/pipeline.yaml", ["sft", "reward", "dpo", "ppo"],
                            gold="rlhf.tiny.task:gold_reward", flags=("--eval_preferences", ""))
    assert argv[argv.index("--gold_reward") + 1] == "rlhf.tiny.task:gold_reward"
    policies = table(text, "## Policies on held-out prompts")
    assert_no_empty_cell(policies)
    assert policies[0] == ["policy", "RM score", "win-rate vs sft (RM)", "KL to sft", "length", "EOS rate",
                           "gold reward", "win-rate vs sft (gold)", "time (s)", "peak memory (MiB)"]
    assert policies[1][6:8] == ["0.400 [0.350, 0.450]", "–"]


def test_without_a_reward_stage_the_reward_model_columns_go(tmp_path, monkeypatch):
    text, argv = run_report(tmp_path, monkeypatch, "recipes/smollm2/pipeline.yaml", ["sft", "dpo"],
                            curves={"dpo": curve_rows(["5", "4 4"])})
    assert "--reward_model" not in argv
    policies = table(text, "## Policies on held-out prompts")
    assert_no_empty_cell(policies)
    assert policies[0] == ["policy", "KL to sft", "length", "EOS rate", "time (s)", "peak memory (MiB)"]
    assert "and reward model" not in text and "possible reward hacking" not in text
    # Nothing scored the samples: no score plot is drawn rather than an empty one.
    assert not any((tmp_path / plot).exists() for plot in ("policies.png", "reward_vs_kl.png", "score_distributions.png",
                                                           "reward_vs_time.png", "curves.json"))
    assert "Alignment per second" not in text  # neither a gold reward nor a reward model scored the curve
    assert "![" not in text


def curve_rows(responses: list[str], gold: list[float] | None = None) -> list[dict]:
    """Held-out curve points 0, 5, 10, ... with one sample each (on one prompt), as GoldCurve writes them."""
    prompt = [{"role": "user", "content": "add 2 and 3"}]
    return [{"step": 5 * index, "seconds": 4.0 * index, "eos_rate": 1.0, "response_length": 3.0,
             **({"gold_reward": gold[index]} if gold else {}), "samples": [{"prompt": prompt, "response": response}]}
            for index, response in enumerate(responses)]


def test_held_out_curves_are_scored_by_the_reward_model_against_training_seconds(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from rlhf.evaluate.scoring import score_conversations
    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(TINY_BASE)
    reward_model = AutoModelForSequenceClassification.from_pretrained(TINY_BASE, num_labels=1).eval()
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    loaded = []
    monkeypatch.setattr(rm_eval, "load_reward_model", lambda path, model_args: loaded.append(path) or (reward_model, tokenizer))
    curves = {"dpo": curve_rows(["5", "4 4", "5 5 5"]), "ppo": curve_rows(["5", "3", "2 9", "9 9 9 9"])}
    text, _ = run_report(tmp_path, monkeypatch, "recipes/smollm2/pipeline.yaml", curves=curves)

    assert loaded == [str(tmp_path / "reward")]
    written = json.loads((tmp_path / "curves.json").read_text())
    for stage, rows in curves.items():
        conversations = [row["samples"][0]["prompt"] + [{"role": "assistant", "content": row["samples"][0]["response"]}]
                         for row in rows]
        scores = score_conversations(reward_model, tokenizer, conversations, show_progress=False)[0]
        assert [point["reward_model_score"] for point in written[stage]] == pytest.approx(scores, abs=1e-5)
        assert [point["seconds"] for point in written[stage]] == [row["seconds"] for row in rows]
        assert not any("samples" in point for point in written[stage])  # they stay in the stage folders
    measures = table(text, "## Alignment per second")
    assert_no_empty_cell(measures)
    assert measures[0] == ["stage", "points", "training seconds", "held-out reward-model score"]
    first, last = written["ppo"][0]["reward_model_score"], written["ppo"][-1]["reward_model_score"]
    assert measures[2] == ["ppo", "4", "12", f"{first:.3f} → {last:.3f}"]
    assert (tmp_path / "reward_vs_time.png").stat().st_size > 0 and "](reward_vs_time.png)" in text


def test_with_a_gold_reward_the_curves_show_gold_and_reward_model_score_side_by_side(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(TINY_BASE)
    reward_model = AutoModelForSequenceClassification.from_pretrained(TINY_BASE, num_labels=1).eval()
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    monkeypatch.setattr(rm_eval, "load_reward_model", lambda path, model_args: (reward_model, tokenizer))
    curves = {"dpo": curve_rows(["5", "4 4"], gold=[0.4, 0.6])}
    text, _ = run_report(tmp_path, monkeypatch, "recipes/tiny/pipeline.yaml", ["sft", "reward", "dpo"],
                         gold="rlhf.tiny.task:gold_reward", flags=("--eval_preferences", ""), curves=curves)
    measures = table(text, "## Alignment per second")
    assert measures[0] == ["stage", "points", "training seconds", "held-out gold reward", "held-out reward-model score"]
    assert measures[1][:4] == ["dpo", "2", "4", "0.400 → 0.600"]
    assert "held-out gold reward and held-out reward-model score while each policy stage trained" in text


def test_a_best_of_n_reward_model_evaluation_is_reported_as_best_of_n(tmp_path, monkeypatch):
    from rlhf.config import ModelArgs
    from rlhf.evaluate.rm_report import build_best_of_n_report

    # RewardBench 2's layout: no pairs, margin or calibration, which the report read before (a KeyError after every
    # stage had trained).
    records = [{"prompt": [{"role": "user", "content": f"q{i}"}],
                "chosen": [[{"role": "assistant", "content": "good"}]],
                "rejected": [[{"role": "assistant", "content": f"bad {j}"}] for j in range(3)]} for i in range(4)]
    rm_report = build_best_of_n_report(records, [[1.0], [1.0], [1.0], [0.0]], [[0.0, 0.5, -1.0]] * 4)
    rm_calls = []
    monkeypatch.setattr(rm_eval, "main", lambda argv: rm_calls.append(argv) or {argv[1]: rm_report})
    text, argv = run_report(tmp_path, monkeypatch, "recipes/tiny/pipeline.yaml", ["sft", "reward", "dpo"],
                            flags=("--eval_preferences", "rb2.jsonl"),
                            model_args=ModelArgs(dtype="bfloat16", trust_remote_code=True))
    section = text.split("## Reward model", 1)[1].split("##", 1)[0]
    assert f"best-of-N accuracy {format_interval(rm_report['accuracy'])} on 4 records (chance 0.250)" in section
    assert "mean gap (lowest chosen - highest rejected) 0.250" in section and "pairs" not in section
    # The recipes' model settings reach both evaluations.
    for command in (argv, rm_calls[0]):
        assert command[command.index("--dtype") + 1] == "bfloat16"
        assert command[command.index("--trust_remote_code") + 1] == "true"


def test_a_pairs_reward_model_evaluation_keeps_margin_and_calibration(tmp_path, monkeypatch):
    from rlhf.evaluate.rm_report import build_report

    pairs = [{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
              "rejected": [{"role": "assistant", "content": "bad"}]}] * 2
    rm_report = build_report(pairs, [1.0, 0.0], [0.0, 0.5])
    monkeypatch.setattr(rm_eval, "main", lambda argv: {argv[1]: rm_report})
    text, argv = run_report(tmp_path, monkeypatch, "recipes/tiny/pipeline.yaml", ["sft", "reward", "dpo"])
    section = text.split("## Reward model", 1)[1].split("##", 1)[0]
    assert (f"Held-out accuracy {format_interval(rm_report['accuracy'])} on 2 pairs, mean margin 0.250, ECE "
            f"{rm_report['calibration']['ece']:.3f}.") in section
    assert "--dtype" not in argv  # no recipe settings given: eval-policy's defaults
