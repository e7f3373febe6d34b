"""Common options a new user sets: --max_length alone, and batches that mix group shapes."""

from __future__ import annotations

import json

import pytest

from wrpo import PreferenceCollator
from wrpo.cli.main import main
from wrpo.data.preference import prompt_limit
from wrpo.train.tiny import SAMPLE_DATA


def _rows(tmp_path, n=8):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(SAMPLE_DATA.read_text().splitlines()[:n]) + "\n")
    return data


def test_max_length_alone_trains_with_the_papers_prompt_share(tmp_path):
    """Only --max_length set (below the old fixed 1800-token prompt default): trains, prompts cut to
    1800/2048 of it."""
    out = tmp_path / "o"
    code = main(
        [
            "train",
            "--dataset",
            str(_rows(tmp_path)),
            "--max_length",
            "1024",
            "--max_steps",
            "1",
            "--output_dir",
            str(out),
            "--report_to",
            "none",
        ]
    )
    assert code == 0 and json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    assert prompt_limit(1024) == 900 and prompt_limit(2048) == 1800 and prompt_limit(2) == 1


@pytest.mark.parametrize("prompt", ["1024", "2000", "0"])
def test_a_bad_length_pair_is_one_line_naming_both_flags(tmp_path, capsys, prompt):
    args = [
        "train",
        "--dataset",
        str(_rows(tmp_path)),
        "--max_length",
        "1024",
        "--max_prompt_length",
        prompt,
        "--output_dir",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"--max_prompt_length {prompt} must be above 0 and below --max_length 1024" in err


@pytest.mark.parametrize("packing", [True, False])
def test_groups_with_different_numbers_of_chosen_responses_are_refused(packing):
    """The loss reads one num_chosen per batch: a batch mixing 2 and 1 chosen would weigh the second
    group's responses wrongly, depending on the order of the groups."""
    groups = [{"prompt_ids": [3, 4], "responses": [[5], [6], [7]], "num_chosen": n} for n in (2, 2, 1)]
    with pytest.raises(ValueError, match="same num_chosen: group 0 has 2, group 2 has 1"):
        PreferenceCollator(0, packing=packing)(groups)


def test_a_two_message_chosen_says_which_reading_was_used_and_how_to_pick_the_other():
    """TRL conversational `chosen` of two assistant messages: read as WRPO alternatives (the released
    layout), and the log line names the other reading and the chosen_layout that selects it."""
    pytest.importorskip("trl")
    from wrpo.integrations.trl_data import detect_layout, layout_message

    row = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
        "rejected": [{"role": "assistant", "content": "c"}],
    }
    layout = detect_layout(row)
    message = layout_message("train", layout, "auto")
    assert layout == "alternatives" and "detected from its first row" in message
    assert "chosen_layout='completion' reads `chosen` / `rejected` as one completion each" in message
    assert "chosen_layout='alternatives'" in layout_message("train", "completion", "completion")


def test_chosen_weights_that_do_not_fit_the_data_are_refused_when_it_is_read(tmp_path, capsys):
    args = [
        "train",
        "--dataset",
        str(_rows(tmp_path)),
        "--chosen_weights",
        "0.2",
        "0.3",
        "0.5",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--chosen_weights has 3 weights" in err and "2 chosen" in err


@pytest.mark.parametrize("path", ["./no-such-model", "/tmp/no/such/model", "~/no-such-model"])
def test_a_missing_local_model_path_is_one_line(tmp_path, capsys, path):
    assert main(["train", "--model", path, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"wrpo train: --model {path}: no such directory (a local path; hub ids read org/name)"


def test_wrpo_data_takes_both_spellings_of_its_options():
    from wrpo.data.construct.command import dashed, parser

    argv = [
        "sample",
        "--model",
        "m",
        "--input",
        "i",
        "--max_new_tokens=7",
        "--top_p",
        "0.5",
        "--batch-size",
        "2",
    ]
    args = parser().parse_args([dashed(a) for a in argv])
    assert (args.max_new_tokens, args.top_p, args.batch_size) == (7, 0.5, 2)
    assert dashed("under_score") == "under_score"  # values are left alone


def test_a_reward_function_module_in_the_current_directory_imports(tmp_path, monkeypatch):
    import sys

    from wrpo.data.construct.reward_fn import load_reward_fn

    (tmp_path / "my_verifier_mod.py").write_text("def score(prompt, response, row):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_reward_fn("my_verifier_mod:score")([], "x", {}) == 1.0
    assert str(tmp_path) not in sys.path  # the path is restored


@pytest.mark.parametrize("reader", ["train", "data"])
def test_a_byte_that_is_not_utf8_is_named_with_its_file_and_line(tmp_path, reader):
    from wrpo.data.construct.jsonl import read_rows
    from wrpo.data.preference import DataError, load_preference_data

    lines = SAMPLE_DATA.read_text().splitlines()[:3]
    data = tmp_path / "d.jsonl"
    data.write_bytes(("\n".join(lines[:2]) + "\n").encode() + lines[2][:10].encode() + b"\xe9" + b"\n")
    with pytest.raises(DataError, match=rf"{data} line 3: byte 0xe9 at column 11 is not UTF-8"):
        (load_preference_data if reader == "train" else read_rows)(data)


def test_sft_help_lists_no_preference_only_options(capsys):
    from wrpo.cli.help import PREFERENCE_ONLY

    assert main(["sft", "--help"]) == 0
    sft = capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    train = capsys.readouterr().out
    for name in PREFERENCE_ONLY:
        assert f"--{name} " in train and f"--{name} " not in sft, name
    assert "--max_length" in sft and "--packing" in sft
