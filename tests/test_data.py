"""Tests for rlhf.data: per-layout normalisation, validation errors, bad records, and length checks."""

import json

import pytest

from rlhf.config import ConfigError, DataArgs
from rlhf.data import (
    BEST_OF_N,
    PAIRS,
    DataError,
    Record,
    check_lengths,
    hh_rlhf_to_messages,
    load_eval,
    load_preferences,
    load_prompts,
    load_rm_eval,
    load_sft,
    load_train,
    normalise_best_of_n_record,
    normalise_preference_record,
    normalise_prompt_record,
    normalise_sft_record,
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
    # prompt + completion stays TRL's prompt-completion layout (TRL trains on the completion only).
    prompt_completion = {"prompt": [user("hi")], "completion": [assistant("hello")]}
    assert normalise_sft_record({"prompt": "hi", "completion": "hello"}, W) == prompt_completion
    assert normalise_sft_record(prompt_completion, W) == prompt_completion
    assert normalise_sft_record({"prompt": "hi", "completion": "hello", "system": "be nice"}, W) == {
        "prompt": [system("be nice"), user("hi")], "completion": [assistant("hello")]
    }
    # Extra message keys are dropped; columnar None fields are ignored.
    record = {"messages": [dict(user("hi"), name="x"), assistant("hello")], "prompt": None}
    assert normalise_sft_record(record, W) == {"messages": messages}


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"txt": "hi"}, r"src line 1: unknown format; expected one of: 'messages'; 'prompt' \+ 'completion'; "
                        r"'text' \(plain text\); found keys: \['txt'\]"),
        ({"text": 3}, r"src line 1, field 'text': expected a string, got int"),
        ({"text": " \n"}, r"src line 1, field 'text': empty text"),
        ({"text": "hi", "system": "s"}, r"field 'system': a plain-text record has no conversation"),
        ({"prompt": "hi"}, r"src line 1, field 'completion': missing required field"),
        ({"messages": "hi"}, r"field 'messages': expected a list of messages, got str"),
        ({"messages": []}, r"field 'messages': expected a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"field 'messages\[0\]': expected a message with 'role' and 'content'"),
        ({"messages": [user("hi"), {"role": "bot", "content": "x"}]},
         r"field 'messages\[1\]\.role': expected one of system, user, assistant, got 'bot'"),
        ({"messages": [user("hi"), {"role": "assistant", "content": 3}]},
         r"field 'messages\[1\]\.content': expected a string, got int"),
        ({"messages": [user("hi")]}, r"field 'messages': expected the conversation to end with an assistant turn"),
        ({"prompt": " ", "completion": "ok"}, r"field 'prompt': prompt is empty"),
        ({"prompt": "hi", "completion": 5}, r"field 'completion': expected a string or a list of messages, got int"),
        ({"messages": [system("a"), user("hi"), assistant("ok")], "system": "b"},
         r"field 'system': the conversation already starts with a system message"),
        ({"prompt": "hi", "completion": "ok", "system": 1}, r"field 'system': expected a string"),
        # Tool calling: only role and content are kept, so calls and definitions would vanish without a word.
        ({"messages": [user("weather?"), {**assistant(""), "tool_calls": [{"type": "function"}]}]},
         r"^src line 1, field 'messages\[1\]\.tool_calls': tool calling is not supported"),
        ({"messages": [user("weather?"), assistant("sunny")], "tools": [{"type": "function"}]},
         r"^src line 1, field 'tools': tool calling is not supported"),
        ({"messages": [user("w?"), assistant("x"), {"role": "tool", "content": "20C"}, assistant("20C")]},
         r"field 'messages\[2\]\.role': tool calling is not supported"),
    ],
)
def test_sft_errors(record, pattern):
    with pytest.raises(DataError, match=pattern):
        normalise_sft_record(record, W)


def test_load_sft_error_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}] * 2)
    with open(path, "a") as handle:
        handle.write("\n" + json.dumps({"messages": [user("a")]}) + "\n")
    with pytest.raises(DataError, match=r"sft\.jsonl line 4, field 'messages': expected the conversation to end"):
        load_sft(path)


def test_sft_plain_text_and_mixed_layouts_refused(tmp_path):
    assert normalise_sft_record({"text": "The kettle is great.", "id": 1}, W) == {"text": "The kettle is great."}
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "one"}, {"text": "two"}])
    assert load_sft(path) == [{"text": "one"}, {"text": "two"}]
    assert to_dataset(load_sft(path)).column_names == ["text"]
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "one"}, {"messages": [user("q"), assistant("a")]}])
    with pytest.raises(DataError, match=r"mixed\.jsonl line 2: a conversation, but the first record is plain text; "
                                        r"SFT data must be all 'messages' conversations, all 'prompt' \+ 'completion' "
                                        r"or all plain 'text'"):
        load_sft(path)
    path = write_jsonl(tmp_path / "mixed2.jsonl", [{"prompt": "q", "completion": "a"},
                                                   {"messages": [user("q"), assistant("a")]}])
    with pytest.raises(DataError, match=r"mixed2\.jsonl line 2: a conversation, but the first record is prompt \+ "
                                        r"completion"):
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


def test_preference_system_joins_the_prompt():
    record = {"system": "You are a pirate.", "prompt": "hi", "chosen": "arr", "rejected": "hello"}
    assert normalise_preference_record(record, W)["prompt"] == [system("You are a pirate."), user("hi")]
    record = {"system": "s", "chosen": [user("u"), assistant("x")], "rejected": [user("u"), assistant("y")]}
    assert normalise_preference_record(record, W) == {
        "prompt": [system("s"), user("u")], "chosen": [assistant("x")], "rejected": [assistant("y")]}
    with pytest.raises(DataError, match=r"field 'system': the conversation already starts with a system message"):
        normalise_preference_record({**record, "chosen": [system("t"), *record["chosen"]],
                                     "rejected": [system("t"), *record["rejected"]]}, W)


def test_preference_hh_rlhf_explicit_prompt_is_parsed():
    record = {"prompt": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: more\n\nAssistant:", "chosen": " hello",
              "rejected": " go away"}
    expected = {"prompt": [user("hi"), assistant("yo"), user("more")], "chosen": [assistant("hello")],
                "rejected": [assistant("go away")]}
    assert normalise_preference_record(record, W) == expected
    # Responses given as whole transcripts lose the prompt they repeat.
    whole = {"prompt": record["prompt"], "chosen": record["prompt"] + " hello",
             "rejected": record["prompt"] + " go away"}
    assert normalise_preference_record(whole, W) == expected


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
        ({"prompt": "q", "chosen": ["a", "b"], "rejected": ["c"]},
         r"fields 'chosen' and 'rejected': lists of responses \(the best-of-N layout of RewardBench 2\), which only "
         r"eval-rm scores"),
        ({"prompt": "q", "chosen": "", "rejected": ""}, r"fields 'chosen' and 'rejected': identical"),
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
        ({"prompt": "q", "chosen": "a"}, r"field 'rejected': missing required field"),
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
    # Every other field is kept for reward functions, lists and objects included; `system` joins the prompt.
    record = {"prompt": "q", "item": "lamp", "n": 2, "tags": ["x"], "meta": {"k": 1}, "system": "be brief"}
    assert normalise_prompt_record(record, W) == {
        "prompt": [system("be brief"), user("q")], "item": "lamp", "n": 2, "tags": ["x"], "meta": {"k": 1},
    }
    messages = [system("s"), user("q"), assistant("a"), user("q2"), assistant("a2")]
    assert normalise_prompt_record({"messages": messages}, W) == {"prompt": messages[:-1]}  # the reference answer
    assert normalise_prompt_record({"messages": [user("q")]}, W) == {"prompt": [user("q")]}
    # An HH-RLHF prompt is its turns; its closing empty "Assistant:" only says who speaks next.
    assert normalise_prompt_record({"prompt": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: more\n\nAssistant:"},
                                   W) == {"prompt": [user("hi"), assistant("yo"), user("more")]}
    assert normalise_prompt_record({"prompt": [user("q"), assistant("")]}, W) == {"prompt": [user("q")]}


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"text": "q"}, r"src line 1: unknown format; expected one of: 'prompt'; 'messages'; 'chosen' \+ "
                        r"'rejected' conversations \(the prompt they share\); found keys: \['text'\]"),
        ({"chosen": [user("q"), assistant("a")]}, r"unknown format; .*found keys: \['chosen'\]"),
        ({"prompt": "   "}, r"field 'prompt': prompt is empty"),
        ({"messages": [assistant("a")]}, r"field 'messages': prompt is empty"),
        ({"prompt": 5}, r"field 'prompt': expected a string or a list of messages, got int"),
        # A prefill would have been cut off, changing what the policy is asked.
        ({"prompt": [user("Write JSON"), assistant("{")]},
         r"field 'prompt': ends with an assistant turn \(a prefill for the response to continue\), which the "
         r"online stages do not support"),
        ({"prompt": "q", "system": ["s"]}, r"field 'system': expected a string, got list"),
        ({"prompt": "q", "tools": [{"type": "function"}]}, r"field 'tools': tool calling is not supported"),
    ],
)
def test_prompt_errors(record, pattern):
    with pytest.raises(DataError, match=pattern):
        normalise_prompt_record(record, W)


def test_load_prompts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q1", "item": "a"}, {"prompt": "q2", "item": "b"}])
    assert load_prompts(path) == [{"prompt": [user("q1")], "item": "a"}, {"prompt": [user("q2")], "item": "b"}]


def test_prompt_columns_hold_one_kind_of_value_naming_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": 4}, {"prompt": "3/2?", "answer": 1.5},
                                              {"prompt": "x?"}, {"prompt": "name?", "answer": "Bob"}])
    # Arrow would refuse the column only when the trainer builds its dataset, after the model has loaded.
    with pytest.raises(DataError, match=rf"^{path} line 4, field 'answer': a string, but {path} line 1 has a "
                                        r"number; a column must hold one kind of value in every record"):
        load_prompts(path)
    path = write_jsonl(tmp_path / "lists.jsonl", [{"prompt": "a", "tests": []}, {"prompt": "b", "tests": ["x"]},
                                                  {"prompt": "c", "tests": [1]}])
    with pytest.raises(DataError, match=rf"line 3, field 'tests': a list of numbers, but {path} line 2 has a list "
                                        r"of strings"):
        load_prompts(path)
    path = write_jsonl(tmp_path / "mixed_list.jsonl", [{"prompt": "a", "tests": [1, "x"]}])
    with pytest.raises(DataError, match=r"line 1, field 'tests': a list mixing numbers and strings"):
        load_prompts(path)
    # What does fit one column loads, and becomes one dataset column.
    path = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "n": 1, "tests": [], "meta": {"k": 1}, "flag": True},
                                               {"prompt": "b", "n": 2.5, "tests": ["x"], "meta": {"j": "v"}}])
    dataset = to_dataset(load_prompts(path))
    assert dataset["n"] == [1.0, 2.5] and dataset["tests"] == [[], ["x"]] and dataset["flag"] == [True, None]


def test_prompts_from_a_preference_file_drop_the_responses(tmp_path):
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more"
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad", "id": 4, "score_chosen": 8.0},
        {"chosen": [user("u"), assistant("x")], "rejected": [user("u"), assistant("y")], "subset": "chat"},
        {"chosen": hh + "\n\nAssistant: good", "rejected": hh + "\n\nAssistant: bad"},
    ])
    assert load_prompts(path) == [
        {"prompt": [user("q")], "id": 4, "score_chosen": 8.0},
        {"prompt": [user("u")], "subset": "chat"},
        {"prompt": [user("hi"), assistant("hello"), user("more")]},
    ]


# --------------------------------------------------------------------------- empty responses, scores, best-of-N


def test_an_empty_response_is_valid_but_an_empty_prompt_or_missing_field_is_not(tmp_path):
    assert normalise_sft_record({"prompt": "hi", "completion": ""}, W) == {"prompt": [user("hi")],
                                                                          "completion": [assistant("")]}
    assert normalise_preference_record({"prompt": "q", "chosen": "", "rejected": "bad"}, W) == {
        "prompt": [user("q")], "chosen": [assistant("")], "rejected": [assistant("bad")]}
    common = "\n\nHuman: hi"
    record = {"chosen": common + "\n\nAssistant:", "rejected": common + "\n\nAssistant: no"}
    assert normalise_preference_record(record, W)["chosen"] == [assistant("")]
    # HH-RLHF-like: 4 of 50 chosen replies are empty; the set loads whole.
    rows = [{"chosen": common + f"\n\nAssistant: yes {i}", "rejected": common + f"\n\nAssistant: no {i}"}
            for i in range(50)]
    for index in (3, 17, 18, 40):
        rows[index]["chosen"] = common + "\n\nAssistant: "
    pairs = load_preferences(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert len(pairs) == 50 and sum(pair["chosen"] == [assistant("")] for pair in pairs) == 4
    with pytest.raises(DataError, match=r"field 'prompt': prompt is empty"):
        normalise_preference_record({"prompt": " ", "chosen": "", "rejected": "b"}, W)
    with pytest.raises(DataError, match=r"field 'completion': missing required field"):
        normalise_sft_record({"prompt": "hi"}, W)


def test_margin_from_scores(tmp_path, capsys):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 8.5, "score_rejected": 3},
            {"prompt": "q2", "chosen": "a", "rejected": "b", "score_chosen": 5, "score_rejected": 5}]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    pairs = load_preferences(path, margin_from_scores=True)
    assert [pair["margin"] for pair in pairs] == [5.5, 0.0]
    assert to_dataset(pairs)["margin"] == [5.5, 0.0]
    assert "ignored" not in capsys.readouterr().out
    # Not asked: the scores are left out, and the load says so (once) and how to use them.
    assert all("margin" not in pair for pair in load_preferences(path))
    out = capsys.readouterr().out
    assert out.count("are ignored") == 1
    assert f"{path}: 'score_chosen'/'score_rejected' are ignored; set margin_from_scores: true" in out
    with pytest.raises(DataError, match=r"src line 1, field 'score_rejected': missing required field"):
        normalise_preference_record({**rows[0], "score_rejected": None}, W, margin_from_scores=True)
    with pytest.raises(DataError, match=r"field 'score_chosen': expected a number, got str"):
        normalise_preference_record({**rows[0], "score_chosen": "8"}, W, margin_from_scores=True)
    with pytest.raises(DataError, match=r"field 'margin': given as well as margin_from_scores"):
        normalise_preference_record({**rows[0], "margin": 1}, W, margin_from_scores=True)


BEST_OF_N_ROWS = [
    {"id": "1", "prompt": "q", "chosen": ["right"], "rejected": ["w1", "w2", ""], "subset": "Math",
     "num_correct": 1, "num_incorrect": 3},
    {"id": "2", "prompt": "t", "chosen": ["a", [assistant("b")]], "rejected": ["c"], "subset": "Ties"},
]


def test_best_of_n_records_and_the_layout_eval_rm_reads(tmp_path):
    assert normalise_best_of_n_record(BEST_OF_N_ROWS[0], W) == {
        "prompt": [user("q")], "chosen": [[assistant("right")]],
        "rejected": [[assistant("w1")], [assistant("w2")], [assistant("")]], "subset": "Math"}
    assert normalise_best_of_n_record(BEST_OF_N_ROWS[1], W)["chosen"] == [[assistant("a")], [assistant("b")]]
    with pytest.raises(DataError, match=r"field 'rejected': expected a non-empty list of responses"):
        normalise_best_of_n_record({**BEST_OF_N_ROWS[0], "rejected": []}, W)
    with pytest.raises(DataError, match=r"field 'chosen\[0\]': expected the conversation to end with an assistant"):
        normalise_best_of_n_record({**BEST_OF_N_ROWS[0], "chosen": [[user("x")]]}, W)
    layout, records = load_rm_eval(write_jsonl(tmp_path / "rb2.jsonl", BEST_OF_N_ROWS))
    assert layout == BEST_OF_N and [len(record["rejected"]) for record in records] == [3, 1]
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    layout, pairs = load_rm_eval(pairs_file)
    assert layout == PAIRS and pairs == [{"prompt": [user("q")], "chosen": [assistant("a")],
                                          "rejected": [assistant("b")]}]


# --------------------------------------------------------------------------- bad records


def write_with_bad_records(tmp_path):
    """Five lines: 2 (not JSON), 4 (empty prompt) and 5 (identical responses) are malformed."""
    path = tmp_path / "prefs.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    path.write_text("\n".join([good, '{"prompt": "q", ', good,
                               json.dumps({"prompt": " ", "chosen": "a", "rejected": "b"}),
                               json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"})]) + "\n")
    return str(path)


def test_on_bad_record_error_stops_at_the_first(tmp_path):
    path = write_with_bad_records(tmp_path)
    with pytest.raises(DataError, match=rf"^{path} line 2: not valid JSON"):
        load_preferences(path)
    with pytest.raises(ConfigError, match=r"on_bad_record: expected one of error, skip, got 'drop'"):
        load_preferences(path, on_bad_record="drop")


def test_on_bad_record_skip_counts_and_names_the_first_reasons(tmp_path, capsys):
    path = write_with_bad_records(tmp_path)
    pairs = load_preferences(path, on_bad_record="skip")
    assert [pair.where for pair in pairs] == [f"{path} line 1", f"{path} line 3"]
    out = capsys.readouterr().out
    assert out.startswith(f"[rlhf] skipped 3 of 5 records in {path} (on_bad_record: skip); first: line 2: not valid "
                          "JSON")
    assert "; line 4, field 'prompt': prompt is empty; line 5, fields 'chosen' and 'rejected': identical" in out
    assert len(load_prompts(path, on_bad_record="skip")) == 3  # line 5 is a fine prompt
    (tmp_path / "prefs.jsonl").write_text('{"prompt": " "}\n[1]\n')
    with pytest.raises(DataError, match=rf"^{path}: all 2 records are malformed, nothing is left; first: line 1, "
                                        r"field 'prompt': prompt is empty; line 2: expected a JSON object"):
        load_prompts(path, on_bad_record="skip")


def test_load_train_and_eval_follow_data_args(tmp_path, capsys):
    train = write_with_bad_records(tmp_path)
    scored = write_jsonl(tmp_path / "uf.jsonl", [
        {"prompt": f"q{i}", "chosen": "a", "rejected": "b", "score_chosen": 3 + i, "score_rejected": 1}
        for i in range(3)])
    args = DataArgs(train_data=train, eval_data=scored, on_bad_record="skip", margin_from_scores=True,
                    max_eval_samples=2)
    with pytest.raises(DataError, match=r"line 1, field 'score_chosen': missing required field"):
        load_train(args, "preference")  # no scores in the training file: every record is malformed
    assert [pair["margin"] for pair in load_eval(args, "preference")] == [2.0, 3.0]
    assert len(load_train(args, "prompt")) == 3 and "skipped 2 of 5" in capsys.readouterr().out
    assert load_eval(DataArgs(train_data=train), "sft") is None


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
    # Refused as the file loads, not once the model has (to_dataset builds the trainer's dataset).
    with pytest.raises(DataError, match=rf"^{path} line 2: no 'margin', but 1 of the 3 records have one"):
        load_preferences(path)
    # All or none: the margin column reaches TRL's collator as numbers.
    path = write_jsonl(tmp_path / "all.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b", "margin": 2}
                                                for i in range(3)])
    assert to_dataset(load_preferences(path))["margin"] == [2.0, 2.0, 2.0]


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


def test_check_lengths_plain_text(tokenizer):
    records = [{"text": "a b c"}, {"text": "a b c d e"}]  # no EOS in this tokenizer: one token per word
    assert check_lengths(records, tokenizer, 4, "t", "sft", policy="drop") == records[:1]
    with pytest.raises(DataError, match=r"t record 2, field 'text': 5 tokens, longer than max_length 4"):
        check_lengths(records, tokenizer, 4, "t", "sft")
    assert check_lengths(records, tokenizer, 4, "t", "sft", policy="truncate") == records


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
    with pytest.raises(DataError, match=r"sft\.json record 2, field 'completion': 7 tokens"):
        check_lengths(records, tokenizer, 6, str(path), "sft")


def test_loaded_records_compare_as_dicts_and_leave_where_out_of_datasets(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q1"}])
    (record,) = load_prompts(path)
    assert isinstance(record, Record) and record.where == f"{path} line 1"
    assert record == {"prompt": [user("q1")]}
    assert to_dataset([record]).column_names == ["prompt"]


# --------------------------------------------------------------------------- text in chat-template form


@pytest.fixture(scope="module")
def chatml_tokenizer():
    """The tiny model's tokenizer: its chat template writes <|im_start|> and <|im_end|> (special tokens)."""
    from transformers import AutoTokenizer

    from conftest import TINY_BASE

    return AutoTokenizer.from_pretrained(TINY_BASE)


TEMPLATED = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("policy", ["error", "drop", "truncate"])
def test_text_already_in_chat_template_form_is_refused_under_every_policy(chatml_tokenizer, tmp_path, policy):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "hi", "completion": "yo"},
                                               {"prompt": TEMPLATED, "completion": "hello<|im_end|>"}])
    records = load_sft(path)
    for max_length in (None, 512):  # the check does not wait for a max_length
        with pytest.raises(DataError, match=rf"^{path} line 2, field 'prompt': the user message holds "
                                            r"'<\|im_start\|>', a special token of the tokenizer's chat template, so "
                                            r"it looks formatted with a chat template already; the stages apply the "
                                            r"chat template themselves, so give plain text or a list of messages"):
            check_lengths(records, chatml_tokenizer, max_length, path, "sft", policy)


def test_chat_template_text_is_looked_for_in_every_kind_of_record(chatml_tokenizer):
    pair = normalise_preference_record({"prompt": "q", "chosen": "fine", "rejected": "bad<|im_end|>"}, W)
    with pytest.raises(DataError, match=r"^p record 1, field 'rejected': the assistant message holds '<\|im_end\|>'"):
        check_lengths([pair], chatml_tokenizer, None, "p", "preference")
    conversation = normalise_sft_record({"messages": [system(TEMPLATED), user("q"), assistant("a")]}, W)
    with pytest.raises(DataError, match=r"field 'messages': the system message holds '<\|im_start\|>'"):
        check_lengths([conversation], chatml_tokenizer, None, "s", "sft")
    prompt = normalise_prompt_record({"prompt": TEMPLATED}, W)
    with pytest.raises(DataError, match=r"field 'prompt': the user message holds '<\|im_start\|>'"):
        check_lengths([prompt], chatml_tokenizer, 64, "q", "prompt", "drop")
    # Plain text is tokenised as it is (formatted on purpose); special tokens the template never writes may be quoted.
    fine = [{"text": TEMPLATED + "hello<|im_end|>"}, {"messages": [user("what is <|endoftext|>?"), assistant("EOS")]}]
    assert check_lengths(fine, chatml_tokenizer, None, "t", "sft") == fine
    columns = [normalise_prompt_record({"prompt": "q", "completion": TEMPLATED}, W)]  # a column, not a message
    assert check_lengths(columns, chatml_tokenizer, None, "q", "prompt") == columns


def test_fit_records_says_what_the_policy_left_out(tokenizer, capsys):
    from rlhf.data import fit_records

    records = [preference(3, 2, 2), preference(3, 6, 2)]
    assert fit_records(records, tokenizer, 10, "eval.jsonl", "preference", "drop", "dpo") == records[:1]
    assert capsys.readouterr().out == ("[rlhf] dpo: 1 of 2 pairs in eval.jsonl are longer than max_length 10 tokens "
                                       "and are left out (length_policy: drop)\n")
    assert fit_records(None, tokenizer, 10, "eval.jsonl", "preference", "drop", "dpo") is None  # no eval_data
    assert fit_records(records, tokenizer, None, "t.jsonl", "preference", "error", "dpo") == records  # no max_length
