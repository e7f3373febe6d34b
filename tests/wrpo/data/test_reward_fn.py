"""``wrpo data score --reward-fn MODULE:FUNCTION`` and the arithmetic exact-match verifier."""

from __future__ import annotations

import json
import sys

import pytest

from wrpo.cli.main import main
from wrpo.data.construct.verifiers import (
    arithmetic_exact_match,
    arithmetic_graded,
    equation_steps,
    final_number,
)

VERIFIER = "wrpo.data.construct.verifiers:arithmetic_exact_match"
ROWS = [
    {
        "prompt_id": "p1",
        "prompt": "What is the sum of 12 and 5?",
        "answer": 17,
        "responses": [
            {"model": "m", "text": "12 + 5 = 17. The answer is 17.", "score": None},
            {"model": "m", "text": "12 + 5 = 18. The answer is 18.", "score": None},
        ],
    },
    {
        "prompt_id": "p2",
        "prompt": [{"role": "user", "content": "What is two times 31?"}],
        "answer": "62",
        "responses": [{"model": "m", "text": "The answer is 62."}, {"model": "m", "text": "no idea"}],
    },
]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scores(path):
    return [[r["score"] for r in json.loads(line)["responses"]] for line in path.read_text().splitlines()]


def test_verifier_scores_a_correct_response_1_and_a_wrong_one_0(tmp_path, capsys):
    data = write(tmp_path / "s.jsonl", ROWS)
    assert main(["data", "score", "--input", str(data), "--reward-fn", VERIFIER]) == 0
    assert "4 responses scored" in capsys.readouterr().out
    assert scores(data) == [[1.0, 0.0], [1.0, 0.0]]
    assert json.loads(data.read_text().splitlines()[0])["answer"] == 17  # other keys kept


def test_final_number_and_a_row_without_answer():
    assert final_number("3 * 4 = 12. 12 + 5 = 17. The answer is 17.") == 17
    assert final_number("x = -2.5") == -2.5 and final_number("none") is None
    with pytest.raises(ValueError, match="no 'answer'"):
        arithmetic_exact_match([], "5", {"prompt": "p"})


GRADED = "wrpo.data.construct.verifiers:arithmetic_graded"
TWOSTEP = {"prompt": "Add 5 to the product of 3 and 4.", "answer": 17}


def graded(text, row=TWOSTEP):
    return arithmetic_graded([], text, row)


def test_graded_ranks_correct_over_near_over_far_over_no_number():
    correct = graded("3 * 4 = 12. 12 + 5 = 17. The answer is 17.")
    near, far = graded("The answer is 18."), graded("The answer is 170.")
    assert correct == 1.0 > near > far > graded("I do not know.") == 0.0
    assert graded("The answer is 16.") == near  # the same distance either side
    assert graded("The answer is -17.") < near  # the sign counts
    # a correct final answer is 1.0 whatever the steps; the best wrong answer stays below it
    assert graded("3 * 4 = 13. The answer is 17.") == 1.0
    assert graded("3 * 4 = 12. 12 + 5 = 17. 17 - 1 = 16. The answer is 16.") < 0.9
    assert graded("The answer is 17.", {"answer": "it is 17"}) == 1.0  # the answer as text


def test_graded_gives_partial_credit_for_true_steps():
    assert equation_steps("3 * 4 = 12. 12 + 5 = 18.") == (1, 2)
    assert equation_steps("3 * 4 = 12 + 5 = 17") == (2, 2)  # a chain holds two equations
    assert equation_steps("28 - 7 = 21. 28-7=22. 6 / 0 = 0. 2 x 3 = 6") == (2, 4)
    assert equation_steps("12.5 * 2 = 25. The answer is 25.") == (1, 1)  # 12.5, not 5
    assert equation_steps("The answer is 17.") == (0, 0)
    no_steps = graded("The answer is 18.")
    one_step = graded("3 * 4 = 12. 12 + 5 = 18. The answer is 18.")
    both_steps = graded("3 * 4 = 12. 12 + 6 = 18. The answer is 18.")
    wrong_steps = graded("3 * 4 = 11. 11 + 5 = 15. The answer is 18.")
    assert both_steps > one_step > no_steps == wrong_steps
    assert one_step - no_steps == pytest.approx(0.2) and both_steps - no_steps == pytest.approx(0.4)


def test_graded_is_bounded_and_rejects_rows_without_answer(tmp_path):
    texts = ["", "no", "0", "-99999", "1e9", "3 * 4 = 12", "17.0001", "The answer is 17.", "0 + 0 = 0. 0"]
    for answer in (17, 0, -5, 29997, 2.5):
        for text in texts:
            score = graded(text, {"answer": answer})
            assert 0.0 <= score <= 1.0 and (score == 1.0) == (final_number(text) == answer)
    with pytest.raises(ValueError, match="no 'answer'"):
        graded("5", {"prompt": "p"})
    with pytest.raises(ValueError, match="holds no number"):
        graded("5", {"answer": "seventeen"})
    data = write(tmp_path / "s.jsonl", ROWS)
    assert main(["data", "score", "--input", str(data), "--reward-fn", GRADED]) == 0
    (right, wrong), (right2, none) = scores(data)
    assert right == right2 == 1.0 and 0.0 < wrong < 1.0 and none == 0.0


def test_reward_model_and_reward_fn_are_exclusive_and_one_is_required(tmp_path, capsys):
    data = write(tmp_path / "s.jsonl", ROWS)
    assert main(["data", "score", "--input", str(data)]) == 2
    assert main(["data", "score", "--input", str(data), "--reward-fn", VERIFIER, "--reward-model", "x"]) == 2
    err = capsys.readouterr().err
    assert "one of the arguments --reward-model --reward-fn is required" in err
    assert "not allowed with argument" in err


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def boom(prompt, response, row):\n"
        "    if row['prompt_id'] == 'p2':\n"
        "        raise KeyError('gold')\n"
        "    return 1.0\n"
        "def text(prompt, response, row):\n"
        "    return 'high'\n"
        "def check_args(prompt, response, row):\n"
        "    assert prompt[-1]['role'] == 'user' and isinstance(response, str) and 'answer' in row\n"
        "    return len(response)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_colon", "expected MODULE:FUNCTION"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("my_rewards:missing", "module 'my_rewards' has no function 'missing'"),
        ("my_rewards:boom", "line 2: responses[0]: --reward-fn my_rewards:boom raised KeyError: 'gold'"),
        (
            "my_rewards:text",
            "line 1: responses[0]: --reward-fn my_rewards:text returned 'high' (str), expected a number",
        ),
    ],
)
def test_errors_name_the_row_and_what_is_wrong_and_write_nothing(
    tmp_path, capsys, user_module, spec, expected
):
    data = write(tmp_path / "s.jsonl", ROWS)
    before = data.read_text()
    assert main(["data", "score", "--input", str(data), "--reward-fn", spec]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert err.startswith("wrpo data score: ") and expected in err
    if "line" in expected:
        assert f"{data} line" in err
    assert data.read_text() == before


def test_the_function_gets_messages_text_and_the_row(tmp_path, user_module):
    data = write(tmp_path / "s.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "data",
                "score",
                "--input",
                str(data),
                "--reward-fn",
                "my_rewards:check_args",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert scores(out)[0] == [float(len(ROWS[0]["responses"][0]["text"])), 30.0]


def test_sample_and_build_carry_the_reference_answer(tmp_path):
    from wrpo.train.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "m", seed=1)
    prompts = write(tmp_path / "p.jsonl", [{"prompt_id": "p1", "prompt": "What is 2 + 3?", "answer": 5}])
    for name in ("src", "tgt"):
        out = str(tmp_path / f"{name}.jsonl")
        assert (
            main(
                [
                    "data",
                    "sample",
                    "--model",
                    str(model),
                    "--input",
                    str(prompts),
                    "--n",
                    "2",
                    "--max-new-tokens",
                    "4",
                    "--model-name",
                    name,
                    "--output",
                    out,
                ]
            )
            == 0
        )
    rows = [json.loads(line) for line in (tmp_path / "src.jsonl").read_text().splitlines()]
    assert rows[0]["answer"] == 5 and len(rows[0]["responses"]) == 2
    for name, texts in (("src", ["5", "5"]), ("tgt", ["5", "4"])):  # fixed texts: a kept quadruple
        path = tmp_path / f"{name}.jsonl"
        row = json.loads(path.read_text())
        row["responses"] = [{**r, "text": t} for r, t in zip(row["responses"], texts, strict=True)]
        write(path, [row])
        assert main(["data", "score", "--input", str(path), "--reward-fn", VERIFIER]) == 0
    out = tmp_path / "built.jsonl"
    assert (
        main(
            [
                "data",
                "build",
                "--sources",
                str(tmp_path / "src.jsonl"),
                "--targets",
                str(tmp_path / "tgt.jsonl"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    built = json.loads(out.read_text())
    assert built["answer"] == 5 and built["chosen_scores"] == [1.0, 1.0] and built["rejected_scores"] == [0.0]
