"""The held-out curve: evenly spaced points from the starting policy on, sampling that leaves training's random state
alone, resume, samples kept for a reward model to score."""

import json
import random
import time

import torch

from conftest import TINY_BASE, TINY_DATA
from rlhf.config import ModelArgs
from rlhf.data import load_prompts
from rlhf.evaluate.curve import GoldCurve, read_curve, score_curves
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.tiny.task import gold_reward


def make_curve(tmp_path, points=3, total_steps=12):
    prompts = [record["prompt"] for record in load_prompts(str(TINY_DATA / "prompts_test.jsonl"))[:4]]
    return GoldCurve(str(tmp_path), prompts, gold_reward, points, total_steps, max_new_tokens=8)


def test_points_are_evenly_spaced_and_end_with_training(tmp_path):
    assert make_curve(tmp_path, 3, 12).steps == [4, 8, 12]
    assert make_curve(tmp_path, 5, 3).steps == [1, 2, 3]  # more points than steps: one per step


def test_a_point_leaves_the_training_state_as_it_was_and_its_time_out(tmp_path):
    model, tokenizer = load_causal_lm(TINY_BASE, ModelArgs()).train(), load_tokenizer(TINY_BASE)
    tokenizer.padding_side = "right"
    curve = make_curve(tmp_path)
    curve.start(model, tokenizer)
    (start,) = read_curve(tmp_path / "gold_curve.jsonl")
    assert start["step"] == 0 and start["seconds"] < 0.01 and 0 <= start["gold_reward"] <= 1  # the starting policy
    time.sleep(0.2)
    torch.manual_seed(7)
    rng_before, python_rng_before = torch.get_rng_state(), random.getstate()
    evaluation_started = time.perf_counter()
    row = curve.record(model, tokenizer, step=4)
    evaluation_seconds = time.perf_counter() - evaluation_started
    assert torch.equal(torch.get_rng_state(), rng_before)  # training draws what it would have drawn
    assert random.getstate() == python_rng_before
    assert model.training and tokenizer.padding_side == "right"
    assert 0.2 <= row["seconds"] < 0.2 + evaluation_seconds / 2 + 0.1
    assert 0.2 <= row["seconds"] and 0 <= row["gold_reward"] <= 1
    assert read_curve(tmp_path / "gold_curve.jsonl") == [start, row]
    second = curve.record(model, tokenizer, step=8)
    assert second["seconds"] - row["seconds"] < evaluation_seconds / 2  # the first evaluation is not counted


def test_a_resumed_run_keeps_the_points_up_to_its_checkpoint(tmp_path):
    rows = [{"step": step, "seconds": 10.0 * step, "gold_reward": 0.5, "eos_rate": 1.0, "response_length": 9.0}
            for step in (0, 4, 8)]
    (tmp_path / "gold_curve.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 12, "sec')
    curve = make_curve(tmp_path)
    curve.start(None, None, resumed_step=4)  # nothing is sampled: the starting point is on file
    assert read_curve(tmp_path / "gold_curve.jsonl") == rows[:2]
    assert curve.offset == 40.0


def test_without_a_gold_reward_the_samples_are_kept_for_a_reward_model_to_score(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhf.evaluate.scoring import score_conversations

    model, tokenizer = load_causal_lm(TINY_BASE, ModelArgs()), load_tokenizer(TINY_BASE)
    prompts = [record["prompt"] for record in load_prompts(str(TINY_DATA / "prompts_test.jsonl"))[:4]]
    curve = GoldCurve(str(tmp_path), prompts, None, 2, 4, max_new_tokens=8)
    curve.start(model, tokenizer)
    curve.record(model, tokenizer, step=2)
    rows = read_curve(tmp_path / "gold_curve.jsonl")
    assert [row["step"] for row in rows] == [0, 2] and not any("gold_reward" in row for row in rows)
    assert [sample["prompt"] for sample in rows[1]["samples"]] == prompts

    reward_model = AutoModelForSequenceClassification.from_pretrained(TINY_BASE, num_labels=1).eval()
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    older = {"step": 4, "seconds": 9.0, "gold_reward": 0.5}  # a point without samples keeps what it has
    scored = score_curves({"dpo": rows + [older]}, reward_model, tokenizer)["dpo"]
    conversations = [sample["prompt"] + [{"role": "assistant", "content": sample["response"]}]
                     for sample in rows[1]["samples"]]
    scores = score_conversations(reward_model, tokenizer, conversations, show_progress=False)[0]
    assert scored[1]["reward_model_score"] == sum(scores) / len(scores)
    assert scored[2] == older and scored[1]["samples"] == rows[1]["samples"]


def test_the_stage_settings_pick_prompts_and_response_length(tmp_path):
    from rlhf.config import DataArgs
    from rlhf.evaluate.curve import gold_curve

    prompts = [record["prompt"] for record in load_prompts(str(TINY_DATA / "prompts_test.jsonl"))[:4]]
    assert gold_curve(DataArgs(gold_curve_points=0), prompts, str(tmp_path), 10) is None
    assert gold_curve(DataArgs(gold_curve_points=3), None, str(tmp_path), 10) is None  # no held-out prompts
    curve = gold_curve(DataArgs(gold_curve_points=3, gold_eval_max_new_tokens=3), prompts, str(tmp_path), 10)
    model, tokenizer = load_causal_lm(TINY_BASE, ModelArgs()), load_tokenizer(TINY_BASE)
    curve.start(model, tokenizer)
    (start,) = read_curve(tmp_path / "gold_curve.jsonl")
    assert curve.steps == [3, 7, 10] and "gold_reward" not in start
    assert 0 < start["response_length"] <= 3 and start["eos_rate"] < 1  # the untrained base rambles past 3 tokens


def test_a_resumed_run_without_its_curve_file_does_not_pass_its_policy_off_as_the_start(tmp_path):
    curve = make_curve(tmp_path)
    curve.start(None, None, resumed_step=8)  # None: sampling anything here would fail
    assert read_curve(tmp_path / "gold_curve.jsonl") == [] and curve.offset == 0.0


def test_sampling_on_a_gpu_forks_that_gpus_generator_too(monkeypatch):
    from rlhf.evaluate.devices import devices_to_fork

    # torch.manual_seed reseeds the GPU's generator as well: a point must save and restore the one in use.
    assert devices_to_fork(torch.device("cpu")) == [] and devices_to_fork("cpu") == []
    assert devices_to_fork(torch.device("cuda", 1)) == [1] and devices_to_fork("cuda:0") == [0]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # "cuda" without an index: the current device
    assert devices_to_fork(torch.device("cuda")) == [3]
