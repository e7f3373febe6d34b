"""Data construction (wrpo.data.construct): build, split, malformed rows, atomic outputs, prompts."""

from __future__ import annotations

import json
import os
import re

import pytest

from wrpo.cli.main import main
from wrpo.data.construct.build import NO_SOURCE, NO_TARGET, ONE_TARGET, TIED_TARGETS, build, few_sources
from wrpo.data.construct.jsonl import atomic_outputs, write_jsonl
from wrpo.data.construct.split import split, split_indices
from wrpo.data.preference import load_preference_data
from wrpo.train.tiny import SAMPLE_DATA


def write_jsonl_rows(path, rows):
    """One row per line; a str row is written verbatim (broken JSON, blank lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def src(model, text, score):
    return {"model": model, "text": text, "score": score}


def tgt(text, score):
    return {"text": text, "score": score}


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``wrpo data ...``."""
    code = main(["data", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# p1: ties everywhere; p2: all target scores equal; p3: one target sample; p4: no target row;
# p5: no source row; p6: blank texts (ignored even with the best score); p7: a single source model.
SOURCES = [
    {
        "prompt_id": "p1",
        "prompt": "What is 1 + 1?",
        "responses": [src("a", "a1", 1.0), src("b", "b1", 3.0), src("a", "a2", 3.0), src("b", "b2", 2.0)],
    },
    {"prompt_id": "p2", "prompt": "What is 2 + 2?", "responses": [src("a", "a", 1.0), src("b", "b", 0.0)]},
    {"prompt_id": "p3", "prompt": "What is 3 + 3?", "responses": [src("a", "a", 1.0), src("b", "b", 0.0)]},
    {"prompt_id": "p4", "prompt": "What is 4 + 4?", "responses": [src("a", "a", 1.0), src("b", "b", 0.0)]},
    {
        "prompt_id": 6,
        "prompt": [{"role": "user", "content": "What is 6 + 6?"}],
        "responses": [src("a", " ", 9.0), src("a", "a6", -1.0), src("b", "b6", -2.0)],
    },
    {"prompt_id": "p7", "prompt": "What is 7 + 7?", "responses": [src("a", "x", 0.5), src("a", "y", 0.7)]},
]
TARGETS = [  # out of order, p4 missing, p5 extra
    {"prompt_id": "p7", "responses": [tgt("t7", 1.0), tgt("u7", 0.0)]},
    {"prompt_id": "p5", "responses": [tgt("t5", 1.0), tgt("u5", 0.0)]},
    {"prompt_id": 6, "responses": [tgt("", 5.0), tgt("t6", 2.0), tgt("\n", -5.0), tgt("u6", 1.0)]},
    {"prompt_id": "p3", "responses": [tgt("t3", 1.0)]},
    {"prompt_id": "p2", "responses": [tgt("t2", 0.25), tgt("u2", 0.25), tgt("v2", 0.25)]},
    {
        "prompt_id": "p1",
        "prompt": {"role": "user", "content": "What is 1 + 1?"},
        "responses": [tgt("t1", 0.5), tgt("t2", 0.9), tgt("t3", 0.9), tgt("t4", 0.1), tgt("t5", 0.1)],
    },
]


def assistant(*texts):
    return [{"role": "assistant", "content": t} for t in texts]


@pytest.fixture
def files(tmp_path):
    return write_jsonl_rows(tmp_path / "s.jsonl", SOURCES), write_jsonl_rows(tmp_path / "t.jsonl", TARGETS)


# ---- build -------------------------------------------------------------------------------------------------


def test_build_picks_first_best_and_worst_and_counts_every_skip_reason(tmp_path, files):
    out = tmp_path / "q.jsonl"
    summary = build([files[0]], files[1], out)
    rows = read(out)
    assert rows == [
        {
            "prompt_id": "p1",
            "prompt": "What is 1 + 1?",
            "chosen": assistant("b1", "t2"),
            "rejected": assistant("t4"),
            "source_models": ["b"],
            "chosen_scores": [3.0, 0.9],
            "rejected_scores": [0.1],
        },
        {
            "prompt_id": 6,
            "prompt": [{"role": "user", "content": "What is 6 + 6?"}],
            "chosen": assistant("a6", "t6"),
            "rejected": assistant("u6"),
            "source_models": ["a"],
            "chosen_scores": [-1.0, 2.0],
            "rejected_scores": [1.0],
        },
        {
            "prompt_id": "p7",
            "prompt": "What is 7 + 7?",
            "chosen": assistant("y", "t7"),
            "rejected": assistant("u7"),
            "source_models": ["a"],
            "chosen_scores": [0.7, 1.0],
            "rejected_scores": [0.0],
        },
    ]
    assert summary.kept == 3
    assert dict(summary.skipped) == {TIED_TARGETS: 1, ONE_TARGET: 1, NO_TARGET: 1, NO_SOURCE: 1}
    assert summary.wins == {"b": 1, "a": 2}
    assert summary.target_gaps == pytest.approx([0.8, 1.0, 1.0])
    assert summary.source_gaps == pytest.approx([2.1, -3.0, -0.3])
    assert summary.blank == 3
    text = str(summary)
    assert "kept 3 of 7 prompts" in text and "y_ws won by: a 2 (67%), b 1 (33%)" in text
    examples = load_preference_data(out, num_chosen=2)
    assert [ex.chosen for ex in examples] == [("b1", "t2"), ("a6", "t6"), ("y", "t7")]


def test_build_k2_keeps_the_best_response_of_each_of_the_two_best_models(tmp_path, files):
    out = tmp_path / "q.jsonl"
    summary = build([files[0]], files[1], out, num_source_chosen=2)
    rows = read(out)
    # p1: a's best is a2 (3.0), b's best is b1 (3.0, seen first) -> b1 then a2; p7 has one model only
    assert [r["chosen"] for r in rows] == [assistant("b1", "a2", "t2"), assistant("a6", "b6", "t6")]
    assert [r["source_models"] for r in rows] == [["b", "a"], ["a", "b"]]
    assert [r["chosen_scores"] for r in rows] == [[3.0, 3.0, 0.9], [-1.0, -2.0, 2.0]]
    assert summary.skipped[few_sources(2)] == 1 and summary.kept == 2
    assert [len(ex.chosen) for ex in load_preference_data(out, num_chosen=3)] == [3, 3]


def test_build_merges_source_files_by_prompt_id(tmp_path, files):
    """Responses of one prompt spread over two source files (in another order) give the same output."""
    first = [{**SOURCES[0], "responses": SOURCES[0]["responses"][:2]}, *SOURCES[1:]]
    second = [{**SOURCES[0], "responses": SOURCES[0]["responses"][2:]}]
    a = write_jsonl_rows(tmp_path / "a.jsonl", first)
    b = write_jsonl_rows(tmp_path / "b.jsonl", second)
    build([a, b], files[1], tmp_path / "merged.jsonl", num_source_chosen=2)
    build([files[0]], files[1], tmp_path / "one.jsonl", num_source_chosen=2)
    assert read(tmp_path / "merged.jsonl") == read(tmp_path / "one.jsonl")


def test_build_command_prints_the_summary(tmp_path, files, capsys):
    code, out, err = run(
        capsys, "build", "--sources", files[0], "--targets", files[1], "--output", tmp_path / "q.jsonl"
    )
    assert code == 0, err
    assert "kept 3 of 7 prompts" in out
    assert f"{ONE_TARGET} 1" in out and f"{NO_SOURCE} 1" in out and "score gap y_wt - y_l" in out


def test_build_keeping_nothing_writes_nothing(tmp_path, capsys):
    s = write_jsonl_rows(tmp_path / "s.jsonl", [SOURCES[1]])
    t = write_jsonl_rows(tmp_path / "t.jsonl", [TARGETS[4]])
    code, _, err = run(capsys, "build", "--sources", s, "--targets", t, "--output", tmp_path / "q.jsonl")
    assert code == 2 and "no prompt kept" in err and TIED_TARGETS in err
    assert not (tmp_path / "q.jsonl").exists()


def test_build_keep_tied_keeps_equal_target_scores_for_sft(tmp_path, capsys):
    s = write_jsonl_rows(tmp_path / "s.jsonl", [SOURCES[1]])
    t = write_jsonl_rows(tmp_path / "t.jsonl", [TARGETS[4]])
    code, out, err = run(
        capsys, "build", "--sources", s, "--targets", t, "--output", tmp_path / "q.jsonl", "--keep-tied"
    )
    assert code == 0, err
    (row,) = read(tmp_path / "q.jsonl")
    assert row["chosen"][0]["content"] == "a" and row["chosen_scores"][1] == row["rejected_scores"][0]


def test_build_refuses_one_prompt_id_with_two_prompts(tmp_path, capsys):
    s = write_jsonl_rows(tmp_path / "s.jsonl", SOURCES)
    t = write_jsonl_rows(tmp_path / "t.jsonl", [{**TARGETS[0], "prompt": "Something else?"}])
    code, _, err = run(capsys, "build", "--sources", s, "--targets", t, "--output", tmp_path / "q.jsonl")
    assert code == 2
    assert err.strip() == (f"wrpo data build: {t} line 1: prompt_id 'p7' has another prompt in {s} line 6")


# ---- split -------------------------------------------------------------------------------------------------


def prompt_rows(n):
    return [{"prompt_id": f"q{i}", "prompt": f"What is {i} + {i}?"} for i in range(n)]


@pytest.mark.parametrize(
    ("n", "fraction", "n_sft"),
    [(10, 0.3333, 3), (12, 0.3333, 4), (7, 0.5, 4), (5, 0.0, 0), (5, 1.0, 5), (1, 0.3333, 0)],
)
def test_split_is_disjoint_covers_every_row_and_has_round_n_fraction_sft_rows(tmp_path, n, fraction, n_sft):
    data = write_jsonl_rows(tmp_path / "in.jsonl", prompt_rows(n))
    written = split(data, tmp_path / "D", sft_fraction=fraction, seed=42)
    sft, pref = read(tmp_path / "D" / "sft.jsonl"), read(tmp_path / "D" / "pref.jsonl")
    assert list(written.values()) == [n_sft, n - n_sft] == [len(sft), len(pref)]
    ids_sft, ids_pref = [r["prompt_id"] for r in sft], [r["prompt_id"] for r in pref]
    assert not set(ids_sft) & set(ids_pref)
    assert sorted(ids_sft + ids_pref) == sorted(r["prompt_id"] for r in prompt_rows(n))
    order = [r["prompt_id"] for r in prompt_rows(n)]
    assert ids_sft == sorted(ids_sft, key=order.index) and ids_pref == sorted(ids_pref, key=order.index)


def test_split_is_deterministic_for_a_seed_and_changes_with_it(tmp_path, capsys):
    data = write_jsonl_rows(tmp_path / "in.jsonl", prompt_rows(30))
    parts = {}
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        code, out, err = run(
            capsys,
            "split",
            "--input",
            data,
            "--sft-fraction",
            "0.3333",
            "--seed",
            seed,
            "--out-dir",
            tmp_path / name,
        )
        assert code == 0, err
        assert "10 rows" in out and "20 rows" in out
        parts[name] = [(tmp_path / name / f).read_text() for f in ("sft.jsonl", "pref.jsonl")]
    assert parts["a"] == parts["b"]
    assert parts["a"] != parts["c"]
    assert split_indices(30, 1 / 3, 7) == split_indices(30, 1 / 3, 7) != split_indices(30, 1 / 3, 8)


def test_split_rejects_a_fraction_outside_0_1(tmp_path, capsys):
    data = write_jsonl_rows(tmp_path / "in.jsonl", prompt_rows(3))
    code, _, err = run(capsys, "split", "--input", data, "--sft-fraction", "1.5", "--out-dir", tmp_path / "D")
    assert code == 2 and "--sft-fraction must be in [0, 1]" in err
    assert not (tmp_path / "D").exists() or not any((tmp_path / "D").iterdir())


# ---- malformed rows ----------------------------------------------------------------------------------------

GOOD_SOURCE = SOURCES[0]
R = GOOD_SOURCE["responses"]

BAD_SOURCE_ROWS = {
    "broken-json": ('{"prompt_id": "x", "prompt": "Hi?", "responses": [', "invalid JSON"),
    "not-an-object": ('["x"]', "expected a JSON object, got a list"),
    "missing-prompt-id": ({"prompt": "Hi?", "responses": R}, "missing key 'prompt_id'"),
    "list-prompt-id": ({**GOOD_SOURCE, "prompt_id": ["x"]}, "prompt_id: expected text or an integer, got a"),
    "bool-prompt-id": ({**GOOD_SOURCE, "prompt_id": True}, "prompt_id: expected .*, got a boolean"),
    "float-prompt-id": ({**GOOD_SOURCE, "prompt_id": 1.5}, "prompt_id: expected .*, got a number"),
    "empty-prompt-id": ({**GOOD_SOURCE, "prompt_id": " "}, "prompt_id is an empty string"),
    "duplicate-prompt-id": (GOOD_SOURCE, "duplicate prompt_id 'p1' \\(first on line 1\\)"),
    "missing-prompt": ({"prompt_id": "x", "responses": R}, "missing key 'prompt'"),
    "number-prompt": ({"prompt_id": "x", "prompt": 3, "responses": R}, "prompt: expected .* got a number"),
    "prompt-without-user": (
        {"prompt_id": "x", "prompt": [{"role": "system", "content": "Hi"}], "responses": R},
        "prompt has no user message",
    ),
    "missing-responses": ({"prompt_id": "x", "prompt": "Hi?"}, "missing key 'responses'"),
    "responses-not-a-list": (
        {"prompt_id": "x", "prompt": "Hi?", "responses": {"text": "a"}},
        "responses: expected a list, got an object",
    ),
    "empty-responses": ({"prompt_id": "x", "prompt": "Hi?", "responses": []}, "responses is an empty list"),
    "response-not-an-object": (
        {"prompt_id": "x", "prompt": "Hi?", "responses": ["a"]},
        r"responses\[0\]: expected an object .* got a string",
    ),
    "missing-text": (
        {"prompt_id": "x", "prompt": "Hi?", "responses": [{"model": "a", "score": 1}]},
        r"missing key 'responses\[0\].text'",
    ),
    "number-text": (
        {"prompt_id": "x", "prompt": "Hi?", "responses": [src("a", 5, 1.0)]},
        r"responses\[0\].text: expected text, got a number",
    ),
    "missing-model": (
        {"prompt_id": "x", "prompt": "Hi?", "responses": [src("a", "t", 1), tgt("u", 2)]},
        r"missing key 'responses\[1\].model'",
    ),
    "text-score": (
        {"prompt_id": "x", "prompt": "Hi?", "responses": [src("a", "t", "high")]},
        r"responses\[0\].score: expected a number, got a string",
    ),
    "bool-score": (
        {"prompt_id": "x", "prompt": "Hi?", "responses": [src("a", "t", False)]},
        r"responses\[0\].score: expected a number, got a boolean",
    ),
    "nan-score": (
        '{"prompt_id": "x", "prompt": "Hi?", "responses": [{"model": "a", "text": "t", "score": NaN}]}',
        r"responses\[0\].score: expected a finite number, got nan",
    ),
    "null-score": (
        {"prompt_id": "x", "prompt": "Hi?", "responses": [src("a", "t", None)]},
        r"responses\[0\].score is null \(not scored yet\? run `wrpo data score`\)",
    ),
    "missing-score": (
        {"prompt_id": "x", "prompt": "Hi?", "responses": [{"model": "a", "text": "t"}]},
        r"missing key 'responses\[0\].score'",
    ),
}


def assert_refused_at(code, err, path, line, what):
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"wrpo data build: {path} line {line}: "), err
    assert re.search(what, err), err


@pytest.mark.parametrize("case", BAD_SOURCE_ROWS)
def test_malformed_source_row_is_refused_with_its_line(tmp_path, files, capsys, case):
    bad, what = BAD_SOURCE_ROWS[case]
    s = write_jsonl_rows(tmp_path / "bad.jsonl", [GOOD_SOURCE, "", bad, SOURCES[1]])  # bad on line 3
    out = tmp_path / "q.jsonl"
    code, _, err = run(capsys, "build", "--sources", files[0], s, "--targets", files[1], "--output", out)
    assert_refused_at(code, err, s, 3, what)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "s.jsonl", "t.jsonl"]  # no output, no temp file


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        (
            {"prompt_id": "p1", "responses": [tgt("a", 1.0), tgt("b", "1.0")]},
            r"responses\[1\].score: expected a number",
        ),
        (
            {"prompt_id": "p1", "responses": [tgt("a", 1.0), {"text": "b"}]},
            r"missing key 'responses\[1\].score'",
        ),
        ({"prompt_id": "p1", "responses": []}, "responses is an empty list"),
        ({"prompt_id": "p7", "responses": [tgt("a", 1.0)]}, "duplicate prompt_id 'p7' \\(first on line 1\\)"),
        (
            {"prompt_id": "p1", "responses": [{"text": "a", "score": 1, "model": 3}]},
            r"responses\[0\].model: expected text, got a number",
        ),
    ],
    ids=["text-score", "missing-score", "empty-responses", "duplicate-prompt-id", "number-model"],
)
def test_malformed_target_row_is_refused_with_its_line(tmp_path, files, capsys, bad, what):
    t = write_jsonl_rows(tmp_path / "bad_t.jsonl", [*TARGETS[:3], bad])
    out = tmp_path / "q.jsonl"
    code, _, err = run(capsys, "build", "--sources", files[0], "--targets", t, "--output", out)
    assert_refused_at(code, err, t, 4, what)
    assert not out.exists()


@pytest.mark.parametrize("command", ["sample", "score", "split", "prompts"])
def test_other_commands_refuse_malformed_rows_with_their_line(tmp_path, capsys, command):
    model = tmp_path / "no-model-needed"  # rows are checked before any model is loaded
    good = {"prompt_id": "a", "prompt": "Hi?", "responses": [tgt("x", None)]}
    cases = {
        "sample": ({"prompt_id": "b"}, "missing key 'prompt'", ["--model", model]),
        "score": (
            {"prompt_id": "b", "responses": [tgt("x", None)]},
            "missing key 'prompt'",
            ["--reward-model", model],
        ),
        "split": (
            {"prompt_id": "a"},
            "duplicate prompt_id 'a' \\(first on line 1\\)",
            ["--out-dir", tmp_path / "D"],
        ),
        "prompts": ({"prompt": ""}, "prompt is an empty string", ["--output", tmp_path / "p.jsonl"]),
    }
    bad, what, extra = cases[command]
    data = write_jsonl_rows(tmp_path / "in.jsonl", [good, "  ", bad])
    before = data.read_text()
    code, _, err = run(capsys, command, "--input", data, *extra)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"wrpo data {command}: {data} line 3: ") and re.search(what, err), err
    assert data.read_text() == before and sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_missing_file_and_usage_errors_exit_2(tmp_path, capsys):
    code, _, err = run(capsys, "split", "--input", tmp_path / "nope.jsonl", "--out-dir", tmp_path / "D")
    assert code == 2 and err.strip() == f"wrpo data split: {tmp_path / 'nope.jsonl'}: no such file"
    code, _, err = run(capsys, "build", "--sources", tmp_path / "s.jsonl")
    assert code == 2 and "--targets" in err
    assert run(capsys)[0] == 2


# ---- atomic outputs ----------------------------------------------------------------------------------------


def failing_rows(n_good):
    for i in range(n_good):
        yield {"i": i}
    raise RuntimeError("interrupted mid-write")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_exception_mid_write_leaves_no_output_and_no_temp_file(tmp_path, error):
    out = tmp_path / "sub" / "out.jsonl"

    def rows():
        yield {"i": 0}
        yield {"i": 1}
        raise error("mid-write")

    with pytest.raises(error):
        write_jsonl(out, rows())
    assert os.listdir(tmp_path / "sub") == []


def test_a_failed_write_leaves_the_previous_output_as_it_was(tmp_path):
    out = tmp_path / "out.jsonl"
    assert write_jsonl(out, [{"old": 1}]) == 1
    with pytest.raises(RuntimeError):
        write_jsonl(out, failing_rows(3))
    assert read(out) == [{"old": 1}] and os.listdir(tmp_path) == ["out.jsonl"]


def test_outputs_written_together_appear_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with pytest.raises(RuntimeError), atomic_outputs(a, b) as (fa, fb):
        fa.write("{}\n")
        fb.write("{}\n")
        assert os.listdir(tmp_path) and not a.exists() and not b.exists()  # only hidden temporary files
        raise RuntimeError("second part failed")
    assert os.listdir(tmp_path) == []
    with atomic_outputs(a, b) as (fa, fb):
        fa.write("{}\n")
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.jsonl"] and b.read_text() == ""
    assert oct(a.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- prompts -----------------------------------------------------------------------------------------------


def test_prompts_from_the_bundled_sample_data(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    code, stdout, err = run(capsys, "prompts", "--input", SAMPLE_DATA, "--limit", 4, "--output", out)
    assert code == 0, err
    assert "4 prompts" in stdout
    rows = read(out)
    source = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()[:4]]
    assert rows == [{"prompt_id": f"sample_pref:{i}", "prompt": s["prompt"]} for i, s in enumerate(source, 1)]
