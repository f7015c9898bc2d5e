"""A finished stage's model card, and its upload to the Hugging Face Hub (push_to_hub).

Every stage writes README.md into adapter/ and merged/ (before its manifest, which marks completion): front matter
for the hub (library, base model, tags, datasets), the lineage through parent stages and the reward model, the
data, the key configuration, the metrics and how to load it. With `push_to_hub: true` the stage uploads, in one
commit once its manifest is written, the adapter folder (or merged/ when it trained no adapter) with its card plus
manifest.json, to `hub_model_id` (default: the output folder's name). TRL's own trainer push stays off: it would
upload checkpoints while training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.config import ConfigError
from rlhf.manifest import MANIFEST_NAME, Manifest, ManifestError, atomic_write, read_manifest

CARD_NAME = "README.md"
NOT_PUSHED = {"training_args.bin"}  # the trainer's pickled arguments: no loader reads them, and pickles are flagged

# Configuration worth a line on the card: (section, key, label). The rest is in manifest.json.
CARD_CONFIG = [
    ("training", "learning_rate", "learning rate"), ("training", "lr_scheduler_type", "schedule"),
    ("training", "lr_scheduler", "schedule"), ("training", "num_train_epochs", "epochs"),
    ("training", "max_steps", "max steps"), ("training", "steps", "steps"),
    ("training", "per_device_train_batch_size", "batch per device"),
    ("training", "rollout_batch_size", "rollout batch"),
    ("training", "mini_batch_size", "mini-batch"), ("training", "gradient_accumulation_steps", "gradient accumulation"),
    ("training", "num_generations", "generations per prompt"), ("training", "ppo_epochs", "PPO epochs"),
    ("training", "max_length", "max length"), ("training", "max_new_tokens", "max new tokens"),
    ("training", "max_completion_length", "max completion length"), ("training", "loss_type", "loss"),
    ("training", "beta", "beta"), ("training", "kl_coef", "KL coefficient"), ("training", "target_kl", "target KL"),
    ("training", "bf16", "bf16"), ("training", "seed", "seed"),
    ("model", "dtype", "weights dtype"), ("model", "lora_r", "LoRA r"), ("model", "lora_alpha", "LoRA alpha"),
    ("model", "lora_dropout", "LoRA dropout"), ("model", "lora_target_modules", "LoRA targets"),
]
# Metrics worth a line: key (a.b for nested) -> label.
CARD_METRICS = {
    "steps": "steps trained", "train_loss": "final train loss", "first_logged_loss": "first logged loss",
    "last_logged_loss": "last logged loss", "first_logged_reward": "first logged reward",
    "last_logged_reward": "last logged reward", "eval_loss": "eval loss", "eval_accuracy": "eval accuracy",
    "eval_margin": "eval margin", "train_accuracy": "train accuracy", "reward_mean": "reward mean",
    "reward_std": "reward std", "last.score/combined": "last step score", "last.score/gold": "last step gold reward",
    "last.kl/sequence": "last step KL", "gold.eos_rate": "held-out EOS rate",
    "gold.response_length": "held-out response length", "train_seconds": "training time (s)",
    "peak_memory_mib": "peak memory (MiB)",
}


# ------------------------------------------------------------------------------------------------- names


def hub_name(value: str | None) -> str | None:
    """`value` when it names a hub repo (owner/name), else None: a local path, or what reads as one (data/x.jsonl
    that is not there), by the rule the data loader uses to choose between a file and the hub."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from rlhf.sources import looks_like_path

    if not value or os.path.exists(value) or looks_like_path(value):
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def base_hub_name(base_model: str) -> str | None:
    """The hub name of a stage's base model: itself, or for a local folder the `_name_or_path` its config.json
    kept from the hub model it was saved from."""
    folder = Path(base_model)
    if not folder.is_dir():
        return hub_name(base_model)
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--").replace("--", "/", 1)  # a pinned model_revision
    try:
        return hub_name(json.loads((Path(base_model) / "config.json").read_text()).get("_name_or_path"))
    except (OSError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------------------------- the card


def lineage(manifest: Manifest) -> list[Manifest | str]:
    """The stages this one was trained from, root first, this stage last. A parent's embedded manifest is used,
    its own parents are read from disk; a folder that is gone is listed by its path."""
    chain: list[Manifest | str] = [manifest]
    parent = None
    if manifest.parent_manifest and manifest.parent:
        known = {key: value for key, value in manifest.parent_manifest.items() if key in Manifest.__dataclass_fields__}
        parent = Manifest(**{**known, "output_dir": manifest.parent})
    path = manifest.parent
    while path:
        if parent is None:
            try:
                parent = read_manifest(path)
            except ManifestError:
                chain.append(path)
                break
        chain.append(parent)
        path, parent = parent.parent, None
    return chain[::-1]


def _stage_ref(manifest: Manifest) -> str:
    data = manifest.config.get("data", {}).get("train_data")
    on = f", trained on `{data}`" if data else ""
    return f"**{manifest.stage}** `{manifest.output_dir}` (config {manifest.config_hash or '?'}{on})"


def _lineage_lines(manifest: Manifest) -> list[str]:
    chain = lineage(manifest)
    lines = [f"- base model: `{hub_name(manifest.base_model) or manifest.base_model}`"]
    for step in chain[:-1]:
        lines.append(f"- {_stage_ref(step)}" if isinstance(step, Manifest) else f"- `{step}` (manifest not found)")
    lines.append(f"- **{manifest.stage}** (this model, config {manifest.config_hash or 'see manifest.json'})")
    reward_path = manifest.extra.get("reward_model")
    if reward_path:
        try:
            reward = read_manifest(reward_path)
            accuracy = reward.metrics.get("eval_accuracy")
            scored = f", eval accuracy {accuracy:.3f}" if isinstance(accuracy, float) else ""
            parents = " → ".join(step.stage if isinstance(step, Manifest) else str(step) for step in lineage(reward))
            lines.append(f"- rewarded by {_stage_ref(reward)}{scored}; its lineage: {parents}")
        except ManifestError:
            lines.append(f"- rewarded by the reward model `{reward_path}`")
    rewards = [name for name in manifest.extra.get("rewards") or [] if name != "reward_model"]
    if rewards:
        lines.append(f"- reward functions: {', '.join(f'`{name}`' for name in rewards)}")
    return lines


def _data_lines(manifest: Manifest) -> list[str]:
    data, metrics = manifest.config.get("data", {}), manifest.metrics
    lines = []
    for role in ("train", "eval"):
        source = data.get(f"{role}_data")
        if not source:
            continue
        split = f" (split {data.get(f'{role}_split')})" if hub_name(source) else ""
        limit = f", first {data[f'max_{role}_samples']}" if data.get(f"max_{role}_samples") else ""
        records = f": {metrics[f'{role}_records']} records" if metrics.get(f"{role}_records") else ""
        lines.append(f"- {role}: `{source}`{split}{limit}{records}")
    if data.get("gold_eval_prompts") and data.get("gold_reward"):
        lines.append(f"- held-out gold check: `{data['gold_eval_prompts']}` scored by `{data['gold_reward']}`")
    return lines


def _config_lines(manifest: Manifest) -> list[str]:
    config, shown, lines = manifest.config, set(), []
    lora = config.get("model", {}).get("use_lora", True)
    for section, key, label in CARD_CONFIG:
        value = config.get(section, {}).get(key)
        if value is None or label in shown or (key.startswith("lora_") and not lora):
            continue
        if key == "max_steps" and value <= 0 or key == "num_train_epochs" and config[section].get("max_steps", 0) > 0:
            continue  # the one of epochs / max_steps that decided the length
        shown.add(label)
        lines.append(f"- {label}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    if not lora:
        lines.append("- full fine-tuning (no LoRA adapter)")
    return lines


def _metric(metrics: dict, key: str):
    value = metrics
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _metric_lines(manifest: Manifest) -> list[str]:
    lines = []
    gold = (manifest.metrics.get("gold") or {}).get("gold_reward")
    if gold:
        low, high = gold.get("ci95", [None, None])
        interval = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
        lines.append(f"- held-out gold reward: {gold['mean']:.3f}{interval} over {gold.get('n', '?')} prompts")
    for key, label in CARD_METRICS.items():
        value = _metric(manifest.metrics, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"- {label}: {value:.4g}" if isinstance(value, float) else f"- {label}: {value}")
    return lines


def _usage(manifest: Manifest, folder: str) -> str:
    reward = manifest.extra.get("head") == "reward"
    if folder == "merged":
        auto = "AutoModelForSequenceClassification" if reward else "AutoModelForCausalLM"
        return (f"```python\nfrom transformers import {auto}, AutoTokenizer\n\n"
                f"model = {auto}.from_pretrained(\"<path or repo id>\")\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"<path or repo id>\")\n```")
    auto = "AutoPeftModelForSequenceClassification" if reward else "AutoPeftModelForCausalLM"
    on_top = ("the parent stage's policy (its `merged/` folder)" if manifest.parent
              else f"`{hub_name(manifest.base_model) or manifest.base_model}`")
    return (f"A LoRA adapter on {on_top}, the model adapter_config.json names as its base "
            "(`base_model_name_or_path`; point it at your copy when that path does not exist where you load it).\n\n"
            f"```python\nfrom peft import {auto}\nfrom transformers import AutoTokenizer\n\n"
            f"model = {auto}.from_pretrained(\"<path or repo id>\")"
            f"{'  # num_labels=1 score head included' if reward else ''}\n"
            "tokenizer = AutoTokenizer.from_pretrained(\"<path or repo id>\")\n```")


def render_card(manifest: Manifest, folder: str) -> str:
    """README.md for a stage's `adapter` or `merged` folder, from its manifest (config hash and versions filled)."""
    from huggingface_hub import ModelCard, ModelCardData

    lora = folder == "adapter"
    base = base_hub_name(manifest.base_model)
    datasets = [name for name in (hub_name(manifest.config.get("data", {}).get(key))
                                  for key in ("train_data", "eval_data")) if name]
    data = ModelCardData(library_name="peft" if lora else "transformers", base_model=base,
                         tags=["rlhf", manifest.stage, "trl"] + (["lora"] if lora else []),
                         datasets=sorted(set(datasets)) or None,
                         pipeline_tag="text-classification" if manifest.extra.get("head") == "reward"
                         else "text-generation")
    what = "LoRA adapter" if lora else "merged model (base + adapters)" if manifest.adapter_path else "model"
    sections = [
        f"# {Path(manifest.output_dir).name}: rlhf {manifest.stage} {what}",
        f"Trained by the `rlhf {manifest.stage}` stage. Everything below comes from its `{MANIFEST_NAME}`, which "
        "holds the full resolved configuration.",
        "## Lineage", "\n".join(_lineage_lines(manifest)),
        "## Data", "\n".join(_data_lines(manifest)) or "- not recorded",
        "## Configuration", "\n".join(_config_lines(manifest)),
        "## Results", "\n".join(_metric_lines(manifest)) or "- none recorded",
        "## How to load", _usage(manifest, folder),
        "## Framework versions",
        "\n".join(f"- {name} {version}" for name, version in manifest.versions.items() if version),
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"))


def write_cards(manifest: Manifest) -> list[Path]:
    """Write README.md into the stage's adapter/ and merged/ folders (replacing peft's template)."""
    written = []
    for folder, relative in (("adapter", manifest.adapter_path), ("merged", manifest.merged_path)):
        path = Path(manifest.path(relative)) if relative else None
        if path is not None and path.is_dir():
            atomic_write(path / CARD_NAME, render_card(manifest, folder))
            written.append(path / CARD_NAME)
    return written


# ------------------------------------------------------------------------------------------------- the push


@dataclass
class HubArgs:
    """push_to_hub and where to, in TRL's TrainingArguments names: in a TRL stage the same flag also fills its
    config, whose own push (the repo made at start, checkpoints uploaded while training) the stage turns off."""

    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the finished stage (its adapter, or merged/ without LoRA, with the "
                                 "model card, plus manifest.json) to the Hugging Face Hub. Needs HF_TOKEN."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo to push to (name or owner/name); default: the output folder's name."})
    hub_private_repo: bool | None = field(
        default=None, metadata={"help": "Create the hub repo private (default: the account's default)."})


@dataclass
class HubTarget:
    repo_id: str
    private: bool | None = None
    revision: str | None = None  # a branch (made when missing); None: main


def push_target(stage_args, output_dir: str, revision: str | None = None) -> HubTarget | None:
    """Where a finished stage goes when `push_to_hub` is on, checked before anything trains: not offline, a
    token to push with (HF_TOKEN or `hf auth login`), a valid repo id. `revision`: the TRL configs' hub_revision."""
    if not getattr(stage_args, "push_to_hub", False):
        return None
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from rlhf.sources import hub_offline

    if hub_offline():
        raise ConfigError("push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or set "
                          "push_to_hub: false")
    repo_id = stage_args.hub_model_id or Path(output_dir).resolve().name
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ConfigError(f"hub_model_id: {repo_id!r} is not a hub repo id ({error}); expected name or "
                          "owner/name") from None
    if not get_token():
        raise ConfigError("push_to_hub: no Hugging Face token; set HF_TOKEN (or pass --hub_token, or run "
                          "`hf auth login`)")
    return HubTarget(repo_id, stage_args.hub_private_repo, revision or None)


def pushed_files(manifest: Manifest) -> dict[str, Path]:
    """What a push uploads, {path in the repo: local file}: the adapter folder (or merged/ for a stage without
    one) with its card, and manifest.json. Never checkpoints, logs, locks or the trainer's pickled arguments."""
    folder = Path(manifest.path(manifest.adapter_path or manifest.merged_path))
    files = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*"))
             if path.is_file() and path.name not in NOT_PUSHED and not path.name.startswith(".")}
    files[MANIFEST_NAME] = Path(manifest.output_dir) / MANIFEST_NAME
    return files


def push_stage(manifest: Manifest, target: HubTarget) -> str:
    """Upload a finished stage (see pushed_files) in one commit, so the repo never holds an adapter without the
    manifest and card that describe it; returns the repo's URL. Cards are written first: a stage finished before
    they existed gets them too."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from rlhf.processes import StageError

    write_cards(manifest)
    files = pushed_files(manifest)
    api = HfApi()
    try:
        repo = api.create_repo(target.repo_id, private=target.private, exist_ok=True)
        if target.revision:
            api.create_branch(repo.repo_id, branch=target.revision, exist_ok=True)
        api.create_commit(repo.repo_id, operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                                                    for name, path in files.items()],
                          commit_message=f"rlhf {manifest.stage} (config {manifest.config_hash})",
                          revision=target.revision)
    except Exception as error:  # network, permissions, quota: the stage itself is finished and kept
        raise StageError(f"push_to_hub: uploading {manifest.output_dir} to {target.repo_id} failed "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); the stage "
                         "is finished and saved; rerun the same command to push it") from None
    branch = f" (branch {target.revision})" if target.revision else ""
    print(f"[rlhf] {manifest.stage}: pushed {len(files)} files to {repo}{branch}", flush=True)
    return str(repo)
