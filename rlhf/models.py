"""The only place that loads models: base models, tokenizers, LoRA adapters, merges, and stage outputs.

Safe by default: weights load as safetensors only (models and LoRA adapters alike: a pickled adapter_model.bin is
refused before peft sees it), and modelling code shipped with a model runs only when the recipe sets trust_remote_code.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from rlhf.config import ConfigError, ModelArgs
from rlhf.manifest import Manifest, read_manifest, resolve_parent

logger = logging.getLogger(__name__)

PAD_CANDIDATES = ["<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", "<unk>", "<|finetune_right_pad_id|>"]


def check_model_path(path: str) -> None:
    """A local model folder must hold a config and safetensors weights; hub names are checked by the hub loader."""
    folder = Path(path)
    if not folder.exists():
        if path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise ConfigError(f"model {path}: folder not found (give a local folder or a hub name like org/model)")
        return  # a hub name: loaded (or refused, offline) by from_pretrained
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model {path}: no config.json in that folder; expected a save_pretrained() model folder")
    if not list(folder.glob("*.safetensors")):
        pickles = [file.name for file in folder.glob("*.bin")] + [file.name for file in folder.glob("*.pt")]
        detail = f" (found pickle weights {', '.join(pickles)}; convert them to safetensors)" if pickles else ""
        raise ConfigError(f"model {path}: no *.safetensors weights in that folder{detail}")


ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
NOT_ADAPTER_WEIGHTS = {"training_args.bin"}  # Trainer's pickled arguments, saved next to every adapter


def check_adapter_folder(path: str) -> None:
    """A LoRA adapter folder must hold adapter_model.safetensors. peft would otherwise fall back to unpickling
    adapter_model.bin, so a pickled adapter is refused here, before peft is called."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"adapter {path}: folder not found")
    if (folder / ADAPTER_WEIGHTS).is_file():
        return
    pickles = sorted(file.name for file in folder.iterdir()
                     if file.suffix in PICKLE_SUFFIXES and file.name not in NOT_ADAPTER_WEIGHTS)
    if pickles:
        raise ConfigError(
            f"adapter {path}: holds pickle weights ({', '.join(pickles)}) and no {ADAPTER_WEIGHTS}; only safetensors "
            f"are loaded. Convert it once, in a trusted environment, with folder = that adapter folder: "
            f"PeftModel.from_pretrained(base_model, folder).save_pretrained(folder, safe_serialization=True)"
        )
    raise ConfigError(f"adapter {path}: no adapter weights found (expected {ADAPTER_WEIGHTS} in that folder)")


def load_tokenizer(path: str, trust_remote_code: bool = False, padding_side: str = "right"):
    """Load a tokenizer and make sure it has an EOS and a pad token distinct from EOS.

    Many tokenizers ship pad == eos (SmolLM2 does). Then any mask built from `ids != pad` hides real EOS tokens and
    the model never learns to stop, so we pick another existing special token as pad (or add one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {path}: has no eos_token; set one in its tokenizer_config.json")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        replacement = next(
            (token for token in PAD_CANDIDATES if token in vocab and vocab[token] != tokenizer.eos_token_id), None
        )
        if replacement is None:
            raise ConfigError(
                f"tokenizer {path}: pad token is missing or equal to eos ({tokenizer.eos_token!r}) and no spare "
                f"special token ({', '.join(PAD_CANDIDATES)}) exists; add a pad token to the tokenizer"
            )
        logger.warning("tokenizer %s: pad was %r; using %r as a distinct pad token", path, tokenizer.pad_token, replacement)
        tokenizer.pad_token = replacement
    tokenizer.padding_side = padding_side
    if tokenizer.chat_template is None:
        raise ConfigError(f"tokenizer {path}: has no chat template; use an instruct tokenizer or add chat_template.jinja")
    return tokenizer


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# What a model folder is loaded as. A stage's manifest records its head; parents are loaded with the child's head
# (an SFT policy loads as a sequence classifier to start a reward model: same body, new score head).
CAUSAL_LM, REWARD = "causal-lm", "reward"


def set_pad_token_id(model, pad_token_id: int) -> None:
    """A sequence classifier reads its score at the last token that is not config.pad_token_id, so that id must be
    the pad the inputs are padded with: None fails for batches > 1, and pad == EOS reads padding or the token
    before the EOS. Multimodal configs keep it on their text config."""
    model.config.pad_token_id = pad_token_id
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        text_config.pad_token_id = pad_token_id


def load_pretrained(path: str, model_args: ModelArgs, head: str = CAUSAL_LM, pad_token_id: int | None = None):
    """A model folder as a causal LM or a reward model. A reward model's pad_token_id is set to `pad_token_id`, or
    to the pad of the tokenizer in `path` (see load_tokenizer), whatever its config.json says."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_model_path(path)
    # A local folder is loaded by its absolute path: config._name_or_path becomes the base_model_name_or_path of
    # every adapter saved from this model, and a relative one would not load from any other working directory.
    path = str(Path(path).resolve()) if Path(path).is_dir() else path
    kwargs = dict(dtype=torch_dtype(model_args.dtype), trust_remote_code=model_args.trust_remote_code, use_safetensors=True)
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if head == REWARD:
        if pad_token_id is None:
            pad_token_id = load_tokenizer(path, model_args.trust_remote_code).pad_token_id
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
        set_pad_token_id(model, pad_token_id)
        return model
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_causal_lm(path: str, model_args: ModelArgs):
    return load_pretrained(path, model_args, CAUSAL_LM)


def resolve_start(model_args: ModelArgs, parent_stages: tuple[str, ...]) -> tuple[str, Manifest | None]:
    """Base model path and (if starting from a parent stage) the parent's manifest."""
    if bool(model_args.model_name_or_path) == bool(model_args.init_from):
        raise ConfigError("set exactly one of model_name_or_path (a base model) or init_from (a parent stage folder)")
    check_revision(model_args)
    if model_args.model_name_or_path:
        check_model_path(model_args.model_name_or_path)
        if model_args.model_revision != "main":
            return pinned_snapshot(model_args.model_name_or_path, model_args.model_revision,
                                   model_args.trust_remote_code), None
        return model_args.model_name_or_path, None
    parent = resolve_parent(model_args.init_from, parent_stages)
    return parent.base_model, parent


def check_revision(model_args: ModelArgs) -> None:
    """model_revision pins a hub model named by model_name_or_path; a parent stage or a local folder has no other."""
    if model_args.model_revision == "main":
        return
    if model_args.init_from or not model_args.model_name_or_path:
        raise ConfigError(f"model_revision {model_args.model_revision!r}: a stage started from init_from loads the base "
                          "its parent stage recorded; set model_revision on the stage that names model_name_or_path")
    if Path(model_args.model_name_or_path).exists():
        raise ConfigError(f"model_revision {model_args.model_revision!r}: {model_args.model_name_or_path} is a local "
                          "folder, which has no revisions; give a hub name, or leave model_revision at main")


# What a pinned snapshot fetches: configs, safetensors weights, tokenizer files; code only when it may run.
SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def pinned_snapshot(name: str, revision: str, trust_remote_code: bool = False) -> str:
    """The local folder of hub model `name` at `revision`: downloaded, or offline read from the hub cache. Its path
    (…/models--org--name/snapshots/<commit>) becomes the stage's base_model, so later stages load that commit."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from rlhf.sources import hub_offline

    try:
        # Offline, the cache alone (huggingface_hub 1.x would otherwise list a commit's files on the hub first).
        return snapshot_download(name, revision=revision, local_files_only=hub_offline(),
                                 allow_patterns=SNAPSHOT_FILES + (["*.py"] if trust_remote_code else []))
    except RevisionNotFoundError:
        raise ConfigError(f"model {name}: the hub has no revision {revision!r} (model_revision)") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"model {name}: no such model on the hub (if it is private, log in: hf auth login)") from None
    except LocalEntryNotFoundError:
        raise ConfigError(f"model {name}: revision {revision!r} is not in the hub cache and the hub cannot be reached "
                          "(offline); fetch it once online, or give the folder it was saved to") from None


def stage_head(manifest: Manifest) -> str:
    return manifest.extra.get("head", CAUSAL_LM)


def load_stage_output(manifest: Manifest, model_args: ModelArgs, head: str | None = None,
                      pad_token_id: int | None = None):
    """A finished stage's model as one plain model: its merged copy if saved, else its parent's output (or the base)
    with its adapter merged in, recursively up the lineage. A reward model gets the pad of the tokenizer saved with
    this stage (or `pad_token_id`): no config.json on the way is trusted to hold it."""
    head = head or stage_head(manifest)
    if head == REWARD and pad_token_id is None:
        pad_token_id = stage_tokenizer(manifest, model_args).pad_token_id
    if manifest.merged_path and Path(manifest.path(manifest.merged_path)).is_dir():
        return load_pretrained(manifest.path(manifest.merged_path), model_args, head, pad_token_id)
    adapter_dir = manifest.path(manifest.adapter_path) if manifest.adapter_path else None
    if adapter_dir:
        check_adapter_folder(adapter_dir)  # before loading anything, and before peft would unpickle a .bin adapter
    if manifest.parent:  # parent paths are absolute
        model = load_stage_output(read_manifest(manifest.parent), model_args, head, pad_token_id)
    else:
        model = load_pretrained(manifest.base_model, model_args, head, pad_token_id)
    if adapter_dir:
        from peft import PeftConfig, PeftModel

        config = PeftConfig.from_pretrained(adapter_dir)
        if head != stage_head(manifest):
            # An SFT adapter under a reward head: peft would wrap the model for the adapter's task (a causal LM's
            # generation hooks), which a sequence classifier lacks; the LoRA weights merge into the body alike.
            config.task_type = None
        # peft loads the adapter for inference and freezes every weight; give back what from_pretrained gives for a
        # merged copy (all trainable), or full fine-tuning from this stage would have nothing to train.
        model = PeftModel.from_pretrained(model, adapter_dir, config=config).merge_and_unload().requires_grad_(True)
    return model


def stage_tokenizer(manifest: Manifest, model_args: ModelArgs):
    return load_tokenizer(manifest.path(manifest.adapter_path or manifest.merged_path), model_args.trust_remote_code)


def start_tokenizer(model_args: ModelArgs, parent_stages: tuple[str, ...]):
    """(tokenizer, base model path, parent manifest) of the model a stage starts from, without loading weights:
    enough to check lengths and the configuration before any model loads."""
    base_path, parent = resolve_start(model_args, parent_stages)
    if parent is not None:
        return stage_tokenizer(parent, model_args), base_path, parent
    return load_tokenizer(base_path, model_args.trust_remote_code), base_path, parent


def load_start_model(model_args: ModelArgs, tokenizer, base_path: str, parent: Manifest | None,
                     head: str = CAUSAL_LM):
    """The model a stage starts from (what start_tokenizer resolved): the base, or the parent stage's model with its
    adapter merged in, its pad ids set to the tokenizer's.

    Merging (instead of stacking adapters) keeps one plain model in memory: disabling the new stage's adapter then
    gives exactly the parent policy, which is what DPO and PPO use as their reference."""
    pad_token_id = tokenizer.pad_token_id
    if parent is None:
        model = load_pretrained(base_path, model_args, head, pad_token_id)
    else:
        model = load_stage_output(parent, model_args, head, pad_token_id)
    model.config.pad_token_id = pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad_token_id
    return model


def lora_config(model_args: ModelArgs, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None,
                tokenizer=None):
    if not model_args.use_lora:
        return None
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    trainable_tokens = None
    if model_args.lora_trainable_tokens:
        if tokenizer is None:
            raise ConfigError("lora_trainable_tokens needs the tokenizer to find the token ids")
        unknown = [token for token in model_args.lora_trainable_tokens if token not in tokenizer.get_vocab()]
        if unknown:
            raise ConfigError(f"lora_trainable_tokens: {unknown} are not tokens of this tokenizer")
        trainable_tokens = [tokenizer.convert_tokens_to_ids(token) for token in model_args.lora_trainable_tokens]
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type=task_type,
        modules_to_save=(modules_to_save or []) + model_args.lora_modules_to_save or None,
        trainable_token_indices=trainable_tokens,
    )


def save_merged_copy(manifest: Manifest, model_args: ModelArgs) -> str:
    """Write <stage>/merged: the stage's policy as one plain model (base + adapters merged) with its tokenizer, so
    any tool loads it with AutoModelForCausalLM.from_pretrained. Built from the files on disk, so it works the same
    whatever sharding the training used."""
    model = load_stage_output(manifest, model_args)
    tokenizer = stage_tokenizer(manifest, model_args)
    merged_dir = Path(manifest.path("merged"))
    model.save_pretrained(merged_dir, safe_serialization=True)
    tokenizer.save_pretrained(merged_dir)
    return "merged"


def read_adapter(adapter_dir: str):
    """A saved LoRA adapter as (LoraConfig, tensors), read with safetensors (no pickle)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    check_adapter_folder(adapter_dir)
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS
    return LoraConfig.from_pretrained(adapter_dir), load_file(str(weights_path))


def split_head_weights(tensors: dict, head_name: str = "score") -> tuple[dict, dict]:
    """Separate a classifier head saved via modules_to_save from the LoRA weights of a reward adapter."""
    head = {key: value for key, value in tensors.items() if f".{head_name}." in key}
    return {key: value for key, value in tensors.items() if key not in head}, head


def mergeable_lora_layers(peft_model, adapter: str) -> list | None:
    """The LoRA linear layers of `adapter` when folding it into the weights is exact enough to sample from (plain
    LoRA on fp32 linears, nothing else trained by the adapter); None otherwise. In bf16/fp16, W + BA rounds away
    much of a small update, so the merged model would not be the policy that training sees."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper
    from torch.distributed.tensor import DTensor

    layers = []
    for module in peft_model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper) and adapter in getattr(module, "modules_to_save", {}):
            return None  # modules_to_save / trainable tokens: not a weight delta
        if not isinstance(module, BaseTunerLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        base = module.get_base_layer()
        if isinstance(base.weight, DTensor):  # sharded (FSDP, blocks not gathered): no whole weight to fold into
            return None
        if (type(module) is not LoraLinear or module.use_dora.get(adapter) or module.lora_bias.get(adapter)
                or module.merged or base.weight.dtype != torch.float32 or base.weight.dim() != 2):
            return None
        layers.append(module)
    return layers or None


@contextmanager
def lora_merged(peft_model, adapter: str, dtype=None):
    """Run `peft_model` as plain linears with `adapter` folded into fresh weight tensors: no per-layer LoRA branch,
    which dominates the cost of token-by-token decoding on CPU. The original weight tensors are put back untouched
    (peft's unmerge subtracts, and would drift the shared base that is also the reference). Falls back to the
    unmerged model where merging is not exact (see mergeable_lora_layers). The merged copy lives only inside the
    `with` block. `dtype`: make the merged tensors in this dtype (for sampling under autocast to it, which would
    round them the same way at every step)."""
    import torch

    layers = mergeable_lora_layers(peft_model, adapter)
    if layers is None:
        yield False
        return
    originals = []
    try:
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                originals.append((base, base.weight))
                merged = base.weight + layer.get_delta_weight(adapter).to(base.weight.dtype)
                merged = merged.to(dtype or merged.dtype)
                base.weight = torch.nn.Parameter(merged, requires_grad=False)
        with peft_model.disable_adapter():
            yield True
    finally:
        for base, weight in originals:
            base.weight = weight
