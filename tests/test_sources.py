"""Tests for rlhf.sources: files with line-exact errors, folders (hub snapshots, save_to_disk output), hub names."""

import json

import pytest

from rlhf.data import load_preferences, load_prompts
from rlhf.sources import DataError, read_located, read_records


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


PAIRS = [{"prompt": f"q{index}", "chosen": f"good {index}", "rejected": f"bad {index}"} for index in range(5)]


def pair(index):
    return {"prompt": [user(f"q{index}")], "chosen": [assistant(f"good {index}")],
            "rejected": [assistant(f"bad {index}")]}


# --------------------------------------------------------------------------- files


def test_jsonl_skips_blank_lines_and_counts_them(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n')
    assert read_records(str(path)) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(DataError, match=r"x\.jsonl line 3: not valid JSON"):
        read_records(str(path))


def test_jsonl_record_must_be_object(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"x\.jsonl line 2: expected a JSON object, got list"):
        read_records(str(path))


def test_json_list_and_keyed_object(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2}]))
    assert read_records(str(path)) == [{"a": 1}, {"a": 2}]
    path.write_text(json.dumps({"data": [{"a": 3}]}))
    assert read_records(str(path)) == [{"a": 3}]
    path.write_text(json.dumps({"train": [{"a": 4}], "test": [{"a": 5}]}))
    assert read_records(str(path)) == [{"a": 4}]
    assert read_records(str(path), split="test") == [{"a": 5}]
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match=r"x\.json: expected a list of records.*'rows'"):
        read_records(str(path))
    path.write_text('[{"a": 1},\n {"a": }]')
    with pytest.raises(DataError, match=r"x\.json line 2: not valid JSON"):
        read_records(str(path))
    path.write_text(json.dumps([{"a": 1}, 7]))
    with pytest.raises(DataError, match=r"x\.json record 2: expected a JSON object, got int"):
        read_records(str(path))


def test_jsonl_not_utf8_names_file_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl line 3: not valid UTF-8 \(byte 0xe9 at column 16\); "
                                        r"the file must be UTF-8 encoded"):
        read_records(str(path))


def test_json_not_utf8_line_from_byte_offset(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[\n  {"prompt": "naïve"},\n  {"prompt": "caf'.encode() + b'\xe9"}\n]')
    with pytest.raises(DataError, match=r"latin1\.json line 3: not valid UTF-8 \(byte 0xe9 at column 18\)"):
        read_records(str(path))


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"a": "\xc3\xa9"}\n')
    assert read_records(str(path)) == [{"a": 1}, {"a": "é"}]


@pytest.mark.parametrize(
    ("last_line", "pattern"),
    [
        ('{"prompt": "abc', r"cut\.jsonl line 3: not valid JSON: the line ends after column 15, before the record "
                            r"is complete; the string opened at column 12 is never closed \(truncated file\?\)"),
        ('{"prompt": "abc"\n', r"cut\.jsonl line 3: not valid JSON: the line ends after column 16, before the "
                               r"record is complete \(truncated file\?\)"),
        ('{"prompt": ["a", \r\n', r"cut\.jsonl line 3: not valid JSON: the line ends after column 16, before"),
    ],
)
def test_jsonl_cut_off_last_line_points_at_its_end(tmp_path, last_line, pattern):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n' + last_line + "\n\n", newline="")
    with pytest.raises(DataError, match=pattern):
        read_records(str(path))


def test_jsonl_record_split_across_lines_is_not_called_truncation(tmp_path):
    path = tmp_path / "split.jsonl"
    path.write_text('{"prompt": "a",\n "completion": "b"}\n')
    with pytest.raises(DataError, match=r"split\.jsonl line 1: not valid JSON: the line ends after column 15, "
                                        r"before the record is complete \(is a record split across lines\?"):
        read_records(str(path))
    path.write_text('{"prompt": "a"} x\n')  # an error inside the line keeps the decoder's own column
    with pytest.raises(DataError, match=r"split\.jsonl line 1: not valid JSON \(Extra data at column 17\)"):
        read_records(str(path))


def test_json_cut_off_file_points_at_its_end(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[{"prompt": "a"},\n {"prompt": "b"')
    with pytest.raises(DataError, match=r"cut\.json: not valid JSON: the file ends after line 2 column 15, before "
                                        r"the JSON is complete \(truncated file\?\)"):
        read_records(str(path))
    path.write_text("  \n")
    with pytest.raises(DataError, match=r"cut\.json: no records found \(the file is empty\)"):
        read_records(str(path))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    table = pa.Table.from_pylist([
        {"prompt": "hi", "chosen": "good", "rejected": "bad", "subset": "chat"},
        {"prompt": "yo", "chosen": "fine", "rejected": "poor", "subset": None},
    ])
    pq.write_table(table, str(path))
    assert read_records(str(path))[0] == {"prompt": "hi", "chosen": "good", "rejected": "bad", "subset": "chat"}
    # The None that parquet fills in for an absent field is treated as absent.
    assert load_preferences(str(path)) == [
        {"prompt": [user("hi")], "chosen": [assistant("good")], "rejected": [assistant("bad")], "subset": "chat"},
        {"prompt": [user("yo")], "chosen": [assistant("fine")], "rejected": [assistant("poor")]},
    ]


def test_directory_with_split_file(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "q"}])
    assert load_prompts(str(tmp_path), split="test") == [{"prompt": [user("q")]}]
    with pytest.raises(DataError, match=rf"^{tmp_path}: no 'train' split \(looked for train\.jsonl/\.json/\.parquet "
                                        r"or data/train-\*\.parquet; splits found: 'test'\)"):
        read_records(str(tmp_path))


def test_missing_file_unknown_extension_and_empty(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"file not found"):
        read_records("data/missing.json")
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unsupported file type '\.csv'; "
                                        r"supported: \.jsonl, \.json, \.parquet"):
        read_records(str(csv))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        read_records(str(empty))


# --------------------------------------------------------------------------- folders and the hub


def test_unreadable_records_come_back_in_place_for_the_caller_to_judge(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": \n[2]\n{"a": 3}\n')
    located = read_located(str(path))
    assert [where for where, _ in located] == [f"{path} line {line}" for line in (1, 2, 3, 4)]
    assert located[0][1] == {"a": 1} and located[3][1] == {"a": 3}
    assert isinstance(located[1][1], DataError) and "line 2: not valid JSON" in str(located[1][1])
    assert str(located[2][1]) == f"{path} line 3: expected a JSON object, got list"


def test_hub_snapshot_folder_of_parquet_shards(tmp_path):
    datasets = pytest.importorskip("datasets")
    snapshot = tmp_path / "snap"
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n# A preference set\n")
    datasets.Dataset.from_list(PAIRS[:3]).to_parquet(str(snapshot / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(PAIRS[3:]).to_parquet(str(snapshot / "data" / "test-00000-of-00001.parquet"))
    assert load_preferences(str(snapshot)) == [pair(0), pair(1), pair(2)]
    pairs = load_preferences(str(snapshot), split="test")
    assert pairs == [pair(3), pair(4)]
    # Errors name the shard and the record in it.
    assert pairs[1].where == f"{snapshot}/data/test-00000-of-00001.parquet record 2"
    with pytest.raises(DataError, match=rf"^{snapshot}: no 'validation' split .*splits found: 'train', 'test'"):
        load_preferences(str(snapshot), split="validation")


def test_hub_snapshot_folder_of_jsonl_shards_keeps_shard_order_and_lines(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "snap"
    write_jsonl(folder / "data" / "train-00000-of-00002.jsonl", PAIRS[:2])
    write_jsonl(folder / "data" / "train-00001-of-00002.jsonl", [PAIRS[2], {**PAIRS[3], "chosen": 7}])
    with pytest.raises(DataError, match=r"data/train-00001-of-00002\.jsonl line 2, field 'chosen': expected a string"):
        load_preferences(str(folder))
    write_jsonl(folder / "data" / "train-00001-of-00002.jsonl", PAIRS[2:4])
    assert load_preferences(str(folder)) == [pair(0), pair(1), pair(2), pair(3)]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_list(PAIRS[:2]).save_to_disk(str(single))
    # One saved Dataset has no splits: it is read whatever split is asked for (eval_split defaults to 'test').
    assert load_preferences(str(single)) == load_preferences(str(single), split="test") == [pair(0), pair(1)]
    assert load_preferences(str(single))[1].where == f"{single} record 2"

    several = tmp_path / "several"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS[:3]),
                          "test": datasets.Dataset.from_list(PAIRS[3:])}).save_to_disk(str(several))
    assert load_preferences(str(several)) == [pair(0), pair(1), pair(2)]
    test_pairs = load_preferences(str(several), split="test")
    assert test_pairs == [pair(3), pair(4)] and test_pairs[0].where == f"{several} (test) record 1"
    with pytest.raises(DataError, match=rf"^{several}: no 'validation' split in the saved DatasetDict; "
                                        r"splits: 'train', 'test'"):
        load_preferences(str(several), split="validation")


def test_hub_name_passes_config_and_split_to_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(PAIRS[:2])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs = load_preferences("org/prefs", "test", config="helpful-base")
    assert calls == [("org/prefs", "helpful-base", "test")]
    assert pairs == [pair(0), pair(1)] and pairs[1].where == "org/prefs (test) record 2"
    prompts = load_prompts("org/prefs")
    assert calls[-1] == ("org/prefs", None, "train") and prompts[0] == {"prompt": [user("q0")]}

    def failing_load_dataset(name, config=None, split=None):
        raise ValueError("Config name is missing")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(DataError, match=r"^org/prefs: not a local file or directory, and could not load it as a hub "
                                        r"dataset \(config 'x', split 'train'\): Config name is missing"):
        load_preferences("org/prefs", config="x")


def test_file_named_after_the_split_wins_over_names_that_contain_it(tmp_path):
    # datasets' rules would put sft_train.jsonl and prefs_train.jsonl together into "train".
    (tmp_path / "sft_train.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    (tmp_path / "prefs_train.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n' * 3)
    (tmp_path / "train.jsonl").write_text('{"prompt": "q"}\n' * 2)
    assert len(read_records(str(tmp_path), "sft_train")) == 1
    assert len(read_records(str(tmp_path), "prefs_train")) == 3
    assert [record["prompt"] for record in read_records(str(tmp_path), "train")] == ["q", "q"]


def test_a_split_that_gathers_several_datasets_is_refused(tmp_path):
    # What datasets' rules make of data/tiny: every file whose name holds "train", three datasets read as one.
    for name in ("sft_train", "prefs_train", "prompts_train"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": f"{name} q"}])
    with pytest.raises(DataError, match=rf"^{tmp_path}: the 'train' split matches 3 files of 3 different datasets "
                                        r"\(prefs_train\.jsonl, prompts_train\.jsonl, sft_train\.jsonl\), which "
                                        rf"datasets' rules would read as one; name the file to read \(e\.g\. "
                                        rf"{tmp_path}/prefs_train\.jsonl\)"):
        load_prompts(str(tmp_path))
    # Shards of one dataset, and any files in a folder named after the split, are one dataset.
    shards = tmp_path / "shards"
    write_jsonl(shards / "data" / "train-00000-of-00002-5b6c5a5f.jsonl", PAIRS[:2])
    write_jsonl(shards / "data" / "train-00001-of-00002-0a9d3c1e.jsonl", PAIRS[2:3])
    assert load_preferences(str(shards)) == [pair(0), pair(1), pair(2)]
    parts = tmp_path / "parts"
    write_jsonl(parts / "train" / "first.jsonl", PAIRS[:1])
    write_jsonl(parts / "train" / "second.jsonl", PAIRS[1:2])
    assert load_preferences(str(parts)) == [pair(0), pair(1)]
    numbered = tmp_path / "numbered"
    write_jsonl(numbered / "part1.jsonl", PAIRS[:1])
    write_jsonl(numbered / "part2.jsonl", PAIRS[1:2])
    assert load_preferences(str(numbered)) == [pair(0), pair(1)]


def test_a_readme_that_lists_a_splits_files_is_followed(tmp_path):
    pytest.importorskip("datasets")
    write_jsonl(tmp_path / "helpful.jsonl", PAIRS[:2])
    write_jsonl(tmp_path / "harmless.jsonl", PAIRS[2:3])
    with pytest.raises(DataError, match=r"the 'train' split matches 2 files of 2 different datasets"):
        load_preferences(str(tmp_path))  # every file of a folder without split names is "train"
    (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                        "    path: [helpful.jsonl, harmless.jsonl]\n---\n")
    assert len(load_preferences(str(tmp_path))) == 3


def test_home_folder_in_a_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "data" / "p.jsonl", [{"prompt": "q"}])
    (record,) = load_prompts("~/data/p.jsonl")
    assert record == {"prompt": [user("q")]} and record.where == f"{tmp_path}/data/p.jsonl line 1"


def test_a_lone_surrogate_is_named_by_record_and_field_as_the_file_loads(tmp_path):
    path = tmp_path / "s.jsonl"
    # "\ud83d\ude00" is one character (an emoji); "\ud83d" alone is half of one, which no tokenizer can encode.
    path.write_text('{"prompt": "fine \\ud83d\\ude00", "completion": "ok"}\n'
                    '{"messages": [{"role": "user", "content": "hi \\ud83d there"}]}\n')
    located = read_located(str(path))
    assert located[0][1] == {"prompt": "fine \U0001F600", "completion": "ok"}
    assert str(located[1][1]) == (f"{path} line 2, field 'messages[0].content': a lone UTF-16 surrogate U+D83D at "
                                  "character 4 (half of a character such as an emoji, e.g. a JSON '\\ud83d' escape "
                                  "without its pair), which no tokenizer can encode; fix or remove that text")
    with pytest.raises(DataError, match=r"line 2, field 'messages\[0\]\.content': a lone UTF-16 surrogate"):
        load_prompts(str(path))
    assert len(load_prompts(str(path), on_bad_record="skip")) == 1  # a bad record like any other
