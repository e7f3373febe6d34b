"""``make fusion-demo QUICK=1``: the whole "Does it fuse?" pipeline end to end at its smallest (1 seed)."""

from __future__ import annotations

import json

from wrpo.fusion_demo.__main__ import main
from wrpo.fusion_demo.tasks import FAMILIES, all_problems, split_problems
from wrpo.tiny import build_tiny_tokenizer


def test_problems_are_disjoint_deterministic_and_expressible():
    tokenizer = build_tiny_tokenizer()
    for seed in (0, 1):
        train, held = split_problems(seed, 20)
        assert split_problems(seed, 20) == (train, held)
        for f in FAMILIES:
            assert len(held[f]) == 20 and not {p.key for p in held[f]} & {p.key for p in train[f]}
            assert len(train[f]) + 20 == len(all_problems(f))
    for f in FAMILIES:
        for p in all_problems(f)[:50]:
            assert tokenizer.unk_token_id not in tokenizer(p.question + p.solution)["input_ids"]
            assert p.solution.endswith(f"The answer is {p.answer}.")


def test_quick_demo_writes_results_and_plot(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    methods = results["methods"]
    expected = {
        "target",
        "target-sft",
        "target-sft-dpo",
        "target-sft-wrpo",
        *(f"source-{f}" for f in FAMILIES),
    }
    assert expected <= set(methods)
    for m in methods.values():
        assert len(m["accuracy"]) == 1 and set(m["by_family"]) == set(FAMILIES)
        values = m["accuracy"] + [v for per_seed in m["by_family"].values() for v in per_seed]
        assert all(0.0 <= v <= 1.0 for v in values)
    assert results["config"]["quick"] is True and results["config"]["seeds"] == [0]
    assert (tmp_path / "results.png").stat().st_size > 0
