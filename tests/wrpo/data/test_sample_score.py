"""``wrpo data sample`` and ``wrpo data score`` with tiny random models saved to a temporary directory."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from wrpo.cli.main import main
from wrpo.data.construct import score as score_module
from wrpo.data.construct.score import reward_scores
from wrpo.train.tiny import save_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny_model(root / "policy", seed=1), save_tiny_model(
        root / "reward", seed=2, reward_model=True
    )


PROMPTS = [
    {"prompt_id": "a", "prompt": "What is 2 + 3?"},
    {"prompt_id": 7, "prompt": {"role": "user", "content": "Compute 4 * 5."}},
    {
        "prompt_id": "c",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
    },
]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_writes_n_unscored_responses_per_prompt_deterministically(tmp_path, models, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    args = [
        "data",
        "sample",
        "--model",
        str(models[0]),
        "--input",
        str(prompts),
        "--n",
        "3",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
        "--model-name",
        "src-a",
    ]
    assert main(args) == 0
    out = tmp_path / "samples-src-a.jsonl"  # the default output
    rows = read(out)
    assert [(r["prompt_id"], r["prompt"]) for r in rows] == [(p["prompt_id"], p["prompt"]) for p in PROMPTS]
    for row in rows:
        assert len(row["responses"]) == 3
        assert all(
            r["model"] == "src-a" and r["score"] is None and isinstance(r["text"], str)
            for r in row["responses"]
        )
    assert main([*args, "--output", str(tmp_path / "again.jsonl")]) == 0
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()
    assert main([*args, "--output", str(tmp_path / "seed1.jsonl"), "--seed", "1"]) == 0
    assert (tmp_path / "seed1.jsonl").read_text() != out.read_text()
    assert "3 prompts x 3 samples" in capsys.readouterr().out


def sample_rows():
    return [
        {
            "prompt_id": "a",
            "prompt": "What is 2 + 3?",
            "note": "kept",
            "responses": [{"model": "m", "text": "5", "score": None}, {"model": "m", "text": "2 + 3 = 5."}],
        },
        {
            "prompt_id": "b",
            "prompt": [{"role": "user", "content": "Compute 4 * 5."}],
            "responses": [
                {"text": "20", "score": 3.0},
                {"text": "It is 4 * 5 = 20, so the answer is 20."},
                {"text": ""},
            ],
        },
    ]


def test_score_fills_every_score_in_place_keeping_other_keys(tmp_path, models, capsys):
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sample_rows()))
    assert main(["data", "score", "--input", str(data), "--reward-model", str(models[1])]) == 0
    assert "5 responses scored" in capsys.readouterr().out
    rows = read(data)
    assert rows[0]["note"] == "kept" and [r["prompt_id"] for r in rows] == ["a", "b"]
    scores = [r["score"] for row in rows for r in row["responses"]]
    assert len(scores) == 5 and all(isinstance(s, float) for s in scores) and len(set(scores)) == 5
    texts = [[r["text"] for r in row["responses"]] for row in rows]
    assert texts == [[r["text"] for r in row["responses"]] for row in sample_rows()]


def test_batched_scores_equal_one_by_one_scores(models):
    """Right padding in a batch does not change any reward: the score is read at each last real token."""
    tokenizer = AutoTokenizer.from_pretrained(models[1])
    model = AutoModelForSequenceClassification.from_pretrained(models[1]).eval()
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in [("Hi?", "Hello there, how can I help you today?"), ("2 + 2?", "4"), ("3 * 3?", "9.")]
    ]
    batched = reward_scores(model, tokenizer, conversations, batch_size=3, max_length=512)
    single = reward_scores(model, tokenizer, conversations, batch_size=1, max_length=512)
    assert batched == pytest.approx(single, abs=1e-5)
    with torch.no_grad():
        ids = tokenizer.apply_chat_template(
            conversations[1], tokenize=True, return_dict=True, return_tensors="pt"
        )
        assert model(**ids).logits[0, 0].item() == pytest.approx(single[1], abs=1e-6)


def test_a_failure_while_scoring_leaves_the_input_untouched(tmp_path, models, monkeypatch, capsys):
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sample_rows()))
    before = data.read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(score_module, "reward_scores", broken)
    with pytest.raises(RuntimeError):
        main(["data", "score", "--input", str(data), "--reward-model", str(models[1])])
    assert data.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]


def test_a_policy_is_refused_as_reward_model_and_a_missing_dir_is_named(tmp_path, models, capsys):
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sample_rows()))
    assert main(["data", "score", "--input", str(data), "--reward-model", str(tmp_path / "nope")]) == 2
    assert "--reward-model" in capsys.readouterr().err
    code = main(["data", "score", "--input", str(data), "--reward-model", str(models[0])])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == (
        f"wrpo data score: --reward-model {models[0]}: 2 outputs, expected one (num_labels=1)"
    )
