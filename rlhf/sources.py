"""Find and read raw records: local files, folders (hub snapshots, `save_to_disk` output) and hub datasets.

Every record comes back with where it was read (`Located`), so later checks name the same place:
"data.jsonl line 4", "data.json record 2", "snap/data/train-00000-of-00001.parquet record 7",
"org/name (test) record 9". A record that cannot be read at all (a line that is not JSON, not an object, text with a
lone surrogate) comes back as a DataError in its place, so the caller decides whether it stops the run or is skipped
(`on_bad_record`). A path may start with "~" (the home folder).

    file         .jsonl / .json / .parquet, read here (line and column in errors)
    folder       `Dataset.save_to_disk` / `DatasetDict.save_to_disk` output (datasets.load_from_disk), else data
                 files found by datasets' own rules (`{split}.jsonl`, `data/{split}-00000-of-00001.parquet`, a
                 README's `configs:`), as a hub snapshot lays them out; a split those rules make of several
                 datasets (sft_train.jsonl + prefs_train.jsonl) is refused
    other        a hub dataset name: datasets.load_dataset(name, config, split=split)
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet")
SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")  # written by DatasetDict / Dataset .save_to_disk

Located = list[tuple[str, Any]]  # (where, record or DataError); `where` labels the record in errors


class DataError(ValueError):
    """Bad input. Message names the source (file path or dataset name), the record (1-based line
    number for JSONL, 1-based index otherwise), the field, and what was expected."""


def type_name(value: Any) -> str:
    return type(value).__name__


def field_error(where: str, field: str, problem: str) -> DataError:
    return DataError(f"{where}, field '{field}': {problem}")


def read_records(source: str, split: str | None = None, config: str | None = None) -> list[dict]:
    """Raw records of a source (see the module docstring); the first unreadable record raises."""
    records = []
    for _, record in read_located(source, split, config):
        if isinstance(record, DataError):
            raise record
        records.append(record)
    return records


def read_located(source: str, split: str | None = None, config: str | None = None) -> Located:
    """(where, record) for every record; a record that is not a readable JSON object, or holds a lone surrogate, is a
    DataError in its place."""
    split = split or "train"
    source = os.path.expanduser(source)  # "~/data/x.jsonl": a shell would expand it; a recipe's value is not
    if os.path.isdir(source):
        located = _read_folder(source, split, config)
    elif os.path.isfile(source):
        located = _read_file(source, split)
    elif looks_like_path(source):
        raise DataError(f"{source}: file not found")
    else:
        located = _read_hub(source, split, config)
    if not located:
        raise DataError(f"{source}: no records found")
    return [(where, _lone_surrogate(record, where) or record if isinstance(record, (dict, DataError))
             else DataError(f"{where}: expected a JSON object, got {type_name(record)}"))
            for where, record in located]


_SURROGATE = re.compile("[\ud800-\udfff]")  # in a decoded string, only ever half of a pair: a lone surrogate


def _lone_surrogate(value: Any, where: str, field: str = "") -> DataError | None:
    """The error for the first string in a record that holds a lone UTF-16 surrogate (JSON's "\\ud83d" escape
    without its pair, e.g. an emoji cut in two): it is not a character, and no tokenizer can encode it."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return found and field_error(where, field, f"a lone UTF-16 surrogate U+{ord(found.group()):04X} at character "
                                     f"{found.start() + 1} (half of a character such as an emoji, e.g. a JSON "
                                     f"'\\u{ord(found.group()):04x}' escape without its pair), which no tokenizer can "
                                     "encode; fix or remove that text")
    if isinstance(value, dict):
        items = ((key, f"{field}.{key}" if field else str(key)) for key in value)
    elif isinstance(value, list):
        items = ((index, f"{field}[{index}]") for index in range(len(value)))
    else:
        return None
    return next((error for key, name in items if (error := _lone_surrogate(value[key], where, name))), None)


_FILE_EXTENSION = re.compile(r"\.[A-Za-z]{2,8}$")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as it is now: huggingface_hub reads it once, at import, and a recipe's env: section (or a test)
    may set it later."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def looks_like_path(source: str) -> bool:
    # Hub names look like "owner/name", so a single separator alone does not make a path, unless "owner" is a
    # local folder (data/missing is a typo'd path, not a dataset to fetch).
    return (source.startswith((".", os.sep, "~")) or source.count(os.sep) >= 2
            or bool(_FILE_EXTENSION.search(source)) or os.path.isdir(source.split(os.sep, 1)[0]) and os.sep in source)


# --------------------------------------------------------------------------- folders and the hub


def _read_folder(folder: str, split: str, config: str | None) -> Located:
    if any(os.path.isfile(os.path.join(folder, name)) for name in SAVED_DATASET_FILES):
        return _read_saved(folder, split)
    # A file named exactly after the split wins: datasets' own rules would gather every file whose name merely
    # contains it (sft_train.jsonl, prefs_train.jsonl, ... all into "train").
    for extension in SUPPORTED_EXTENSIONS:
        if os.path.isfile(exact := os.path.join(folder, split + extension)):
            return _read_file(exact, split)
    import datasets  # imported lazily: heavy, and only folders and hub names need it

    try:  # datasets' own rules for which files hold which split; nothing is read or cached yet
        builder = datasets.load_dataset_builder(folder, config)
    except Exception as error:
        raise DataError(f"{folder}: not a folder datasets.load_dataset can read ({error})") from error
    data_files = {str(name): list(files) for name, files in (builder.config.data_files or {}).items()}
    if split not in data_files:
        found = ", ".join(repr(name) for name in data_files) or "none"
        raise DataError(f"{folder}: no {split!r} split (looked for {split}.jsonl/.json/.parquet or "
                        f"data/{split}-*.parquet; splits found: {found})")
    files = data_files[split]
    _check_one_dataset(folder, split, files)
    if not all(os.path.splitext(path)[1].lower() in SUPPORTED_EXTENSIONS for path in files):
        return _from_dataset(datasets.load_dataset(folder, config, split=split), f"{folder} ({split})")
    # Read here rather than through datasets, so errors name the shard and its line.
    located: Located = []
    for path in files:
        located += _read_file(os.path.join(folder, os.path.relpath(path, os.path.abspath(folder))), split)
    return located


# What shard names add to a dataset's name: "-00000-of-00002", "_3", "1", "-00000-of-00001-5b6c5a5f4d2e8a4b".
_SHARD_SUFFIX = re.compile(r"[-_.]?\d+(?:-of-\d+)?(?:-[0-9a-f]{6,})?$")


def _check_one_dataset(folder: str, split: str, files: list[str]) -> None:
    """Refuse a split that datasets' rules made of several datasets: its patterns take every file whose name holds
    the split as a word, so "train" gathers sft_train.jsonl, prefs_train.jsonl and prompts_train.jsonl alike. Shards
    of one dataset (train-00000-of-00002, train-00001-of-00002; any files in a folder named after the split) are one,
    and so is whatever a README's `configs:` lists, which someone chose."""
    relative = sorted(os.path.relpath(path, os.path.abspath(folder)) for path in files)
    datasets_named = {_dataset_of(path, split) for path in relative}
    if len(datasets_named) < 2 or _declares_configs(folder):
        return
    listed = ", ".join(relative[:6]) + (", ..." if len(relative) > 6 else "")
    raise DataError(f"{folder}: the {split!r} split matches {len(relative)} files of {len(datasets_named)} different "
                    f"datasets ({listed}), which datasets' rules would read as one; name the file to read "
                    f"(e.g. {os.path.join(folder, relative[0])})")


def _dataset_of(path: str, split: str) -> str:
    """The dataset a data file belongs to: a folder named after the split, else the file's name without extension
    and shard numbering."""
    parts = path.split(os.sep)
    if split in parts[:-1]:
        return os.sep.join(parts[: parts.index(split) + 1])
    stem = os.path.splitext(path)[0]
    return _SHARD_SUFFIX.sub("", stem) or stem


def _declares_configs(folder: str) -> bool:
    from huggingface_hub.repocard import metadata_load

    readme = os.path.join(folder, "README.md")
    return os.path.isfile(readme) and "configs" in (metadata_load(readme) or {})


def _read_saved(folder: str, split: str) -> Located:
    import datasets

    try:
        saved = datasets.load_from_disk(folder)
    except Exception as error:
        raise DataError(f"{folder}: could not read the saved dataset ({error})") from error
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"{folder}: no {split!r} split in the saved DatasetDict; splits: "
                            f"{', '.join(repr(name) for name in saved)}")
        return _from_dataset(saved[split], f"{folder} ({split})")
    return _from_dataset(saved, folder)  # a single saved Dataset is used whatever the split asked for


def _read_hub(name: str, split: str, config: str | None) -> Located:
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:
        named = f"config {config!r}, " if config else ""
        raise DataError(f"{name}: not a local file or directory, and could not load it as a hub "
                        f"dataset ({named}split {split!r}): {error}") from error
    return _from_dataset(dataset, f"{name} ({split})")


def _from_dataset(dataset, label: str) -> Located:
    return [(f"{label} record {index}", dict(row)) for index, row in enumerate(dataset, start=1)]


# --------------------------------------------------------------------------- files


def _read_file(path: str, split: str) -> Located:
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


def _read_jsonl(path: str, split: str) -> Located:
    with _open_text(path) as handle:
        lines = handle.readlines()
    last = max((index for index, line in enumerate(lines) if line.strip()), default=-1)
    return [(f"{path} line {index + 1}", _jsonl_record(path, line, index + 1, index == last))
            for index, line in enumerate(lines) if line.strip()]


def _jsonl_record(path: str, line: str, line_number: int, last_line: bool) -> Any:
    """The record on one JSONL line, or the DataError that says why it is not one."""
    bad_byte = _BAD_BYTE.search(line)
    if bad_byte:
        return _not_utf8(path, line, bad_byte, line=line_number)
    line = line.rstrip("\r\n")  # else an unclosed string is reported as a control character at the newline
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        where = f"{path} line {line_number}"
        hint = ("truncated file?" if last_line
                else "is a record split across lines? JSONL needs each record complete on one line")
        return (_incomplete(line, error, where, True, hint)
                or DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})"))


def _read_json(path: str, split: str) -> Located:
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
        key = next((key for key in (split, "data") if isinstance(data.get(key), list)), None)
        if key is None:
            raise DataError(f"{path}: expected a list of records or an object with a "
                            f"{split!r} or 'data' list; found keys {sorted(data)}")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records, got {type_name(data)}")
    return [(f"{path} record {index}", record) for index, record in enumerate(data, start=1)]


def _read_parquet(path: str, split: str) -> Located:
    import pyarrow.parquet  # imported lazily: only parquet input needs it

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: could not read parquet ({error})") from error
    return [(f"{path} record {index}", row) for index, row in enumerate(rows, start=1)]
