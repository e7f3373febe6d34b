"""``make fusion-demo QUICK=1``: the whole "Does it fuse?" pipeline end to end at its smallest (1 seed), with
the 0/1 verifier and with the graded reward; the report's intervals and the jobs' thread count."""

from __future__ import annotations

import json
import math

import pytest
from fusion_demo import report
from fusion_demo.__main__ import main
from fusion_demo.tasks import FAMILIES, all_problems, split_problems

from wrpo.train.tiny import build_tiny_tokenizer


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


def test_quick_graded_demo_records_reward_data_machine_and_intervals(tmp_path):
    assert main(["--quick", "--reward", "graded", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    config = results["config"]
    assert (
        config["reward"] == "graded"
        and config["reward_fn"] == "wrpo.data.construct.verifiers:arithmetic_graded"
    )
    assert results["seeds"] == config["seeds"] == [0]
    (stats,) = results["preference_stats"]  # one per seed
    assert stats["seed"] == 0 and stats["offered"] == results["data"][0]["pref_prompts"]
    assert 0 < stats["kept"] == results["data"][0]["pref_rows"] <= stats["offered"]
    assert 0 <= stats["ws_correct_wt_wrong"] <= min(stats["ws_correct"], stats["kept"])
    assert stats["ws_correct_wt_wrong_fraction"] == round(stats["ws_correct_wt_wrong"] / stats["kept"], 4)
    machine = results["machine"]
    assert machine["cpu"] and machine["torch_threads_per_job"] == config["threads"] == 1
    assert machine["parallel_jobs"] == config["parallel"]
    for m in results["methods"].values():
        assert m["interval"] == {"n": 1, "mean": m["accuracy"][0], "sd": None, "ci95": None}
        assert set(m["by_family_interval"]) == set(FAMILIES)
    paired = results["paired"]["target-sft-wrpo - target-sft-dpo"]
    methods = results["methods"]
    diff = methods["target-sft-wrpo"]["accuracy"][0] - methods["target-sft-dpo"]["accuracy"][0]
    assert paired["per_seed"] == [diff] and paired["interval"]["n"] == 1
    logs = list((tmp_path / "seed0" / "logs").glob("*.log"))
    assert logs and all(log.read_text().splitlines()[1] == "torch threads: 1" for log in logs)
    assert "n=1" in report.table(results)


def test_t_quantiles_and_intervals():
    def coverage(t, df, steps=20000):  # P(|T| <= t) by Simpson's rule on the t density
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        h = t / steps
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
        return 2 * h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    for df in (1, 2, 4, 10, 30, 31, 60, 200):
        assert coverage(report.t975(df), df) == pytest.approx(0.95, abs=2e-5)
    iv = report.interval([0.1, 0.2, 0.3])
    assert iv["mean"] == pytest.approx(0.2) and iv["sd"] == pytest.approx(0.1)
    half = 4.3027 * 0.1 / math.sqrt(3)
    assert iv["ci95"] == pytest.approx([0.2 - half, 0.2 + half])
    assert report.interval([0.5]) == {"n": 1, "mean": 0.5, "sd": None, "ci95": None}


def test_report_pairs_wrpo_with_dpo_per_seed_and_lists_every_seed():
    def run(dpo, wrpo):
        acc = {
            "target-sft-dpo": dpo,
            "target-sft-wrpo": wrpo,
            "target-sft-wrpo-beta0.5": wrpo,
            "target-sft-dpo-beta0.5": dpo - 0.1,
        }
        methods = {k: {"accuracy": v, "by_family": {"addsub": v}} for k, v in acc.items()}
        return {
            "methods": methods,
            "data": {},
            "preference_stats": {
                "offered": 4,
                "kept": 2,
                "ws_correct": 1,
                "wt_correct": 1,
                "ws_correct_wt_wrong": 1,
                "ws_correct_wt_wrong_fraction": 0.5,
            },
        }

    results = report.collect([run(0.2, 0.3), run(0.4, 0.4), run(0.1, 0.3)], {"seeds": [3, 5, 7]})
    paired = results["paired"]
    assert set(paired) == {
        "target-sft-wrpo - target-sft-dpo",
        "target-sft-wrpo-beta0.5 - target-sft-dpo-beta0.5",
    }
    main_pair = paired["target-sft-wrpo - target-sft-dpo"]
    assert main_pair["per_seed"] == pytest.approx([0.1, 0.0, 0.2])
    assert main_pair["interval"]["mean"] == pytest.approx(0.1) and main_pair["interval"]["ci95"][0] < 0
    assert [s["seed"] for s in results["preference_stats"]] == [3, 5, 7]
    text = report.table(results)
    assert "seed 3 | seed 5 | seed 7" in text and "+0.100 [" in text and "1 (50.0%)" in text


@pytest.mark.parametrize(("parallel", "threads"), [(1, 1), (2, 2)])
def test_every_job_runs_with_the_configured_threads_whatever_parallel_is(tmp_path, parallel, threads):
    import torch
    from fusion_demo.jobs import run_wrpo
    from tqdm.auto import tqdm

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": str(i), "prompt": f"q{i}"}) + "\n" for i in range(6)))
    jobs = {
        f"split{i}": ["data", "split", "--input", str(prompts), "--out-dir", str(tmp_path / f"s{i}")]
        for i in range(2)
    }
    before = torch.get_num_threads()
    with tqdm(total=2, disable=True) as bar:
        run_wrpo(jobs, tmp_path / "logs", bar, parallel=parallel, threads=threads)
    assert torch.get_num_threads() == before  # the in-process jobs restore this process's count
    for name in jobs:
        assert (tmp_path / "logs" / f"{name}.log").read_text().splitlines()[1] == f"torch threads: {threads}"
        assert (tmp_path / f"s{name[-1]}" / "pref.jsonl").exists()
