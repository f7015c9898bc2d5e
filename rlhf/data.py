"""Normalise and validate records for every stage (SFT, reward model, DPO, PPO, GRPO, RLOO, evaluation).

rlhf.sources reads the raw records (files, folders, hub datasets); each loader here converts every record to one
canonical layout and validates it (rlhf.records holds the checks the layouts share), so bad data raises DataError
before anything trains:

    SFT:          {"messages": [{"role", "content"}, ...]}  (ends with an assistant turn),
                  {"prompt": [...], "completion": [...]}  (the loss on the completion only), or {"text": "..."}
    preferences:  {"prompt": [...], "chosen": [...], "rejected": [...]}  (+ "margin", "subset")
    best-of-N:    {"prompt": [...], "chosen": [[...], ...], "rejected": [[...], ...]}  (+ "subset"; eval-rm only)
    prompts:      {"prompt": [...]}                 (+ the record's other fields, each of one kind in every record)

A `system` field becomes the prompt's first message (every layout but plain text); a `prompt` string in HH-RLHF form
("\\n\\nHuman: ...\\n\\nAssistant:") becomes its turns. An empty response ("") is a valid answer. A malformed record
stops the load (on_bad_record "error", the default) or is left out (on_bad_record "skip"), and then the count and the
first reasons are printed: nothing goes silently. Once a stage has its tokenizer, fit_records checks what only the
tokenizer can tell (rlhf.lengths): text already in chat-template form, and lengths against max_length.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from rlhf.lengths import KINDS, LENGTH_POLICIES, check_chat_markup, check_lengths  # noqa: F401 (re-exported)
from rlhf.records import (  # noqa: F401 (Record is re-exported)
    Record,
    check_prompt,
    check_response,
    normalise_all,
    number_field,
    parse_messages,
    parse_text_or_messages,
    present_fields,
    require_field,
    unknown_format,
    with_system,
)
from rlhf.sources import (  # noqa: F401 (DataError, read_records and SUPPORTED_EXTENSIONS are re-exported)
    SUPPORTED_EXTENSIONS,
    DataError,
    field_error,
    read_located,
    read_records,
)
from rlhf.sources import type_name as _type_name

if TYPE_CHECKING:
    import datasets

    from rlhf.config import DataArgs

SCORE_FIELDS = ("score_chosen", "score_rejected")
PAIRS, BEST_OF_N = "pairs", "best_of_n"

SFT_LAYOUTS = ("'messages'", "'prompt' + 'completion'", "'text' (plain text)")
PREFERENCE_LAYOUTS = (
    "'prompt' + 'chosen' + 'rejected' (explicit prompt)",
    "'chosen' + 'rejected' conversations sharing a prompt prefix (implicit prompt)",
    "'chosen' + 'rejected' HH-RLHF 'Human:/Assistant:' transcripts",
)
PROMPT_LAYOUTS = ("'prompt'", "'messages'", "'chosen' + 'rejected' conversations (the prompt they share)")


# --------------------------------------------------------------------------- HH-RLHF text and explicit prompts

_HH_TURN = re.compile(r"(?:\A|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _is_hh_text(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("Human:") and "\n\nAssistant:" in value


def hh_rlhf_to_messages(text: str, where: str) -> list[dict]:
    """Parse an Anthropic HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages."""
    parts = _HH_TURN.split(text)  # [preamble, speaker, text, speaker, text, ...]
    preamble, turns = parts[0], parts[1:]
    if preamble.strip() or not turns:
        raise DataError(f"{where}: expected an HH-RLHF transcript starting with 'Human:', got {text[:40]!r}")
    return [{"role": _HH_ROLES[speaker], "content": content.strip()}
            for speaker, content in zip(turns[0::2], turns[1::2])]


def _explicit_prompt(value: Any, where: str) -> list[dict]:
    """A `prompt` field: messages, plain text (one user message) or an HH-RLHF transcript. An empty final assistant
    turn (HH-RLHF's closing "Assistant:") only says who speaks next, and is dropped."""
    if _is_hh_text(value):
        messages = hh_rlhf_to_messages(value, f"{where}, field 'prompt'")
    else:
        messages = parse_text_or_messages(value, where, "prompt", "user")
    if len(messages) > 1 and messages[-1] == {"role": "assistant", "content": ""}:
        messages = messages[:-1]
    return messages


def _response(value: Any, where: str, field: str, after_hh_prompt: bool) -> list[dict]:
    """A response field (completion, chosen, rejected). After an HH-RLHF prompt a string is a whole transcript or the
    text after its "Assistant:", whose surrounding space is dropped as the transcript parser drops it from each turn."""
    if after_hh_prompt and isinstance(value, str):
        if _is_hh_text(value):
            return hh_rlhf_to_messages(value, f"{where}, field '{field}'")
        return [{"role": "assistant", "content": value.strip()}]
    return parse_text_or_messages(value, where, field, "assistant")


def _without_repeated_prompt(prompt: list[dict], *responses: list[dict]) -> tuple[list[dict], ...]:
    """Some datasets (e.g. UltraFeedback binarized) repeat the prompt at the start of each response: cut it off."""
    size = len(prompt)
    if all(response[:size] == prompt for response in responses):
        return tuple(response[size:] for response in responses)
    return responses


# --------------------------------------------------------------------------- SFT


def normalise_sft_record(record: Any, where: str) -> dict:
    fields = present_fields(record, where)
    if "messages" in fields:
        messages = with_system(fields, parse_messages(fields["messages"], where, "messages"), where)
        check_response(messages, where, "messages")
        return {"messages": messages}
    if "prompt" in fields or "completion" in fields:
        # Kept as TRL's prompt-completion layout: TRL then trains on the completion only (completion_only_loss),
        # as it does for this layout, with or without assistant_only_loss.
        prompt = _explicit_prompt(require_field(fields, "prompt", where), where)
        completion = _response(require_field(fields, "completion", where), where, "completion",
                               _is_hh_text(fields["prompt"]))
        (completion,) = _without_repeated_prompt(prompt, completion)
        check_prompt(prompt, where)
        check_response(completion, where, "completion")
        return {"prompt": with_system(fields, prompt, where), "completion": completion}
    if "text" in fields:  # plain text: TRL's language-modelling layout, the loss is on every token
        text = fields["text"]
        if not isinstance(text, str):
            raise field_error(where, "text", f"expected a string, got {_type_name(text)}")
        if not text.strip():
            raise field_error(where, "text", "empty text")
        if "system" in fields:
            raise field_error(where, "system", "a plain-text record has no conversation to add a system message to")
        return {"text": text}
    raise unknown_format(where, record, SFT_LAYOUTS)


def load_sft(source: str, split: str | None = None, *, config: str | None = None,
             on_bad_record: str = "error") -> list[Record]:
    records = normalise_all(normalise_sft_record, source, on_bad_record, read_located(source, split, config))
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


def normalise_preference_record(record: Any, where: str, margin_from_scores: bool = False) -> dict:
    """One pair; with margin_from_scores its margin is score_chosen - score_rejected (UltraFeedback's ratings)."""
    fields = present_fields(record, where)
    if not {"prompt", "chosen", "rejected"} & fields.keys():
        raise unknown_format(where, record, PREFERENCE_LAYOUTS)
    chosen, rejected = require_field(fields, "chosen", where), require_field(fields, "rejected", where)
    if _is_best_of_n(chosen, rejected):
        raise DataError(f"{where}, fields 'chosen' and 'rejected': lists of responses (the best-of-N layout of "
                        "RewardBench 2), which only eval-rm scores; training needs one chosen and one rejected "
                        "response per record")
    if "prompt" in fields:
        prompt, chosen, rejected = _split_explicit(fields["prompt"], chosen, rejected, where)
    else:
        prompt, chosen, rejected = _split_implicit(chosen, rejected, where)
    check_prompt(prompt, where)
    check_response(chosen, where, "chosen")
    check_response(rejected, where, "rejected")
    if chosen == rejected:
        raise DataError(f"{where}, fields 'chosen' and 'rejected': identical; "
                        "a pair needs two different responses")
    return {"prompt": with_system(fields, prompt, where), "chosen": chosen, "rejected": rejected,
            **_preference_extras(fields, where, margin_from_scores)}


def _split_explicit(prompt: Any, chosen: Any, rejected: Any, where: str) -> tuple[list, list, list]:
    after_hh_prompt = _is_hh_text(prompt)
    prompt = _explicit_prompt(prompt, where)
    chosen = _response(chosen, where, "chosen", after_hh_prompt)
    rejected = _response(rejected, where, "rejected", after_hh_prompt)
    return (prompt, *_without_repeated_prompt(prompt, chosen, rejected))


def _conversation(value: Any, where: str, field: str) -> list[dict]:
    """A full conversation for the implicit-prompt layout: a message list or an HH-RLHF transcript."""
    if isinstance(value, str):
        if _is_hh_text(value):
            return hh_rlhf_to_messages(value, f"{where}, field '{field}'")
        raise field_error(where, "prompt", "missing required field (needed when 'chosen'/'rejected' are plain "
                    "strings rather than conversations or HH-RLHF 'Human:/Assistant:' transcripts)")
    if not isinstance(value, list):
        raise field_error(where, field, f"expected a string or a list of messages, got {_type_name(value)}")
    return parse_messages(value, where, field)


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
        extras["margin"] = number_field(fields, "score_chosen", where) - number_field(fields, "score_rejected", where)
    elif "margin" in fields:
        extras["margin"] = number_field(fields, "margin", where)
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
    pairs = normalise_all(normalise, source, on_bad_record, located)
    _check_margins(pairs)
    return pairs


def _check_margins(pairs: list[Record]) -> None:
    """Every pair has a margin or none does. A missing one would become None, which TRL's reward collator cannot
    turn into a tensor; and no default is neutral (0 reads as "barely preferred" next to labelled pairs)."""
    labelled = sum("margin" in pair for pair in pairs)
    unlabelled = next((pair for pair in pairs if "margin" not in pair), None)
    if labelled and unlabelled is not None:
        raise DataError(f"{unlabelled.where}: no 'margin', but {labelled} of the {len(pairs)} records have one; "
                        "give every record a margin or none")


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
        response = parse_text_or_messages(item, where, f"{field}[{index}]", "assistant")
        check_response(response, where, f"{field}[{index}]")
        responses.append(response)
    return responses


def normalise_best_of_n_record(record: Any, where: str) -> dict:
    """A prompt with several chosen and several rejected responses (RewardBench 2: one chosen and three rejected; its
    Ties subset has several of each). Scored correct when every chosen response beats every rejected one."""
    fields = present_fields(record, where)
    prompt = _explicit_prompt(require_field(fields, "prompt", where), where)
    check_prompt(prompt, where)
    return {"prompt": with_system(fields, prompt, where),
            "chosen": _responses(require_field(fields, "chosen", where), where, "chosen"),
            "rejected": _responses(require_field(fields, "rejected", where), where, "rejected"),
            **_subset(fields, where)}


def load_rm_eval(source: str, split: str | None = None, *, config: str | None = None,
                 on_bad_record: str = "error") -> tuple[str, list[Record]]:
    """(PAIRS, preference pairs) or (BEST_OF_N, best-of-N records), as the first record's layout says."""
    located = read_located(source, split, config)
    first = next((raw for _, raw in located if isinstance(raw, Mapping)), {})
    if _is_best_of_n(first.get("chosen"), first.get("rejected")):
        return BEST_OF_N, normalise_all(normalise_best_of_n_record, source, on_bad_record, located)
    return PAIRS, normalise_all(normalise_preference_record, source, on_bad_record, located)


# --------------------------------------------------------------------------- prompts

_PROMPT_SOURCES = ("prompt", "messages", "chosen", "rejected", "system")  # fields that make the prompt, not columns
# The kinds of value a column may hold, as one dataset column type (arrow stores ints and floats as one number type).
_VALUE_KINDS = ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "list"), (Mapping, "object"))


def normalise_prompt_record(record: Any, where: str) -> dict:
    fields = present_fields(record, where)
    if "prompt" in fields:
        field, messages = "prompt", _explicit_prompt(fields["prompt"], where)
        if messages[-1]["role"] == "assistant":  # cutting it off would change what the policy is asked
            raise field_error(where, "prompt", "ends with an assistant turn (a prefill for the response to continue), "
                              "which the online stages do not support: the policy answers in a new assistant turn. "
                              "End the prompt with a user turn (a reference answer can go in a field of its own, "
                              "which reward functions receive)")
    elif "messages" in fields:
        field, messages = "messages", parse_messages(fields["messages"], where, "messages")
        if messages[-1]["role"] == "assistant":  # a conversation's final answer is a reference, not part of the ask
            messages = messages[:-1]
    elif "chosen" in fields and "rejected" in fields:  # a preference file without a prompt column
        field, messages = "chosen", _split_implicit(fields["chosen"], fields["rejected"], where)[0]
    else:
        raise unknown_format(where, record, PROMPT_LAYOUTS)
    check_prompt(messages, where, field)
    columns = {key: value for key, value in fields.items() if key not in _PROMPT_SOURCES}
    return {"prompt": with_system(fields, messages, where), **columns}


def load_prompts(source: str, split: str | None = None, *, config: str | None = None,
                 on_bad_record: str = "error") -> list[Record]:
    """Prompts from a prompt file, or from a preference file (its responses are dropped, other fields kept)."""
    records = normalise_all(normalise_prompt_record, source, on_bad_record, read_located(source, split, config))
    _check_column_kinds(records)
    return records


def _kind_name(value: Any) -> str:
    return next((name for types, name in _VALUE_KINDS if isinstance(value, types)), _type_name(value))


def _value_kind(value: Any, where: str, column: str) -> str:
    """"number", "string", "boolean", "object", "list" (empty) or "list of <kind>s": lists differ by what they hold."""
    kind = _kind_name(value)
    if kind != "list" or not value:
        return kind
    items = sorted({_kind_name(item) for item in value if item is not None})
    if len(items) > 1:
        raise field_error(where, column, f"a list mixing {' and '.join(item + 's' for item in items)}; a dataset "
                          "column holds one kind of value (arrow could not store it)")
    return f"list of {items[0]}s" if items else kind


def _check_column_kinds(records: list[Record]) -> None:
    """Every extra column holds one kind of value in all records (a None, or a field left out, fits any): a dataset
    column has one type, and arrow would refuse mixed ones (4 then "Bob") only once the trainer builds its dataset."""
    seen: dict[str, tuple[str, str]] = {}  # column -> (kind, where the first record with that kind was read)
    for record in records:
        for column, value in record.items():
            if column == "prompt":
                continue
            kind = _value_kind(value, record.where, column)
            first_kind, first_where = seen.setdefault(column, (kind, record.where))
            if first_kind == "list" and kind.startswith("list"):  # an empty list fits any list; a full one says more
                seen[column] = (kind, record.where)
            elif kind != first_kind and not (kind == "list" and first_kind.startswith("list")):
                raise field_error(record.where, column, f"{_with_article(kind)}, but {first_where} has "
                                  f"{_with_article(first_kind)}; a column must hold one kind of value in every record "
                                  "(it becomes one dataset column: numbers, strings, booleans, lists or objects)")


def _with_article(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


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


def fit_records(records: list[Record] | None, tokenizer: Any, max_length: int | None, source: str, kind: str,
                policy: str, stage: str, why: str | None = None) -> list[Record] | None:
    """check_lengths for a stage's training or evaluation records (None: no records, None back), run whether or not
    max_length is set: it also refuses text already in chat-template form. The records the policy leaves out are
    counted and said (`why`: the reason given; the length_policy by default)."""
    if records is None:
        return None
    kept = check_lengths(records, tokenizer, max_length, source, kind, policy)
    if len(kept) < len(records):
        noun = {"preference": "pairs", "prompt": "prompts"}.get(KINDS[kind], "records")
        print(f"[rlhf] {stage}: {len(records) - len(kept)} of {len(records)} {noun} in {source} are longer than "
              f"max_length {max_length} tokens and are left out ({why or f'length_policy: {policy}'})", flush=True)
    return kept


# --------------------------------------------------------------------------- datasets


def prompt_text(messages: list[dict]) -> str:
    """The last user message: what a reader (or a gold reward) needs to know about the request."""
    return next((message["content"] for message in reversed(messages) if message.get("role") == "user"), "")


def to_dataset(records: list[dict]) -> datasets.Dataset:
    import datasets

    # Dataset.from_list takes its columns from the first record only, so give every record every key.
    columns = list(dict.fromkeys(key for record in records for key in record))
    rows = [{column: record.get(column) for column in columns} for record in records]
    return datasets.Dataset.from_list(rows)
