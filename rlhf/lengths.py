"""Checks of normalised records (rlhf.data) that need the stage's tokenizer: no text already in chat-template form
(check_chat_markup), and token lengths against max_length, by length_policy (check_lengths, which runs both)."""

from __future__ import annotations

import re
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


def _where(record: dict, source: str, index: int) -> str:
    """A record by where it was read (`Record.where`, as the load_* functions return), else "<source> record <n>"."""
    return getattr(record, "where", None) or f"{source} record {index}"


_MESSAGE_FIELDS = {"sft": ("messages", "prompt", "completion"), "preference": ("prompt", "chosen", "rejected"),
                   "prompt": ("prompt",)}  # a prompt record's other fields are its own columns, not messages
# A conversation that shows every marker a chat template writes: around each role's turn and the generation prompt.
_PROBE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "x"}]


def _template_markers(tokenizer: Any) -> re.Pattern | None:
    """The special tokens the chat template writes (<|im_start|>, <|eot_id|>, a BOS it adds, ...), as one pattern, or
    None when it writes none. Special tokens the template never writes (<unk>, a code model's <filename>) may well be
    quoted in plain text, so they are not looked for."""
    special = {token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special}
    special.update(tokenizer.all_special_tokens)
    try:  # with a system turn if the template takes one (some refuse it)
        rendered = tokenizer.apply_chat_template([{"role": "system", "content": "x"}] + _PROBE, tokenize=False,
                                                 add_generation_prompt=True)
    except Exception:  # noqa: BLE001 (templates raise what they like, e.g. jinja's TemplateError)
        rendered = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
    markers = sorted((token for token in special if token and token in rendered), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, markers))) if markers else None


def check_chat_markup(records: list[dict], tokenizer: Any, source: str, kind: str) -> None:
    """Refuse message text that holds a special token of the tokenizer's chat template ("<|im_start|>user\\n..."):
    such text was formatted with a chat template already, and the stages apply it again. Plain `text` records (SFT
    language modelling) are tokenised as they are, so they are not looked at."""
    markers = _template_markers(tokenizer)
    if markers is None:
        return
    fields = _MESSAGE_FIELDS[KINDS[kind]]
    for index, record in enumerate(records, start=1):
        for field in fields:  # a plain-text record has none of them
            for message in record.get(field) or ():
                found = markers.search(message["content"])
                if found:
                    raise field_error(_where(record, source, index), field, f"the {message['role']} message holds "
                                      f"{found.group()!r}, a special token of the tokenizer's chat template, so it "
                                      "looks formatted with a chat template already; the stages apply the chat "
                                      "template themselves, so give plain text or a list of messages")


def check_lengths(records: list[dict], tokenizer: Any, max_length: int | None, source: str, kind: str,
                  policy: str = "error") -> list[dict]:
    """Check every record fits in max_length tokens once rendered with the chat template, after check_chat_markup
    (max_length None: only that). Errors name a record as check_chat_markup does.

    policy "error": raise on the first over-long record; "drop": return only the records that
    fit; "truncate": keep everything (the trainer truncates) but raise if a prompt alone
    already fills max_length, since nothing would be left for the response."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"policy must be one of {', '.join(LENGTH_POLICIES)}, got {policy!r}")
    check_chat_markup(records, tokenizer, source, kind)
    if max_length is None:
        return list(records)
    kind = KINDS[kind]
    kept = []
    for index, record in enumerate(records, start=1):
        where = _where(record, source, index)
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
