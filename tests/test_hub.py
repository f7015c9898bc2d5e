"""Model cards and push_to_hub: every stage writes a card into adapter/ and merged/ (lineage, data, config, metrics,
how to load), and a push uploads exactly the adapter (or merged/) folder with its card plus manifest.json, once the
stage is finished. Nothing here reaches the hub: HfApi is replaced by a recorder."""

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import yaml

from rlhf import hub
from rlhf.config import ConfigError
from rlhf.manifest import Manifest, read_manifest

SHORT = ["--max_steps", "2", "--logging_steps", "1", "--save_steps", "1000"]


@pytest.fixture(scope="module")
def short_sft(tmp_path_factory):
    """A 2-step tiny SFT with the held-out gold check (4 prompts) and a merged copy."""
    from rlhf import sft

    output_dir = tmp_path_factory.mktemp("hub") / "sft"
    return sft.main(["--config", "recipes/tiny/sft.yaml", *SHORT, "--gold_eval_samples", "4",
                     "--output_dir", str(output_dir)])


@pytest.fixture(scope="module")
def short_reward(short_sft, tmp_path_factory):
    """A 2-step full fine-tuned reward model on short_sft: its model lives in merged/ only."""
    from rlhf import reward

    output_dir = tmp_path_factory.mktemp("hub") / "reward"
    return reward.main(["--config", "recipes/tiny/reward.yaml", *SHORT, "--stats_samples", "8",
                        "--max_eval_samples", "32", "--init_from", short_sft.output_dir,
                        "--output_dir", str(output_dir)])


def card(folder) -> tuple[dict, str]:
    """(front matter, body) of a README.md model card."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    calls: list = []

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        RecordingHfApi.calls.append(("create_repo", repo_id, private, exist_ok))
        full_id = repo_id if "/" in repo_id else f"me/{repo_id}"  # the hub puts a bare name under the token's user
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{full_id}")

    def create_branch(self, repo_id, branch, exist_ok=False, **kwargs):
        RecordingHfApi.calls.append(("create_branch", repo_id, branch))

    def create_commit(self, repo_id, operations, commit_message="", revision=None, **kwargs):
        RecordingHfApi.calls.append(("create_commit", repo_id, sorted(op.path_in_repo for op in operations))
                                    + ((revision,) if revision else ()))
        for operation in operations:  # every file named exists and would be read
            assert open(operation.path_or_fileobj, "rb").read(1) is not None


@pytest.fixture
def fake_hub(monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_not_a_real_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return RecordingHfApi.calls


def test_sft_card_has_front_matter_lineage_config_metrics_and_usage(short_sft):
    adapter, merged = short_sft.path("adapter"), short_sft.path("merged")
    front, body = card(Path(adapter))
    assert front["library_name"] == "peft" and front["tags"] == ["rlhf", "sft", "trl", "lora"]
    assert "base_model" not in front and "datasets" not in front  # a local base and local data: no hub names
    assert "[More Information Needed]" not in body  # peft's template is replaced
    assert f"**sft** (this model, config {short_sft.config_hash})" in body
    assert "- train: `data/tiny/sft_train.jsonl`: 2000 records" in body
    assert "- learning rate: 0.002" in body and "- max steps: 2" in body and "- LoRA r: 16" in body
    assert f"- final train loss: {short_sft.metrics['train_loss']:.4g}" in body
    assert "- held-out gold reward: " in body and "- peak memory (MiB): " in body
    assert "AutoPeftModelForCausalLM.from_pretrained(\"<path or repo id>\")" in body

    front, body = card(Path(merged))
    assert front["library_name"] == "transformers" and "lora" not in front["tags"]
    assert "AutoModelForCausalLM.from_pretrained(\"<path or repo id>\")" in body
    # Written before the manifest, which marks the stage finished.
    manifest_time = (Path(short_sft.output_dir) / "manifest.json").stat().st_mtime_ns
    assert (Path(merged) / "README.md").stat().st_mtime_ns <= manifest_time


def test_reward_card_names_its_parent_stage(short_sft, short_reward):
    assert short_reward.adapter_path is None
    front, body = card(Path(short_reward.path("merged")))
    assert front["library_name"] == "transformers" and front["tags"] == ["rlhf", "reward", "trl"]
    assert front["pipeline_tag"] == "text-classification"
    assert f"- **sft** `{Path(short_sft.output_dir).resolve()}` (config {short_sft.config_hash}" in body
    assert body.index("**sft**") < body.index("**reward** (this model")
    assert "- full fine-tuning (no LoRA adapter)" in body and "LoRA r" not in body
    assert "- eval accuracy: " in body and "- reward mean: " in body
    assert "AutoModelForSequenceClassification.from_pretrained" in body


def test_hub_base_model_and_datasets_go_into_the_front_matter(tmp_path):
    manifest = Manifest(stage="dpo", output_dir=str(tmp_path / "dpo"), base_model="HuggingFaceTB/SmolLM2-135M",
                        adapter_path="adapter",
                        config={"data": {"train_data": "trl-lib/ultrafeedback_binarized", "eval_data": "data/x.jsonl"},
                                "training": {"beta": 0.1, "learning_rate": 5e-7}, "model": {"use_lora": True}})
    body = hub.render_card(manifest, "adapter")
    front = yaml.safe_load(body[4:].split("\n---\n")[0])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert front["datasets"] == ["trl-lib/ultrafeedback_binarized"]
    assert "- beta: 0.1" in body and "(split " in body

    # A local base saved from a hub model is named by the hub name its config kept.
    local = tmp_path / "base"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": "HuggingFaceTB/SmolLM2-360M"}))
    assert hub.base_hub_name(str(local)) == "HuggingFaceTB/SmolLM2-360M"
    (local / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/models/base"}))
    assert hub.base_hub_name(str(local)) is None


def test_push_uploads_the_adapter_with_its_card_and_the_manifest_only(short_sft, tmp_path, fake_hub):
    folder = tmp_path / "my-sft"
    shutil.copytree(short_sft.output_dir, folder)  # with its checkpoints/, logs/, .lock
    assert (folder / "checkpoints").is_dir() and (folder / ".lock").is_file()
    (folder / "adapter" / "README.md").unlink()  # a stage finished before cards existed gets one
    manifest = read_manifest(folder)
    target = hub.push_target(type("Args", (), {"push_to_hub": True, "hub_model_id": None,
                                               "hub_private_repo": True})(), str(folder))
    hub.push_stage(manifest, target)
    assert fake_hub == [
        ("create_repo", "my-sft", True, True),
        ("create_commit", "me/my-sft", ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                     "chat_template.jinja", "manifest.json", "tokenizer.json",
                                     "tokenizer_config.json"]),
    ]
    assert (folder / "adapter" / "README.md").is_file()


def test_push_of_a_full_fine_tune_uploads_merged(short_reward, fake_hub):
    hub.push_stage(short_reward, hub.HubTarget("me/tiny-reward"))
    assert fake_hub[1] == ("create_commit", "me/tiny-reward", [
        "README.md", "chat_template.jinja", "config.json", "manifest.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"])


def test_stage_pushes_once_when_finished_and_trl_does_not_push(tmp_path, fake_hub):
    """TRL's own push (repo created at the start, checkpoints uploaded while training) is off: the only hub calls
    are ours, after the manifest. A rerun of the finished stage pushes it again (how a failed push is retried)."""
    from rlhf import sft

    argv = ["--config", "recipes/tiny/sft.yaml", *SHORT, "--gold_eval_prompts", "", "--save_merged", "false",
            "--output_dir", str(tmp_path / "sft"), "--push_to_hub", "true", "--hub_model_id", "me/tiny-sft"]
    manifest = sft.main(argv)
    assert manifest.config["training"].get("push_to_hub") is None  # where it goes is not what was trained
    assert [call[0] for call in fake_hub] == ["create_repo", "create_commit"] and fake_hub[0][1] == "me/tiny-sft"
    assert sft.main(argv).config_hash == manifest.config_hash
    assert [call[0] for call in fake_hub] == ["create_repo", "create_commit"] * 2
    fake_hub.clear()
    sft.main(argv + ["--hub_revision", "exp-1"])  # TRL's hub_revision: that branch, made when missing
    assert fake_hub[1:] == [("create_branch", "me/tiny-sft", "exp-1"),
                            ("create_commit", "me/tiny-sft", fake_hub[2][2], "exp-1")]


@pytest.mark.parametrize("change, message", [
    ({"offline": True}, "push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded"),
    ({"token": None}, "push_to_hub: no Hugging Face token; set HF_TOKEN"),
    ({"hub_model_id": "me/two/slashes"}, "hub_model_id: 'me/two/slashes' is not a hub repo id"),
])
def test_push_is_refused_before_anything_trains(tmp_path, fake_hub, monkeypatch, capsys, change, message):
    from rlhf.cli import main

    if change.get("offline"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "token" in change:
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    repo = change.get("hub_model_id", "me/x")
    assert main(["sft", "--config", "recipes/tiny/sft.yaml", "--output_dir", str(tmp_path / "sft"),
                 "--push_to_hub", "true", "--hub_model_id", repo]) == 1
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "sft").exists() and fake_hub == []


def test_no_push_needs_no_token_nor_network(tmp_path):
    args = type("Args", (), {"push_to_hub": False, "hub_model_id": None, "hub_private_repo": None})()
    assert hub.push_target(args, str(tmp_path)) is None
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):  # the test session is offline
        hub.push_target(type("Args", (), {"push_to_hub": True, "hub_model_id": None, "hub_private_repo": None})(),
                        str(tmp_path))
