"""Tests for rlhf.data: reading, per-layout normalisation, validation errors and length checks."""

import json

import pytest

from rlhf.data import (
    DataError,
    Record,
    check_lengths,
    hh_rlhf_to_messages,
    load_preferences,
    load_prompts,
    load_sft,
    normalise_preference_record,
    normalise_prompt_record,
    normalise_sft_record,
    read_records,
    to_dataset,
)

W = "src line 1"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


# --------------------------------------------------------------------------- SFT


def test_sft_layouts():
    messages = [user("hi"), assistant("hello")]
    assert normalise_sft_record({"messages": messages}, W) == {"messages": messages}
    assert normalise_sft_record({"prompt": "hi", "completion": "hello"}, W) == {"messages": messages}
    assert normalise_sft_record({"prompt": [user("hi")], "completion": [assistant("hello")]}, W) == {
        "messages": messages
    }
    assert normalise_sft_record({"prompt": "hi", "completion": "hello", "system": "be nice"}, W) == {
        "messages": [system("be nice")] + messages
    }
    # Extra message keys are dropped; columnar None fields are ignored.
    record = {"messages": [dict(user("hi"), name="x"), assistant("hello")], "prompt": None}
    assert normalise_sft_record(record, W) == {"messages": messages}


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"text": "hi"}, r"src line 1: unknown format; expected one of: 'messages'; 'prompt' \+ 'completion'; "
                         r"found keys: \['text'\]"),
        ({"prompt": "hi"}, r"src line 1, field 'completion': missing required field"),
        ({"messages": "hi"}, r"field 'messages': expected a list of messages, got str"),
        ({"messages": []}, r"field 'messages': expected a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"field 'messages\[0\]': expected a message with 'role' and 'content'"),
        ({"messages": [user("hi"), {"role": "bot", "content": "x"}]},
         r"field 'messages\[1\]\.role': expected one of system, user, assistant, got 'bot'"),
        ({"messages": [user("hi"), {"role": "assistant", "content": 3}]},
         r"field 'messages\[1\]\.content': expected a string, got int"),
        ({"messages": [user("hi")]}, r"field 'messages': expected the conversation to end with an assistant turn"),
        ({"messages": [user("hi"), assistant("  ")]}, r"field 'messages': empty response"),
        ({"prompt": "hi", "completion": ""}, r"field 'completion': empty response"),
        ({"prompt": " ", "completion": "ok"}, r"field 'prompt': prompt is empty"),
        ({"prompt": "hi", "completion": 5}, r"field 'completion': expected a string or a list of messages, got int"),
        ({"messages": [system("a"), user("hi"), assistant("ok")], "system": "b"},
         r"field 'system': the conversation already starts with a system message"),
        ({"prompt": "hi", "completion": "ok", "system": 1}, r"field 'system': expected a string"),
    ],
)
def test_sft_errors(record, pattern):
    with pytest.raises(DataError, match=pattern):
        normalise_sft_record(record, W)


def test_load_sft_error_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}] * 2)
    with open(path, "a") as handle:
        handle.write("\n" + json.dumps({"messages": [user("a"), assistant("")]}) + "\n")
    with pytest.raises(DataError, match=r"sft\.jsonl line 4, field 'messages': empty response"):
        load_sft(path)


# --------------------------------------------------------------------------- preferences


def test_preference_explicit_strings_with_passthrough():
    record = {"prompt": "q", "chosen": "good", "rejected": "bad", "subset": "chat", "id": 3}
    assert normalise_preference_record(record, W) == {
        "prompt": [user("q")], "chosen": [assistant("good")], "rejected": [assistant("bad")], "subset": "chat",
    }
    record = {"prompt": "q", "chosen": "good", "rejected": "bad", "category": "math", "margin": 2}
    result = normalise_preference_record(record, W)
    assert result["subset"] == "math" and result["margin"] == 2.0 and isinstance(result["margin"], float)


def test_preference_explicit_messages_and_repeated_prompt():
    prompt = [system("s"), user("q")]
    record = {"prompt": prompt, "chosen": [assistant("good")], "rejected": [assistant("bad")]}
    assert normalise_preference_record(record, W) == {
        "prompt": prompt, "chosen": [assistant("good")], "rejected": [assistant("bad")],
    }
    # UltraFeedback-style: responses repeat the prompt turn, which is stripped.
    record = {"prompt": "q", "chosen": [user("q"), assistant("good")], "rejected": [user("q"), assistant("bad")]}
    assert normalise_preference_record(record, W) == {
        "prompt": [user("q")], "chosen": [assistant("good")], "rejected": [assistant("bad")],
    }


def test_preference_implicit_prompt():
    shared = [user("u1"), assistant("a1"), user("u2")]
    record = {"chosen": shared + [assistant("good")], "rejected": shared + [assistant("bad")]}
    assert normalise_preference_record(record, W) == {
        "prompt": shared, "chosen": [assistant("good")], "rejected": [assistant("bad")],
    }
    # Conversations that diverge at an earlier assistant turn keep the rest as the response.
    record = {"chosen": [user("u"), assistant("x"), user("more"), assistant("y")],
              "rejected": [user("u"), assistant("z")]}
    assert normalise_preference_record(record, W) == {
        "prompt": [user("u")],
        "chosen": [assistant("x"), user("more"), assistant("y")],
        "rejected": [assistant("z")],
    }


def test_hh_rlhf_text_to_messages():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me\nmore\n\nAssistant: answer"
    assert hh_rlhf_to_messages(text, W) == [
        user("hi"), assistant("hello"), user("tell me\nmore"), assistant("answer"),
    ]
    assert hh_rlhf_to_messages("Human: hi\n\nAssistant: yo", W) == [user("hi"), assistant("yo")]
    with pytest.raises(DataError, match=r"src line 1: expected an HH-RLHF transcript"):
        hh_rlhf_to_messages("hello\n\nAssistant: yo", W)


def test_preference_hh_rlhf_raw_layout(tmp_path):
    common = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more"
    record = {"chosen": common + "\n\nAssistant: good answer", "rejected": common + "\n\nAssistant: bad answer"}
    path = write_jsonl(tmp_path / "hh.jsonl", [record])
    assert load_preferences(path) == [{
        "prompt": [user("hi"), assistant("hello"), user("more")],
        "chosen": [assistant("good answer")],
        "rejected": [assistant("bad answer")],
    }]


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"text": "x"}, r"src line 1: unknown format; expected one of: 'prompt' \+ 'chosen' \+ 'rejected'.*"
                        r"HH-RLHF.*found keys: \['text'\]"),
        ({"prompt": "q", "chosen": "a"}, r"field 'rejected': missing required field"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"},
         r"field 'chosen': expected a string or a list of messages, got int"),
        ({"chosen": [system("s"), user("a"), assistant("x")], "rejected": [system("s"), user("b"), assistant("y")]},
         r"fields 'chosen' and 'rejected': the shared prompt prefix is not followed by an assistant turn"),
        ({"prompt": "q", "chosen": "a", "rejected": " "}, r"field 'rejected': empty response"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, r"field 'prompt': prompt is empty"),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, r"fields 'chosen' and 'rejected': identical"),
        ({"prompt": "q", "chosen": [user("x")], "rejected": "b"},
         r"field 'chosen': expected the conversation to end with an assistant turn, got 'user'"),
        ({"chosen": "a", "rejected": "b"}, r"field 'prompt': missing required field"),
        ({"chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("y")]},
         r"fields 'chosen' and 'rejected': no shared prompt prefix"),
        ({"chosen": [user("a"), assistant("x")], "rejected": [user("a"), assistant("x")]},
         r"fields 'chosen' and 'rejected': identical conversations"),
        ({"chosen": [user("a"), assistant("x")], "rejected": 4}, r"field 'rejected': expected a string or a list"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, r"field 'margin': expected a number"),
        ({"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same"},
         r"identical conversations"),
        ({"chosen": "\n\nHuman: hi\n\nAssistant: ok", "rejected": "\n\nHuman: hi\n\nAssistant:"},
         r"field 'rejected': empty response"),
    ],
)
def test_preference_errors(record, pattern):
    with pytest.raises(DataError, match=pattern):
        normalise_preference_record(record, W)


def test_load_preferences_error_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": 1, "rejected": "b"},
    ])
    with pytest.raises(DataError, match=r"prefs\.jsonl line 2, field 'chosen': expected a string or a list"):
        load_preferences(path)


# --------------------------------------------------------------------------- prompts


def test_prompt_layouts():
    assert normalise_prompt_record({"prompt": "q", "item": "lamp", "n": 2, "tags": ["x"]}, W) == {
        "prompt": [user("q")], "item": "lamp", "n": 2,
    }
    assert normalise_prompt_record({"prompt": [user("q"), assistant("ref")]}, W) == {"prompt": [user("q")]}
    messages = [system("s"), user("q"), assistant("a"), user("q2"), assistant("a2")]
    assert normalise_prompt_record({"messages": messages}, W) == {"prompt": messages[:-1]}
    assert normalise_prompt_record({"messages": [user("q")]}, W) == {"prompt": [user("q")]}


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"text": "q"}, r"src line 1: unknown format; expected one of: 'prompt'; 'messages'; "
                        r"found keys: \['text'\]"),
        ({"prompt": "   "}, r"field 'prompt': prompt is empty"),
        ({"messages": [assistant("a")]}, r"field 'messages': prompt is empty"),
        ({"prompt": 5}, r"field 'prompt': expected a string or a list of messages, got int"),
    ],
)
def test_prompt_errors(record, pattern):
    with pytest.raises(DataError, match=pattern):
        normalise_prompt_record(record, W)


def test_load_prompts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q1", "item": "a"}, {"prompt": "q2", "item": "b"}])
    assert load_prompts(path) == [{"prompt": [user("q1")], "item": "a"}, {"prompt": [user("q2")], "item": "b"}]


def test_to_dataset_keeps_keys_missing_from_first_record():
    dataset = to_dataset([{"a": 1}, {"a": 2, "b": "x"}])
    assert dataset.column_names == ["a", "b"]
    assert dataset[1] == {"a": 2, "b": "x"}


def test_margin_on_some_records_only_is_refused_naming_the_first_without(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q1", "chosen": "a", "rejected": "b", "margin": 1.5},
        {"prompt": "q2", "chosen": "a", "rejected": "b"},
        {"prompt": "q3", "chosen": "a", "rejected": "b"},
    ])
    pairs = load_preferences(path)
    with pytest.raises(DataError, match=rf"^{path} line 2: no 'margin', but 1 of the 3 records have one"):
        to_dataset(pairs)
    with pytest.raises(DataError, match=r"^record 1: no 'margin'"):  # plain dicts: named by position
        to_dataset([{"chosen": "a"}, {"chosen": "b", "margin": 0.5}])
    # All or none: the margin column reaches TRL's collator as numbers.
    assert to_dataset(pairs[1:]).column_names == ["prompt", "chosen", "rejected"]
    assert to_dataset([{**pair, "margin": 2.0} for pair in pairs])["margin"] == [2.0, 2.0, 2.0]


# --------------------------------------------------------------------------- lengths


@pytest.fixture
def tokenizer():
    """One token per whitespace-separated word; the template adds one token per role name."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "user": 1, "assistant": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    wrapped.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    return wrapped


def preference(prompt_words, chosen_words, rejected_words):
    return {"prompt": [user(" ".join(["w"] * prompt_words))],
            "chosen": [assistant(" ".join(["c"] * chosen_words))],
            "rejected": [assistant(" ".join(["r"] * rejected_words))]}


def test_check_lengths_error_policy(tokenizer):
    # prompt 3 words -> 4 tokens; prompt+rejected = 4 + 1 + 6 = 11 tokens.
    records = [preference(3, 2, 2), preference(3, 2, 6)]
    assert check_lengths(records, tokenizer, 11, "prefs.jsonl", "preference") == records
    with pytest.raises(DataError, match=r"prefs\.jsonl record 2, field 'rejected': 11 tokens, longer than "
                                        r"max_length 10; raise max_length or use policy 'truncate' or 'drop'"):
        check_lengths(records, tokenizer, 10, "prefs.jsonl", "preference")


def test_check_lengths_drop_policy(tokenizer):
    records = [preference(3, 2, 2), preference(3, 6, 2)]
    assert check_lengths(records, tokenizer, 10, "p", "preference", policy="drop") == records[:1]
    with pytest.raises(DataError, match=r"p: all 2 records are longer than max_length 5"):
        check_lengths(records, tokenizer, 5, "p", "preference", policy="drop")


def test_check_lengths_truncate_policy(tokenizer):
    records = [preference(3, 2, 2), preference(3, 20, 2)]
    assert check_lengths(records, tokenizer, 10, "p", "preference", policy="truncate") == records
    # Prompt rendered with the generation prompt: user + 3 words + assistant = 5 tokens.
    with pytest.raises(DataError, match=r"p record 1, field 'prompt': 5 tokens on its own, "
                                        r"not below max_length 5"):
        check_lengths(records, tokenizer, 5, "p", "preference", policy="truncate")


def test_check_lengths_sft_and_prompt_kinds(tokenizer):
    sft = [{"messages": [user("a b"), assistant("c d e")]}]  # 3 + 4 = 7 tokens
    assert check_lengths(sft, tokenizer, 7, "s", "sft") == sft
    with pytest.raises(DataError, match=r"s record 1, field 'messages': 7 tokens"):
        check_lengths(sft, tokenizer, 6, "s", "sft")
    prompts = [{"prompt": [user("a b")], "item": "x"}]  # 3 + generation prompt 1 = 4 tokens
    assert check_lengths(prompts, tokenizer, 4, "q", "prompt") == prompts
    with pytest.raises(DataError, match=r"q record 1, field 'prompt': 4 tokens"):
        check_lengths(prompts, tokenizer, 3, "q", "prompt")
    with pytest.raises(ValueError, match="policy"):
        check_lengths(prompts, tokenizer, 3, "q", "prompt", policy="shrink")


def test_check_lengths_names_the_line_a_loaded_record_came_from(tokenizer, tmp_path):
    # Blank lines shift line numbers away from record indexes: the error must name the line, like the loader's own.
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "w w w", "chosen": "c c", "rejected": "r r"}) + "\n\n\n"
                    + json.dumps({"prompt": "w w w", "chosen": "c c", "rejected": "r r r r r r"}) + "\n")
    pairs = load_preferences(str(path))
    assert [pair.where for pair in pairs] == [f"{path} line 1", f"{path} line 4"]
    with pytest.raises(DataError, match=r"prefs\.jsonl line 4, field 'rejected': 11 tokens, longer than max_length 10"):
        check_lengths(pairs, tokenizer, 10, str(path), "preference")
    with pytest.raises(DataError, match=r"prefs\.jsonl line 1, field 'prompt': 5 tokens on its own"):
        check_lengths(pairs, tokenizer, 5, str(path), "preference", policy="truncate")


def test_check_lengths_names_json_records_and_survives_slicing(tokenizer, tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "a b", "completion": "c d e"}]))
    records = load_sft(str(path))[1:]  # max_train_samples-style slicing keeps each record's origin
    with pytest.raises(DataError, match=r"sft\.json record 2, field 'messages': 7 tokens"):
        check_lengths(records, tokenizer, 6, str(path), "sft")


def test_loaded_records_compare_as_dicts_and_leave_where_out_of_datasets(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q1"}])
    (record,) = load_prompts(path)
    assert isinstance(record, Record) and record.where == f"{path} line 1"
    assert record == {"prompt": [user("q1")]}
    assert to_dataset([record]).column_names == ["prompt"]
