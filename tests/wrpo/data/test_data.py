"""Reading, validating and tokenizing preference data (wrpo.data.preference)."""

from __future__ import annotations

import json
import re

import datasets
import pytest

from wrpo.data.preference import (
    DataError,
    PreferenceExample,
    load_preference_data,
    tokenize_example,
)
from wrpo.train.tiny import build_tiny_tokenizer

USER = {"role": "user", "content": "What is 2 + 3?"}
WS, WT, WL = "2 + 3 = 5. The answer is 5.", "5", "6"


def assistant(text):
    return {"role": "assistant", "content": text}


GOOD = {"prompt": USER, "chosen": [assistant(WS), assistant(WT)], "rejected": [assistant(WL)]}
EXPECTED = PreferenceExample(prompt=(USER,), chosen=(WS, WT), rejected=(WL,))


def write_jsonl(path, rows):
    """One row per line; a str row is written verbatim (for broken JSON)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def error_at(path, where):
    """The start of a DataError message as a regex."""
    return rf"^{re.escape(str(path))} {where}: "


# ---- accepted forms ----------------------------------------------------------------------------------------

SAME_ROW_FORMS = {
    "released-dict-prompt": GOOD,
    "string-prompt-and-responses": {"prompt": USER["content"], "chosen": [WS, WT], "rejected": [WL]},
    "message-list-prompt": {
        "prompt": [USER],
        "chosen": [[USER, assistant(WS)], [assistant(WT)]],
        "rejected": assistant(WL),
    },
    "flat": {"prompt": USER["content"], "source_chosen": WS, "target_chosen": WT, "rejected": WL},
    "flat-lists": {"prompt": [USER], "source_chosen": [WS], "target_chosen": assistant(WT), "rejected": [WL]},
    "extra-keys-ignored": {**GOOD, "score_chosen": [1.0, 2.0], "id": 7},
}


@pytest.mark.parametrize("form", SAME_ROW_FORMS)
def test_prompt_and_response_forms_parse_to_the_same_example(tmp_path, form):
    path = write_jsonl(tmp_path / "d.jsonl", [SAME_ROW_FORMS[form]])
    assert load_preference_data(path) == [EXPECTED]


def test_multi_turn_prompt_keeps_all_messages(tmp_path):
    prompt = [
        {"role": "system", "content": "Be brief."},
        USER,
        assistant("5"),
        {"role": "user", "content": "And 3 + 3?"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{**GOOD, "prompt": prompt}])
    assert load_preference_data(path)[0].prompt == tuple(prompt)


def test_blank_lines_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["", GOOD, "   ", GOOD, ""])
    assert load_preference_data(path, num_chosen=2) == [EXPECTED, EXPECTED]


def test_dpo_pairs_have_one_chosen(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}])
    [ex] = load_preference_data(path, num_chosen=1)
    assert (ex.chosen, ex.rejected) == (("Hello.",), ("No.",))


def test_json_list_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, SAME_ROW_FORMS["flat"]], indent=2))
    assert load_preference_data(path) == [EXPECTED, EXPECTED]


def test_json_suffix_holding_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [GOOD, GOOD])
    assert load_preference_data(path) == [EXPECTED, EXPECTED]


def test_saved_datasets_directory(tmp_path):
    datasets.Dataset.from_list([GOOD] * 3).save_to_disk(str(tmp_path / "ds"))
    assert load_preference_data(tmp_path / "ds") == [EXPECTED] * 3
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "dd"))
    assert load_preference_data(tmp_path / "dd") == [EXPECTED]


# ---- malformed rows ----------------------------------------------------------------------------------------

BAD_ROWS = {
    "broken-json": ('{"prompt": "x", "chosen": [', "invalid JSON"),
    "not-an-object": ([GOOD], "expected a JSON object, got a list"),
    "string-row": ('"just text"', "expected a JSON object, got a string"),
    "missing-prompt": ({"chosen": [WS, WT], "rejected": [WL]}, "missing key 'prompt'"),
    "missing-chosen": ({"prompt": "x", "rejected": [WL]}, "missing key 'chosen'"),
    "missing-rejected": ({"prompt": "x", "chosen": [WS, WT]}, "missing key 'rejected'"),
    "flat-missing-target": (
        {"prompt": "x", "source_chosen": WS, "rejected": WL},
        "missing key 'target_chosen'",
    ),
    "flat-missing-rejected": (
        {"prompt": "x", "source_chosen": WS, "target_chosen": WT},
        "missing key 'rejected'",
    ),
    "empty-chosen": ({**GOOD, "chosen": []}, "chosen is an empty list"),
    "empty-rejected": ({**GOOD, "rejected": []}, "rejected is an empty list"),
    "number-response": ({**GOOD, "chosen": [WS, 5]}, r"chosen\[1\]: expected text .*got a number"),
    "null-response": ({**GOOD, "rejected": [None]}, r"rejected\[0\]: expected text .*got null"),
    "null-content": (
        {**GOOD, "chosen": [WS, assistant(None)]},
        r"chosen\[1\]\.content: expected text, got null",
    ),
    "dict-content": ({**GOOD, "rejected": [assistant({"t": 1})]}, "expected text, got an object"),
    "number-prompt": ({**GOOD, "prompt": 42}, "prompt: expected a string, a message or a list"),
    "null-prompt": ({**GOOD, "prompt": None}, "prompt: expected .* got null"),
    "number-prompt-content": (
        {**GOOD, "prompt": {"role": "user", "content": 3}},
        "prompt.content: expected text",
    ),
    "empty-prompt": ({**GOOD, "prompt": ""}, "prompt is an empty string"),
    "blank-prompt-message": ({**GOOD, "prompt": [{"role": "user", "content": " "}]}, "is an empty string"),
    "empty-response": ({**GOOD, "chosen": [WS, ""]}, r"chosen\[1\] is an empty string"),
    "empty-response-message": ({**GOOD, "rejected": [assistant("")]}, "content is an empty string"),
    "empty-prompt-list": ({**GOOD, "prompt": []}, "prompt has no user message"),
    "no-user-message": ({**GOOD, "prompt": [{"role": "system", "content": "Hi."}]}, "no user message"),
    "prompt-ends-with-assistant": (
        {**GOOD, "prompt": [USER, assistant("5")]},
        "must end with a user message",
    ),
    "message-without-role": ({**GOOD, "prompt": {"content": "x"}}, "message without 'role'"),
    "user-as-response": ({**GOOD, "chosen": [WS, USER]}, "expected an assistant message, got role 'user'"),
    "list-without-assistant": ({**GOOD, "rejected": [[USER]]}, "no assistant message"),
    "fewer-chosen": ({**GOOD, "chosen": [WT]}, "1 chosen and 1 rejected responses, but line 1 has 2 and 1"),
    "more-rejected": ({**GOOD, "rejected": [WL, WL]}, "2 chosen and 2 rejected responses"),
    "string-chosen": (
        {**GOOD, "chosen": WS},
        r"'chosen' is a string, but a list of responses was expected \(line 1 has 2 chosen\); the "
        r'expected layout: \{"prompt": \.\.\., "chosen": \[response, response\], "rejected": \[response\]\}',
    ),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_malformed_row_names_path_and_line(tmp_path, case):
    bad, what = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", GOOD, GOOD, GOOD, bad, GOOD])  # line 2 blank
    with pytest.raises(DataError, match=error_at(path, "line 6")) as info:
        load_preference_data(path)
    assert re.search(what, str(info.value)), str(info.value)


def test_single_response_on_the_first_line_is_the_one_reported(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{**GOOD, "rejected": WL, "chosen": WT}, GOOD])
    with pytest.raises(DataError, match=error_at(path, "line 1") + "'chosen' is a string, but a list"):
        load_preference_data(path)


def test_flat_source_given_alone_where_a_list_was_expected(tmp_path):
    three = {"prompt": "x", "source_chosen": [WS, WS], "target_chosen": WT, "rejected": WL}
    path = write_jsonl(tmp_path / "d.jsonl", [three, {**three, "source_chosen": assistant(WS)}])
    with pytest.raises(
        DataError, match=error_at(path, "line 2") + "'source_chosen' is an object, but a list"
    ) as e:
        load_preference_data(path)
    assert '"source_chosen": [response, response], "target_chosen": response' in str(e.value)


def test_first_bad_row_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, "chosen": []}, "{broken", {"prompt": 1}])
    with pytest.raises(DataError, match=error_at(path, "line 2")):
        load_preference_data(path)


def test_num_chosen_is_enforced_from_the_first_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD])
    with pytest.raises(
        DataError, match=error_at(path, "line 1") + "2 chosen responses, expected num_chosen=3"
    ):
        load_preference_data(path, num_chosen=3)
    with pytest.raises(ValueError, match="num_chosen must be >= 1"):
        load_preference_data(path, num_chosen=0)


def test_json_list_errors_name_the_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, GOOD, {**GOOD, "rejected": []}]))
    with pytest.raises(DataError, match=error_at(path, "row 3") + "rejected is an empty list"):
        load_preference_data(path)
    path.write_text('[\n{"prompt": "x",\n"chosen": ]')
    with pytest.raises(DataError, match=error_at(path, "line 3") + "invalid JSON"):
        load_preference_data(path)


def test_datasets_directory_errors_name_the_row(tmp_path):
    rows = [GOOD] * 5 + [{**GOOD, "chosen": [assistant(WS), assistant("")]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(
        DataError, match=error_at(tmp_path / "ds", "row 6") + r"chosen\[1\]\.content is an empty"
    ):
        load_preference_data(tmp_path / "ds")


@pytest.mark.parametrize(
    ("name", "content", "what"),
    [
        ("missing.jsonl", None, "no such file"),
        ("empty.jsonl", "", "file is empty"),
        ("blank.jsonl", "\n  \n", "file is empty"),
        ("empty.json", "[]", "no rows"),
        ("data.csv", "prompt,chosen\n", "unsupported format"),
    ],
)
def test_unusable_files(tmp_path, name, content, what):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: {what}"):
        load_preference_data(path)


def test_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}: not a directory saved"):
        load_preference_data(tmp_path)


# ---- tokenizing --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def template(tok, messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    return list(out)


LONG = PreferenceExample(
    prompt=({"role": "system", "content": "You are a careful math tutor."}, USER),
    chosen=(WS, WT),
    rejected=("2 + 3 = 6. The answer is 6.",),
)


def test_prompt_plus_response_reproduces_the_conversation(tok):
    group = tokenize_example(LONG, tok)
    assert list(group.prompt_ids) == template(tok, list(LONG.prompt), add_generation_prompt=True)
    assert len(group.responses) == 3
    for text, ids in zip((*LONG.chosen, *LONG.rejected), group.responses, strict=True):
        assert list(group.prompt_ids + ids) == template(tok, [*LONG.prompt, assistant(text)])
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_template_tail_after_eos_is_dropped(tok):
    tail = tok.chat_template.replace("</s>", "</s>\n")  # like ChatML templates: a newline after each turn
    tok2 = build_tiny_tokenizer()
    tok2.chat_template = tail
    group = tokenize_example(LONG, tok2)
    assert all(r[-1] == tok2.eos_token_id and tok2.eos_token_id not in r[:-1] for r in group.responses)
    assert group.responses == tokenize_example(LONG, tok).responses


def test_response_without_prefix_template_falls_back_to_plain_text(tok):
    tok2 = build_tiny_tokenizer()  # a generation prompt that is not how the template renders a turn's start
    tok2.chat_template = tok.chat_template.replace(
        "<|assistant|>\n{% endif %}", "<|assistant|>\n\n{% endif %}"
    )
    group = tokenize_example(LONG, tok2)
    for text, ids in zip((*LONG.chosen, *LONG.rejected), group.responses, strict=True):
        assert list(ids) == tok2(text, add_special_tokens=False)["input_ids"] + [tok2.eos_token_id]


@pytest.mark.parametrize(
    ("max_length", "max_prompt_length"), [(64, 50), (50, 20), (40, 30), (30, 20), (12, 8), (2, 1)]
)
def test_truncation_respects_the_limits(tok, max_length, max_prompt_length):
    full = tokenize_example(LONG, tok, max_length=10_000, max_prompt_length=9_999)
    group = tokenize_example(LONG, tok, max_length=max_length, max_prompt_length=max_prompt_length)
    longest = max(map(len, full.responses))
    assert len(group.prompt_ids) + max(map(len, group.responses)) <= max_length
    assert all(len(r) >= 1 for r in group.responses)
    if len(full.prompt_ids) + longest <= max_length:
        assert group == full
    else:  # the prompt keeps its end; responses keep their starts
        assert len(group.prompt_ids) == min(len(full.prompt_ids), max_prompt_length)
        assert group.prompt_ids == full.prompt_ids[len(full.prompt_ids) - len(group.prompt_ids) :]
        for short, whole in zip(group.responses, full.responses, strict=True):
            assert short == whole[: len(short)]
        if len(group.prompt_ids) + longest > max_length:  # responses were cut to the room left
            assert max(map(len, group.responses)) == max_length - len(group.prompt_ids)


def test_short_groups_are_not_truncated(tok):
    group = tokenize_example(LONG, tok)
    assert len(group.prompt_ids) + max(map(len, group.responses)) < 2048
    assert group == tokenize_example(LONG, tok, max_length=10_000, max_prompt_length=9_000)


@pytest.mark.parametrize(("max_length", "max_prompt_length"), [(10, 10), (10, 0), (5, 8)])
def test_truncation_limits_are_checked(tok, max_length, max_prompt_length):
    with pytest.raises(ValueError, match="--max_prompt_length .* must be above 0 and below --max_length"):
        tokenize_example(LONG, tok, max_length=max_length, max_prompt_length=max_prompt_length)
