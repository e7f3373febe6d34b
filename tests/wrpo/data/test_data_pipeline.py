"""The data recipe of docs/data.md end to end on the tiny default: prompts -> sample -> score -> build
-> split -> ``wrpo sft`` -> ``wrpo train``, with tiny random models saved to a temporary directory
(scores mean nothing: this checks the plumbing)."""

from __future__ import annotations

import json

import pytest

from wrpo.cli.main import main
from wrpo.data.preference import load_preference_data
from wrpo.train.tiny import SAMPLE_DATA

N_PROMPTS, N_SAMPLES = 9, 3


def wrpo(*args) -> None:
    assert main([str(a) for a in args]) == 0, args


def test_sample_score_build_split_sft_train(tmp_path, capsys):
    d, models = tmp_path, tmp_path / "models"
    wrpo("data", "prompts", "--input", SAMPLE_DATA, "--limit", N_PROMPTS, "--output", d / "prompts.jsonl")
    for seed, name in enumerate(("src-a", "src-b", "target"), 1):
        wrpo("data", "tiny-model", "--output", models / name, "--seed", seed)
    wrpo("data", "tiny-model", "--reward-model", "--output", models / "reward")
    for name in ("src-a", "src-b", "target"):
        wrpo(
            "data",
            "sample",
            "--model",
            models / name,
            "--input",
            d / "prompts.jsonl",
            "--n",
            N_SAMPLES,
            "--max-new-tokens",
            8,
            "--output",
            d / f"{name}.jsonl",
        )
        wrpo("data", "score", "--input", d / f"{name}.jsonl", "--reward-model", models / "reward")
    capsys.readouterr()
    wrpo(
        "data",
        "build",
        "--sources",
        d / "src-a.jsonl",
        d / "src-b.jsonl",
        "--targets",
        d / "target.jsonl",
        "--output",
        d / "wrpo.jsonl",
    )
    report = capsys.readouterr().out
    kept = len(load_preference_data(d / "wrpo.jsonl", num_chosen=2))
    assert f"kept {kept} of {N_PROMPTS} prompts" in report and kept >= N_PROMPTS - 2, report
    rows = [json.loads(line) for line in (d / "wrpo.jsonl").read_text().splitlines()]
    assert all(r["source_models"][0] in ("src-a", "src-b") for r in rows)
    assert all(r["chosen_scores"][-1] > r["rejected_scores"][0] for r in rows)

    split = d / "split"
    wrpo(
        "data",
        "split",
        "--input",
        d / "wrpo.jsonl",
        "--sft-fraction",
        0.3333,
        "--seed",
        42,
        "--out-dir",
        split,
    )
    sft, pref = load_preference_data(split / "sft.jsonl"), load_preference_data(split / "pref.jsonl")
    assert len(sft) == round(kept * 0.3333) and len(sft) + len(pref) == kept

    steps = [
        "--max_steps",
        2,
        "--per_device_train_batch_size",
        2,
        "--logging_steps",
        1,
        "--save_strategy",
        "no",
    ]
    wrpo(
        "sft",
        "--model",
        models / "target",
        "--dataset",
        split / "sft.jsonl",
        "--output_dir",
        d / "sft",
        *steps,
    )
    wrpo("train", "--model", d / "sft", "--dataset", split / "pref.jsonl", "--output_dir", d / "wrpo", *steps)
    history = json.loads((d / "wrpo" / "trainer_state.json").read_text())["log_history"]
    assert [e["cur_alpha"] for e in history if "loss" in e] == pytest.approx([0.0, 0.05])  # alpha * g / N
    assert (d / "wrpo" / "model.safetensors").is_file()
