"""Normalise and validate records for every stage (SFT, reward model, DPO, PPO, evaluation).

rlhf.sources reads the raw records (files, folders, hub datasets); each loader here converts every record to one
canonical layout and validates it, so bad data raises DataError before anything trains:

    SFT:          {"messages": [{"role", "content"}, ...]}  (ends with an assistant turn),
                  {"prompt": [...], "completion": [...]}  (the loss on the completion only), or {"text": "..."}
    preferences:  {"prompt": [...], "chosen": [...], "rejected": [...]}  (+ "margin", "subset")
    best-of-N:    {"prompt": [...], "chosen": [[...], ...], "rejected": [[...], ...]}  (+ "subset"; eval-rm only)
    prompts:      {"prompt": [...]}                               (+ extra scalar fields)

An empty response ("") is a valid answer. A malformed record stops the load (on_bad_record "error", the default) or
is left out (on_bad_record "skip"), and then the count and the first reasons are printed: nothing goes silently.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from rlhf.config import ConfigError
from rlhf.lengths import KINDS, LENGTH_POLICIES, check_lengths  # noqa: F401 (re-exported)
from rlhf.sources import (  # noqa: F401 (DataError, read_records and SUPPORTED_EXTENSIONS are re-exported)
    SUPPORTED_EXTENSIONS,
    DataError,
    Located,
    field_error,
    read_located,
    read_records,
)
from rlhf.sources import type_name as _type_name

if TYPE_CHECKING:
    import datasets

    from rlhf.config import DataArgs

ROLES = ("system", "user", "assistant")
ON_BAD_RECORD = ("error", "skip")
SKIP_REASONS_SHOWN = 3
SCORE_FIELDS = ("score_chosen", "score_rejected")
PAIRS, BEST_OF_N = "pairs", "best_of_n"

SFT_LAYOUTS = ("'messages'", "'prompt' + 'completion'", "'text' (plain text)")
PREFERENCE_LAYOUTS = (
    "'prompt' + 'chosen' + 'rejected' (explicit prompt)",
    "'chosen' + 'rejected' conversations sharing a prompt prefix (implicit prompt)",
    "'chosen' + 'rejected' HH-RLHF 'Human:/Assistant:' transcripts",
)
PROMPT_LAYOUTS = ("'prompt'", "'messages'", "'chosen' + 'rejected' conversations (the prompt they share)")


class Record(dict):
    """A normalised record that remembers where it was read (`where`: "data.jsonl line 4", "data.json record 2"),
    so checks made after loading (check_lengths) name the same place as the loaders' own errors. It is a dict and
    compares equal to one; to_dataset writes plain rows, so `where` never reaches a dataset."""

    def __init__(self, fields: Mapping, where: str):
        super().__init__(fields)
        self.where = where


def _load(normalise, source: str, on_bad_record: str, located: Located) -> list[Record]:
    """Normalise every located record; a bad one raises (on_bad_record "error") or is counted and left out ("skip")."""
    if on_bad_record not in ON_BAD_RECORD:
        raise ConfigError(f"on_bad_record: expected one of {', '.join(ON_BAD_RECORD)}, got {on_bad_record!r}")
    unreadable = next((raw for _, raw in located if isinstance(raw, DataError)), None)
    if unreadable is not None and on_bad_record == "error":  # a broken file is named before any record's fields
        raise unreadable
    records, reasons = [], []
    for where, raw in located:
        try:
            if isinstance(raw, DataError):  # could not be read as a record at all (not JSON, not an object)
                raise raw
            records.append(Record(normalise(raw, where), where))
        except DataError as error:
            if on_bad_record == "error":
                raise
            reasons.append(str(error).removeprefix(f"{source} "))
    if reasons:
        first = "; ".join(reasons[:SKIP_REASONS_SHOWN])
        if not records:
            raise DataError(f"{source}: all {len(located)} records are malformed, nothing is left; first: {first}")
        print(f"[rlhf] skipped {len(reasons)} of {len(located)} records in {source} (on_bad_record: skip); "
              f"first: {first}", flush=True)
    return records


# --------------------------------------------------------------------------- shared checks


def _present_fields(record: Any, where: str) -> dict:
    """The record's fields minus None values: columnar formats (parquet, hub) fill absent fields with None."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(record)}")
    return {key: value for key, value in record.items() if value is not None}


def _require(fields: dict, name: str, where: str) -> Any:
    if name not in fields:
        raise field_error(where, name, "missing required field")
    return fields[name]


def _unknown_format(where: str, record: Mapping, layouts: tuple[str, ...]) -> DataError:
    return DataError(f"{where}: unknown format; expected one of: {'; '.join(layouts)}; "
                     f"found keys: {sorted(record) or 'none'}")


def _message(value: Any, where: str, field: str) -> dict:
    if not isinstance(value, Mapping) or "role" not in value or "content" not in value:
        found = sorted(value) if isinstance(value, Mapping) else _type_name(value)
        raise field_error(where, field, f"expected a message with 'role' and 'content', got {found}")
    role, content = value["role"], value["content"]
    if role not in ROLES:
        raise field_error(where, f"{field}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise field_error(where, f"{field}.content", f"expected a string, got {_type_name(content)}")
    return {"role": role, "content": content}


def _messages(value: Any, where: str, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise field_error(where, field, f"expected a list of messages, got {_type_name(value)}")
    if not value:
        raise field_error(where, field, "expected a non-empty list of messages")
    return [_message(item, where, f"{field}[{index}]") for index, item in enumerate(value)]


def _text_or_messages(value: Any, where: str, field: str, role: str) -> list[dict]:
    """A plain string becomes a single message from `role`; a list must already be messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _messages(value, where, field)
    raise field_error(where, field, f"expected a string or a list of messages, got {_type_name(value)}")


def _check_prompt(messages: list[dict], where: str, field: str = "prompt") -> None:
    if all(not message["content"].strip() for message in messages):
        raise field_error(where, field, "prompt is empty")


def _check_response(messages: list[dict], where: str, field: str) -> None:
    """The final assistant turn is what gets trained or scored, so it must exist. It may be empty: saying nothing is
    an answer a rater can prefer or reject (HH-RLHF has such pairs)."""
    if not messages or messages[-1]["role"] != "assistant":
        last = repr(messages[-1]["role"]) if messages else "nothing"
        raise field_error(where, field, f"expected the conversation to end with an assistant turn, got {last}")


def _number(fields: dict, name: str, where: str) -> float:
    value = _require(fields, name, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise field_error(where, name, f"expected a number, got {_type_name(value)}")
    return float(value)


# --------------------------------------------------------------------------- SFT


def normalise_sft_record(record: Any, where: str) -> dict:
    fields = _present_fields(record, where)
    if "messages" in fields:
        field, messages = "messages", _messages(fields["messages"], where, "messages")
    elif "prompt" in fields or "completion" in fields:
        # Kept as TRL's prompt-completion layout: TRL then trains on the completion only (completion_only_loss),
        # as it does for this layout, with or without assistant_only_loss.
        prompt = _text_or_messages(_require(fields, "prompt", where), where, "prompt", "user")
        completion = _text_or_messages(_require(fields, "completion", where), where, "completion", "assistant")
        _check_prompt(prompt, where)
        _check_response(completion, where, "completion")
        if "system" in fields:
            prompt = _with_system(fields["system"], prompt, where)
        return {"prompt": prompt, "completion": completion}
    elif "text" in fields:  # plain text: TRL's language-modelling layout, the loss is on every token
        text = fields["text"]
        if not isinstance(text, str):
            raise field_error(where, "text", f"expected a string, got {_type_name(text)}")
        if not text.strip():
            raise field_error(where, "text", "empty text")
        if "system" in fields:
            raise field_error(where, "system", "a plain-text record has no conversation to add a system message to")
        return {"text": text}
    else:
        raise _unknown_format(where, record, SFT_LAYOUTS)
    if "system" in fields:
        messages = _with_system(fields["system"], messages, where)
    _check_response(messages, where, field)
    return {"messages": messages}


def _with_system(system: Any, messages: list[dict], where: str) -> list[dict]:
    if not isinstance(system, str):
        raise field_error(where, "system", f"expected a string, got {_type_name(system)}")
    if messages[0]["role"] == "system":  # two system turns break most chat templates
        raise field_error(where, "system", "the conversation already starts with a system message")
    return [{"role": "system", "content": system}] + messages


def load_sft(source: str, split: str | None = None, *, config: str | None = None,
             on_bad_record: str = "error") -> list[Record]:
    records = _load(normalise_sft_record, source, on_bad_record, read_located(source, split, config))
    layout = _sft_layout(records[0]) if records else None
    mixed = next((record for record in records if _sft_layout(record) != layout), None)
    if mixed is not None:  # one dataset has one layout: TRL picks it from the first record
        raise DataError(f"{mixed.where}: {_sft_layout(mixed)}, but the first record is {layout}; SFT data must be "
                        "all 'messages' conversations, all 'prompt' + 'completion' or all plain 'text'")
    return records


def _sft_layout(record: dict) -> str:
    return ("plain text" if "text" in record else "prompt + completion" if "completion" in record
            else "a conversation")


# --------------------------------------------------------------------------- preferences

_HH_TURN = re.compile(r"(?:\A|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _is_hh_text(text: str) -> bool:
    return text.lstrip().startswith("Human:") and "\n\nAssistant:" in text


def hh_rlhf_to_messages(text: str, where: str) -> list[dict]:
    """Parse an Anthropic HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages."""
    parts = _HH_TURN.split(text)  # [preamble, speaker, text, speaker, text, ...]
    preamble, turns = parts[0], parts[1:]
    if preamble.strip() or not turns:
        raise DataError(f"{where}: expected an HH-RLHF transcript starting with 'Human:', got {text[:40]!r}")
    return [{"role": _HH_ROLES[speaker], "content": content.strip()}
            for speaker, content in zip(turns[0::2], turns[1::2])]


def normalise_preference_record(record: Any, where: str, margin_from_scores: bool = False) -> dict:
    """One pair; with margin_from_scores its margin is score_chosen - score_rejected (UltraFeedback's ratings)."""
    fields = _present_fields(record, where)
    if not {"prompt", "chosen", "rejected"} & fields.keys():
        raise _unknown_format(where, record, PREFERENCE_LAYOUTS)
    chosen, rejected = _require(fields, "chosen", where), _require(fields, "rejected", where)
    if _is_best_of_n(chosen, rejected):
        raise DataError(f"{where}, fields 'chosen' and 'rejected': lists of responses (the best-of-N layout of "
                        "RewardBench 2), which only eval-rm scores; training needs one chosen and one rejected "
                        "response per record")
    if "prompt" in fields:
        prompt, chosen, rejected = _split_explicit(fields["prompt"], chosen, rejected, where)
    else:
        prompt, chosen, rejected = _split_implicit(chosen, rejected, where)
    _check_prompt(prompt, where)
    _check_response(chosen, where, "chosen")
    _check_response(rejected, where, "rejected")
    if chosen == rejected:
        raise DataError(f"{where}, fields 'chosen' and 'rejected': identical; "
                        "a pair needs two different responses")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            **_preference_extras(fields, where, margin_from_scores)}


def _split_explicit(prompt: Any, chosen: Any, rejected: Any, where: str) -> tuple[list, list, list]:
    prompt = _text_or_messages(prompt, where, "prompt", "user")
    chosen = _text_or_messages(chosen, where, "chosen", "assistant")
    rejected = _text_or_messages(rejected, where, "rejected", "assistant")
    # Some datasets (e.g. UltraFeedback binarized) repeat the prompt at the start of each response.
    size = len(prompt)
    if chosen[:size] == prompt and rejected[:size] == prompt:
        chosen, rejected = chosen[size:], rejected[size:]
    return prompt, chosen, rejected


def _conversation(value: Any, where: str, field: str) -> list[dict]:
    """A full conversation for the implicit-prompt layout: a message list or an HH-RLHF transcript."""
    if isinstance(value, str):
        if _is_hh_text(value):
            return hh_rlhf_to_messages(value, f"{where}, field '{field}'")
        raise field_error(where, "prompt", "missing required field (needed when 'chosen'/'rejected' are plain "
                    "strings rather than conversations or HH-RLHF 'Human:/Assistant:' transcripts)")
    if not isinstance(value, list):
        raise field_error(where, field, f"expected a string or a list of messages, got {_type_name(value)}")
    return _messages(value, where, field)


def _split_implicit(chosen: Any, rejected: Any, where: str) -> tuple[list, list, list]:
    chosen = _conversation(chosen, where, "chosen")
    rejected = _conversation(rejected, where, "rejected")
    fields = f"{where}, fields 'chosen' and 'rejected'"
    if chosen == rejected:
        raise DataError(f"{fields}: identical conversations; a pair needs two different responses")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(f"{fields}: no shared prompt prefix; without a 'prompt' field both "
                        "conversations must start with the same messages")
    start = _response_start(chosen, rejected, shared)
    if start == 0:
        raise DataError(f"{fields}: the shared prompt prefix is not followed by an assistant turn in both")
    return chosen[:start], chosen[start:], rejected[start:]


def _response_start(chosen: list[dict], rejected: list[dict], shared: int) -> int:
    """Where the responses begin: the last position within the shared prefix (or just after it)
    at which both conversations have an assistant turn. 0 means there is none."""
    for index in range(min(shared, len(chosen) - 1, len(rejected) - 1), 0, -1):
        if chosen[index]["role"] == rejected[index]["role"] == "assistant":
            return index
    return 0


def _preference_extras(fields: dict, where: str, margin_from_scores: bool) -> dict:
    extras = {}
    if margin_from_scores:
        if "margin" in fields:
            raise field_error(where, "margin", "given as well as margin_from_scores; use one or the other")
        extras["margin"] = _number(fields, "score_chosen", where) - _number(fields, "score_rejected", where)
    elif "margin" in fields:
        extras["margin"] = _number(fields, "margin", where)
    return {**extras, **_subset(fields, where)}


def _subset(fields: dict, where: str) -> dict:
    extras = {}
    subset_field = next((name for name in ("subset", "category") if name in fields), None)
    if subset_field:
        subset = fields[subset_field]
        if not isinstance(subset, str):
            raise field_error(where, subset_field, f"expected a string, got {_type_name(subset)}")
        extras["subset"] = subset
    return extras


def load_preferences(source: str, split: str | None = None, *, config: str | None = None,
                     on_bad_record: str = "error", margin_from_scores: bool = False) -> list[Record]:
    located = read_located(source, split, config)
    if not margin_from_scores and any(isinstance(raw, Mapping) and any(raw.get(name) is not None
                                                                        for name in SCORE_FIELDS)
                                      for _, raw in located):
        print(f"[rlhf] {source}: 'score_chosen'/'score_rejected' are ignored; set margin_from_scores: true to train "
              "the reward model with margin = score_chosen - score_rejected", flush=True)
    normalise = partial(normalise_preference_record, margin_from_scores=margin_from_scores)
    return _load(normalise, source, on_bad_record, located)


# --------------------------------------------------------------------------- best-of-N (RewardBench 2)


def _is_best_of_n(chosen: Any, rejected: Any) -> bool:
    """Lists of whole responses (strings or message lists) rather than one response as a list of messages."""
    return any(isinstance(value, list) and value and all(isinstance(item, (str, list)) for item in value)
               for value in (chosen, rejected))


def _responses(value: Any, where: str, field: str) -> list[list[dict]]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise field_error(where, field, f"expected a non-empty list of responses (strings or message lists), got "
                    f"{_type_name(value) if not isinstance(value, list) else 'an empty list'}")
    responses = []
    for index, item in enumerate(items):
        response = _text_or_messages(item, where, f"{field}[{index}]", "assistant")
        _check_response(response, where, f"{field}[{index}]")
        responses.append(response)
    return responses


def normalise_best_of_n_record(record: Any, where: str) -> dict:
    """A prompt with several chosen and several rejected responses (RewardBench 2: one chosen and three rejected; its
    Ties subset has several of each). Scored correct when every chosen response beats every rejected one."""
    fields = _present_fields(record, where)
    prompt = _text_or_messages(_require(fields, "prompt", where), where, "prompt", "user")
    _check_prompt(prompt, where)
    return {"prompt": prompt, "chosen": _responses(_require(fields, "chosen", where), where, "chosen"),
            "rejected": _responses(_require(fields, "rejected", where), where, "rejected"), **_subset(fields, where)}


def load_rm_eval(source: str, split: str | None = None, *, config: str | None = None,
                 on_bad_record: str = "error") -> tuple[str, list[Record]]:
    """(PAIRS, preference pairs) or (BEST_OF_N, best-of-N records), as the first record's layout says."""
    located = read_located(source, split, config)
    first = next((raw for _, raw in located if isinstance(raw, Mapping)), {})
    if _is_best_of_n(first.get("chosen"), first.get("rejected")):
        return BEST_OF_N, _load(normalise_best_of_n_record, source, on_bad_record, located)
    return PAIRS, _load(normalise_preference_record, source, on_bad_record, located)


# --------------------------------------------------------------------------- prompts

_SCALARS = (str, int, float, bool)


def normalise_prompt_record(record: Any, where: str) -> dict:
    fields = _present_fields(record, where)
    if "prompt" in fields:
        field, messages = "prompt", _text_or_messages(fields["prompt"], where, "prompt", "user")
    elif "messages" in fields:
        field, messages = "messages", _messages(fields["messages"], where, "messages")
    elif "chosen" in fields and "rejected" in fields:  # a preference file without a prompt column
        field, messages = "chosen", _split_implicit(fields["chosen"], fields["rejected"], where)[0]
    else:
        raise _unknown_format(where, record, PROMPT_LAYOUTS)
    # A trailing assistant turn is a reference answer, not part of what the policy is asked.
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    _check_prompt(messages, where, field)
    extras = {key: value for key, value in fields.items()
              if key not in ("prompt", "messages", "chosen", "rejected") and isinstance(value, _SCALARS)}
    return {"prompt": messages, **extras}


def load_prompts(source: str, split: str | None = None, *, config: str | None = None,
                 on_bad_record: str = "error") -> list[Record]:
    """Prompts from a prompt file, or from a preference file (its responses are dropped, other scalar fields kept)."""
    return _load(normalise_prompt_record, source, on_bad_record, read_located(source, split, config))


# --------------------------------------------------------------------------- a stage's data


def load_train(data_args: DataArgs, kind: str) -> list[Record]:
    """The training records of kind "sft", "preference" or "prompt", as data_args asks (first max_train_samples)."""
    return _load_kind(kind, data_args.train_data, data_args.train_split, data_args)[: data_args.max_train_samples]


def load_eval(data_args: DataArgs, kind: str) -> list[Record] | None:
    """The evaluation records (first max_eval_samples), or None without eval_data."""
    if not data_args.eval_data:
        return None
    return _load_kind(kind, data_args.eval_data, data_args.eval_split, data_args)[: data_args.max_eval_samples]


def _load_kind(kind: str, source: str, split: str, data_args: DataArgs) -> list[Record]:
    options = {"config": data_args.dataset_config, "on_bad_record": data_args.on_bad_record}
    if KINDS[kind] == "preference":
        return load_preferences(source, split, margin_from_scores=data_args.margin_from_scores, **options)
    return {"sft": load_sft, "prompt": load_prompts}[KINDS[kind]](source, split, **options)


# --------------------------------------------------------------------------- datasets


def prompt_text(messages: list[dict]) -> str:
    """The last user message: what a reader (or a gold reward) needs to know about the request."""
    return next((message["content"] for message in reversed(messages) if message.get("role") == "user"), "")


def to_dataset(records: list[dict]) -> datasets.Dataset:
    import datasets

    # Dataset.from_list takes its columns from the first record only, so give every record every key.
    columns = list(dict.fromkeys(key for record in records for key in record))
    if "margin" in columns:
        # A missing margin would become None, which TRL's reward collator cannot turn into a tensor; and no
        # default is neutral (0 reads as "barely preferred" next to labelled pairs), so the data must say.
        unlabelled = next((index for index, record in enumerate(records) if "margin" not in record), None)
        if unlabelled is not None:
            where = getattr(records[unlabelled], "where", f"record {unlabelled + 1}")
            labelled = sum("margin" in record for record in records)
            raise DataError(f"{where}: no 'margin', but {labelled} of the {len(records)} records have one; "
                            "give every record a margin or none")
    rows = [{column: record.get(column) for column in columns} for record in records]
    return datasets.Dataset.from_list(rows)
