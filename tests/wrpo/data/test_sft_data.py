"""``wrpo sft`` data (wrpo.data.sft): TRL's SFT formats and preference rows -> examples -> token ids, and
``wrpo sft`` end to end on prompt-completion, messages and text files with the bundled tiny model."""

from __future__ import annotations

import json
import logging
import re

import datasets
import pytest
from helpers.cli_runs import cli

from wrpo.cli.main import main
from wrpo.data.preference import (
    DataError,
    PreferenceExample,
    TokenizedGroup,
    load_preference_data,
    tokenize_example,
)
from wrpo.data.sft import (
    SFTExample,
    as_sft_example,
    describe_formats,
    load_sft_data,
    tokenize_sft_example,
)
from wrpo.train.tiny import EOS_ID, build_tiny_tokenizer, make_sample_rows

SYSTEM = {"role": "system", "content": "You are a careful math tutor."}
USER = {"role": "user", "content": "What is 2 + 3?"}
WS, WT, WL = "2 + 3 = 5. The answer is 5.", "5", "6"


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    """One row per line; a str row is written verbatim."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- formats -----------------------------------------------------------------------------------------------

FORMS = {
    "text": ({"text": "2 + 3 = 5"}, SFTExample((), "2 + 3 = 5"), "text"),
    "messages": ({"messages": [USER, assistant(WS)]}, SFTExample((USER,), WS), "messages"),
    "messages-system": (
        {"messages": [SYSTEM, USER, assistant(WS)]},
        SFTExample((SYSTEM, USER), WS),
        "messages",
    ),
    "prompt-completion": (
        {"prompt": USER["content"], "completion": WS},
        SFTExample((USER,), WS),
        "prompt-completion",
    ),
    "prompt-completion-conversational": (
        {"prompt": [SYSTEM, USER], "completion": [assistant(WS)]},
        SFTExample((SYSTEM, USER), WS),
        "prompt-completion",
    ),
    "prompt-completion-message": (
        {"prompt": USER, "completion": assistant(WS)},
        SFTExample((USER,), WS),
        "prompt-completion",
    ),
    "prompt-chosen": ({"prompt": USER, "chosen": [WS, WT]}, SFTExample((USER,), WS), "preference"),
    "prompt-chosen-single": (
        {"prompt": USER, "chosen": assistant(WS)},
        SFTExample((USER,), WS),
        "preference",
    ),
    "released": (
        {"prompt": USER, "chosen": [assistant(WS), assistant(WT)], "rejected": [assistant(WL)]},
        SFTExample((USER,), WS),
        "preference",
    ),
    "flat": (
        {"prompt": USER["content"], "source_chosen": [WS], "target_chosen": WT, "rejected": WL},
        SFTExample((USER,), WS),
        "preference",
    ),
    "flat-without-rejected": (
        {"prompt": USER["content"], "source_chosen": WS, "target_chosen": WT},
        SFTExample((USER,), WS),
        "preference",
    ),
    "extra-keys-ignored": (
        {"id": 7, "prompt": USER, "completion": WS, "source": "x"},
        SFTExample((USER,), WS),
        "prompt-completion",
    ),
}


@pytest.mark.parametrize("form", FORMS)
def test_each_format_parses_to_its_prompt_and_completion(tmp_path, form):
    row, expected, fmt = FORMS[form]
    (ex,) = load_sft_data(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert ex == expected and (ex.prompt, ex.completion) == (expected.prompt, expected.completion)
    assert ex.format == fmt


def test_formats_may_share_a_file_and_are_described(tmp_path):
    rows = [FORMS[f][0] for f in ("text", "messages", "prompt-completion", "released", "messages")]
    examples = load_sft_data(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [ex.format for ex in examples] == [
        "text",
        "messages",
        "prompt-completion",
        "preference",
        "messages",
    ]
    assert describe_formats(examples) == (
        "2 messages (the last assistant turn), 1 text (every token after the first), 1 prompt-completion, "
        "1 preference (the first chosen response)"
    )


def test_preference_rows_read_as_sft_are_their_first_chosen_response(tmp_path):
    rows = make_sample_rows(12, seed=3)
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert load_sft_data(path) == [as_sft_example(ex) for ex in load_preference_data(path)]
    assert [ex.completion for ex in load_sft_data(path)] == [r["chosen"][0]["content"] for r in rows]


def test_earlier_assistant_turns_are_context_and_said_once_with_their_count(tmp_path, caplog):
    turns = [SYSTEM, USER, assistant("5"), {"role": "user", "content": "And 2 + 4?"}, assistant("6")]
    rows = [{"messages": turns}, FORMS["messages"][0], {"messages": turns}]
    with caplog.at_level(logging.WARNING, logger="wrpo.data.sft"):
        examples = load_sft_data(write_jsonl(tmp_path / "d.jsonl", rows))
    assert examples[0] == SFTExample(tuple(turns[:-1]), "6")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "2 of 3 rows (first: line 1)" in warnings[0] and "only the last assistant message" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wrpo.data.sft"):
        load_sft_data(write_jsonl(tmp_path / "e.jsonl", [FORMS["messages"][0]]))
    assert not caplog.records  # single-turn conversations: nothing to say


def test_saved_datasets_directory_with_null_columns(tmp_path):
    """A datasets directory has every column in every row: null counts as absent."""
    ds = datasets.Dataset.from_dict(
        {"prompt": [USER["content"], None], "completion": [WS, None], "text": [None, "2 + 3 = 5"]}
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_sft_data(tmp_path / "ds") == [SFTExample((USER,), WS), SFTExample((), "2 + 3 = 5")]


BAD_ROWS = {
    "messages-ending-with-user": (
        {"messages": [USER, assistant("5"), {"role": "user", "content": "thanks"}]},
        r"messages: the last message must be an assistant message \(the completion trained on\), "
        "got role 'user'",
    ),
    "messages-without-user": ({"messages": [SYSTEM, assistant(WS)]}, "messages: no user message before"),
    "messages-two-assistants-last": (
        {"messages": [USER, assistant(WT), assistant(WS)]},
        "messages: the message before the last one must be a user message, got role 'assistant'",
    ),
    "messages-empty": (
        {"messages": []},
        "messages: expected a list of messages ending with an assistant one",
    ),
    "messages-not-messages": ({"messages": ["hi"]}, r"messages\[0\]: expected a message"),
    "unknown-keys": (
        {"question": "q", "answer": "a"},
        r"no SFT format matches the keys found \('question', 'answer'\); accepted rows: \{\"text\"\}",
    ),
    "prompt-and-rejected-only": (
        {"prompt": "q", "rejected": "a"},
        r"no SFT format matches the keys found \('prompt', 'rejected'\);",
    ),
    "empty-completion": ({"prompt": "q", "completion": "  "}, "completion is an empty string"),
    "completion-without-prompt": ({"completion": WS}, "'completion' without 'prompt'"),
    "user-completion": ({"prompt": "q", "completion": USER}, "completion: expected an assistant message"),
    "prompt-ending-with-assistant": (
        {"prompt": [USER, assistant(WT)], "completion": WS},
        "prompt must end with a user message",
    ),
    "empty-text": ({"text": ""}, "text is an empty string"),
    "text-not-text": ({"text": ["a"]}, "text: expected text, got a list"),
    "flat-without-target": ({"prompt": "q", "source_chosen": WS}, "missing key 'target_chosen'"),
    "preference-bad-rejected": ({"prompt": "q", "chosen": WS, "rejected": 3}, "rejected: expected text"),
    "not-an-object": ([1, 2], "expected a JSON object, got a list"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_row_is_a_data_error_naming_file_and_line(tmp_path, case):
    row, message = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "d.jsonl", [FORMS["text"][0], "", row, FORMS["messages"][0]])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} line 3: {message}") as err:
        load_sft_data(path)
    assert "\n" not in str(err.value)


def test_a_byte_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))} line 2: byte 0xe9 at column 14 is not UTF-8"
    ):
        load_sft_data(path)


def test_json_list_errors_name_the_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([FORMS["text"][0], {"prompt": "q"}]))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} row 2: no SFT format matches"):
        load_sft_data(path)


# ---- tokenizing --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.mark.parametrize("prompt", [(USER,), (SYSTEM, USER), (SYSTEM, USER, assistant("5"), USER)])
@pytest.mark.parametrize(("max_length", "max_prompt_length"), [(2048, None), (30, 20), (12, 8)])
def test_chat_rows_tokenize_as_tokenize_example_with_that_one_response(
    tok, prompt, max_length, max_prompt_length
):
    limits = {"max_length": max_length, "max_prompt_length": max_prompt_length}
    group = tokenize_sft_example(SFTExample(prompt, WS), tok, **limits)
    one = tokenize_example(PreferenceExample(prompt, (WS,), ()), tok, **limits)
    assert group == one and len(group.responses) == 1
    assert len(group.prompt_ids) + len(group.responses[0]) <= max_length
    if max_length == 2048:  # not truncated: the first response of the preference group
        full = tokenize_example(PreferenceExample(prompt, (WS, WT), (WL,)), tok, **limits)
        assert (group.prompt_ids, group.responses[0]) == (full.prompt_ids, full.responses[0])
        assert group.responses[0][-1] == EOS_ID


def test_a_preference_example_tokenizes_as_its_first_chosen_response(tok):
    pref = PreferenceExample((USER,), (WS, WT), (WL,))
    assert tokenize_sft_example(pref, tok) == tokenize_sft_example(SFTExample((USER,), WS), tok)


def test_text_rows_train_every_token_after_the_first(tok):
    text = "What is 2 + 3? 2 + 3 = 5."
    ids = tok(text)["input_ids"]
    group = tokenize_sft_example(SFTExample((), text), tok)
    assert group == TokenizedGroup(prompt_ids=(ids[0],), responses=((*ids[1:], EOS_ID),))
    assert tok.decode([*group.prompt_ids, *group.responses[0]]) == text + "</s>"
    # an EOS already last is not doubled
    assert tokenize_sft_example(SFTExample((), text + "</s>"), tok) == group


@pytest.mark.parametrize("max_length", [2, 3, 8])
def test_text_truncation_keeps_the_start(tok, max_length):
    text = "What is 2 + 3? 2 + 3 = 5."
    full = tokenize_sft_example(SFTExample((), text), tok)
    group = tokenize_sft_example(SFTExample((), text), tok, max_length=max_length, max_prompt_length=1)
    ids = [*full.prompt_ids, *full.responses[0]]
    assert len(ids) > 8
    assert [*group.prompt_ids, *group.responses[0]] == ids[:max_length]
    assert len(group.prompt_ids) == 1 and EOS_ID not in group.responses[0]


class _BosTokenizer:
    """A tokenizer that adds BOS (as Llama's): ``tokenizer(text)`` -> [BOS, one id per character]."""

    eos_token_id = 2

    def __call__(self, text):
        return {"input_ids": [1, *(10 + ord(c) % 50 for c in text)]}


def test_text_rows_keep_the_special_tokens_the_tokenizer_adds():
    group = tokenize_sft_example(SFTExample((), "abc"), _BosTokenizer())
    assert group == TokenizedGroup(prompt_ids=(1,), responses=((57, 58, 59, 2),))


# ---- wrpo sft end to end -----------------------------------------------------------------------------------

N_ROWS = 24
RUN = cli(
    "--model tiny --max_steps 2 --logging_steps 1 --report_to none",
    "--save_strategy no --disable_tqdm true --seed 5",
)


def _prompt_messages(prompt):
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [prompt] if isinstance(prompt, dict) else list(prompt)


def _sft_files(tmp_path):
    """The same N_ROWS sample rows as preference, prompt-completion, messages and text files."""
    rows = make_sample_rows(N_ROWS, seed=11)
    pc = [{"prompt": r["prompt"], "completion": r["chosen"][0]["content"]} for r in rows]
    messages = [{"messages": [*_prompt_messages(r["prompt"]), r["chosen"][0]]} for r in rows]
    text = [
        {"text": f"{_prompt_messages(r['prompt'])[-1]['content']} {r['chosen'][0]['content']}"} for r in rows
    ]
    return {
        name: write_jsonl(tmp_path / f"{name}.jsonl", data)
        for name, data in (("preference", rows), ("pc", pc), ("messages", messages), ("text", text))
    }


def _sft(data, out, capsys):
    assert main(["sft", *RUN, "--dataset", str(data), "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert [e["step"] for e in logs] == [1, 2]
    return [e["loss"] for e in logs], printed


@pytest.mark.parametrize(
    ("name", "formats"),
    [
        ("pc", f"{N_ROWS} prompt-completion"),
        ("messages", f"{N_ROWS} messages (the last assistant turn)"),
        ("text", f"{N_ROWS} text (every token after the first)"),
    ],
)
def test_wrpo_sft_trains_on_a_trl_sft_file(tmp_path, capsys, name, formats):
    losses, printed = _sft(_sft_files(tmp_path)[name], tmp_path / "out", capsys)
    assert f"nll on the completion (sft; rows: {formats})" in printed
    assert f"train {N_ROWS} rows" in printed
    assert all(loss > 0 for loss in losses) and (tmp_path / "out" / "model.safetensors").is_file()


def test_prompt_completion_rows_train_exactly_as_the_preference_rows_they_come_from(tmp_path, capsys):
    from wrpo.cli.main import stage_config
    from wrpo.train.stage import build_datasets, load_examples

    files = _sft_files(tmp_path)
    groups = {}
    for name in ("preference", "pc", "messages"):
        config = stage_config("sft", [*RUN, "--dataset", str(files[name]), "--output_dir", str(tmp_path)])
        train, _ = build_datasets(load_examples(config, "sft"), build_tiny_tokenizer(), config, "sft")
        groups[name] = train.to_list()
    assert groups["pc"] == groups["preference"] == groups["messages"]
    assert len(groups["pc"]) == N_ROWS and all(len(g["responses"]) == 1 for g in groups["pc"])

    pc, _ = _sft(files["pc"], tmp_path / "pc", capsys)
    pref, printed = _sft(files["preference"], tmp_path / "pref", capsys)
    assert "rows: 24 preference (the first chosen response)" in printed
    assert pc == pref


def test_bad_row_stops_wrpo_sft_with_one_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [FORMS["text"][0], {"messages": [USER]}])
    assert main(["sft", *RUN, "--dataset", str(path), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"wrpo sft: {path} line 2: messages: the last message must be an assistant message "
        "(the completion trained on), got role 'user'"
    )
    assert not (tmp_path / "o").exists()
