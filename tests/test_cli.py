"""``wrpo train`` / ``wrpo sft`` end to end on the CPU with the bundled tiny default."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from wrpo.cli import main
from wrpo.tiny import SAMPLE_DATA

METRICS = [
    "loss", "rewards/chosen", "rewards/source_chosen", "rewards/target_chosen", "rewards/rejected",
    "rewards/accuracies", "rewards/source_accuracies", "rewards/pivot_accuracies", "rewards/margins",
    "logps/chosen", "logps/source_chosen", "logps/target_chosen", "logps/rejected", "cur_alpha",
    "logits/chosen", "logits/rejected",
]  # fmt: skip


def test_train_logs_every_metric_and_alpha_rises_as_the_official_schedule(tmp_path):
    out = tmp_path / "D"
    code = main(["train", "--dataset", str(SAMPLE_DATA), "--output_dir", str(out), "--max_steps", "6",
                 "--alpha", "0.1", "--alpha_schedule", "linear", "--beta", "0.1",
                 "--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none",
                 "--eval_rows", "0"])  # fmt: skip
    assert code == 0
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert [e["step"] for e in logs] == [1, 2, 3, 4, 5, 6]
    for entry in logs:
        assert set(METRICS) <= entry.keys(), set(METRICS) - entry.keys()
    alphas = [e["cur_alpha"] for e in logs]
    # the official schedule: alpha * g / N at global step g of N = 6
    assert alphas == pytest.approx([0.1 * g / 6 for g in range(6)], abs=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.num_parameters() > 0 and (out / "training_curves.png").stat().st_size > 0
    assert torch.isfinite(torch.tensor([e["loss"] for e in logs])).all()


def _write_with_bad_line_6(tmp_path, bad: str):
    good = SAMPLE_DATA.read_text().splitlines()[:8]
    lines = good[:5] + [bad] + good[5:]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "bad",
    [
        '{"prompt": "What is 1 + 1?", "chosen": ["2", "2"]}',  # missing rejected
        '{"prompt": "What is 1 + 1?", "chosen": [], "rejected": ["3"]}',  # empty chosen
        '{"prompt": "What is 1 + 1?", "chosen": ["2", "2"], "rejected": ["3"]',  # broken JSON
        '{"prompt": 42, "chosen": ["2", "2"], "rejected": ["3"]}',  # non-text prompt
    ],
    ids=["missing-rejected", "empty-chosen", "broken-json", "non-text-prompt"],
)
def test_malformed_line_exits_nonzero_naming_the_line_and_writes_no_model(tmp_path, capsys, bad):
    data = _write_with_bad_line_6(tmp_path, bad)
    out = tmp_path / "D"
    code = main(["train", "--dataset", str(data), "--output_dir", str(out), "--max_steps", "2"])
    err = capsys.readouterr().err
    assert code != 0
    assert "line 6" in err and str(data) in err
    assert "Traceback" not in err
    assert not (out / "model.safetensors").exists()


def test_sft_trains_on_the_first_chosen_response(tmp_path):
    out = tmp_path / "S"
    code = main(
        ["sft", "--output_dir", str(out), "--max_steps", "4", "--logging_steps", "1", "--eval_rows", "0"]
    )
    assert code == 0
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(logs) == 4 and all("nll_loss" in e for e in logs)
    assert logs[-1]["nll_loss"] < logs[0]["nll_loss"]


def test_yaml_config_then_flags_override(tmp_path):
    from wrpo.config import parse_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("beta: 0.05\nalpha: 0.2\nloss_type: simpo\nchosen_weights: [0.3, 0.7]\n")
    config = parse_config([str(cfg), "--alpha", "0.4", "--output_dir", str(tmp_path / "o")])
    assert (config.beta, config.alpha, config.loss_type, config.chosen_weights) == (
        0.05,
        0.4,
        "simpo",
        [0.3, 0.7],
    )


def test_unknown_loss_type_is_refused(capsys, tmp_path):
    code = main(["train", "--loss_type", "kto", "--output_dir", str(tmp_path / "o")])
    assert code == 2 and "loss_type" in capsys.readouterr().err


def test_precomputed_reference_logps_train_like_on_the_fly(tmp_path):
    """Reference = the starting policy either way: the same data and seed give the same losses."""
    losses = {}
    for flag in ("True", "False"):
        out = tmp_path / flag
        code = main(["train", "--output_dir", str(out), "--max_steps", "3", "--logging_steps", "1",
                     "--eval_rows", "0", "--precompute_ref_logps", flag,
                     "--ref_logps_cache", str(tmp_path / "cache")])  # fmt: skip
        assert code == 0
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        losses[flag] = [e["loss"] for e in history if "loss" in e]
    assert losses["True"] == pytest.approx(losses["False"], rel=1e-5)
    assert losses["True"][-1] != pytest.approx(losses["True"][0], rel=1e-6)  # training moved


def test_precomputed_reference_logps_are_cached_on_disk(tmp_path, monkeypatch):
    """The second run on the same data and reference model loads the cache instead of running the model."""
    from wrpo import pipeline

    cache = tmp_path / "cache"
    args = ["train", "--max_steps", "1", "--eval_rows", "4", "--precompute_ref_logps", "true",
            "--ref_logps_cache", str(cache), "--dataset", str(SAMPLE_DATA)]  # fmt: skip
    assert main([*args, "--output_dir", str(tmp_path / "a")]) == 0
    files = sorted(cache.glob("ref_logps-*.safetensors"))
    assert len(files) == 2  # train and eval rows
    computed = {}
    real = pipeline.compute_ref_logps

    def spy(ref_model, dataset, *a):
        computed[len(dataset)] = real(ref_model, dataset, *a)
        return computed[len(dataset)]

    monkeypatch.setattr(pipeline, "compute_ref_logps", spy)
    assert main([*args, "--output_dir", str(tmp_path / "b")]) == 0
    assert computed == {}  # both came from the cache
    assert main([*args, "--output_dir", str(tmp_path / "c"), "--seed_model", "1"]) == 0
    assert len(computed) == 2  # another reference model: recomputed
    assert len(list(cache.glob("ref_logps-*.safetensors"))) == 4
    assert not list(cache.glob(".*.part"))
