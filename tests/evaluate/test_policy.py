"""Policy evaluation: win-rates and intervals by hand, a policy compared with itself, a gold reward named by a
stage folder run only when the user asks, the reward-hacking rule on hand values, and the report without a gold
reward (the reward model's score leads; no empty cell)."""

import json
import math
import sys

import pytest

from conftest import TINY_BASE, TINY_DATA
from rlhf.config import ConfigError, ModelArgs
from rlhf.data import load_prompts
from rlhf.evaluate.policy import (compare_policies, load_gold_reward, mean_with_interval, pick_gold_reward, policy_table,
                                  reward_hacking, sample_responses, win_rate)
from rlhf.evaluate.rm_report import wilson_interval
from rlhf.evaluate.policy import main as eval_policy_main
from rlhf.manifest import Manifest, write_manifest
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.tiny.task import gold_reward


def test_mean_with_interval_by_hand():
    result = mean_with_interval([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, sample variance 5/3, half width 1.96 * sqrt(5/3 / 4)
    half = 1.96 * math.sqrt((5 / 3) / 4)
    assert result["mean"] == 2.5
    assert result["ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    assert result["n"] == 4


def test_win_rate_counts_ties_as_half():
    result = win_rate([1.0, 2.0, 3.0, 5.0], [0.0, 2.0, 4.0, 1.0])
    assert result["mean"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert result["ci95"] == pytest.approx(wilson_interval(2.5, 4)) and result["n"] == 4


def test_win_rate_interval_stays_inside_0_1_and_is_wide_on_few_prompts():
    # 3 wins of 3: the normal approximation gave [1, 1]; Wilson's lower bound is 3 / (3 + 1.96^2).
    sweep = win_rate([1.0] * 3, [0.0] * 3)
    assert sweep["mean"] == 1.0 and sweep["ci95"] == pytest.approx([3 / (3 + 1.96 ** 2), 1.0])
    # 127 of 128: the normal approximation's upper bound was 1.0075.
    nearly = win_rate([1.0] * 127 + [0.0], [0.0] * 128)
    assert 0.95 < nearly["ci95"][0] < nearly["mean"] < nearly["ci95"][1] <= 1.0
    assert win_rate([0.0] * 3, [1.0] * 3)["ci95"][0] == 0.0
    ties = win_rate([1.0] * 4, [1.0] * 4)["ci95"]
    assert ties[0] == pytest.approx(1 - ties[1]) and ties[0] < 0.5 < ties[1]  # all ties: centred on an even split
    # So 3 prompts never make a drifted policy "clearly preferred" by the reward model.
    drifted = {**TINY_PPO, "response_length": 3 * 21.8, "win_rate_vs_reference_rm": sweep}
    assert reward_hacking(drifted, SFT) is None


def test_kl_to_reference_is_scored_at_the_sampling_temperature():
    tokenizer = load_tokenizer(TINY_BASE)
    policy = load_causal_lm(TINY_BASE, ModelArgs()).eval()
    prompts = [record["prompt"] for record in load_prompts(str(TINY_DATA / "prompts_test.jsonl"))][:16]
    sampling = dict(temperature=1.5, max_new_tokens=8, batch_size=16)
    same = sample_responses(policy, tokenizer, prompts, reference_model=load_causal_lm(TINY_BASE, ModelArgs()).eval(),
                            **sampling)
    assert same["kl"] == [0.0] * 16
    # A reference with flatter logits (divided by 1.5). Scored at temperature 1, as before, the policy's samples at
    # temperature 1.5 are the reference's own distribution, and the estimate is -KL(reference || policy) < 0 on
    # average (about -1.6 nats here); at the sampling temperature it is a true KL, positive on average.
    flatter = load_causal_lm(TINY_BASE, ModelArgs()).eval()
    flatter.get_output_embeddings().register_forward_hook(lambda module, inputs, logits: logits / 1.5)
    kl = sample_responses(policy, tokenizer, prompts, reference_model=flatter, **sampling)["kl"]
    assert sum(kl) / len(kl) > 1.0


@pytest.mark.parametrize("engine, sampling_dtype", [("dynamic", None), ("static", "bfloat16"), ("paged", None)])
def test_policy_against_itself_has_zero_kl_and_even_win_rate(engine, sampling_dtype):
    model = load_causal_lm(TINY_BASE, ModelArgs()).eval()
    tokenizer = load_tokenizer(TINY_BASE)
    prompts = [record["prompt"] for record in load_prompts(str(TINY_DATA / "prompts_test.jsonl"))][:12]
    report = compare_policies({"same": model}, tokenizer, prompts, reference=model, gold=gold_reward,
                              batch_size=6, max_new_tokens=24, seed=3, engine=engine, sampling_dtype=sampling_dtype)
    summary = report["policies"]["same"]
    # Same seed, same model: identical samples, so every comparison is a tie and the KL estimate is exactly 0.
    assert summary["win_rate_vs_reference_gold"]["mean"] == 0.5
    assert summary["kl_to_reference"]["mean"] == 0.0
    assert summary["gold_reward"]["mean"] == report["reference"]["gold_reward"]["mean"]
    assert [e["policy"] for e in summary["examples"]] == [e["reference"] for e in summary["examples"]]


# Code a stage folder names runs only when the user asks (issue 11): a shared folder must not trigger imports.

def test_pick_gold_reward_runs_manifest_code_only_when_asked():
    # Named by the user: used, whatever the manifest says.
    assert pick_gold_reward("mine:gold", "theirs:gold", False) == ("mine:gold", None)
    # Named only by the manifest: not used, and the notice says what was skipped and both ways to enable it.
    spec, notice = pick_gold_reward(None, "theirs:gold", False, "runs/x/manifest.json")
    assert spec is None
    assert notice.startswith("runs/x/manifest.json names gold_reward theirs:gold; it was not imported or run")
    assert "--gold_reward theirs:gold" in notice and "--trust_manifest_gold_reward true" in notice
    # Confirmed with the flag: the manifest's spec is used.
    assert pick_gold_reward(None, "theirs:gold", True) == ("theirs:gold", None)
    assert pick_gold_reward("", None, False) == (None, None)
    # A spec that is not plain module:function is shown escaped, never raw (no terminal control characters).
    _, notice = pick_gold_reward(None, "x:y\x1b[2J", False)
    assert "\x1b" not in notice and "'x:y\\x1b[2J'" in notice


def test_load_gold_reward_refuses_what_is_not_a_function():
    with pytest.raises(ConfigError, match="expected 'package.module:function'"):
        load_gold_reward("rlhf.tiny.task")
    with pytest.raises(ConfigError, match="cannot import it"):
        load_gold_reward("rlhf.tiny.no_such_module:gold")
    with pytest.raises(ConfigError, match="is not a function"):
        load_gold_reward("math:pi")
    with pytest.raises(ConfigError, match="expected a string"):
        load_gold_reward({"module": "math"})


def write_probe_module(folder, name: str) -> None:
    """A gold-reward module that records every import of it in <folder>/imported.txt."""
    (folder / f"{name}.py").write_text(
        "from pathlib import Path\n"
        "with open(Path(__file__).parent / 'imported.txt', 'a') as log:\n"
        "    log.write('imported\\n')\n"
        "def gold(prompt, response):\n"
        "    return 0.25\n"
    )


def fake_policy_stage(folder, gold_spec: str):
    """A finished stage folder whose model is the tiny base (as its merged copy) and whose manifest names gold_spec."""
    return write_manifest(Manifest(stage="dpo", output_dir=str(folder), base_model=TINY_BASE, merged_path=TINY_BASE,
                                   config={"data": {"gold_reward": gold_spec}}))


def test_eval_policy_imports_the_manifest_gold_reward_only_when_asked(tmp_path, monkeypatch, capsys):
    module_name = f"gold_probe_{tmp_path.name}"
    write_probe_module(tmp_path, module_name)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    fake_policy_stage(tmp_path / "policy", f"{module_name}:gold")
    argv = ["--policy", str(tmp_path / "policy"), "--prompts", str(TINY_DATA / "prompts_test.jsonl"),
            "--max_samples", "3", "--max_new_tokens", "4", "--batch_size", "3"]

    report = eval_policy_main(argv + ["--out", str(tmp_path / "untrusted")])
    assert not (tmp_path / "imported.txt").exists() and module_name not in sys.modules
    summary = report["policies"][str(tmp_path / "policy")]
    assert "gold_reward" not in summary and report["gold_reward_spec"] is None
    notice = f"names gold_reward {module_name}:gold; it was not imported or run"
    assert sum(notice in line for line in capsys.readouterr().out.splitlines()) == 1
    assert notice in (tmp_path / "untrusted" / "report.md").read_text()

    report = eval_policy_main(argv + ["--out", str(tmp_path / "trusted"), "--trust_manifest_gold_reward", "true"])
    assert (tmp_path / "imported.txt").read_text() == "imported\n"
    assert report["policies"][str(tmp_path / "policy")]["gold_reward"]["mean"] == 0.25
    assert "not imported" not in capsys.readouterr().out


def test_pipeline_report_scores_the_gold_reward_its_own_recipes_name(tmp_path):
    from rlhf.config import parse_args
    from rlhf.pipeline import ARG_TYPES, recipe_gold_reward
    from rlhf.report import write_pipeline_report

    (args,) = parse_args(ARG_TYPES, ["--config", "recipes/tiny/pipeline.yaml", "--output_dir", str(tmp_path),
                                     "--stages", "sft", "dpo", "--eval_samples", "3", "--eval_preferences", ""])
    assert recipe_gold_reward(args, tmp_path, ["dpo", "ppo"]) == "rlhf.tiny.task:gold_reward"
    # The stage folders' manifests are not consulted (this one names a module that does not exist): the pipeline's
    # recipes name the gold reward, and the report scores with it.
    fake_policy_stage(tmp_path / "sft", "someone.elses:module")
    fake_policy_stage(tmp_path / "dpo", "someone.elses:module")
    write_pipeline_report(args, tmp_path, ["sft", "dpo"], {}, recipe_gold_reward(args, tmp_path, ["dpo"]))
    policies = json.loads((tmp_path / "eval_policy" / "report.json").read_text())
    assert policies["gold_reward_spec"] == "rlhf.tiny.task:gold_reward"
    assert "gold_reward" in policies["reference"] and "gold_reward" in policies["policies"][str(tmp_path / "dpo")]
    # A stage's extra flags override its recipe, as they do for the stage itself.
    args.dpo_args, args.ppo_args = ["--gold_reward", ""], ["--gold_reward", "rlhf.tiny.task:gold_reward"]
    assert recipe_gold_reward(args, tmp_path, ["dpo", "ppo"]) == "rlhf.tiny.task:gold_reward"
    assert recipe_gold_reward(args, tmp_path, ["dpo"]) is None


def interval(mean: float, low: float, high: float) -> dict:
    return {"mean": mean, "ci95": [low, high], "n": 128}


# The tiny pipeline's README run (SFT length 21.8): healthy, so the default thresholds must not flag it.
SFT = {"response_length": 21.8, "eos_rate": 0.95}
TINY_PPO = {"response_length": 17.1, "eos_rate": 1.0, "win_rate_vs_reference_rm": interval(0.832, 0.767, 0.897),
            "kl_to_reference": interval(4.996, 4.439, 5.553)}
TINY_GRPO = {"response_length": 23.4, "eos_rate": 0.98, "win_rate_vs_reference_rm": interval(0.762, 0.688, 0.835),
             "kl_to_reference": interval(4.076, 3.365, 4.787)}


def test_reward_hacking_spares_the_healthy_tiny_runs():
    assert reward_hacking(TINY_PPO, SFT, "sft") is None
    assert reward_hacking(TINY_GRPO, SFT, "sft") is None


def test_reward_hacking_flags_a_preferred_policy_whose_length_or_kl_drifted_far():
    longer = {**TINY_PPO, "response_length": 2.1 * 21.8}
    assert reward_hacking(longer, SFT, "sft") == "win-rate 0.83 while length 2.1x sft"
    shorter = {**TINY_PPO, "response_length": 0.5 * 21.8}
    assert reward_hacking(shorter, SFT, "sft") == "win-rate 0.83 while length 0.5x sft"
    far = {**TINY_PPO, "kl_to_reference": interval(14.2, 12.0, 16.4)}
    assert reward_hacking(far, SFT, "sft") == "win-rate 0.83 while KL 14.2 nats (above 10)"
    both = {**far, "response_length": 2.1 * 21.8}
    assert reward_hacking(both, SFT, "sft") == "win-rate 0.83 while length 2.1x sft and KL 14.2 nats (above 10)"
    # The thresholds are options: a tighter KL bound flags the tiny PPO run.
    assert reward_hacking(TINY_PPO, SFT, "sft", max_kl=4.0) == "win-rate 0.83 while KL 5.0 nats (above 4)"
    assert reward_hacking({**TINY_PPO, "response_length": 27.0}, SFT, "sft", length_factor=1.2) is not None


def test_reward_hacking_needs_the_reward_model_to_clearly_prefer_the_policy():
    drifted = {**TINY_PPO, "response_length": 3 * 21.8, "kl_to_reference": interval(30.0, 25.0, 35.0)}
    # A win-rate whose interval reaches 0.5 is no clear preference; without a reward model there is none at all.
    assert reward_hacking({**drifted, "win_rate_vs_reference_rm": interval(0.58, 0.50, 0.66)}, SFT) is None
    assert reward_hacking({key: value for key, value in drifted.items() if key != "win_rate_vs_reference_rm"}, SFT) is None


def test_policy_table_drops_columns_no_row_has_and_dashes_what_a_row_cannot_have():
    report = {"reference": {**SFT, "reward_model_score": interval(0.1, 0.0, 0.2)},
              "policies": {"runs/x/ppo": {**TINY_PPO, "reward_model_score": interval(1.2, 1.0, 1.4)}},
              "reward_hacking": {"runs/x/ppo": "win-rate 0.83 while length 2.1x sft"}}
    lines = policy_table(report, "sft", extra={"time (s)": {"runs/x/ppo": "51"}, "peak memory (MiB)": {}})
    assert lines[:4] == [
        "| policy | RM score | win-rate vs sft (RM) | KL to sft | length | EOS rate | time (s) |", "|---|---|---|---|---|---|---|",
        "| sft | 0.100 [0.000, 0.200] | – | 0 | 21.8 | 0.95 | – |",
        "| ppo | 1.200 [1.000, 1.400] | 0.832 [0.767, 0.897] | 4.996 [4.439, 5.553] | 17.1 | 1.00 | 51 |"]
    assert lines[4:] == ["", "possible reward hacking: ppo — win-rate 0.83 while length 2.1x sft"]
    # Two policies of the same folder name are told apart by their parent folders.
    report["policies"]["runs/y/ppo"] = report["policies"]["runs/x/ppo"]
    assert [line.split(" | ")[0] for line in policy_table(report, "sft")[3:5]] == ["| x/ppo", "| y/ppo"]


def fake_stage(folder, stage: str):
    """A finished stage folder of the given kind whose model is the tiny base (a reward stage gets a fresh score head)."""
    from rlhf.models import REWARD

    return write_manifest(Manifest(stage=stage, output_dir=str(folder), base_model=TINY_BASE, merged_path=TINY_BASE,
                                   extra={"head": REWARD} if stage == "reward" else {}))


def test_eval_policy_runs_the_models_on_the_gpu_when_there_is_one(tmp_path):
    import torch

    from rlhf.evaluate.devices import pick_device

    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda"):
        pick_device("gpu")
    if not torch.cuda.is_available():  # a GPU asked for on a machine without one is refused before any model loads
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            eval_policy_main(["--policy", "unused", "--prompts", str(TINY_DATA / "prompts_test.jsonl"),
                              "--device", "cuda:0"])
    fake_stage(tmp_path / "dpo", "dpo")
    argv = ["--policy", str(tmp_path / "dpo"), "--prompts", str(TINY_DATA / "prompts_test.jsonl"), "--max_samples", "2",
            "--max_new_tokens", "3", "--out", str(tmp_path / "eval")]
    assert eval_policy_main(argv)["device"] == str(pick_device("auto"))
    assert eval_policy_main(argv + ["--device", "cpu"])["device"] == "cpu"


def test_eval_policy_without_gold_reward_leads_with_the_reward_model(tmp_path, capsys):
    for stage in ("sft", "reward"):
        fake_stage(tmp_path / stage, stage)
    fake_stage(tmp_path / "dpo", "dpo")
    report = eval_policy_main(["--policy", str(tmp_path / "dpo"), "--reference", str(tmp_path / "sft"),
                               "--reward_model", str(tmp_path / "reward"), "--prompts", str(TINY_DATA / "prompts_test.jsonl"),
                               "--max_samples", "4", "--max_new_tokens", "6", "--batch_size", "4",
                               "--out", str(tmp_path / "eval")])
    reference, summary = report["reference"], report["policies"][str(tmp_path / "dpo")]
    # The same model and seed as the reference: the reward model scores identical samples, so the win-rate is an even tie.
    assert reference["reward_model_score"] == summary["reward_model_score"]
    assert summary["win_rate_vs_reference_rm"]["mean"] == 0.5 and report["reward_hacking"] == {}
    assert len(summary["per_prompt"]["rm"]) == len(reference["per_prompt"]["rm"]) == 4
    assert "gold_reward" not in summary and "gold" not in summary["per_prompt"]
    text = (tmp_path / "eval" / "report.md").read_text()
    lines = text.splitlines()
    header, _, sft_row, dpo_row = lines[lines.index("| policy | RM score | win-rate vs sft (RM) | KL to sft | length | "
                                                    "EOS rate |"):][:4]
    assert sft_row.startswith("| sft | ") and dpo_row.startswith("| dpo | ")
    assert all(cell.strip() and cell.strip() != "n/a" for row in (sft_row, dpo_row) for cell in row.strip("|").split("|"))
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["policies"][str(tmp_path / "dpo")]["per_prompt"]
    for plot in ("policies.png", "reward_vs_kl.png", "score_distributions.png"):
        assert (tmp_path / "eval" / plot).is_file() and f"]({plot})" in text
    assert "dpo: RM score " in capsys.readouterr().out


def test_plots_draw_only_what_was_scored(tmp_path):
    from rlhf.evaluate.plots import rows, write_policy_plots

    unscored = {"n_prompts": 4, "reference": dict(SFT), "policies": {"runs/x/ppo": dict(TINY_PPO)}}
    assert write_policy_plots(unscored, tmp_path / "none", "sft") == [] and not (tmp_path / "none").exists()
    scored = {"n_prompts": 4, "reference": {**SFT, "reward_model_score": interval(0.1, 0.0, 0.2),
                                            "per_prompt": {"rm": [0.0, 0.1, 0.2]}},
              "policies": {"runs/x/ppo": {**TINY_PPO, "reward_model_score": interval(1.2, 1.0, 1.4),
                                          "per_prompt": {"rm": [1.0, 1.2, 1.4]}}}}
    training = {"ppo": [{"step": step, "kl/sequence": 0.5 * step, "score/raw": 0.1 * step} for step in range(1, 11)]}
    assert write_policy_plots(scored, tmp_path / "rm", "sft", training) == [
        "policies.png", "reward_vs_kl.png", "score_distributions.png"]
    # A policy named like the reference keeps its own spot on the axis.
    scored["policies"] = {"runs/sft": scored["policies"]["runs/x/ppo"]}
    assert [name for name, _, _ in rows(scored, "sft")] == ["sft (reference)", "sft"]


def test_eval_policy_refuses_prompts_already_in_chat_template_form_before_loading_a_model(tmp_path, monkeypatch):
    import rlhf.models
    from rlhf.data import DataError

    fake_stage(tmp_path / "dpo", "dpo")
    prompts = tmp_path / "templated.jsonl"
    prompts.write_text(json.dumps({"prompt": "<|im_start|>user\nhi<|im_end|>"}) + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(rlhf.models, "load_stage_output", no_model)
    with pytest.raises(DataError, match=r"templated\.jsonl line 1, field 'prompt': the user message holds "
                                        r"'<\|im_start\|>'"):
        eval_policy_main(["--policy", str(tmp_path / "dpo"), "--prompts", str(prompts), "--out", str(tmp_path / "e")])
