"""``wrpo train`` / ``wrpo sft`` end to end on the CPU with the bundled tiny default."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import METRIC_NAMES
from helpers.cli_runs import QUIET, cli, sample_rows
from transformers import AutoModelForCausalLM

from wrpo.cli.main import main
from wrpo.train.tiny import SAMPLE_DATA

METRICS = {"loss", *METRIC_NAMES}  # what the trainer logs each step


def test_train_logs_every_metric_and_alpha_rises_as_the_official_schedule(tmp_path):
    out = tmp_path / "D"
    code = main(
        cli(
            "train --max_steps 6 --alpha 0.1 --alpha_schedule linear --beta 0.1",
            "--per_device_train_batch_size 2 --logging_steps 1",
            QUIET,
            dataset=SAMPLE_DATA,
            output_dir=out,
        )
    )
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
    from wrpo.train.config import parse_config

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
        code = main(
            cli(
                "train --max_steps 3 --logging_steps 1 --eval_rows 0",
                output_dir=out,
                precompute_ref_logps=flag,
                ref_logps_cache=tmp_path / "cache",
            )
        )
        assert code == 0
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        losses[flag] = [e["loss"] for e in history if "loss" in e]
    assert losses["True"] == pytest.approx(losses["False"], rel=1e-5)
    assert losses["True"][-1] != pytest.approx(losses["True"][0], rel=1e-6)  # training moved


def test_precomputed_reference_logps_are_cached_on_disk(tmp_path, monkeypatch):
    """The second run on the same data and reference model loads the cache instead of running the model."""
    from wrpo.train import stage as pipeline

    cache = tmp_path / "cache"
    args = cli(
        "train --max_steps 1 --eval_rows 4 --precompute_ref_logps true",
        ref_logps_cache=cache,
        dataset=SAMPLE_DATA,
    )
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


# ---- the tiny default's settings, the effective config, --help ---------------------------------------------


def _user_rows(tmp_path, n=20):
    return sample_rows(tmp_path / "user.jsonl", n)


def test_user_dataset_trains_on_all_rows_with_the_documented_defaults(tmp_path, capsys):
    from transformers import TrainingArguments

    from wrpo.cli.main import stage_config

    data, out = _user_rows(tmp_path), tmp_path / "o"
    args = ["--dataset", str(data), "--max_steps", "3", "--output_dir", str(out)]
    config = stage_config("train", args)
    assert (config.eval_rows, config.beta, config.warmup_steps) == (0, 0.01, 0)
    assert config.learning_rate == TrainingArguments(output_dir=str(out)).learning_rate == 5e-5
    assert main(["train", *args, "--report_to", "none"]) == 0
    printed = capsys.readouterr().out
    block = printed.split("wrpo train: effective config\n")[1].split("\n\n")[0]
    lines = dict(line.strip().split("  ", 1) for line in block.splitlines() if line.startswith("  "))
    lines = {k: v.strip() for k, v in lines.items()}
    assert lines["data"] == f"{data}: train 20 rows, eval 0 rows"
    assert lines["K"].startswith("3 responses per prompt (2 chosen + 1 rejected)")
    assert (lines["beta"], lines["lr"]) == ("0.01", "5e-05 (linear, warmup 0)")
    assert "  batch           8 per device x 1 accumulation x 1 process = 8 global\n" in printed
    assert "  steps           3 optimizer steps (max_steps)\n" in printed
    assert "prefix sharing  o" in printed
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["log_history"][-1]["epoch"] == 1  # 8 + 8 + 4 rows: all 20
    assert "no step's metrics were logged" in printed  # --max_steps 3 < logging_steps: no empty table


def test_bundled_tiny_default_keeps_its_own_settings(tmp_path):
    from wrpo.cli.main import stage_config
    from wrpo.train.tiny import TINY_DEFAULTS

    out = ["--output_dir", str(tmp_path)]
    config = stage_config("train", out)
    for name, value in TINY_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert stage_config("train", [*out, "--beta", "0.3"]).beta == 0.3  # a flag still wins
    assert stage_config("sft", [*out, "--eval_rows", "0"]).eval_strategy == "no"
    for other in (["--dataset", str(SAMPLE_DATA)], ["--model", str(tmp_path / "m")]):
        config = stage_config("train", [*out, *other])
        assert (config.learning_rate, config.eval_rows, config.beta) == (5e-5, 0, 0.01), other


def test_effective_config_counts_epoch_steps_like_the_trainer(tmp_path):
    from wrpo.cli.main import stage_config
    from wrpo.train.effective_config import updates_per_epoch

    config = stage_config(
        "train",
        [
            "--output_dir",
            str(tmp_path),
            "--per_device_train_batch_size",
            "7",
            "--gradient_accumulation_steps",
            "3",
        ],
    )
    assert updates_per_epoch(config, 540) == 26  # 78 batches of <= 7 rows, 3 per optimizer step
    config.dataloader_drop_last = True
    assert updates_per_epoch(config, 540) == 26 and updates_per_epoch(config, 20) == 1


def test_no_pin_memory_without_a_gpu(tmp_path):
    from wrpo.train.config import parse_config

    config = parse_config(["--output_dir", str(tmp_path)])
    assert config.dataloader_pin_memory is torch.cuda.is_available()
    assert parse_config(["--output_dir", str(tmp_path), "--use_cpu", "true"]).dataloader_pin_memory is False


def _option_blocks(text: str) -> dict[str, str]:
    """``--name`` -> its help lines, for the options of an argparse help text."""
    blocks, name = {}, None
    for line in text.splitlines():
        if line.startswith("  --"):
            name = line.split()[0].rstrip(",")
            blocks[name] = line
        elif name and line.startswith("      "):
            blocks[name] += " " + line.strip()
        else:
            name = None
    return blocks


def test_help_lists_the_wrpo_options_first_each_with_a_description_and_its_default(capsys):
    from wrpo.train.config import WRPOConfig, WRPOOptions

    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) < 120 and "--help-all" in text
    blocks = _option_blocks(text.split("WRPO options:")[1])
    own = [*WRPOConfig.__annotations__, *WRPOOptions.__annotations__]  # wrpo train's, then the shared ones
    assert list(blocks) == [f"--{name}" for name in own]
    for block in blocks.values():
        described = block.split(None, 1)[1].split("(default:")[0]
        assert len(described.strip()) > 10 and block.count("(default:") == 1, block
    assert "(default: 0)" in blocks["--eval_rows"] and "(default: 0.01)" in blocks["--beta"]
    assert "--learning_rate" not in text


def test_help_all_adds_the_training_arguments_after_the_wrpo_options(capsys):
    assert main(["sft", "--help-all"]) == 0
    text = capsys.readouterr().out
    assert text.index("--model") < text.index("--max_length") < text.index("--learning_rate")
    assert "--beta" not in text  # preference-only: wrpo sft does not read it
    blocks = _option_blocks(text)
    assert "(default: 5e-05)" in blocks["--learning_rate"]
    assert "(default: outputs/wrpo-sft)" in blocks["--output_dir"]


def test_chosen_given_as_a_string_says_a_list_was_expected(tmp_path, capsys):
    lines = SAMPLE_DATA.read_text().splitlines()[:4]
    row = json.loads(lines[2])
    row["chosen"] = row["chosen"][0]["content"]
    lines[2] = json.dumps(row)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    assert main(["train", "--dataset", str(data), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{data} line 3: 'chosen' is a string, but a list of responses was expected (line 1 has 2" in err
    assert '{"prompt": ..., "chosen": [response, response], "rejected": [response]}' in err


def test_summary_of_a_run_that_logged_no_step():
    from wrpo.train.curves import summary

    text = summary([{"step": 1, "train_loss": 0.6931, "train_runtime": 1.0}])
    assert "no step's metrics were logged" in text and "0.6931" in text
    table = summary([{"step": 1, "loss": 0.5}, {"step": 2, "train_loss": 0.5}])
    assert table.splitlines()[1].split() == ["loss", "0.5000", "0.5000"]
