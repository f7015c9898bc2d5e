"""Load, normalise and validate datasets for every stage (SFT, reward model, DPO, PPO, evaluation).

Each loader reads raw records, converts every record to one canonical conversational
layout and validates it, so bad data raises DataError before anything trains:

    SFT:          {"messages": [{"role", "content"}, ...]}      (ends with an assistant turn)
    preferences:  {"prompt": [...], "chosen": [...], "rejected": [...]}  (+ "margin", "subset")
    prompts:      {"prompt": [...]}                               (+ extra scalar fields)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

ROLES = ("system", "user", "assistant")
SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet")
LENGTH_POLICIES = ("error", "drop", "truncate")

SFT_LAYOUTS = ("'messages'", "'prompt' + 'completion'")
PREFERENCE_LAYOUTS = (
    "'prompt' + 'chosen' + 'rejected' (explicit prompt)",
    "'chosen' + 'rejected' conversations sharing a prompt prefix (implicit prompt)",
    "'chosen' + 'rejected' HH-RLHF 'Human:/Assistant:' transcripts",
)
PROMPT_LAYOUTS = ("'prompt'", "'messages'")

Located = list[tuple[str, dict]]  # (where, record) pairs; `where` labels the record in errors


class DataError(ValueError):
    """Bad input. Message names the source (file path or dataset name), the record (1-based line
    number for JSONL, 1-based index otherwise), the field, and what was expected."""


class Record(dict):
    """A normalised record that remembers where it was read (`where`: "data.jsonl line 4", "data.json record 2"),
    so checks made after loading (check_lengths) name the same place as the loaders' own errors. It is a dict and
    compares equal to one; to_dataset writes plain rows, so `where` never reaches a dataset."""

    def __init__(self, fields: Mapping, where: str):
        super().__init__(fields)
        self.where = where


def _load(normalise, source: str, split: str | None) -> list[Record]:
    return [Record(normalise(record, where), where) for where, record in _read_located(source, split)]


def _fail(where: str, field: str, problem: str) -> DataError:
    return DataError(f"{where}, field '{field}': {problem}")


def _type_name(value: Any) -> str:
    return type(value).__name__


# --------------------------------------------------------------------------- reading


def read_records(source: str, split: str | None = None) -> list[dict]:
    """Read raw records from a local .jsonl/.json/.parquet file, a directory holding
    `{split}.jsonl` (or .json/.parquet), or else a hub dataset name."""
    return [record for _, record in _read_located(source, split)]


def _read_located(source: str, split: str | None) -> Located:
    if os.path.isdir(source):
        located = _read_file(_split_file(source, split), split)
    elif os.path.isfile(source):
        located = _read_file(source, split)
    elif _looks_like_path(source):
        raise DataError(f"{source}: file not found")
    else:
        located = _read_hub(source, split or "train")
    if not located:
        raise DataError(f"{source}: no records found")
    for where, record in located:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {_type_name(record)}")
    return located


_FILE_EXTENSION = re.compile(r"\.[A-Za-z]{2,8}$")


def _looks_like_path(source: str) -> bool:
    # Hub names look like "owner/name", so a single separator alone does not make a path, unless "owner" is a
    # local folder (data/missing is a typo'd path, not a dataset to fetch).
    return (source.startswith((".", os.sep, "~")) or source.count(os.sep) >= 2
            or bool(_FILE_EXTENSION.search(source)) or os.path.isdir(source.split(os.sep, 1)[0]) and os.sep in source)


def _split_file(directory: str, split: str | None) -> str:
    split = split or "train"
    for extension in SUPPORTED_EXTENSIONS:
        path = os.path.join(directory, split + extension)
        if os.path.isfile(path):
            return path
    expected = os.path.join(directory, f"{split}.jsonl")
    raise DataError(f"{expected}: file not found (no {split}.jsonl/.json/.parquet in {directory})")


def _read_file(path: str, split: str | None) -> Located:
    extension = os.path.splitext(path)[1].lower()
    if extension not in SUPPORTED_EXTENSIONS:
        supported = ", ".join(SUPPORTED_EXTENSIONS)
        raise DataError(f"{path}: unsupported file type {extension!r}; supported: {supported}")
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}[extension]
    return reader(path, split)


# Files are opened with errors="surrogateescape": every byte that is not valid UTF-8 becomes one lone surrogate
# U+DC80..U+DCFF (which valid UTF-8 never decodes to), so a bad byte can be reported by line and column.
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def _open_text(path: str):
    # utf-8-sig: a byte-order mark some editors write at the start of a file is skipped, not a JSON error.
    return open(path, encoding="utf-8-sig", errors="surrogateescape")


def _line_and_column(text: str, index: int) -> tuple[int, int]:
    """1-based line and column (in characters) of text[index]."""
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _not_utf8(path: str, text: str, match: re.Match, line: int | None = None) -> DataError:
    """`text` is the whole file, or (with `line` given) the one line of a JSONL file that holds the bad byte."""
    line_in_text, column = _line_and_column(text, match.start())
    byte = ord(match.group()) - 0xDC00
    return DataError(f"{path} line {line or line_in_text}: not valid UTF-8 (byte 0x{byte:02x} at column {column}); "
                     "the file must be UTF-8 encoded (convert it, e.g. iconv -f <its encoding> -t UTF-8)")


def _incomplete(text: str, error: json.JSONDecodeError, place: str, one_line: bool, hint: str) -> DataError | None:
    """The message for JSON text that ends before its value is complete (a cut-off line or file), or None if it goes
    wrong part-way through: then the decoder's own position is right. `place` names the text ("data.jsonl line 4");
    `one_line`: the text is one JSONL line, so positions are columns within it."""
    content = text.rstrip()
    unterminated = error.msg.startswith("Unterminated string")
    if error.pos < len(content) and not unterminated:
        return None

    def position(line: int, column: int) -> str:
        return f"column {column}" if one_line else f"line {line} column {column}"

    last = position(*_line_and_column(content, len(content) - 1))  # the last character that is there
    detail = f"; the string opened at {position(error.lineno, error.colno)} is never closed" if unterminated else ""
    ends = (f"the line ends after {last}, before the record" if one_line
            else f"the file ends after {last}, before the JSON")
    return DataError(f"{place}: not valid JSON: {ends} is complete{detail} ({hint})")


def _read_jsonl(path: str, split: str | None) -> Located:
    located = []
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            bad_byte = _BAD_BYTE.search(line)
            if bad_byte:
                raise _not_utf8(path, line, bad_byte, line=line_number)
            line = line.rstrip("\r\n")  # else an unclosed string is reported as a control character at the newline
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                last_line = not any(rest.strip() for rest in handle)
                hint = ("truncated file?" if last_line
                        else "is a record split across lines? JSONL needs each record complete on one line")
                raise (_incomplete(line, error, where, True, hint)
                       or DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})")) from None
            located.append((where, record))
    return located


def _read_json(path: str, split: str | None) -> Located:
    with _open_text(path) as handle:
        text = handle.read()
    if not text.strip():
        raise DataError(f"{path}: no records found (the file is empty)")
    bad_byte = _BAD_BYTE.search(text)
    if bad_byte:
        raise _not_utf8(path, text, bad_byte)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"{path} line {error.lineno}"
        raise (_incomplete(text, error, path, False, "truncated file?")
               or DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})")) from None
    if isinstance(data, dict):  # records under the split's key or 'data'
        key = next((key for key in (split or "train", "data") if isinstance(data.get(key), list)), None)
        if key is None:
            raise DataError(f"{path}: expected a list of records or an object with a "
                            f"{split or 'train'!r} or 'data' list; found keys {sorted(data)}")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records, got {_type_name(data)}")
    return [(f"{path} record {index}", record) for index, record in enumerate(data, start=1)]


def _read_parquet(path: str, split: str | None) -> Located:
    import pyarrow.parquet  # imported lazily: only parquet input needs it

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: could not read parquet ({error})") from error
    return [(f"{path} record {index}", row) for index, row in enumerate(rows, start=1)]


def _read_hub(name: str, split: str) -> Located:
    import datasets  # imported lazily: heavy, and only hub input needs it

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:
        raise DataError(f"{name}: not a local file or directory, and could not load it as a hub "
                        f"dataset (split {split!r}): {error}") from error
    return [(f"{name} ({split}) record {index}", dict(row)) for index, row in enumerate(dataset, start=1)]


# --------------------------------------------------------------------------- shared checks


def _present_fields(record: Any, where: str) -> dict:
    """The record's fields minus None values: columnar formats (parquet, hub) fill absent fields with None."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(record)}")
    return {key: value for key, value in record.items() if value is not None}


def _require(fields: dict, name: str, where: str) -> Any:
    if name not in fields:
        raise _fail(where, name, "missing required field")
    return fields[name]


def _unknown_format(where: str, record: Mapping, layouts: tuple[str, ...]) -> DataError:
    return DataError(f"{where}: unknown format; expected one of: {'; '.join(layouts)}; "
                     f"found keys: {sorted(record) or 'none'}")


def _message(value: Any, where: str, field: str) -> dict:
    if not isinstance(value, Mapping) or "role" not in value or "content" not in value:
        found = sorted(value) if isinstance(value, Mapping) else _type_name(value)
        raise _fail(where, field, f"expected a message with 'role' and 'content', got {found}")
    role, content = value["role"], value["content"]
    if role not in ROLES:
        raise _fail(where, f"{field}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise _fail(where, f"{field}.content", f"expected a string, got {_type_name(content)}")
    return {"role": role, "content": content}


def _messages(value: Any, where: str, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise _fail(where, field, f"expected a list of messages, got {_type_name(value)}")
    if not value:
        raise _fail(where, field, "expected a non-empty list of messages")
    return [_message(item, where, f"{field}[{index}]") for index, item in enumerate(value)]


def _text_or_messages(value: Any, where: str, field: str, role: str) -> list[dict]:
    """A plain string becomes a single message from `role`; a list must already be messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _messages(value, where, field)
    raise _fail(where, field, f"expected a string or a list of messages, got {_type_name(value)}")


def _check_prompt(messages: list[dict], where: str, field: str = "prompt") -> None:
    if all(not message["content"].strip() for message in messages):
        raise _fail(where, field, "prompt is empty")


def _check_response(messages: list[dict], where: str, field: str) -> None:
    """The final assistant turn is what gets trained or scored, so it must exist and say something."""
    if not messages or messages[-1]["role"] != "assistant":
        last = repr(messages[-1]["role"]) if messages else "nothing"
        raise _fail(where, field, f"expected the conversation to end with an assistant turn, got {last}")
    if not messages[-1]["content"].strip():
        raise _fail(where, field, "empty response: the final assistant message has no content")


# --------------------------------------------------------------------------- SFT


def normalise_sft_record(record: Any, where: str) -> dict:
    fields = _present_fields(record, where)
    if "messages" in fields:
        field, messages = "messages", _messages(fields["messages"], where, "messages")
    elif "prompt" in fields or "completion" in fields:
        prompt = _text_or_messages(_require(fields, "prompt", where), where, "prompt", "user")
        completion = _text_or_messages(_require(fields, "completion", where), where, "completion", "assistant")
        _check_prompt(prompt, where)
        field, messages = "completion", prompt + completion
    else:
        raise _unknown_format(where, record, SFT_LAYOUTS)
    if "system" in fields:
        messages = _with_system(fields["system"], messages, where)
    _check_response(messages, where, field)
    return {"messages": messages}


def _with_system(system: Any, messages: list[dict], where: str) -> list[dict]:
    if not isinstance(system, str):
        raise _fail(where, "system", f"expected a string, got {_type_name(system)}")
    if messages[0]["role"] == "system":  # two system turns break most chat templates
        raise _fail(where, "system", "the conversation already starts with a system message")
    return [{"role": "system", "content": system}] + messages


def load_sft(source: str, split: str | None = None) -> list[Record]:
    return _load(normalise_sft_record, source, split)


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


def normalise_preference_record(record: Any, where: str) -> dict:
    fields = _present_fields(record, where)
    if not {"prompt", "chosen", "rejected"} & fields.keys():
        raise _unknown_format(where, record, PREFERENCE_LAYOUTS)
    chosen, rejected = _require(fields, "chosen", where), _require(fields, "rejected", where)
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
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **_preference_extras(fields, where)}


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
        raise _fail(where, "prompt", "missing required field (needed when 'chosen'/'rejected' are plain "
                    "strings rather than conversations or HH-RLHF 'Human:/Assistant:' transcripts)")
    if not isinstance(value, list):
        raise _fail(where, field, f"expected a string or a list of messages, got {_type_name(value)}")
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


def _preference_extras(fields: dict, where: str) -> dict:
    extras = {}
    if "margin" in fields:
        margin = fields["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise _fail(where, "margin", f"expected a number, got {_type_name(margin)}")
        extras["margin"] = float(margin)
    subset_field = next((name for name in ("subset", "category") if name in fields), None)
    if subset_field:
        subset = fields[subset_field]
        if not isinstance(subset, str):
            raise _fail(where, subset_field, f"expected a string, got {_type_name(subset)}")
        extras["subset"] = subset
    return extras


def load_preferences(source: str, split: str | None = None) -> list[Record]:
    return _load(normalise_preference_record, source, split)


# --------------------------------------------------------------------------- prompts

_SCALARS = (str, int, float, bool)


def normalise_prompt_record(record: Any, where: str) -> dict:
    fields = _present_fields(record, where)
    if "prompt" in fields:
        field, messages = "prompt", _text_or_messages(fields["prompt"], where, "prompt", "user")
    elif "messages" in fields:
        field, messages = "messages", _messages(fields["messages"], where, "messages")
    else:
        raise _unknown_format(where, record, PROMPT_LAYOUTS)
    # A trailing assistant turn is a reference answer, not part of what the policy is asked.
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    _check_prompt(messages, where, field)
    extras = {key: value for key, value in fields.items()
              if key not in ("prompt", "messages") and isinstance(value, _SCALARS)}
    return {"prompt": messages, **extras}


def load_prompts(source: str, split: str | None = None) -> list[Record]:
    return _load(normalise_prompt_record, source, split)


# --------------------------------------------------------------------------- lengths and datasets

_KINDS = {"sft": "sft", "preference": "preference", "preferences": "preference",
          "prompt": "prompt", "prompts": "prompt"}


def _token_count(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> int:
    tokens = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    # transformers 5 returns a BatchEncoding here; older versions a plain list of ids.
    if isinstance(tokens, Mapping):
        tokens = tokens["input_ids"]
    return len(tokens)


def _sequences(record: dict, kind: str) -> tuple[list[dict], list[tuple[str, list[dict], bool]]]:
    """(prompt part, [(field, messages to render, add_generation_prompt)]) for one normalised record."""
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
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"policy must be one of {', '.join(LENGTH_POLICIES)}, got {policy!r}")
    kind = _KINDS[kind]
    kept = []
    for index, record in enumerate(records, start=1):
        where = getattr(record, "where", None) or f"{source} record {index}"
        prompt, sequences = _sequences(record, kind)
        if policy == "truncate":
            length = _token_count(tokenizer, prompt, add_generation_prompt=True) if prompt else 0
            if length >= max_length:
                raise _fail(where, "prompt", f"{length} tokens on its own, not below max_length "
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
            raise _fail(where, field, f"{length} tokens, longer than max_length {max_length}; "
                        "raise max_length or use policy 'truncate' or 'drop'")
    if records and not kept:
        raise DataError(f"{source}: all {len(records)} records are longer than max_length "
                        f"{max_length}; nothing left (raise max_length)")
    return kept


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
