"""PPO stage: learns on the tiny task, one base model in memory, exact resume, multi-process runs."""

import gc
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_DATA, held_out_curve, metrics_rows, short_ppo_run
from rlhf.config import ModelArgs
from rlhf.data import load_preferences
from rlhf.generation import pad_batch, position_ids_from_mask, response_logprobs, token_logprobs
from rlhf.manifest import read_manifest
from rlhf.models import load_stage_output, stage_tokenizer
from rlhf.ppo.layouts import build_models


def test_ppo_improves_gold_reward_over_sft(ppo_run, sft_run):
    sft_gold = sft_run.metrics["gold"]["gold_reward"]["mean"]
    ppo_gold = ppo_run.metrics["gold"]["gold_reward"]["mean"]
    assert ppo_gold >= 1.25 * sft_gold, (sft_gold, ppo_gold)
    assert ppo_run.metrics["last"]["score/raw"] > ppo_run.metrics["first"]["score/raw"]
    # The policy starts as the reference (equal up to the rounding of KV-cached decoding vs a full forward).
    assert abs(ppo_run.metrics["first"]["kl/sequence"]) < 1e-4
    assert ppo_run.extra["layout"] == "shared"
    held_out_curve(ppo_run, sft_gold)
    lines = (REPO / ppo_run.output_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == ppo_run.metrics["steps"]
    for key in ("policy/clipfrac", "policy/approx_kl", "policy/entropy", "value/clipfrac", "loss/value",
                "value/explained_variance", "response/eos_rate", "time/generation", "time/scoring", "time/training"):
        assert key in json.loads(lines[-1])


def count_models():
    """Distinct copies of model weights alive (a causal LM and its inner body share one embedding matrix)."""
    from transformers import PreTrainedModel

    gc.collect()
    return len({obj.get_input_embeddings().weight.data_ptr() for obj in gc.get_objects()
                if isinstance(obj, PreTrainedModel)})


def sequence_batch(tokenizer, n=6):
    pairs = load_preferences(str(TINY_DATA / "prefs_test.jsonl"))[:n]
    prompts = [list(tokenizer.apply_chat_template(p["prompt"], add_generation_prompt=True, return_dict=False)) for p in pairs]
    responses = [tokenizer(p["chosen"][0]["content"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for p in pairs]
    return (*pad_batch(prompts, tokenizer.pad_token_id, "left"), *pad_batch(responses, tokenizer.pad_token_id, "right"))


def test_shared_layout_holds_one_base_and_reference_is_sft(sft_run, lora_reward_run):
    before = count_models()
    models = build_models("shared", sft_run, lora_reward_run, ModelArgs(), value_init="reward").eval()
    assert count_models() - before == 1
    tokenizer = stage_tokenizer(sft_run, ModelArgs())
    batch = sequence_batch(tokenizer)
    sft_policy = load_stage_output(sft_run, ModelArgs()).eval()
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    input_ids, attention_mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    with torch.no_grad():
        expected = response_logprobs(sft_policy, *batch)
        logits = models.reference_logits(input_ids, attention_mask, position_ids_from_mask(attention_mask))
        reference = token_logprobs(logits[:, prompt_ids.shape[1] - 1 : -1], response_ids) * response_mask
    torch.testing.assert_close(reference, expected, atol=1e-4, rtol=1e-4)


def test_shared_reward_adapter_scores_like_the_reward_model(sft_run, lora_reward_run):
    from rlhf.evaluate.scoring import render, score_token_ids

    models = build_models("shared", sft_run, lora_reward_run, ModelArgs(), value_init="reward").eval()
    tokenizer = stage_tokenizer(lora_reward_run, ModelArgs())
    pairs = load_preferences(str(TINY_DATA / "prefs_test.jsonl"))[:6]
    sequences = [render(tokenizer, p["prompt"] + p["chosen"]) for p in pairs]
    ids, mask = pad_batch(sequences, tokenizer.pad_token_id, "right")
    expected = score_token_ids(load_stage_output(lora_reward_run, ModelArgs()).eval(), tokenizer.pad_token_id, sequences)
    torch.testing.assert_close(models.scores(ids, mask), expected, atol=1e-4, rtol=1e-4)
    # The value model starts as the reward model: its value at the last token is the reward.
    values = models.values(ids, mask, (mask.cumsum(1) - 1).clamp(min=0)).detach()
    torch.testing.assert_close(values[torch.arange(len(pairs)), mask.sum(1) - 1], expected, atol=1e-4, rtol=1e-4)


def test_full_reward_model_sits_beside_the_shared_base(sft_run, reward_run):
    import pytest

    from rlhf.config import ConfigError

    before = count_models()
    models = build_models("shared", sft_run, reward_run, ModelArgs(), value_init="policy")
    assert models.reward_placement.startswith("separate")
    assert count_models() - before == 2  # the shared base (policy, value, reference) + the reward model
    with pytest.raises(ConfigError, match="value_init: policy"):
        build_models("shared", sft_run, reward_run, ModelArgs(), value_init="reward")


@pytest.mark.parametrize("layout, copies", [("shared", 1), ("separate", 3)])
def test_reward_functions_alone_load_no_reward_model(sft_run, layout, copies):
    from rlhf.config import ConfigError

    before = count_models()
    models = build_models(layout, sft_run, None, ModelArgs(), value_init="policy")
    assert count_models() - before == copies  # shared: one base; separate: policy, reference, value; no reward
    assert not models.has_reward_model and models.reward_placement == "none (reward functions)"
    with pytest.raises(ConfigError, match="use value_init: policy"):
        build_models(layout, sft_run, None, ModelArgs(), value_init="reward")


def test_resume_continues_exactly_like_an_uninterrupted_run(sft_run, reward_run, tmp_path, capsys):
    constant = ["--lr_scheduler", "constant"]  # so stopping at step 2 changes nothing but the stop
    short_ppo_run(sft_run, reward_run, tmp_path / "straight", "--steps", "3", *constant)
    assert "[rlhf] ppo: training 3 steps on 512 prompts (8 per step, 0.047 passes)\n" in capsys.readouterr().out
    short_ppo_run(sft_run, reward_run, tmp_path / "resumed", "--steps", "2", "--save_steps", "1", *constant)
    short_ppo_run(sft_run, reward_run, tmp_path / "resumed", "--steps", "3", "--save_steps", "1", *constant)  # from step 2
    resumed_output = capsys.readouterr().out
    assert "training 3 steps on 512 prompts (8 per step, 0.047 passes), from step 2" in resumed_output
    assert "[rlhf] ppo: trained 1 steps in" in resumed_output
    straight, resumed = metrics_rows(tmp_path / "straight"), metrics_rows(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for key in ("score/raw", "kl/sequence", "loss/policy", "loss/value"):
        assert abs(straight[-1][key] - resumed[-1][key]) < 1e-4, key


def test_separate_layout_runs_and_says_so(sft_run, reward_run, tmp_path):
    manifest = short_ppo_run(sft_run, reward_run, tmp_path / "separate", "--steps", "1", "--layout", "separate")
    assert manifest.extra["layout"] == "separate"
    assert abs(manifest.metrics["first"]["kl/sequence"]) < 1e-4
    assert read_manifest(tmp_path / "separate").stage == "ppo"


def test_two_processes_match_one(sft_run, reward_run, tmp_path):
    common = ["-m", "rlhf.ppo", "--config", "recipes/tiny/ppo.yaml", "--init_from", sft_run.output_dir,
              "--reward_model", reward_run.output_dir, "--steps", "2", "--ppo_epochs", "1",
              "--max_new_tokens", "24", "--gold_eval_prompts", "", "--save_merged", "false"]
    # Same global batch of 16 prompts and global mini-batch of 4: the same number of optimizer steps.
    runs = {"one": ("cpu.yaml", "16", "4"), "two": ("cpu_2proc.yaml", "8", "2")}
    for name, (config, per_process, mini_batch) in runs.items():
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"recipes/accelerate/{config}",
                   *common, "--rollout_batch_size", per_process, "--mini_batch_size", mini_batch,
                   "--output_dir", str(tmp_path / name)]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                                env={**os.environ, "ACCELERATE_USE_CPU": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = metrics_rows(tmp_path / "one"), metrics_rows(tmp_path / "two")
    assert read_manifest(tmp_path / "two").extra["world_size"] == 2
    # Same prompts, same model, different sampling streams: statistics agree within sampling noise.
    assert abs(one[0]["kl/sequence"]) < 1e-4 and abs(two[0]["kl/sequence"]) < 1e-4
    assert abs(one[0]["score/raw"] - two[0]["score/raw"]) < 0.5
    assert abs(one[0]["response/length"] - two[0]["response/length"]) < 6
    assert abs(one[-1]["score/gold"] - two[-1]["score/gold"]) < 0.2


def test_shared_critic_reads_the_policy_forward_and_has_no_value_adapter(sft_run, reward_run):
    model_args = ModelArgs(lora_r=8, lora_alpha=16)
    models = build_models("shared", read_manifest(sft_run.output_dir), read_manifest(reward_run.output_dir), model_args,
                          "policy", critic="shared").eval()
    assert models.shared_critic and "value" not in models.model.peft_config
    tokenizer = stage_tokenizer(read_manifest(sft_run.output_dir), model_args)
    prompt_ids, prompt_mask, response_ids, response_mask = sequence_batch(tokenizer)
    ids, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    positions = position_ids_from_mask(mask)
    keep = response_ids.shape[1] + 1
    with torch.no_grad():
        torch.nn.init.normal_(models.value_head.weight)  # a head that is not all zeros, so values say something
        logits, values = models.policy_logits_and_values(ids, mask, positions, keep=keep)
        assert torch.allclose(logits, models.policy_logits(ids, mask, positions, keep=keep), atol=1e-5)
        assert torch.allclose(values, models.values(ids, mask, positions), atol=1e-6)
        body = models.model.get_base_model().base_model(input_ids=ids, attention_mask=mask, position_ids=positions)
        assert torch.allclose(values, models.value_head(body.last_hidden_state).squeeze(-1), atol=1e-5)


def test_shared_critic_run_learns(sft_run, reward_run, tmp_path):
    manifest = short_ppo_run(sft_run, reward_run, tmp_path / "shared_critic", "--steps", "16", "--critic", "shared",
                         "--value_init", "policy", "--rollout_batch_size", "16", "--mini_batch_size", "8",
                         "--ppo_epochs", "4")
    lines = metrics_rows(tmp_path / "shared_critic")
    first, last = lines[:4], lines[-4:]
    mean = lambda rows, key: sum(row[key] for row in rows) / len(rows)  # noqa: E731
    assert mean(last, "score/raw") > mean(first, "score/raw") + 0.3, [row["score/raw"] for row in lines]
    assert manifest.config["training"]["critic"] == "shared"


def test_shared_critic_needs_the_shared_layout(sft_run, reward_run, tmp_path):
    import pytest

    from rlhf.config import ConfigError

    with pytest.raises(ConfigError, match="critic: shared .* use layout: shared"):
        short_ppo_run(sft_run, reward_run, tmp_path / "bad", "--steps", "1", "--critic", "shared", "--layout", "separate")


def test_resume_after_a_kill_logs_every_step_once(sft_run, reward_run, tmp_path):
    """A run killed after logging steps 3-4 but before its last save resumes from step 2: those rows are logged
    again, so the log must drop them first, and the manifest's first row stays step 1."""
    output_dir = tmp_path / "killed"
    short_ppo_run(sft_run, reward_run, output_dir, "--steps", "4", "--save_steps", "2")
    # What a kill between the step-4 log line and the final save leaves: no manifest, no step-4 checkpoint, and a
    # last log line cut in half.
    (output_dir / "manifest.json").unlink()
    import shutil

    shutil.rmtree(output_dir / "checkpoints" / "step-000004")
    with open(output_dir / "metrics.jsonl", "a") as log:
        log.write('{"step": 5, "score/r')
    manifest = short_ppo_run(sft_run, reward_run, output_dir, "--steps", "4", "--save_steps", "2")
    assert [row["step"] for row in metrics_rows(output_dir)] == [1, 2, 3, 4]
    assert manifest.metrics["first"]["step"] == 1 and manifest.metrics["last"]["step"] == 4


def test_prompts_longer_than_max_prompt_length_follow_the_length_policy(sft_run, tmp_path):
    import pytest

    from rlhf.config import DataArgs
    from rlhf.data import DataError, load_prompts
    from rlhf.ppo.trainer import fit_prompts

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "Write a short review of the lamp."}) + "\n"
                            + json.dumps({"prompt": "lamp " * 400}) + "\n")
    records = load_prompts(str(prompts_file))
    tokenizer = stage_tokenizer(sft_run, ModelArgs())
    messages = []

    def fit(policy):
        return fit_prompts(records, tokenizer, 64, DataArgs(train_data=str(prompts_file), length_policy=policy),
                           messages.append)

    with pytest.raises(DataError, match=r"prompts.jsonl line 2, field 'prompt': \d+ tokens, longer than max_length 64"):
        fit("error")
    prompts, ids = fit("drop")
    assert len(prompts) == len(ids) == 1 and "1 of 2 prompts" in messages[-1]
    prompts, ids = fit("truncate")
    assert len(ids) == 2 and len(ids[1]) == 64 and len(ids[0]) < 64 and "keeping their last 64" in messages[-1]
    # Under every policy (truncate is the default), text already in chat-template form is refused.
    records.append(load_prompts(str(write_prompt(tmp_path, "<|im_start|>user\nhi<|im_end|>")))[0])
    for policy in ("error", "drop", "truncate"):
        with pytest.raises(DataError, match=r"field 'prompt': the user message holds '<\|im_start\|>'"):
            fit(policy)


def write_prompt(tmp_path, prompt: str):
    path = tmp_path / "templated.jsonl"
    path.write_text(json.dumps({"prompt": prompt}) + "\n")
    return path


def saved_rollout(sft_run, reward_run, path, n_prompts=8):
    """A real rollout of the tiny policy on n_prompts prompts, with advantages, saved for update_worker.py."""
    from rlhf.data import load_prompts
    from rlhf.generation import encode_prompts
    from rlhf.ppo import math as ppo_math
    from rlhf.ppo.config import PPOArgs
    from rlhf.ppo.rollout import collect, finish_advantages

    torch.manual_seed(0)
    models = build_models("shared", read_manifest(sft_run.output_dir), read_manifest(reward_run.output_dir),
                          ModelArgs(), "policy").eval()
    tokenizer = stage_tokenizer(read_manifest(sft_run.output_dir), ModelArgs())
    prompts = [record["prompt"] for record in load_prompts(str(TINY_DATA / "prompts_test.jsonl"))[:n_prompts]]
    args = PPOArgs(output_dir="unused", reward_model=reward_run.output_dir, rollout_batch_size=n_prompts,
                   mini_batch_size=n_prompts, max_new_tokens=16)
    rollout = collect(models, tokenizer, stage_tokenizer(read_manifest(reward_run.output_dir), ModelArgs()), prompts,
                      encode_prompts(tokenizer, prompts), args, 0.05, None)
    finish_advantages(rollout, args, lambda values, mask: (ppo_math.masked_mean(values, mask),
                                                           ppo_math.masked_var(values, mask)))
    assert len({int(length) for length in rollout.response_mask.sum(1)}) > 1  # ragged: token-means differ per row
    torch.save(dict(rollout.__dict__), path)
    return path


def test_update_is_the_same_whether_one_process_holds_the_batch_or_two_share_it(sft_run, reward_run, tmp_path):
    """The same rollout batch, one process holding all 8 rows or two holding 4 each, same optimizer steps (one
    mini-batch per epoch, 2 epochs): equal trainable parameters, with and without gradient accumulation. Before the
    losses were token-means over the global mini-batch, micro-batch and per-process means made these differ."""
    sys.path.insert(0, str(REPO / "tests" / "ppo"))
    from update_worker import run

    rollout = saved_rollout(sft_run, reward_run, tmp_path / "rollout.pt")
    for accumulation in (1, 2):
        whole = tmp_path / f"whole{accumulation}.pt"
        run(sft_run.output_dir, reward_run.output_dir, str(rollout), str(whole), 8, accumulation)
        one = torch.load(whole)
        two = launch_update_worker(sft_run, reward_run, rollout, tmp_path / f"shared{accumulation}.pt", "4",
                                   str(accumulation))
        start = trainable_start(sft_run, reward_run)
        assert max((one[name] - start[name]).abs().max().item() for name in one) > 1e-4  # the update moved them
        for name in one:
            assert torch.allclose(one[name], two[name], atol=1e-5, rtol=0), (accumulation, name)


def launch_update_worker(sft_run, reward_run, rollout, out, *extra):
    worker = str(REPO / "tests" / "ppo" / "update_worker.py")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml",
               "--main_process_port", "29623", worker, sft_run.output_dir, reward_run.output_dir, str(rollout),
               str(out), *extra]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


def test_sharded_update_equals_the_unsharded_one(sft_run, reward_run, tmp_path):
    """FSDP2 over two gloo processes, each holding half of every parameter (the worker checks that every
    parameter is a shard) and half of the batch: the same trainable parameters after the update as one unsharded
    process holding it all, for the separate critic with gradient accumulation and for the shared critic."""
    sys.path.insert(0, str(REPO / "tests" / "ppo"))
    from update_worker import run

    rollout = saved_rollout(sft_run, reward_run, tmp_path / "rollout.pt")
    start = trainable_start(sft_run, reward_run)
    for accumulation, critic in ((2, "separate"), (1, "shared")):
        whole = tmp_path / f"whole-{critic}.pt"
        run(sft_run.output_dir, reward_run.output_dir, str(rollout), str(whole), 8, accumulation, critic=critic)
        one = torch.load(whole)
        sharded = launch_update_worker(sft_run, reward_run, rollout, tmp_path / f"sharded-{critic}.pt", "4",
                                       str(accumulation), "fsdp", critic)
        assert sorted(one) == sorted(sharded)
        assert max((one[name] - start[name]).abs().max().item() for name in one if name in start) > 1e-4
        for name in one:
            assert torch.allclose(one[name], sharded[name], atol=1e-5, rtol=0), (critic, name)


def test_sharded_run_trains_saves_and_resumes_unsharded(sft_run, reward_run, tmp_path):
    """`fsdp: true` end to end on two processes: rollouts (generation on the gathered model, or block by block with
    every process decoding until all are done), updates, checkpoints and the adapter. Checkpoints hold whole tensors,
    so the run continues with or without sharding."""
    output = tmp_path / "ppo"
    common = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml",
              "--main_process_port", "29625", "-m", "rlhf.ppo", "--config", "recipes/tiny/ppo.yaml",
              "--init_from", sft_run.output_dir, "--reward_model", reward_run.output_dir, "--output_dir", str(output),
              "--rollout_batch_size", "8", "--mini_batch_size", "4", "--ppo_epochs", "1", "--max_new_tokens", "24",
              "--gold_eval_prompts", "", "--save_merged", "false", "--save_steps", "1"]
    # Step 1 with blocks gathered one at a time while sampling, step 2 with the model gathered whole (the default),
    # step 3 unsharded; each leg continues the last one's checkpoint.
    legs = [("1", ["--fsdp", "true", "--gather_for_generation", "false"]), ("2", ["--fsdp", "true"]),
            ("3", ["--fsdp", "false"])]
    for steps, flags in legs:
        for attempt in range(2):
            result = subprocess.run(common + ["--steps", steps, *flags], cwd=REPO, capture_output=True, text=True,
                                    timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
            # Known, rare and not yet traced: a rank aborts in C++ ("terminate called without an active exception",
            # a std::thread destroyed unjoined), seen in 2 full-suite runs, never in 57 legs run alone. A rerun
            # resumes from the checkpoints (or finds the leg finished), which this test checks anyway; any other
            # failure fails at once.
            if result.returncode == 0 or "terminate called without an active exception" not in result.stderr:
                break
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr and "step-000002" in result.stdout + result.stderr
    rows = metrics_rows(output)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(row["memory/peak_mib"] > 100 and row["response/length"] > 0 for row in rows)
    manifest = read_manifest(output)
    assert manifest.extra["world_size"] == 2 and manifest.metrics["first"]["step"] == 1
    from safetensors.torch import load_file

    adapter = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(output / "checkpoints" / "step-000003" / "trainable.safetensors"))
    policy = {name: tensor for name, tensor in final.items() if ".default." in name}
    assert len(adapter) == len(policy) > 0
    for name, tensor in adapter.items():  # the saved adapter is the trained policy, whole
        (match,) = [value for key, value in policy.items() if key.endswith(name.replace(".weight", ".default.weight"))]
        assert torch.equal(tensor, match)


def trainable_start(sft_run, reward_run):
    torch.manual_seed(0)
    models = build_models("shared", read_manifest(sft_run.output_dir), read_manifest(reward_run.output_dir),
                          ModelArgs(), "policy")
    return {name: parameter.detach().clone() for name, parameter in models.named_parameters() if parameter.requires_grad}


def test_gradient_accumulation_does_not_change_the_update(sft_run, reward_run, tmp_path):
    """Micro-batches with different token counts: the loss is still the token-mean of the whole mini-batch."""
    sys.path.insert(0, str(REPO / "tests" / "ppo"))
    from update_worker import run

    rollout = saved_rollout(sft_run, reward_run, tmp_path / "rollout.pt")
    for accumulation in (1, 4):
        run(sft_run.output_dir, reward_run.output_dir, str(rollout), str(tmp_path / f"{accumulation}.pt"), 8,
            accumulation)
    one, four = torch.load(tmp_path / "1.pt"), torch.load(tmp_path / "4.pt")
    for name in one:
        assert torch.allclose(one[name], four[name], atol=1e-5, rtol=0), name


def test_warmup_cosine_schedule_checkpoint_limit_and_tensorboard(sft_run, reward_run, tmp_path):
    from conftest import tensorboard_scalars

    output_dir = tmp_path / "schedule"
    short_ppo_run(sft_run, reward_run, output_dir, "--steps", "4", "--save_steps", "1", "--save_total_limit", "2",
              "--lr_scheduler", "cosine", "--warmup_steps", "1", "--learning_rate", "1e-3",
              "--report_to", "tensorboard")
    # One warmup step from 0, then half a cosine over the 3 remaining: 1, (1 + cos(pi/3))/2, (1 + cos(2pi/3))/2.
    rows = metrics_rows(output_dir)
    assert [row["lr"] for row in rows] == pytest.approx([0.0, 1e-3, 7.5e-4, 2.5e-4])
    # TensorBoard got every metric of every step, in <output_dir>/logs/ppo (with the run's configuration).
    scalars = tensorboard_scalars(output_dir / "logs" / "ppo")
    for key in ("score/raw", "kl/sequence", "loss/policy", "lr"):
        assert [step for step, _ in scalars[key]] == [1, 2, 3, 4], key
        assert [value for _, value in scalars[key]] == pytest.approx([row[key] for row in rows], rel=1e-5), key
    assert sorted(path.name for path in (output_dir / "checkpoints").glob("step-*")) == ["step-000003", "step-000004"]


def test_bf16_run_is_on_policy_at_the_first_minibatch(sft_run, reward_run, tmp_path):
    """bf16 mixed precision on the CPU: one mini-batch per iteration, so every step's ratio and approx-KL are those of
    the first mini-batch, before any update: the rollout log-probs (recomputed by a forward under the same autocast,
    the default in bf16) equal the update's."""
    manifest = short_ppo_run(sft_run, reward_run, tmp_path / "bf16", "--steps", "3", "--bf16", "true",
                         "--mini_batch_size", "8")
    assert manifest.extra["precision"] == "bf16" and manifest.extra["logprobs_from_generation"] is False
    rows = metrics_rows(tmp_path / "bf16")
    assert len(rows) == 3
    for row in rows:
        assert all(math.isfinite(value) for key, value in row.items() if key != "value/explained_variance"), row
        assert row["policy/approx_kl"] < 1e-6 and row["policy/clipfrac"] == 0, row
        assert row["policy/ratio_mean"] == pytest.approx(1, abs=1e-4)
    assert abs(rows[0]["kl/sequence"]) < 1e-4 and rows[-1]["grad_norm"] > 0


def test_bf16_autocasts_every_role_and_keeps_trainable_weights_fp32(sft_run, reward_run):
    """bf16 weights (dtype) and bf16 autocast: the frozen base is bf16, the trainable LoRA weights and value head
    fp32 (the weights AdamW updates); under autocast the roles compute in bf16."""
    models = build_models("shared", read_manifest(sft_run.output_dir), None, ModelArgs(dtype="bfloat16"), "policy")
    models.eval().use_mixed_precision(torch.bfloat16)
    assert models.model.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16
    trainable = models.policy_parameters() + models.value_parameters()
    assert trainable and all(parameter.dtype == torch.float32 for parameter in trainable)
    tokenizer = stage_tokenizer(read_manifest(sft_run.output_dir), ModelArgs())
    prompt_ids, prompt_mask, response_ids, response_mask = sequence_batch(tokenizer)
    ids, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    logits = models.policy_logits(ids, mask, position_ids_from_mask(mask))
    values = models.values(ids, mask, position_ids_from_mask(mask))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(values).all()
    (logits.float().logsumexp(-1).mean() + values.float().mean()).backward()
    assert all(parameter.grad.dtype == torch.float32 for parameter in trainable if parameter.grad is not None)


@pytest.mark.parametrize("flags, message", [(["--fp16", "true"], "fp16 is for GPUs"),
                                            (["--fp16", "true", "--bf16", "true"], "bf16 and fp16 are both on")])
def test_fp16_is_refused_where_it_cannot_run(sft_run, reward_run, tmp_path, flags, message):
    from rlhf.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        short_ppo_run(sft_run, reward_run, tmp_path / "fp16", "--steps", "1", *flags)
    assert not (tmp_path / "fp16" / "metrics.jsonl").exists()


def test_gradient_checkpointing_recomputes_the_update_only(sft_run, reward_run, tmp_path):
    """The update's blocks run twice (forward, then again in the backward) and give the same loss and gradients;
    sampling keeps the KV cache (one new position per decoded token), also after generate() switched to eval()."""
    from rlhf.generation import generate

    for flag in ("false", "true"):
        short_ppo_run(sft_run, reward_run, tmp_path / flag, "--steps", "1", "--gradient_checkpointing", flag)
    plain, checkpointed = metrics_rows(tmp_path / "false")[0], metrics_rows(tmp_path / "true")[0]
    for key in ("loss/policy", "loss/value", "grad_norm", "policy/entropy", "score/raw"):
        assert checkpointed[key] == pytest.approx(plain[key], abs=1e-5), key

    models = build_models("shared", read_manifest(sft_run.output_dir), None, ModelArgs(), "policy").eval()
    models.enable_gradient_checkpointing()
    tokenizer = stage_tokenizer(read_manifest(sft_run.output_dir), ModelArgs())
    widths = []
    mlp = models.model.get_base_model().model.layers[0].mlp  # inside the checkpointed block: runs on every recompute
    mlp.register_forward_pre_hook(lambda module, inputs: widths.append(inputs[0].shape[1]))
    prompt_ids, prompt_mask, response_ids, response_mask = sequence_batch(tokenizer, n=2)
    sample = generate(models, tokenizer, [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)],
                      max_new_tokens=8, do_sample=False)
    assert len(widths) == sample.response_ids.shape[1] and set(widths[1:]) == {1}  # prefill, then cached steps
    widths.clear()
    ids, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    with models.recomputing():  # the update's forward passes
        models.policy_logits(ids, mask, position_ids_from_mask(mask)).float().mean().backward()
    assert widths == [ids.shape[1]] * 2
    widths.clear()
    models.policy_logits(ids, mask, position_ids_from_mask(mask)).float().mean().backward()
    assert widths == [ids.shape[1]]  # outside the update nothing is recomputed


def test_fp16_update_skips_a_step_whose_gradients_overflow(sft_run, reward_run, tmp_path):
    """The gradient scaler path of the update (run here on the CPU's scaler; the stage takes fp16 on GPUs only): a
    scale that overflows fp16 gradients skips the step, logs no grad_norm and halves the scale; a small one steps."""
    from accelerate import Accelerator

    from rlhf.ppo.config import PPOArgs
    from rlhf.ppo.distributed import Distributed
    from rlhf.ppo.rollout import Rollout
    from rlhf.ppo.trainer import update

    rollout = Rollout(**torch.load(saved_rollout(sft_run, reward_run, tmp_path / "rollout.pt"), weights_only=False))
    args = PPOArgs(output_dir="unused", reward_model=reward_run.output_dir, rollout_batch_size=8, mini_batch_size=8,
                   ppo_epochs=1)
    for init_scale, steps in ((2.0 ** 40, False), (1.0, True)):
        torch.manual_seed(0)
        models = build_models("shared", read_manifest(sft_run.output_dir), read_manifest(reward_run.output_dir),
                              ModelArgs(), "policy").eval()
        models.use_mixed_precision(torch.float16)
        trainable = models.policy_parameters() + models.value_parameters()
        start = [parameter.detach().clone() for parameter in trainable]
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        stats = update(models, torch.optim.AdamW(trainable, lr=1e-3), rollout, args, Distributed(Accelerator()),
                       torch.Generator().manual_seed(0), scaler, step=1)
        moved = any(not torch.equal(before, parameter) for before, parameter in zip(start, trainable))
        assert moved == steps and ("grad_norm" in stats) == steps, init_scale
        assert scaler.get_scale() == (init_scale if steps else init_scale / 2)
        assert math.isfinite(stats["loss/policy"]) and math.isfinite(stats["loss/value"])
