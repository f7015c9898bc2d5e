"""Token lengths of normalised records (rlhf.data) against a stage's max_length, by length_policy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rlhf.sources import DataError, field_error

LENGTH_POLICIES = ("error", "drop", "truncate")

KINDS = {"sft": "sft", "preference": "preference", "preferences": "preference",
         "prompt": "prompt", "prompts": "prompt"}


def _token_count(tokenizer: Any, messages: list[dict] | str, add_generation_prompt: bool) -> int:
    if isinstance(messages, str):  # plain text, which TRL ends with EOS when it does not already
        eos = tokenizer.eos_token or ""
        return len(tokenizer(messages if messages.endswith(eos) else messages + eos)["input_ids"])
    tokens = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    # transformers 5 returns a BatchEncoding here; older versions a plain list of ids.
    if isinstance(tokens, Mapping):
        tokens = tokens["input_ids"]
    return len(tokens)


def _sequences(record: dict, kind: str) -> tuple[list[dict], list[tuple[str, list[dict], bool]]]:
    """(prompt part, [(field, messages to render, add_generation_prompt)]) for one normalised record."""
    if kind == "sft" and "text" in record:
        return [], [("text", record["text"], False)]
    if kind == "sft" and "completion" in record:
        return record["prompt"], [("completion", record["prompt"] + record["completion"], False)]
    if kind == "sft":
        messages = record["messages"]
        return messages[:-1], [("messages", messages, False)]
    prompt = record["prompt"]
    if kind == "preference":
        return prompt, [("chosen", prompt + record["chosen"], False),
                        ("rejected", prompt + record["rejected"], False)]
    return prompt, [("prompt", prompt, True)]


def check_lengths(records: list[dict], tokenizer: Any, max_length: int, source: str, kind: str,
                  policy: str = "error") -> list[dict]:
    """Check every record fits in max_length tokens once rendered with the chat template. Errors name a record by
    where it was read (`Record.where`, as the load_* functions return), else as "<source> record <index>".

    policy "error": raise on the first over-long record; "drop": return only the records that
    fit; "truncate": keep everything (the trainer truncates) but raise if a prompt alone
    already fills max_length, since nothing would be left for the response."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"policy must be one of {', '.join(LENGTH_POLICIES)}, got {policy!r}")
    kind = KINDS[kind]
    kept = []
    for index, record in enumerate(records, start=1):
        where = getattr(record, "where", None) or f"{source} record {index}"
        prompt, sequences = _sequences(record, kind)
        if policy == "truncate":
            length = _token_count(tokenizer, prompt, add_generation_prompt=True) if prompt else 0
            if length >= max_length:
                raise field_error(where, "prompt", f"{length} tokens on its own, not below max_length "
                            f"{max_length}, so truncation would leave nothing for the response; "
                            "raise max_length or use policy 'drop'")
            kept.append(record)
            continue
        lengths = [(field, _token_count(tokenizer, messages, add_generation_prompt))
                   for field, messages, add_generation_prompt in sequences]
        too_long = [(field, length) for field, length in lengths if length > max_length]
        if not too_long:
            kept.append(record)
        elif policy == "error":
            field, length = too_long[0]
            raise field_error(where, field, f"{length} tokens, longer than max_length {max_length}; "
                        "raise max_length or use policy 'truncate' or 'drop'")
    if records and not kept:
        raise DataError(f"{source}: all {len(records)} records are longer than max_length "
                        f"{max_length}; nothing left (raise max_length)")
    return kept
