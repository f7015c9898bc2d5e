"""What every record layout of rlhf.data shares: a normalised Record that remembers where it was read, the loop that
normalises a source's records (a bad one stops the load or is left out, by on_bad_record), and the checks of the
fields that the layouts have in common (messages, prompts, responses, a system message)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rlhf.config import ConfigError
from rlhf.sources import DataError, Located, field_error, type_name

ROLES = ("system", "user", "assistant")
ON_BAD_RECORD = ("error", "skip")
SKIP_REASONS_SHOWN = 3
NO_TOOL_CALLING = ("tool calling is not supported: no stage renders tool definitions, calls or results, so they would "
                   "silently be left out of training; leave such records out of the data")


class Record(dict):
    """A normalised record that remembers where it was read (`where`: "data.jsonl line 4", "data.json record 2"),
    so checks made after loading (check_lengths) name the same place as the loaders' own errors. It is a dict and
    compares equal to one; to_dataset writes plain rows, so `where` never reaches a dataset."""

    def __init__(self, fields: Mapping, where: str):
        super().__init__(fields)
        self.where = where


def normalise_all(normalise: Callable[[Any, str], dict], source: str, on_bad_record: str,
                  located: Located) -> list[Record]:
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


def present_fields(record: Any, where: str) -> dict:
    """The record's fields minus None values (columnar formats, parquet and the hub, fill absent fields with None).
    A `tools` field is refused: tool definitions would otherwise be dropped without a word."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type_name(record)}")
    fields = {key: value for key, value in record.items() if value is not None}
    if "tools" in fields:
        raise field_error(where, "tools", NO_TOOL_CALLING)
    return fields


def require_field(fields: dict, name: str, where: str) -> Any:
    if name not in fields:
        raise field_error(where, name, "missing required field")
    return fields[name]


def unknown_format(where: str, record: Mapping, layouts: tuple[str, ...]) -> DataError:
    return DataError(f"{where}: unknown format; expected one of: {'; '.join(layouts)}; "
                     f"found keys: {sorted(record) or 'none'}")


def parse_message(value: Any, where: str, field: str) -> dict:
    if not isinstance(value, Mapping) or "role" not in value or "content" not in value:
        found = sorted(value) if isinstance(value, Mapping) else type_name(value)
        raise field_error(where, field, f"expected a message with 'role' and 'content', got {found}")
    role, content = value["role"], value["content"]
    if role == "tool" or value.get("tool_calls"):  # only role and content are kept: the calls would vanish
        raise field_error(where, f"{field}.{'role' if role == 'tool' else 'tool_calls'}", NO_TOOL_CALLING)
    if role not in ROLES:
        raise field_error(where, f"{field}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise field_error(where, f"{field}.content", f"expected a string, got {type_name(content)}")
    return {"role": role, "content": content}


def parse_messages(value: Any, where: str, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise field_error(where, field, f"expected a list of messages, got {type_name(value)}")
    if not value:
        raise field_error(where, field, "expected a non-empty list of messages")
    return [parse_message(item, where, f"{field}[{index}]") for index, item in enumerate(value)]


def parse_text_or_messages(value: Any, where: str, field: str, role: str) -> list[dict]:
    """A plain string becomes a single message from `role`; a list must already be messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return parse_messages(value, where, field)
    raise field_error(where, field, f"expected a string or a list of messages, got {type_name(value)}")


def check_prompt(messages: list[dict], where: str, field: str = "prompt") -> None:
    if all(not message["content"].strip() for message in messages):
        raise field_error(where, field, "prompt is empty")


def check_response(messages: list[dict], where: str, field: str) -> None:
    """The final assistant turn is what gets trained or scored, so it must exist. It may be empty: saying nothing is
    an answer a rater can prefer or reject (HH-RLHF has such pairs)."""
    if not messages or messages[-1]["role"] != "assistant":
        last = repr(messages[-1]["role"]) if messages else "nothing"
        raise field_error(where, field, f"expected the conversation to end with an assistant turn, got {last}")


def number_field(fields: dict, name: str, where: str) -> float:
    value = require_field(fields, name, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise field_error(where, name, f"expected a number, got {type_name(value)}")
    return float(value)


def with_system(fields: dict, messages: list[dict], where: str) -> list[dict]:
    """The messages after the record's `system` field, as a first system message (the messages, without one)."""
    if "system" not in fields:
        return messages
    system = fields["system"]
    if not isinstance(system, str):
        raise field_error(where, "system", f"expected a string, got {type_name(system)}")
    if messages[0]["role"] == "system":  # two system turns break most chat templates
        raise field_error(where, "system", "the conversation already starts with a system message")
    return [{"role": "system", "content": system}] + messages
