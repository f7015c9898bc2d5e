"""Policy evaluation: win-rates and intervals by hand, a policy compared with itself, and a gold reward named by a
stage folder run only when the user asks."""

import json
import math
import sys

import pytest

from conftest import TINY_BASE, TINY_DATA
from rlhf.config import ConfigError, ModelArgs
from rlhf.data import load_prompts
from rlhf.evaluate.policy import compare_policies, load_gold_reward, mean_with_interval, pick_gold_reward, win_rate
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


def test_policy_against_itself_has_zero_kl_and_even_win_rate():
    model = load_causal_lm(TINY_BASE, ModelArgs()).eval()
    tokenizer = load_tokenizer(TINY_BASE)
    prompts = [record["prompt"] for record in load_prompts(str(TINY_DATA / "prompts_test.jsonl"))][:12]
    report = compare_policies({"same": model}, tokenizer, prompts, reference=model, gold=gold_reward,
                              batch_size=6, max_new_tokens=24, seed=3)
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
